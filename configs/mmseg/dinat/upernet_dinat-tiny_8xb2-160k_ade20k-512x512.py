# dinat_tiny (dinat-tiny). Knobs from SHI-Labs/Neighborhood-Attention-Transformer detection/configs/dinat,
# segmentation/configs/dinat.
_base_ = ['../_base_/upernet_attnzoo_160k_ade20k_512x512.py']

model = dict(
    backbone=dict(
        model_name='dinat_tiny',
        drop_path_rate=0.3,
        model_kwargs={'dilations': [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4],
               [1, 2, 1, 2, 1]]},
        init_cfg=dict(type='Pretrained', checkpoint='https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_tiny_in1k_224.pth')),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
