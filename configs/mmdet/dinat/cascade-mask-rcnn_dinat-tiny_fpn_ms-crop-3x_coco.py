# dinat_tiny (dinat-tiny), Cascade Mask R-CNN: its 3x Mask R-CNN config with the cascade heads of
# ../_base_/cascade_mask_rcnn_attnzoo_fpn.py.
_base_ = ['./mask-rcnn_dinat-tiny_fpn_ms-crop-3x_coco.py', '../_base_/cascade_mask_rcnn_attnzoo_fpn.py']

model = _base_.cascade_mask_rcnn
