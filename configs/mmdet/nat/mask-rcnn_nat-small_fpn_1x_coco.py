# nat_small (nat-small). Knobs from SHI-Labs/Neighborhood-Attention-Transformer detection/configs/nat,
# segmentation/configs/nat.
_base_ = ['../_base_/mask_rcnn_attnzoo_fpn.py', '../_base_/schedule_1x_adamw.py']

model = dict(
    backbone=dict(
        model_name='nat_small',
        drop_path_rate=0.35,
        init_cfg=dict(type='Pretrained', checkpoint='https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
