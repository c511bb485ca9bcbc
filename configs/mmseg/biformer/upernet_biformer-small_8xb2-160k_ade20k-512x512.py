# biformer_small (biformer-small). Knobs from rayleizhu/BiFormer
# object_detection/configs/coco/maskrcnn.1x.biformer_small.py,
# semantic_segmentation/configs/ade20k/upernet.biformer_small.py (no official tiny: drop path lowered one step).
_base_ = ['../_base_/upernet_attnzoo_160k_ade20k_512x512.py']

model = dict(
    backbone=dict(
        model_name='biformer_small',
        drop_path_rate=0.3,
        model_kwargs={'n_win': 8, 'topks': [1, 4, 16, -2]},
        init_cfg=dict(type='Pretrained', checkpoint='https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content')),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
