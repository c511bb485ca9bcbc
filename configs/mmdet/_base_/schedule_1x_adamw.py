# COCO instance data, 12 epochs, AdamW lr 1e-4 / wd 0.05 (the papers' and mmdet's Swin recipe), no weight
# decay on norms, relative-position / agent bias tables and NAT's rpb.
_base_ = [
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

no_decay = dict(decay_mult=0.)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={
        'norm': no_decay,
        'rpb': no_decay,
        'relative_position_bias_table': no_decay,
        'an_bias': no_decay, 'na_bias': no_decay, 'ah_bias': no_decay,
        'aw_bias': no_decay, 'ha_bias': no_decay, 'wa_bias': no_decay,
    }))

# Total batch 16 (8 GPUs x 2 images), as in the papers; mmengine rescales lr for other totals with
# --auto-scale-lr.
auto_scale_lr = dict(enable=False, base_batch_size=16)
