# agent_pvt_s (agent-pvt-small), 3x: its 1x config trained 36 epochs with multi-scale + crop augmentation
# (../_base_/ms_crop_3x.py).
_base_ = ['./mask-rcnn_agent-pvt-small_fpn_1x_coco.py', '../_base_/ms_crop_3x.py']

max_epochs = _base_.ms_crop_3x.max_epochs
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = _base_.ms_crop_3x.param_scheduler
train_pipeline = _base_.ms_crop_3x.train_pipeline
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
