# nat_tiny (nat-tiny). Knobs from SHI-Labs/Neighborhood-Attention-Transformer detection/configs/nat,
# segmentation/configs/nat.
_base_ = ['../_base_/upernet_attnzoo_160k_ade20k_512x512.py']

model = dict(
    backbone=dict(
        model_name='nat_tiny',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth')),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
