# dinat_small (dinat-small). Knobs from SHI-Labs/Neighborhood-Attention-Transformer detection/configs/dinat,
# segmentation/configs/dinat.
_base_ = ['../_base_/mask_rcnn_attnzoo_fpn.py', '../_base_/schedule_1x_adamw.py']

model = dict(
    backbone=dict(
        model_name='dinat_small',
        drop_path_rate=0.35,
        model_kwargs={'dilations': [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7],
               [1, 3, 1, 3, 1]]},
        init_cfg=dict(type='Pretrained', checkpoint='https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_small_in1k_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
