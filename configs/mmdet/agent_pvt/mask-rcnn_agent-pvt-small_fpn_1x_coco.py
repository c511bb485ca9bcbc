# agent_pvt_s (agent-pvt-small). Knobs from LeapLabTHU/Agent-Attention
# downstream/detection/configs/agent_pvt/*_mrcnn_1x_12-16-28-28.py (AdamW 2e-4, wd 1e-4); the official segmentation uses
# Semantic FPN, UPerNet here uses Swin's recipe.
_base_ = ['../_base_/mask_rcnn_attnzoo_fpn.py', '../_base_/schedule_1x_adamw.py']

model = dict(
    backbone=dict(
        model_name='agent_pvt_s',
        drop_path_rate=0.1,
        model_kwargs={'agent_shapes': [(12, 12), (16, 16), (28, 28), (28, 28)]},
        init_cfg=dict(type='Pretrained', checkpoint='https://cloud.tsinghua.edu.cn/f/36b8be9a8863456685a3/?dl=1')),
    neck=dict(in_channels=[64, 128, 320, 512]))

optim_wrapper = dict(optimizer=dict(lr=0.0002, weight_decay=0.0001))
