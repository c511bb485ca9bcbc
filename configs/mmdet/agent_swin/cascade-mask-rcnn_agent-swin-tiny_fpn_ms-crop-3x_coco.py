# agent_swin_t (agent-swin-tiny), Cascade Mask R-CNN: its 3x Mask R-CNN config with the cascade heads of
# ../_base_/cascade_mask_rcnn_attnzoo_fpn.py.
_base_ = ['./mask-rcnn_agent-swin-tiny_fpn_ms-crop-3x_coco.py', '../_base_/cascade_mask_rcnn_attnzoo_fpn.py']

model = dict(_base_.cascade_mask_rcnn, backbone=dict(drop_path_rate=0.2))
