# nat_small (nat-small). Knobs from SHI-Labs/Neighborhood-Attention-Transformer detection/configs/nat,
# segmentation/configs/nat.
_base_ = ['../_base_/upernet_attnzoo_160k_ade20k_512x512.py']

model = dict(
    backbone=dict(
        model_name='nat_small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='https://shi-labs.com/projects/nat/checkpoints/CLS/nat_small.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
