"""benchmarks/mmcv_ext_torchvision.py against mmcv's compiled extension: nms and RoIAlign forward/backward agree on
fresh random inputs (aligned or not, adaptive or fixed sampling), also through mmcv's own Python wrappers; what the
stand-in does not implement raises instead of computing something else."""
from __future__ import annotations

import importlib

import pytest
import torch

try:
    import torchvision  # noqa: F401
    from mmcv import _ext as compiled

    # the modules (mmcv.ops re-exports functions of the same names)
    mmcv_nms = importlib.import_module("mmcv.ops.nms")
    mmcv_roi_align = importlib.import_module("mmcv.ops.roi_align")
    # where the stand-in is installed as mmcv._ext there is nothing compiled to compare with
    _MISSING = "" if not compiled.__file__.endswith(".py") else f"mmcv._ext is not compiled ({compiled.__file__})"
except ImportError as e:
    _MISSING = f"needs torchvision and mmcv with compiled ops ({e}); `make test` installs the 'dense' extra"

pytestmark = [pytest.mark.dense, pytest.mark.skipif(bool(_MISSING), reason=_MISSING)]

from benchmarks import mmcv_ext_torchvision as shim  # noqa: E402


def random_boxes(n: int, size: float, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """``n`` boxes x1, y1, x2, y2 inside (and a little beyond) a ``size`` square, some thinner than a pixel."""
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * size * 1.1 - 0.05 * size
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * size / 2
    wh[: n // 8] *= 0.01
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_nms_matches_compiled(iou_threshold):  # float32: mmcv's CPU kernel takes nothing else
    gen = torch.Generator().manual_seed(int(iou_threshold * 10))
    boxes = random_boxes(300, 64.0, gen, torch.float32)
    scores = torch.randperm(300, generator=gen).float() / 300  # distinct: the order is defined
    expected = compiled.nms(boxes, scores, iou_threshold=iou_threshold, offset=0)
    got = shim.nms(boxes, scores, iou_threshold=iou_threshold, offset=0)
    assert 0 < len(got) < 300
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_nms_empty_and_offset():
    none = torch.zeros(0, 4)
    assert shim.nms(none, torch.zeros(0), iou_threshold=0.5, offset=0).numel() == 0
    with pytest.raises(NotImplementedError, match="offset must be 0, got 1"):
        shim.nms(torch.rand(3, 4), torch.rand(3), iou_threshold=0.5, offset=1)


def test_batched_nms_through_mmcv(monkeypatch):
    """mmcv.ops.batched_nms (RPN and test-time NMS of mmdet) with the stand-in gives the compiled result."""
    gen = torch.Generator().manual_seed(1)
    boxes = random_boxes(400, 100.0, gen, torch.float32)
    scores = torch.randperm(400, generator=gen).float() / 400
    idxs = torch.randint(0, 5, (400,), generator=gen)
    cfg = dict(type="nms", iou_threshold=0.6)
    dets, keep = mmcv_nms.batched_nms(boxes, scores, idxs, cfg)
    monkeypatch.setattr(mmcv_nms, "ext_module", shim)
    dets2, keep2 = mmcv_nms.batched_nms(boxes, scores, idxs, cfg)
    assert torch.equal(keep2, keep) and torch.equal(dets2, dets)


def roi_inputs(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 3, 13, 17, generator=gen, dtype=dtype)
    scale = 0.25
    rois = random_boxes(24, 17 / scale, gen, dtype)
    batch = torch.randint(0, 2, (24, 1), generator=gen).to(dtype)
    return feats, torch.cat([batch, rois], 1), scale, gen


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("out_size", [(7, 7), (5, 3)])
def test_roi_align_matches_compiled(aligned, sampling_ratio, out_size):
    feats, rois, scale, gen = roi_inputs(sampling_ratio + 10 * aligned + out_size[1])
    outputs = []
    for ext in (compiled, shim):
        out = feats.new_zeros(rois.shape[0], feats.shape[1], *out_size)  # as mmcv's wrapper hands it over
        ext.roi_align_forward(feats, rois, out, feats.new_zeros(0), feats.new_zeros(0), aligned_height=out_size[0],
                              aligned_width=out_size[1], spatial_scale=scale, sampling_ratio=sampling_ratio,
                              pool_mode=1, aligned=aligned)
        outputs.append(out)
    assert outputs[0].abs().sum() > 0
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)

    grad_out = torch.randn(outputs[0].shape, generator=gen, dtype=feats.dtype)
    grads = []
    for ext in (compiled, shim):
        grad = torch.zeros_like(feats)
        ext.roi_align_backward(grad_out, rois, feats.new_zeros(0), feats.new_zeros(0), grad,
                               aligned_height=out_size[0], aligned_width=out_size[1], spatial_scale=scale,
                               sampling_ratio=sampling_ratio, pool_mode=1, aligned=aligned)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_through_mmcv_float32(monkeypatch, aligned):
    """mmcv.ops.RoIAlign (mmdet's RoI extractor) forward and input gradient, float32, compiled vs stand-in."""
    feats, rois, scale, gen = roi_inputs(3, torch.float32)
    layer = mmcv_roi_align.RoIAlign((7, 7), spatial_scale=scale, sampling_ratio=0, aligned=aligned)
    grad_out = torch.randn(rois.shape[0], feats.shape[1], 7, 7, generator=gen)
    results = []
    for ext in (compiled, shim):
        monkeypatch.setattr(mmcv_roi_align, "ext_module", ext)
        x = feats.clone().requires_grad_()
        out = layer(x, rois)
        out.backward(grad_out)
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


def test_unsupported_raise():
    feats, rois, scale, _ = roi_inputs(0)
    out = feats.new_zeros(rois.shape[0], 3, 7, 7)
    with pytest.raises(NotImplementedError, match="pool_mode must be 1"):
        shim.roi_align_forward(feats, rois, out, out.clone(), out.clone(), aligned_height=7, aligned_width=7,
                               spatial_scale=scale, sampling_ratio=0, pool_mode=0, aligned=True)
    assert hasattr(shim, "deform_conv_forward")  # import mmcv.ops checks every op's functions
    with pytest.raises(NotImplementedError, match="mmcv._ext.deform_conv_forward"):
        shim.deform_conv_forward(feats)
    assert not hasattr(shim, "__path__")
