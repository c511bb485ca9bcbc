# biformer_small Mask R-CNN on the pasted Fashion-MNIST detection set: its 1x config with the data, image size and
# short schedule of ../_base_/fashion_det_finetune.py. tools/finetune.py starts it from its own classification
# checkpoint (init_cfg); run as it is, it starts from the 1x config's ImageNet checkpoint.
_base_ = ['../biformer/mask-rcnn_biformer-small_fpn_1x_coco.py', '../_base_/fashion_det_finetune.py']

model = _base_.fashion_det.model
data_root = _base_.fashion_det.data_root
max_epochs = _base_.fashion_det.max_epochs
train_pipeline = _base_.fashion_det.train_pipeline
test_pipeline = _base_.fashion_det.test_pipeline
train_dataloader = _base_.fashion_det.train_dataloader
val_dataloader = _base_.fashion_det.val_dataloader
test_dataloader = val_dataloader
val_evaluator = _base_.fashion_det.val_evaluator
test_evaluator = val_evaluator
train_cfg = _base_.fashion_det.train_cfg
param_scheduler = _base_.fashion_det.param_scheduler
default_hooks = _base_.fashion_det.default_hooks
log_processor = _base_.fashion_det.log_processor
optim_wrapper = _base_.fashion_det.optim_wrapper
