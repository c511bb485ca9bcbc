# davit_t (davit-tiny). Knobs from DaViT paper: Swin's Mask R-CNN / UPerNet recipes; windows pad to 7.
_base_ = ['../_base_/upernet_attnzoo_160k_ade20k_512x512.py']

model = dict(
    backbone=dict(
        model_name='davit_t',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/davit_tiny.msft_in1k')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
