"""DaViT: channel attention against a float64 reference and timm, checkpoint conversion, timm API."""
import math

import pytest
import timm
import torch
from timm.models import davit as timm_davit

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.backbones.davit import DaVit, checkpoint_filter_fn
from attnzoo.blocks import set_attention_backend
from attnzoo.blocks.channel import ChannelAttention
from benchmarks.saved_memory import count_step
from tests.helpers import assert_rel_l2
from tests.parity import (create_from_official, load_fixture, official_state_dict, parity_error,
                          save_official_checkpoint)

SMALL = dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 48, 64), num_heads=(2, 2, 4, 4), drop_path_rate=0.0)


def _randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights: fan-in scaled matrices, norm weights near 1, small biases."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.05 * r)
    return model.eval()


def _channel_attention_reference(x: torch.Tensor, m: ChannelAttention) -> torch.Tensor:
    """The official DaViT formula in float64: softmax(scale * kᵀ v) @ qᵀ per head."""
    B, H, W, C = x.shape
    p = {k: v.double() for k, v in m.state_dict().items()}
    qkv = x.double().reshape(B, H * W, C) @ p["qkv.weight"].T + p["qkv.bias"]
    q, k, v = qkv.reshape(B, H * W, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    attn = ((k * m.head_dim ** -0.5).transpose(-1, -2) @ v).softmax(-1)
    out = (attn @ q.transpose(-1, -2)).transpose(-1, -2).transpose(1, 2).reshape(B, H, W, C)
    return out @ p["proj.weight"].T + p["proj.bias"]


@pytest.mark.parametrize("dim,heads,size", [(24, 3, (7, 9)), (16, 1, (1, 5)), (64, 4, (13, 6))])
def test_channel_attention_matches_float64_reference(dim, heads, size):
    m = _randomize_(ChannelAttention(dim, heads))
    x = torch.randn(2, *size, dim)
    ref = _channel_attention_reference(x, m)
    assert_rel_l2(m(x), ref, name="fp32")
    assert_rel_l2(m.double()(x.double()), ref, name="fp64")
    xg = x.double().requires_grad_()
    g = torch.randn_like(ref)
    (dx,) = torch.autograd.grad((m(xg) * g).sum(), xg)
    (dx_ref,) = torch.autograd.grad((_channel_attention_reference(xg, m) * g).sum(), xg)
    assert_rel_l2(dx, dx_ref, name="dx")


def test_channel_attention_matches_timm():
    ours = _randomize_(ChannelAttention(32, 4))
    theirs = timm_davit.ChannelAttention(32, 4, qkv_bias=True).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 7, 32)
    with torch.no_grad():
        assert_rel_l2(ours(x), theirs(x.reshape(2, 35, 32)).reshape(2, 5, 7, 32), tol=2e-6)


def test_channel_attention_rejects_bad_input():
    with pytest.raises(ValueError, match="dim 30 must be a multiple of num_heads 4"):
        ChannelAttention(30, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, H, W, 16\]"):
        ChannelAttention(16, 2)(torch.randn(2, 16, 4, 4))


class _Tokens(torch.nn.Module):
    """timm's ChannelAttention on an NHWC map (it takes ``[B, N, C]`` tokens)."""

    def __init__(self, attn: torch.nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x.flatten(1, 2))


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None, skip: str = "") -> int:
    saved = count_step(model, x, autocast, count_ops=False).saved
    return sum(b for name, b in saved.items() if not (skip and skip in name))


def test_channel_attention_keeps_the_compute_dtype_for_backward():
    """Under bf16 autocast the only fp32 tensor the block saves is its [B·heads, d, d] attention map (fp32
    softmax, as under CUDA autocast): SDPA's math fallback (the only SDPA path for N-dimensional channel
    tokens) upcast q, k, v to fp32 and doubled what DaViT keeps (+0.5 GB for DaViT-T at batch 128).
    In fp32 it saves no more than timm's ChannelAttention."""
    ours = ChannelAttention(64, 4)
    x = torch.randn(2, 28, 28, 64)
    saved = count_step(ours, x, torch.bfloat16, count_ops=False).saved_tensors
    fp32 = {shape for (_, dtype, shape) in saved if dtype == torch.float32}
    assert fp32 == {(2 * 4, 16, 16)}, f"fp32 tensors saved for backward: {sorted(fp32)}"
    theirs = _Tokens(timm_davit.ChannelAttention(64, 4, qkv_bias=True))
    a, b = _saved_bytes(ours, x), _saved_bytes(theirs, x)
    assert a <= b, f"ChannelAttention saves {a} bytes for backward, timm's {b}"


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_davit_saves_no_more_than_timm(autocast):
    """Module by module no more activations than timm's DaViT. Left out: window attention cores in fp32
    (on CPU they run the reference path, whose copies the fused CUDA kernel does not make) and, under
    bf16, all attention (CPU autocast keeps timm's softmax in bf16, CUDA's and ours run it in fp32)."""
    ours, theirs = DaVit(**SMALL), timm_davit.DaVit(**SMALL)
    x = torch.randn(1, 3, 112, 112)
    skip = ".0.attn" if autocast is None else ".attn"  # blocks.{i}.0 is the spatial block in both
    a, b = _saved_bytes(ours, x, autocast, skip), _saved_bytes(theirs, x, autocast, skip)
    assert a <= b, f"DaVit saves {a} bytes for backward outside {skip}, timm's DaVit {b} ({autocast})"


@pytest.mark.parametrize("size", [(224, 224), (200, 300), (33, 47)])
def test_matches_timm_davit(tmp_path, size):
    """Same logits as timm's DaVit at any input size (padded windows included)."""
    ref = _randomize_(timm_davit.DaVit(**SMALL))
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    ours = create_from_official("davit_t", tmp_path / "timm.pth", **SMALL).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert_rel_l2(ours(x), ref(x), tol=2e-5, name=f"logits vs timm at {size}")


def test_official_fixture_parity(tmp_path):
    """The official DaViT-T (depths 1,1,3,1) reproduces the official logits from every released wrapper."""
    fx = load_fixture("davit", "davit_tiny")
    assert "depths=(1, 1, 3, 1)" in fx.meta["constructor"]
    model = create_from_official("davit_t", save_official_checkpoint(fx, tmp_path / "plain.pth"))
    err = parity_error(model, fx)
    assert err <= 2e-5, f"davit_t vs official logits: relative L2 {err:.2e}"
    official = official_state_dict(fx)
    expected = checkpoint_filter_fn(official, model)
    assert expected.keys() == model.state_dict().keys()
    for name, wrapped in [("state_dict", {"state_dict": official, "epoch": 300}),
                          ("state_dict_ema", {"state_dict_ema": official}),
                          ("ddp", {"state_dict": {"module." + k: v for k, v in official.items()}})]:
        got = checkpoint_filter_fn(wrapped, model)
        assert got.keys() == expected.keys() and all(got[k] is expected[k] for k in got), name


def test_checkpoint_mismatch_raises(tmp_path):
    torch.save({"state_dict": {"foo.weight": torch.zeros(1)}}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="neither an official DaViT checkpoint"):
        create_from_official("davit_t", tmp_path / "junk.pth", **SMALL)
    torch.save(DaVit(**dict(SMALL, depths=(1, 1, 3, 1))).state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*stages\.2\.blocks\.2"):
        create_from_official("davit_t", tmp_path / "deeper.pth", **SMALL)


def test_any_size_features_and_intermediates():
    model = _randomize_(timm.create_model("davit_t", **SMALL))
    x = torch.randn(2, 3, 72, 106)
    feats = timm.create_model("davit_t", features_only=True, **SMALL).eval()
    missing, unexpected = feats.model.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        maps = feats(x)
        expected_final = model.forward_features(x)
    expected = [(2, c, math.ceil(72 / 4 / 2 ** i), math.ceil(106 / 4 / 2 ** i))
                for i, c in enumerate(SMALL["embed_dims"])]
    assert [tuple(t.shape) for t in inter] == expected == [tuple(t.shape) for t in maps]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    for a, b in zip(inter, maps):
        assert a.is_contiguous() and torch.equal(a, b)
    assert torch.equal(final, expected_final) and tuple(final.shape) == (2, 64, 3, 4)  # NCHW, as timm's davit
    short = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert len(short) == 1 and torch.equal(short[0], inter[1])


def test_masked_window_padding_option():
    """Masking padded keys changes nothing where maps are window multiples, and something elsewhere."""
    base = _randomize_(DaVit(**SMALL, window_size=2))
    masked = DaVit(**SMALL, window_size=2, masked_window_padding=True).eval()
    masked.load_state_dict(base.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 96)  # stage maps 16x24 .. 2x3
        assert torch.equal(masked(x[..., :64]), base(x[..., :64]))
        x = torch.randn(1, 3, 64, 96)
        assert (masked(x) - base(x)).abs().max() > 1e-4


def test_grad_checkpointing_matches():
    model = _randomize_(timm.create_model("davit_t", **SMALL))
    x = torch.randn(2, 3, 64, 64)
    calls = []
    model.stages[1].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        calls.clear()
        model(x).square().mean().backward()
        assert len(calls) == (2 if enable else 1)  # checkpointed blocks run again in backward, once
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_timm_conventions(tmp_path):
    model = timm.create_model("davit_t", **dict(SMALL, drop_path_rate=0.3))
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert len(rates) == 2 * (2 * sum(SMALL["depths"]) - 1) and math.isclose(rates[-1], 0.3, rel_tol=1e-6)
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 64)
    src = _randomize_(DaVit(**SMALL))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    gray = create_from_official("davit_t", tmp_path / "w.pth", in_chans=1, num_classes=5, **SMALL)
    assert torch.allclose(gray.stem.conv.weight, src.stem.conv.weight.sum(1, keepdim=True))
    assert gray(torch.randn(1, 1, 64, 64)).shape == (1, 5)


@pytest.mark.triton_interpret
def test_attention_backend_switch():
    """set_attention_backend routes the window attention; Triton (interpreter) matches the reference."""
    cfg = dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16), num_heads=(1, 2, 2, 2), drop_path_rate=0.0)
    model = _randomize_(DaVit(**cfg))
    x = torch.randn(1, 3, 60, 44)  # stage maps 15x11 .. 2x2: padded windows everywhere
    outs, grads = {}, {}
    for backend in ("reference", "triton"):
        set_attention_backend(model, backend)
        assert {m.attn_backend for m in model.modules() if hasattr(m, "attn_backend")} == {backend}
        model.zero_grad()
        outs[backend] = model(x)
        outs[backend].square().sum().backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert_rel_l2(outs["triton"], outs["reference"], name="logits")
    assert_rel_l2(grads["triton"], grads["reference"], name="grads")


@pytest.mark.parametrize("ours,theirs,official_params", [  # counts from the official model file
    ("davit_t", "davit_tiny", 28360168), ("davit_s", "davit_small", 49745896), ("davit_b", "davit_base", 87954408),
])
def test_registered_configs(ours, theirs, official_params):
    with torch.device("meta"):
        a, b = timm.create_model(ours), timm.create_model(theirs)
    n = sum(p.numel() for p in a.parameters())
    assert n == sum(p.numel() for p in b.parameters()) == official_params
    assert [len(s.blocks) for s in a.stages] == [len(s.blocks) for s in b.stages]
    cfg = a.pretrained_cfg
    assert cfg["hf_hub_id"] == f"timm/{theirs}.msft_in1k" and cfg["origin_url"] and cfg["notes"]
