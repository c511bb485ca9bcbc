# focalnet_s_lrf (focalnet-small). Knobs from microsoft/FocalNet detection/configs/focalnet/*_lrf.py (focal windows 9,
# levels 3; conv kernels zero-padded from the 3-window ImageNet weights).
_base_ = ['../_base_/mask_rcnn_attnzoo_fpn.py', '../_base_/schedule_1x_adamw.py']

model = dict(
    backbone=dict(
        model_name='focalnet_s_lrf',
        drop_path_rate=0.3,
        model_kwargs={'focal_windows': [9, 9, 9, 9]},
        init_cfg=dict(type='Pretrained', checkpoint='https://github.com/microsoft/FocalNet/releases/download/v1.0.0/focalnet_small_lrf.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
