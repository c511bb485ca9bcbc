# maxvit_t (maxvit-tiny). Knobs from no official MaxViT dense release: Swin's recipe (mmdet/mmseg Swin configs); windows
# pad to 7.
_base_ = ['../_base_/mask_rcnn_attnzoo_fpn.py', '../_base_/schedule_1x_adamw.py']

model = dict(
    backbone=dict(
        model_name='maxvit_t',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/maxvit_tiny_tf_224.in1k')),
    neck=dict(in_channels=[64, 128, 256, 512]))
