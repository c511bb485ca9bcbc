# The shipped biformer-small fine-tune config with the augmented training pipeline (benchmarks/finetune_levers.py).
_base_ = ['../../configs/mmseg/finetune/upernet_biformer-small_fashion-seg.py', '_base_/fashion_seg_augmented.py']

train_pipeline = _base_.augmented_train_pipeline
train_dataloader = dict(dataset=dict(pipeline=_base_.augmented_train_pipeline))
