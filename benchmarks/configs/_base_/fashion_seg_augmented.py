# mmseg's usual training augmentation for the pasted segmentation set (scale jitter 0.5-2, crops that keep no class
# above 75% of the crop, flips, photometric distortion) instead of the shipped recipe's flips alone: a variant of
# benchmarks/finetune_levers.py. tools/finetune.py applies its image size to the RandomResize scale and the
# RandomCrop size as it does to Resize.
augmented_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(192, 160), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=(160, 192), cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
