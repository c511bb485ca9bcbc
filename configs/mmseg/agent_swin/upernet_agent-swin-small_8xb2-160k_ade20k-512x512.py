# agent_swin_s (agent-swin-small). Knobs from LeapLabTHU/Agent-Attention
# downstream/detection/configs/agent_swin/*_9-12-14-7.py,
# downstream/segmentation/configs/agent_swin/upernet_agent_swin_*_9-12-14-7.py.
_base_ = ['../_base_/upernet_attnzoo_160k_ade20k_512x512.py']

model = dict(
    backbone=dict(
        model_name='agent_swin_s',
        drop_path_rate=0.3,
        model_kwargs={'agent_shapes': [(9, 9), (12, 12), (14, 14), (7, 7)]},
        init_cfg=dict(type='Pretrained', checkpoint='https://cloud.tsinghua.edu.cn/f/f607172c9fea4d6e99bb/?dl=1')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
