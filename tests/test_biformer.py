"""BiFormer: official-checkpoint parity, routing-tie margins, blocks against a float64 re-derivation of the
official legacy BRA (auto_pad included), timm conventions, backend switching and graph capture."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.backbones.biformer import BiFormer, checkpoint_filter_fn
from attnzoo.blocks import set_attention_backend
from attnzoo.blocks.routing import AdaptiveRegionRoutingAttention, AttentionLePE, BiLevelRoutingAttention
from tests.helpers import assert_rel_l2, rel_l2
from tests.parity import (FIXTURES, create_from_official, load_fixture, official_state_dict, parity_error,
                          parity_input, save_official_checkpoint)

VARIANTS = ("biformer_tiny", "biformer_small", "biformer_base", "biformer_stl", "biformer_stl_nchw")


def _small_model(**kwargs) -> BiFormer:
    """A reduced BiFormer (one block per stage, 3x3 regions) for convention tests."""
    args = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128), n_win=3, topks=(2, 3, 4, -2))
    return BiFormer(**dict(args, **kwargs))


# ---------------------------------------------------------------- float64 re-derivations of the official ops

def _regions(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, n*n, tokens, C], regions in raster order."""
    B, H, W, C = t.shape
    return t.reshape(B, n, H // n, n, W // n, C).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, -1, C)


def official_bra(attn: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """The official legacy BRA forward with auto_pad, written out token by token (slow, float64)."""
    n, topk, heads, scale = attn.n_win, attn.topk, attn.num_heads, attn.scale
    B, H, W, C = x.shape
    xp = F.pad(x, (0, 0, 0, (-W) % n, 0, (-H) % n))
    Hp, Wp = xp.shape[1:3]
    q, k, v = F.linear(xp, attn.qkv.qkv.weight, attn.qkv.qkv.bias).split([attn.qk_dim, attn.qk_dim, C], -1)
    qr, kr, vr = _regions(q, n), _regions(k, n), _regions(v, n)
    idx = ((qr.mean(2) * scale) @ kr.mean(2).transpose(1, 2)).topk(topk, dim=-1).indices
    out = torch.empty_like(vr)
    for b in range(B):
        for r in range(n * n):
            keys, vals = kr[b, idx[b, r]].flatten(0, 1), vr[b, idx[b, r]].flatten(0, 1)
            for h in range(heads):
                dq, dv = attn.qk_dim // heads, C // heads
                logits = (qr[b, r, :, h * dq:(h + 1) * dq] * scale) @ keys[:, h * dq:(h + 1) * dq].T
                out[b, r, :, h * dv:(h + 1) * dv] = logits.softmax(-1) @ vals[:, h * dv:(h + 1) * dv]
    rh, rw = Hp // n, Wp // n
    out = out.reshape(B, n, n, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    out = out + F.conv2d(v.permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias, padding=attn.lepe.padding,
                         groups=C).permute(0, 2, 3, 1)
    return F.linear(out, attn.wo.weight, attn.wo.bias)[:, :H, :W]


def official_attention_lepe(attn: AttentionLePE, x: torch.Tensor, lepe_on_v: bool = False) -> torch.Tensor:
    """The official AttentionLePE forward (explicit softmax, LePE on the input), float64; ``lepe_on_v``:
    the official nchwAttentionLePE (LePE on v, channels split into heads head-major)."""
    B, H, W, C = x.shape
    qkv = F.linear(x, attn.qkv.weight)
    q, k, v = qkv.reshape(B, H * W, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    out = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v
    out = out.transpose(1, 2).reshape(B, H, W, C)
    lepe_in = qkv[..., 2 * C:] if lepe_on_v else x
    out = out + F.conv2d(lepe_in.permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias, padding=attn.lepe.padding,
                         groups=C).permute(0, 2, 3, 1)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def _grid_regions(t: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of gh, gw) -> [B, gh*gw, tokens, C], regions in raster order."""
    B, H, W, C = t.shape
    return t.reshape(B, gh, H // gh, gw, W // gw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, gh * gw, -1, C)


def official_nchw_bra(attn: AdaptiveRegionRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """The official refactored BRA (``nchwBRA`` + ``regional_routing_attention_torch``) written out token by
    token, float64: regions of H//n_win x W//n_win tokens, q/k/v zero-padded after the projection, routing
    on region means over real tokens, padded zero keys not masked."""
    n, topk, heads, scale = attn.n_win, attn.topk, attn.num_heads, attn.scale
    B, H, W, C = x.shape
    rh, rw = H // n, W // n
    gh, gw = math.ceil(H / rh), math.ceil(W / rw)
    pad = (0, 0, 0, gw * rw - W, 0, gh * rh - H)
    q, k, v = (F.pad(t, pad) for t in F.linear(x, attn.qkv_linear.weight, attn.qkv_linear.bias).chunk(3, -1))
    real = _grid_regions(F.pad(torch.ones(B, H, W, 1, dtype=x.dtype), pad), gh, gw).sum(2)
    qr, kr, vr = (_grid_regions(t, gh, gw) for t in (q, k, v))
    idx = ((qr.sum(2) / real) @ (kr.sum(2) / real).transpose(1, 2)).topk(topk, dim=-1).indices
    out = torch.empty_like(vr)
    d = C // heads
    for b in range(B):
        for r in range(gh * gw):
            keys, vals = kr[b, idx[b, r]].flatten(0, 1), vr[b, idx[b, r]].flatten(0, 1)
            for h in range(heads):
                logits = (qr[b, r, :, h * d:(h + 1) * d] * scale) @ keys[:, h * d:(h + 1) * d].T
                out[b, r, :, h * d:(h + 1) * d] = logits.softmax(-1) @ vals[:, h * d:(h + 1) * d]
    out = out.reshape(B, gh, gw, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, gh * rh, gw * rw, C)[:, :H, :W]
    out = out + F.conv2d(v[:, :H, :W].permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias,
                         padding=attn.lepe.padding, groups=C).permute(0, 2, 3, 1)
    return F.linear(out, attn.output_linear.weight, attn.output_linear.bias)


def _randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial biases and weights so padding (bias-valued keys) and LePE matter."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.5)
    return module


# ---------------------------------------------------------------- blocks

@pytest.mark.parametrize("H, W, n_win, topk, heads, qk_dim", [
    (12, 9, 3, 2, 2, None),   # divisible: no padding
    (13, 17, 3, 4, 2, None),  # padded bottom and right
    (5, 11, 4, 16, 3, 24),    # map smaller than n_win on one side, qk_dim != dim, topk = all regions
])
def test_bra_matches_official_semantics(H, W, n_win, topk, heads, qk_dim):
    attn = _randomize_(BiLevelRoutingAttention(12 if qk_dim else 16, heads, n_win=n_win, topk=topk,
                                               qk_dim=qk_dim)).double()
    attn.attn_backend = "reference"
    x = torch.randn(1, H, W, attn.dim, dtype=torch.float64)
    assert_rel_l2(attn(x), official_bra(attn, x))


def test_bra_padding_equals_unpadded_map():
    """The block's own auto_pad equals padding by hand to a map that needs none, then cropping; a map that
    needs no padding is left as is."""
    attn = _randomize_(BiLevelRoutingAttention(16, 2, n_win=4, topk=3)).double()
    attn.attn_backend = "reference"
    x = torch.randn(1, 10, 13, 16, dtype=torch.float64)
    padded = F.pad(x, (0, 0, 0, 3, 0, 2))  # 12 x 16: multiples of n_win
    out_pad = attn(padded)
    assert_rel_l2(attn(x), out_pad[:, :10, :13])
    assert out_pad.shape == padded.shape


@pytest.mark.parametrize("lepe_input", ["x", "v"])
def test_attention_lepe_matches_official(lepe_input):
    attn = _randomize_(AttentionLePE(64, lepe_input=lepe_input)).double()
    assert attn.num_heads == 8 and attn.qkv.bias is None
    x = torch.randn(2, 5, 7, 64, dtype=torch.float64)
    assert_rel_l2(attn(x), official_attention_lepe(attn, x, lepe_on_v=lepe_input == "v"))


@pytest.mark.parametrize("H, W, n_win, topk", [
    (14, 21, 7, 4),   # divisible: 7 x 7 regions of 2 x 3 tokens, no padding
    (13, 9, 4, 3),    # regions 3 x 2 -> 5 x 5 grid, padded bottom and right
    (15, 18, 7, 16),  # regions 2 x 2 -> 8 x 9 grid (more columns than rows), padded bottom
    (20, 9, 3, 2),    # regions 6 x 3 -> 4 x 3 grid (more rows than columns), padded bottom
])
def test_adaptive_region_bra_matches_official_semantics(H, W, n_win, topk):
    attn = _randomize_(AdaptiveRegionRoutingAttention(16, 2, n_win=n_win, topk=topk)).double()
    attn.attn_backend = "reference"
    x = torch.randn(2, H, W, 16, dtype=torch.float64)
    assert_rel_l2(attn(x), official_nchw_bra(attn, x))


def test_adaptive_region_bra_equals_legacy_bra_on_divisible_maps():
    """Where H and W are multiples of n_win both BRAs cut the same regions: same weights, same output."""
    attn = _randomize_(AdaptiveRegionRoutingAttention(16, 2, n_win=3, topk=4)).double()
    legacy = BiLevelRoutingAttention(16, 2, n_win=3, topk=4).double()
    legacy.load_state_dict({"qkv.qkv.weight": attn.qkv_linear.weight, "qkv.qkv.bias": attn.qkv_linear.bias,
                            "wo.weight": attn.output_linear.weight, "wo.bias": attn.output_linear.bias,
                            "lepe.weight": attn.lepe.weight, "lepe.bias": attn.lepe.bias})
    set_attention_backend(attn, "reference"), set_attention_backend(legacy, "reference")
    x = torch.randn(1, 12, 9, 16, dtype=torch.float64)
    assert_rel_l2(attn(x), legacy(x))
    x = torch.randn(1, 13, 9, 16, dtype=torch.float64)  # 13 rows: 4 x 3 regions of 3 x 3 tokens vs padded 15 rows
    assert rel_l2(attn(x), legacy(x)) > 1e-3


@pytest.mark.triton_interpret
def test_adaptive_region_bra_triton_matches_reference():
    """A non-square region grid (3 x 4 regions of 3 x 4 tokens, run on a 4 x 4 square) through the fused
    kernel (Triton interpreter on CPU): outputs and gradients equal the reference's."""
    attn = _randomize_(AdaptiveRegionRoutingAttention(32, 2, n_win=3, topk=3))
    x = torch.randn(2, 9, 14, 32)
    results = {}
    for backend in ("reference", "triton"):
        attn.attn_backend = backend
        attn.zero_grad()
        out = attn(x)
        out.square().sum().backward()
        results[backend] = out.detach(), [p.grad.clone() for p in attn.parameters()]
    assert_rel_l2(results["triton"][0], results["reference"][0], tol=1e-5)
    for (name, _), grad, ref in zip(attn.named_parameters(), results["triton"][1], results["reference"][1]):
        assert_rel_l2(grad, ref, tol=1e-5, name=name)


def test_adaptive_region_bra_rejects_small_maps():
    attn = AdaptiveRegionRoutingAttention(16, 2, n_win=7, topk=4)
    with pytest.raises(ValueError, match=r"n_win=7 tokens per side, got H=6, W=9"):
        attn(torch.randn(1, 6, 9, 16))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=16, num_heads=2, n_win=2, topk=5), "topk"),
    (dict(dim=16, num_heads=3), "num_heads"),
    (dict(dim=16, num_heads=2, n_win=0), "n_win"),
    (dict(dim=16, num_heads=2, side_dwconv=4), "side_dwconv"),
])
def test_bra_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiLevelRoutingAttention(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(topks=(1, 4, 16, -1)), "topk"),
    (dict(n_win=2), "topk"),  # stage 3 routes to 16 > 2**2 regions
    (dict(n_win=(7, 7)), "n_win"),
    (dict(global_pool="median"), "global_pool"),
])
def test_model_rejects_bad_arguments(kwargs, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        timm.create_model("biformer_tiny", **kwargs)


# ---------------------------------------------------------------- official-checkpoint parity

def _region_affinity(attn: torch.nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """The routing affinity a layer ranks, from its projection output, float64."""
    if isinstance(attn, BiLevelRoutingAttention):
        q, k, _ = qkv.double().split([attn.qk_dim, attn.qk_dim, attn.dim], -1)
        return (_regions(q, attn.n_win).mean(2) * attn.scale) @ _regions(k, attn.n_win).mean(2).transpose(1, 2)
    q, k, _ = qkv.double().permute(0, 3, 1, 2).chunk(3, 1)
    region = (q.shape[2] // attn.n_win, q.shape[3] // attn.n_win)
    q_r, k_r = (F.avg_pool2d(t, region, ceil_mode=True, count_include_pad=False).flatten(2) for t in (q, k))
    return q_r.transpose(1, 2) @ k_r


def _routing_margins(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Per routing layer: the smallest gap between the k-th and (k+1)-th region affinity, relative to the
    largest |affinity| of that row, recomputed in float64 from the layer's own q/k."""
    margins, hooks = [], []
    for attn in model.modules():
        if isinstance(attn, (BiLevelRoutingAttention, AdaptiveRegionRoutingAttention)):
            def hook(mod, inp, out, attn=attn):
                aff = _region_affinity(attn, out)
                if attn.topk < aff.shape[-1]:
                    top = aff.topk(attn.topk + 1, dim=-1).values
                    margins.append(float(((top[..., -2] - top[..., -1]) / aff.abs().amax(-1)).min()))
            proj = attn.qkv if isinstance(attn, BiLevelRoutingAttention) else attn.qkv_linear
            hooks.append(proj.register_forward_hook(hook))
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return margins, out


@pytest.mark.parametrize("variant, n_routing", [("biformer_tiny", 12), ("biformer_stl", 10)])
def test_parity(tmp_path, variant, n_routing):
    fx = load_fixture("biformer", variant)
    ckpt = save_official_checkpoint(fx, tmp_path / f"{variant}.pth", wrap=lambda sd: {"model": sd})
    model = create_from_official(variant, ckpt).eval()
    assert sum(p.numel() for p in model.parameters()) == fx.meta["params"]
    err = parity_error(model, fx)
    assert err <= 1e-4, f"relative L2 {err:.3e}"
    # The fixed input must sit away from routing ties, or a flipped region could hide under the bound:
    # every routing layer keeps its k-th region ahead of the (k+1)-th by >= 1e-6 of the row's largest
    # affinity (~8 float32 ulps). Measured minima: tiny 4.3e-5; stl 1.8e-6 (stage 3, block 0), where a
    # float64 run of this port still matches the official float32 logits to 3.5e-7 (no rounding flip).
    margins, _ = _routing_margins(model, parity_input())
    assert len(margins) == n_routing and min(margins) >= 1e-6, margins


def test_parity_stl_nchw(tmp_path):
    """The refactored STL at 224x224 (7 x 7 regions everywhere) and at 240x296, where the region count follows
    the input: stage grids 8x8, 8x8 and 8x9 with padding after the projection (meta.json)."""
    fx = load_fixture("biformer", "biformer_stl_nchw")
    ckpt = save_official_checkpoint(fx, tmp_path / "biformer_stl_nchw.pth", wrap=lambda sd: {"model": sd})
    model = create_from_official("biformer_stl_nchw", ckpt).eval()
    assert sum(p.numel() for p in model.parameters()) == fx.meta["params"]
    err = parity_error(model, fx)
    assert err <= 1e-4, f"relative L2 {err:.3e}"
    x2 = torch.randn(2, 3, 240, 296, generator=torch.Generator().manual_seed(1))
    expected = torch.load(FIXTURES / "biformer" / "biformer_stl_nchw" / "expected.pt", weights_only=True)
    # Routing ties (test_parity): measured minima 6.1e-6 (224x224) and 3.1e-6 (240x296).
    for x, name in ((parity_input(), "x1_logits"), (x2, "x240x296_logits")):
        margins, out = _routing_margins(model, x)
        assert len(margins) == 10 and min(margins) >= 1e-6, (name, margins)
        assert_rel_l2(out, expected[name], tol=1e-4, name=name)
    # The model's own state dict reloads; a legacy biformer_stl file (same shapes, other BRA) is refused.
    torch.save(model.state_dict(), tmp_path / "own.pth")
    assert parity_error(create_from_official("biformer_stl_nchw", tmp_path / "own.pth"), fx) == err
    stl = save_official_checkpoint(load_fixture("biformer", "biformer_stl"), tmp_path / "stl.pth")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*attn\.qkv_linear\.weight"):
        create_from_official("biformer_stl_nchw", stl)


def test_checkpoint_mismatch_names_keys(tmp_path):
    fx = load_fixture("biformer", "biformer_tiny")
    sd = official_state_dict(fx)
    sd.pop("stages.1.0.attn.wo.weight")
    sd["stages.1.0.attn.extra.weight"] = torch.zeros(1)
    ckpt = tmp_path / "bad.pth"
    torch.save(sd, ckpt)  # plain (unwrapped) file: also accepted by the loader
    with pytest.raises(RuntimeError) as e:
        create_from_official("biformer_tiny", ckpt)
    assert "stages.1.0.attn.wo.weight" in str(e.value) and "stages.1.0.attn.extra.weight" in str(e.value)


def test_checkpoint_filter_unwraps_model_key():
    """Official files (wrapped or not) name the classifier head.*, timm's head is head.fc.*; attnzoo's own
    state dicts already use head.fc.* and pass unchanged."""
    official, ours = {"head.bias": torch.zeros(3)}, {"head.fc.bias": torch.zeros(3)}
    assert checkpoint_filter_fn({"model": official}, None).keys() == ours.keys()
    assert checkpoint_filter_fn(official, None).keys() == ours.keys()
    assert checkpoint_filter_fn(ours, None).keys() == ours.keys()


def test_pretrained_cfgs_name_official_files():
    for name in VARIANTS:
        cfg = timm.models.get_pretrained_cfg(name)
        url, file_name = cfg.url
        assert url.startswith("https://api.onedrive.com/") and file_name == f"{name}_in1k.pth"
        assert cfg.license == "mit" and cfg.crop_pct == 0.875 and cfg.notes


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("name", VARIANTS)
def test_variant_forward_backward(name):
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.1)
    # stage maps 8x16 ... 1x2: padded to multiples of 7 in stages 1-3; biformer_stl_nchw needs 7 tokens per side
    # in stage 3: 112x144 gives region grids 7x8, 7x9, 7x9
    x = torch.randn(1, 3, 112, 144) if name == "biformer_stl_nchw" else torch.randn(1, 3, 32, 64)
    out = model(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_official_configs():
    """Parameter counts as the official table (13.1 / 25.5 / 56.8 / 28.4 M; tiny, stl exactly as their
    fixtures)."""
    expect = {"biformer_tiny": 13.1, "biformer_small": 25.5, "biformer_base": 56.8, "biformer_stl": 28.4,
              "biformer_stl_nchw": 28.4}
    for name, n in expect.items():
        with torch.device("meta"):
            model = timm.create_model(name)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == n, name
        if name.startswith("biformer_stl"):
            blocks = [b for stage in model.stages for b in stage.blocks]
            assert len(blocks) == 12 and all(b.pos_embed is None and len(b.mlp) == 3 for b in blocks)
        if name == "biformer_stl_nchw":
            assert all(isinstance(b.attn, AdaptiveRegionRoutingAttention) for b in blocks[:10])
            assert all(isinstance(b.attn, AttentionLePE) and b.attn.lepe_input == "v" for b in blocks[10:])
        if name == "biformer_base":
            attns = [b.attn for b in model.stages[2]]
            assert all(a.n_win == 7 and a.topk == 16 and a.num_heads == 12 and a.scale == 384 ** -0.5
                       for a in attns)
            assert all(isinstance(b.attn, AttentionLePE) and b.attn.num_heads == 8 for b in model.stages[3])


@pytest.mark.parametrize("size", [(56, 56), (40, 60)])  # stage maps 14/7 divisible by n_win 7; 10x15 not
def test_features_only(size):
    model = timm.create_model("biformer_tiny", features_only=True).eval()
    full = timm.create_model("biformer_tiny").eval()
    model.model.load_state_dict(full.state_dict(), strict=False)  # the wrapper pruned norm and head
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = model(x)
        inter = full.forward_intermediates(x, intermediates_only=True)
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    for i, (f, ref) in enumerate(zip(feats, inter)):
        assert f.shape == (1, 64 * 2 ** i, math.ceil(size[0] / 2 ** (i + 2)), math.ceil(size[1] / 2 ** (i + 2)))
        assert_rel_l2(f, ref, tol=0.0, name=f"stage {i}")


def test_forward_intermediates_and_head():
    model = _small_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[1, 3], norm=True)
        feats = model.forward_features(x)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        logits = model(x)
    assert [t.shape[1] for t in inter] == [64, 128]
    assert_rel_l2(final, feats, tol=0.0)
    assert_rel_l2(inter[1], feats, tol=0.0)  # norm=True applies the final BatchNorm to the last stage
    assert_rel_l2(early[1], inter[0], tol=0.0)
    assert_rel_l2(model.forward_head(feats), logits, tol=0.0)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 128)
    model.reset_classifier(7)
    assert model(x).shape == (1, 7)
    model.reset_classifier(0)
    assert model(x).shape == (1, 128)
    model.reset_classifier(5, "max")  # timm's ClassifierHead pools any timm way
    assert model(x).shape == (1, 5)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, "median")


def test_grad_checkpointing_matches():
    torch.manual_seed(1)
    model = _small_model(num_classes=5, in_chans=1).train()
    x = torch.randn(2, 1, 64, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        out = model(x)
        out.sum().backward()
        grads.append((out.detach(), model.stages[1][0].attn.qkv.qkv.weight.grad.clone()))
    assert_rel_l2(grads[1][0], grads[0][0])
    assert_rel_l2(grads[1][1], grads[0][1])


def test_drop_path_schedule():
    with torch.device("meta"):
        model = timm.create_model("biformer_small", drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s]
    assert len(rates) == 30 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)


def test_dense_n_win_override():
    """Official dense settings: n_win 16 (COCO) / 8 (ADE20K) at creation, any input size."""
    model = timm.create_model("biformer_tiny", features_only=True, n_win=16).eval()
    assert {m.n_win for m in model.modules() if isinstance(m, BiLevelRoutingAttention)} == {16}
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 68, 52))
    assert [tuple(f.shape[2:]) for f in feats] == [(17, 13), (9, 7), (5, 4), (3, 2)]
    with torch.device("meta"):
        model8 = timm.create_model("biformer_tiny", n_win=8, topks=(1, 4, 8, -2), num_classes=0)
    assert [b.attn.topk for b in model8.stages[2]] == [8] * 8


# ---------------------------------------------------------------- backends and graph capture

def test_set_attention_backend_reaches_every_routing_block():
    with torch.device("meta"):
        model = timm.create_model("biformer_tiny")
    set_attention_backend(model, "reference")
    backends = {m.attn_backend for m in model.modules() if isinstance(m, BiLevelRoutingAttention)}
    assert backends == {"reference"}
    assert sum(isinstance(m, BiLevelRoutingAttention) for m in model.modules()) == 12


@pytest.mark.triton_interpret
def test_triton_backend_matches_reference():
    """The fused kernel path (Triton interpreter on CPU) gives the reference's outputs and gradients."""
    model = _small_model(num_classes=4).eval()
    x = torch.randn(1, 3, 44, 52)  # 11x13 -> padded 12x15 in stage 1
    results = {}
    for backend in ("reference", "triton"):
        set_attention_backend(model, backend)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[backend] = out.detach(), [p.grad.clone() for p in model.parameters()]
    assert_rel_l2(results["triton"][0], results["reference"][0], tol=1e-5)
    for (name, _), grad, ref in zip(model.named_parameters(), results["triton"][1], results["reference"][1]):
        assert_rel_l2(grad, ref, tol=1e-5, name=name)


def test_compile_fullgraph_reference_path():
    """Dynamo captures the whole model (padding, routing, attention) as one graph, forward and backward."""
    model = _small_model(num_classes=4)
    set_attention_backend(model, "reference")
    x = torch.randn(2, 3, 44, 52)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    assert_rel_l2(out, ref)
    for (name, p), grad in zip(model.named_parameters(), grads):
        assert_rel_l2(grad, p.grad, name=name)


def test_compile_fullgraph_adaptive_region_bra():
    """Dynamo captures the input-sized region grid (routing, square-grid remap, padding) as one graph."""
    attn = _randomize_(AdaptiveRegionRoutingAttention(32, 2, n_win=3, topk=3))
    attn.attn_backend = "reference"
    x = torch.randn(2, 9, 14, 32)  # 3 x 4 regions of 3 x 4 tokens
    out = torch.compile(attn, fullgraph=True, backend="aot_eager")(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    ref = attn(x)
    ref.square().sum().backward()
    assert_rel_l2(out, ref)
    for (name, p), grad in zip(attn.named_parameters(), grads):
        assert_rel_l2(grad, p.grad, name=name)
