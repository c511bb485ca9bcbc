# 36 epochs with DETR-style multi-scale + random-crop training (as mmdet's Swin ms-crop-3x config and the
# NAT/DiNAT, FocalNet and Agent-Swin 3x configs), same optimizer as the 1x schedule.
_base_ = ['./schedule_1x_adamw.py']

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', keep_ratio=True,
                  scales=[(s, 1333) for s in range(480, 801, 32)])],
            [dict(type='RandomChoiceResize', keep_ratio=True, scales=[(400, 1333), (500, 1333), (600, 1333)]),
             dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
             dict(type='RandomChoiceResize', keep_ratio=True,
                  scales=[(s, 1333) for s in range(480, 801, 32)])],
        ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
