# nat_tiny (nat-tiny). Knobs from SHI-Labs/Neighborhood-Attention-Transformer detection/configs/nat,
# segmentation/configs/nat.
_base_ = ['../_base_/mask_rcnn_attnzoo_fpn.py', '../_base_/schedule_1x_adamw.py']

model = dict(
    backbone=dict(
        model_name='nat_tiny',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
