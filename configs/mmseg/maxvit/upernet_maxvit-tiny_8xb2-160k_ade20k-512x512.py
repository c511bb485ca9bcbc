# maxvit_t (maxvit-tiny). Knobs from no official MaxViT dense release: Swin's recipe (mmdet/mmseg Swin configs); windows
# pad to 7.
_base_ = ['../_base_/upernet_attnzoo_160k_ade20k_512x512.py']

model = dict(
    backbone=dict(
        model_name='maxvit_t',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/maxvit_tiny_tf_224.in1k')),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
