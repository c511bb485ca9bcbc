"""attnzoo.blocks.tokens: blocks that hold their residual stream as tokens compute what the 4-D NHWC forwards
(kept in benchmarks.tokens_layout) computed, and torch.compile then stores no NHWC map with H innermost."""
import contextlib

import pytest
import timm
import torch
from torch import nn

import attnzoo  # noqa: F401
from attnzoo.backbones.focalnet import FocalNetBlock
from benchmarks.layout_census import h_innermost_maps
from benchmarks.tokens_layout import NHWC_FORWARDS, main


@contextlib.contextmanager
def _nhwc_forwards(on: bool = True):
    shipped = {cls: cls.forward for cls in NHWC_FORWARDS}
    if on:
        for cls, fn in NHWC_FORWARDS.items():
            cls.forward = fn
    try:
        yield
    finally:
        for cls, fn in shipped.items():
            cls.forward = fn


@pytest.mark.parametrize("name", ["nat_mini", "davit_t", "focalnet_t_lrf", "biformer_tiny", "agent_swin_t"])
def test_tokens_and_nhwc_forwards_agree(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 80)  # not a multiple of DaViT's windows at every stage: the padded path too
    with torch.no_grad():
        out = model(x)
        with _nhwc_forwards():
            ref = model(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()


class _StemAndBlocks(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, dim, 4, 4), nn.LayerNorm(dim)
        self.blocks = nn.Sequential(FocalNetBlock(dim), FocalNetBlock(dim))

    def forward(self, x):
        return self.blocks(self.norm(self.stem(x).permute(0, 2, 3, 1)))


@pytest.mark.slow
def test_compiled_blocks_store_no_map_with_h_innermost():
    """Inductor's layout optimisation gives a stored 4-D map feeding a convolution NCHW channels-last strides; on
    the NHWC baseline that is [B, 8, 12, 16] with stride 1 on H (the positive control), on tokens never."""
    from torch._inductor.utils import run_and_get_code

    found = {}
    for var in ("nhwc", "tokens"):
        torch._dynamo.reset()
        with _nhwc_forwards(var == "nhwc"), torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
            x = torch.randn(2, 3, 32, 48).to(memory_format=torch.channels_last)
            _, (code,) = run_and_get_code(torch.compile(_StemAndBlocks().eval()), x)
        found[var] = h_innermost_maps(code, nhwc_shape=(2, 8, 12, 16))
    assert found["nhwc"], "the NHWC baseline no longer gets H-innermost maps: revisit attnzoo.blocks.tokens"
    assert not found["tokens"], found["tokens"]


def test_tokens_layout_quick_report(tmp_path):
    rep = main(["--quick", "--variant", "tokens", "--models", "focalnet_t_srf", "--modes", "infer", "--repeats", "1",
                "--out", str(tmp_path)])
    (row,) = rep.rows
    assert row["twin"] == "focalnet_tiny_srf" and row["img_s"] > 0 and row["vs_twin"] > 0
    assert (tmp_path / "tokens_layout_tokens.json").exists()


def test_layout_census_counts_only_h_innermost_nhwc_maps():
    code = "\n".join([
        "buf1 = empty_strided_cuda((128, 56, 56, 96), (301056, 1, 5376, 56), torch.float32)",  # H innermost
        "buf2 = empty_strided_cuda((128, 56, 56, 96), (301056, 5376, 96, 1), torch.float32)",  # contiguous NHWC
        "buf3 = empty_strided_cuda((128, 96, 56, 56), (301056, 1, 5376, 96), torch.float32)",  # NCHW channels-last
        "buf4 = empty_strided_cuda((128, 56, 56, 1), (3136, 1, 56, 56), torch.float32)"])  # per-pixel statistics
    assert [m[0] for m in h_innermost_maps(code)] == ["buf1"]
