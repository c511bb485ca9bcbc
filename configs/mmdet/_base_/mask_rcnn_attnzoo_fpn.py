# Mask R-CNN + FPN (mmdet's own base) on an attnzoo backbone; a variant file names the model, its knobs,
# drop path, checkpoint and the FPN input widths.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']

custom_imports = dict(imports=['attnzoo.openmmlab'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnZooBackbone',
        model_name=None,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        out_norms=True))
