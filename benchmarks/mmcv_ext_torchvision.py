"""A stand-in for mmcv's compiled ``mmcv._ext`` on torchvision's kernels (CPU and CUDA), for the fine-tuning benchmark.

mmcv 2.1.0 publishes no wheel with compiled ops for recent torch/CUDA builds, and compiling them takes long. Mask
R-CNN and UPerNet training and evaluation (``benchmarks/finetune.py``) reach only three of mmcv's ~200 extension
functions: ``nms`` (RPN proposals, test-time NMS) and ``roi_align_forward``/``roi_align_backward`` (box and mask
RoI features, mask targets). torchvision implements both ops with the same conventions (mmcv's and torchvision's
RoIAlign share their origin: ``aligned`` shifts boxes by half a pixel, ``sampling_ratio`` 0 picks
``ceil(roi_size / output_size)`` samples a bin) and ships CUDA kernels for them. ``tests/test_mmcv_ext_torchvision.py``
compares these functions with the compiled extension, number for number.

Installed as ``mmcv/_ext.py`` next to a build of mmcv without ops (``MMCV_WITH_OPS=0``, the ``mmcv-lite`` wheel).
``import mmcv.ops`` checks that the extension has every function of every op; the ones not implemented here
import fine and raise ``NotImplementedError`` naming the op when called, so nothing is computed by anything else.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)

STAND_IN = "n/a (mmcv ops on torchvision kernels: benchmarks/mmcv_ext_torchvision.py)"


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """Indices of the boxes kept, by decreasing score (mmcv's ``ext_module.nms``)."""
    if offset != 0:  # mmcv's legacy +1 box convention; torchvision has only the continuous one
        raise NotImplementedError(f"mmcv._ext.nms on torchvision: offset must be 0, got {offset}")
    return torch.ops.torchvision.nms(boxes, scores, float(iou_threshold))


def _check_roi_align(pool_mode: int, sampling_ratio: int) -> None:
    if pool_mode != 1:  # mmcv passes 0 for 'max', 1 for 'avg'; torchvision averages only
        raise NotImplementedError(f"mmcv._ext.roi_align on torchvision: pool_mode must be 1 ('avg'), got "
                                  f"{pool_mode} ('max' has no torchvision kernel)")
    if sampling_ratio < 0:
        raise ValueError(f"mmcv._ext.roi_align: sampling_ratio must be >= 0, got {sampling_ratio}")


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                      argmax_x: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                      sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """RoIAlign of ``rois`` ``[K, 5]`` (batch index, x1, y1, x2, y2) over ``input``, written into ``output``.

    ``argmax_y``/``argmax_x`` serve mmcv's max pooling only and stay untouched.
    """
    _check_roi_align(pool_mode, sampling_ratio)
    output.copy_(torch.ops.torchvision.roi_align(input, rois, float(spatial_scale), int(aligned_height),
                                                 int(aligned_width), int(sampling_ratio), bool(aligned)))


def roi_align_backward(grad_output: torch.Tensor, rois: torch.Tensor, argmax_y: torch.Tensor, argmax_x: torch.Tensor,
                       grad_input: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                       sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """Gradient of :func:`roi_align_forward` w.r.t. its input, accumulated into ``grad_input`` (as mmcv's kernel)."""
    _check_roi_align(pool_mode, sampling_ratio)
    n, c, h, w = grad_input.shape
    grad_input.add_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, float(spatial_scale), int(aligned_height), int(aligned_width), n, c, h, w,
        int(sampling_ratio), bool(aligned)))


def get_compiler_version() -> str:
    return STAND_IN


def get_compiling_cuda_version() -> str:
    return STAND_IN


def __getattr__(name: str) -> Callable[..., Any]:
    """Every other extension function: present (``import mmcv.ops`` checks them all), raising when called."""
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"mmcv._ext.{name}: this mmcv has no compiled ops and the torchvision stand-in "
                                  "(benchmarks/mmcv_ext_torchvision.py) implements only nms and roi_align; build "
                                  "mmcv with its ops (`make dense`) for this model")

    missing.__name__ = name
    return missing
