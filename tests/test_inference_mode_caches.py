"""Shape-keyed caches filled during an ``inference_mode`` forward must not poison a later training step.

(The FlexAttention baseline of the benchmarks keeps one such cache. A cache tensor created under inference
mode cannot be saved for backward: validating a model, then training it, would fail with "Inference tensors
cannot be saved for backward".)
"""
import pytest
import torch

from benchmarks.na2d_flex import _block_mask, na2d_flex


def _tensors(block_mask) -> list[torch.Tensor]:
    return [t for t in vars(block_mask).values() if isinstance(t, torch.Tensor)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_made_in_inference_mode_is_a_normal_tensor():
    _block_mask.cache_clear()
    q = torch.randn(1, 9, 11, 2, 8)
    with torch.inference_mode():
        na2d_flex(q, q, q, (3, 3), (2, 2), None, 8 ** -0.5)
    cached = _block_mask(9, 11, (3, 3), (2, 2), "cpu")
    assert _tensors(cached) and not any(t.is_inference() for t in _tensors(cached))


@pytest.mark.gpu
def test_gpu_flex_trains_after_inference_mode_forward():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 16, 16, 2, 16, device="cuda", generator=g) for _ in range(3))
    rpb = torch.randn(2, 13, 13, device="cuda", generator=g)
    with torch.inference_mode():
        na2d_flex(q, k, v, (7, 7), (2, 2), rpb, 16 ** -0.5)
    q.requires_grad_(True)
    rpb.requires_grad_(True)
    na2d_flex(q, k, v, (7, 7), (2, 2), rpb, 16 ** -0.5).sum().backward()
    assert torch.isfinite(q.grad).all() and rpb.grad.abs().sum() > 0
