# The 3x schedule as deltas over a 1x config: 36 epochs of DETR-style multi-scale + random-crop training (as
# mmdet's Swin ms-crop-3x config and the NAT/DiNAT, FocalNet and Agent-Swin 3x configs), same optimizer.
# mmengine refuses two bases that set one key, so a 3x config lists its 1x sibling and this file as bases and
# applies `ms_crop_3x` in five lines (see any *_ms-crop-3x_coco.py).
ms_crop_3x = dict(
    max_epochs=36,
    train_pipeline=[
        dict(type='LoadImageFromFile', backend_args=None),  # mmdet's coco_instance.py backend_args
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
    ],
    param_scheduler=[
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
        dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
    ])
