# davit_t (davit-tiny). Knobs from DaViT paper: Swin's Mask R-CNN / UPerNet recipes; windows pad to 7.
_base_ = ['../_base_/mask_rcnn_attnzoo_fpn.py', '../_base_/schedule_1x_adamw.py']

model = dict(
    backbone=dict(
        model_name='davit_t',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/davit_tiny.msft_in1k')),
    neck=dict(in_channels=[96, 192, 384, 768]))
