# biformer_small UPerNet on the pasted Fashion-MNIST segmentation set: its ADE20K config with the data, image size and
# short schedule of ../_base_/fashion_seg_finetune.py. tools/finetune.py starts it from its own classification
# checkpoint (init_cfg); run as it is, it starts from the ADE20K config's ImageNet checkpoint.
_base_ = ['../biformer/upernet_biformer-small_8xb2-160k_ade20k-512x512.py', '../_base_/fashion_seg_finetune.py']

model = _base_.fashion_seg.model
data_preprocessor = _base_.fashion_seg.data_preprocessor
crop_size = _base_.fashion_seg.crop_size
dataset_type = _base_.fashion_seg.dataset_type
data_root = _base_.fashion_seg.data_root
train_pipeline = _base_.fashion_seg.train_pipeline
test_pipeline = _base_.fashion_seg.test_pipeline
train_dataloader = _base_.fashion_seg.train_dataloader
val_dataloader = _base_.fashion_seg.val_dataloader
test_dataloader = val_dataloader
val_evaluator = _base_.fashion_seg.val_evaluator
test_evaluator = val_evaluator
train_cfg = _base_.fashion_seg.train_cfg
param_scheduler = _base_.fashion_seg.param_scheduler
default_hooks = _base_.fashion_seg.default_hooks
optim_wrapper = _base_.fashion_seg.optim_wrapper
