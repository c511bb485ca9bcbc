# Cascade Mask R-CNN + FPN (mmdet's own base) with the 4conv-1fc GIoU box heads that the Swin, NAT/DiNAT,
# FocalNet and Agent-Swin papers used for their 3x Cascade results.
_base_ = ['mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py']

custom_imports = dict(imports=['attnzoo.openmmlab'], allow_failed_imports=False)

head_norm_cfg = dict(type='SyncBN', requires_grad=True)  # plain BN on one process (torch falls back)


def _bbox_head(stds):
    return dict(
        type='ConvFCBBoxHead',
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=head_norm_cfg,
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnZooBackbone',
        model_name=None,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        out_norms=True),
    roi_head=dict(bbox_head=[
        _bbox_head([0.1, 0.1, 0.2, 0.2]),
        _bbox_head([0.05, 0.05, 0.1, 0.1]),
        _bbox_head([0.033, 0.033, 0.067, 0.067]),
    ]))
