# agent_pvt_t (agent-pvt-tiny). Knobs from LeapLabTHU/Agent-Attention
# downstream/detection/configs/agent_pvt/*_mrcnn_1x_12-16-28-28.py (AdamW 2e-4, wd 1e-4); the official segmentation uses
# Semantic FPN, UPerNet here uses Swin's recipe.
_base_ = ['../_base_/upernet_attnzoo_160k_ade20k_512x512.py']

model = dict(
    backbone=dict(
        model_name='agent_pvt_t',
        drop_path_rate=0.1,
        model_kwargs={'agent_shapes': [(12, 12), (16, 16), (28, 28), (28, 28)]},
        init_cfg=dict(type='Pretrained', checkpoint='https://cloud.tsinghua.edu.cn/f/13fdf0e0a7c5498c934f/?dl=1')),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))
