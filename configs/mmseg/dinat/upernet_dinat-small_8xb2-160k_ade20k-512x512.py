# dinat_small (dinat-small). Knobs from SHI-Labs/Neighborhood-Attention-Transformer detection/configs/dinat,
# segmentation/configs/dinat.
_base_ = ['../_base_/upernet_attnzoo_160k_ade20k_512x512.py']

model = dict(
    backbone=dict(
        model_name='dinat_small',
        drop_path_rate=0.5,
        model_kwargs={'dilations': [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4],
               [1, 2, 1, 2, 1]]},
        init_cfg=dict(type='Pretrained', checkpoint='https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_small_in1k_224.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
