"""FocalNet: focal modulation against a float64 reference and timm, checkpoint conversion, timm API."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import focalnet as timm_focalnet

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.backbones.focalnet import FocalNet
from attnzoo.blocks.focal_modulation import FocalModulation
from tests.helpers import RecordOps, assert_rel_l2
from tests.parity import create_from_official, load_fixture, parity_error, save_official_checkpoint

SMALL = dict(embed_dim=16, depths=(1, 1, 2, 1), drop_path_rate=0.0)


def _randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights: fan-in scaled matrices, norm weights and layer scales near 1, small biases."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif name.endswith("gamma") or ("norm" in name or ".ln." in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.05 * r)
    return model.eval()


def _focal_modulation_reference(x: torch.Tensor, m: FocalModulation) -> torch.Tensor:
    """The official formula on NCHW float64 tensors, from the module's weights."""
    x, C, L = x.double().permute(0, 3, 1, 2), m.dim, m.focal_level
    p = {k: v.double() for k, v in m.state_dict().items()}
    y = F.conv2d(x, p["f.weight"][:, :, None, None], p["f.bias"])
    q, ctx, gates = y[:, :C], y[:, C:2 * C], y[:, 2 * C:]
    ctx_all = 0
    for level, k in enumerate(m.kernel_sizes):
        ctx = F.gelu(F.conv2d(ctx, p[f"focal_layers.{level}.0.weight"], padding=k // 2, groups=C))
        ctx_all = ctx_all + ctx * gates[:, level:level + 1]
    ctx_all = ctx_all + F.gelu(ctx.mean(2, keepdim=True).mean(3, keepdim=True)) * gates[:, L:]
    if m.normalize_modulator:
        ctx_all = ctx_all / (L + 1)
    out = (q * F.conv2d(ctx_all, p["h.weight"][:, :, None, None], p["h.bias"])).permute(0, 2, 3, 1)
    if "ln.weight" in p:
        out = F.layer_norm(out, (C,), p["ln.weight"], p["ln.bias"])
    return out @ p["proj.weight"].T + p["proj.bias"]


@pytest.mark.parametrize("dim,level,window,size,extra", [
    (12, 2, 3, (7, 9), {}),
    (20, 3, 5, (5, 11), dict(normalize_modulator=True, use_post_norm=True)),
    (8, 1, 1, (1, 3), {}),
])
def test_focal_modulation_matches_float64_reference(dim, level, window, size, extra):
    m = _randomize_(FocalModulation(dim, focal_window=window, focal_level=level, **extra))
    x = torch.randn(2, *size, dim)
    ref = _focal_modulation_reference(x, m)
    assert_rel_l2(m(x), ref, name="fp32")
    assert_rel_l2(m.double()(x.double()), ref, name="fp64")


def test_focal_modulation_gradients_match_reference():
    m = _randomize_(FocalModulation(10, focal_window=3, focal_level=2)).double()
    x = torch.randn(2, 6, 5, 10, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 5, 10, dtype=torch.float64)
    (dx,) = torch.autograd.grad((m(x) * g).sum(), x)
    (dx_ref,) = torch.autograd.grad((_focal_modulation_reference(x, m) * g).sum(), x)
    assert_rel_l2(dx, dx_ref, name="dx")


@pytest.mark.parametrize("level", [1, 2, 3])
def test_focal_modulation_gated_sum_has_no_zero_pass(level):
    """The gated sum of ``level + 1`` terms takes ``level`` adds and no full-map ``0 + term`` pass."""
    m = FocalModulation(8, focal_level=level)
    with RecordOps() as rec:
        m(torch.randn(1, 5, 6, 8))
    assert rec.ops.count("aten.add") == level and rec.ops.count("aten.mul") == level + 2  # + q * h(ctx_all)


def test_focal_modulation_rejects_bad_input():
    with pytest.raises(ValueError, match="focal_window must be an odd"):
        FocalModulation(8, focal_window=4)
    with pytest.raises(ValueError, match="focal_level must be >= 1"):
        FocalModulation(8, focal_level=0)
    with pytest.raises(ValueError, match=r"x must be \[B, H, W, 8\]"):
        FocalModulation(8)(torch.randn(1, 8, 4, 4))


def _timm_roundtrip(tmp_path, name: str, cfg: dict, size=(64, 96), **timm_overrides) -> float:
    """Build timm's FocalNet with random weights, load its state dict into ours, compare logits."""
    ref = _randomize_(timm_focalnet.FocalNet(**cfg, **timm_overrides))
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **cfg,
                             **timm_overrides).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert_rel_l2(ours(x), ref(x), tol=2e-5, name=f"{name} logits vs timm")


@pytest.mark.parametrize("name,overrides", [
    ("focalnet_t_srf", {}),
    ("focalnet_t_lrf", dict(focal_levels=(3, 3, 3, 3))),
    ("focalnet_t_srf", dict(focal_windows=(5, 5, 5, 5), layerscale_value=1e-1, use_post_norm=True,
                            use_post_norm_in_modulation=True, normalize_modulator=True, use_overlap_down=True)),
])
def test_matches_timm_focalnet(tmp_path, name, overrides):
    _timm_roundtrip(tmp_path, name, SMALL, **overrides)


def test_matches_timm_focalnet_tiny_full_width(tmp_path):
    cfg = dict(embed_dim=96, depths=(2, 2, 6, 2), drop_path_rate=0.0)
    _timm_roundtrip(tmp_path, "focalnet_t_srf", cfg, size=(32, 64))


def test_official_fixture_parity(tmp_path):
    """The official file ({"model": sd}) reproduces the official logits; an unwrapped copy loads the same."""
    fx = load_fixture("focalnet", "focalnet_tiny_srf")
    path = save_official_checkpoint(fx, tmp_path / "focalnet_tiny_srf.pth", wrap=lambda sd: {"model": sd})
    model = create_from_official("focalnet_t_srf", path)
    err = parity_error(model, fx)
    assert err <= 2e-5, f"focalnet_t_srf vs official logits: relative L2 {err:.2e}"
    plain = create_from_official("focalnet_t_srf", save_official_checkpoint(fx, tmp_path / "plain.pth"))
    sd, sd_plain = model.state_dict(), plain.state_dict()
    assert sd.keys() == sd_plain.keys() and all(torch.equal(sd[k], sd_plain[k]) for k in sd)


def _official_keys(sd: dict) -> dict:
    """attnzoo -> official microsoft/FocalNet names, for the post-norm / layer-scale options."""
    import re

    out = {}
    for k, v in sd.items():
        k = k.replace("stem.", "patch_embed.").replace("head.fc.", "head.")
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        k = re.sub(r"\.ls([12])\.gamma", r".gamma_\1", k).replace("_post.", ".")
        if k.endswith("modulation.h.weight"):
            v = v[:, :, None, None]
        out[k] = v
    return out


def test_official_options_conversion(tmp_path):
    """Official keys of post-norm + layer-scale models (gamma_1, post-norm norm1/norm2, modulation.ln)."""
    cfg = dict(SMALL, layerscale_value=0.1, use_post_norm=True, use_post_norm_in_modulation=True)
    src = _randomize_(FocalNet(**cfg))
    official = _official_keys(src.state_dict())
    assert "layers.0.blocks.0.gamma_1" in official and "layers.0.blocks.0.norm1.weight" in official
    torch.save({"model": official}, tmp_path / "o.pth")
    ours = create_from_official("focalnet_t_srf", tmp_path / "o.pth", **cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), src(x))


def test_checkpoint_mismatch_raises(tmp_path):
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="neither an official FocalNet checkpoint"):
        create_from_official("focalnet_t_srf", tmp_path / "junk.pth", **SMALL)
    torch.save(FocalNet(**SMALL).state_dict(), tmp_path / "srf.pth")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*focal_layers\.2"):
        create_from_official("focalnet_t_lrf", tmp_path / "srf.pth", **SMALL)


def test_any_size_features_and_intermediates():
    model = _randomize_(timm.create_model("focalnet_t_srf", **SMALL))
    x = torch.randn(2, 3, 200, 300)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        feats = timm.create_model("focalnet_t_srf", features_only=True, **SMALL)
        missing, unexpected = feats.model.load_state_dict(model.state_dict(), strict=False)
        assert not missing and set(unexpected) == {"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"}
        maps = feats.eval()(x)
        logits = model(x)
        expected_final = model.forward_features(x)
    expected = [(2, 16 * 2 ** i, math.ceil(200 / 4 / 2 ** i), math.ceil(300 / 4 / 2 ** i)) for i in range(4)]
    assert [tuple(t.shape) for t in inter] == expected == [tuple(t.shape) for t in maps]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    for a, b in zip(inter, maps):
        assert a.is_contiguous() and torch.equal(a, b)
    assert torch.equal(final, expected_final) and tuple(final.shape) == (2, 128, 7, 10)  # NCHW, as timm's focalnet
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    short = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert len(short) == 1 and torch.equal(short[0], inter[1])


def test_grad_checkpointing_matches():
    model = _randomize_(timm.create_model("focalnet_t_srf", **SMALL))
    x = torch.randn(2, 3, 64, 64)
    calls = []
    model.layers[1].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
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
    model = timm.create_model("focalnet_t_srf", **dict(SMALL, drop_path_rate=0.3))
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert len(rates) == 2 * (sum(SMALL["depths"]) - 1) and math.isclose(rates[-1], 0.3, rel_tol=1e-6)
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)
    src = _randomize_(FocalNet(**SMALL))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    gray = create_from_official("focalnet_t_srf", tmp_path / "w.pth", in_chans=1, num_classes=5, **SMALL)
    assert torch.allclose(gray.stem.proj.weight, src.stem.proj.weight.sum(1, keepdim=True))
    assert gray(torch.randn(1, 1, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("ours,theirs,paper_m", [
    ("focalnet_t_srf", "focalnet_tiny_srf", 28.4), ("focalnet_t_lrf", "focalnet_tiny_lrf", 28.6),
    ("focalnet_s_srf", "focalnet_small_srf", 49.9), ("focalnet_s_lrf", "focalnet_small_lrf", 50.3),
    ("focalnet_b_srf", "focalnet_base_srf", 88.1), ("focalnet_b_lrf", "focalnet_base_lrf", 88.7),
])
def test_registered_configs(ours, theirs, paper_m):
    with torch.device("meta"):
        a, b = timm.create_model(ours), timm.create_model(theirs)
    n = sum(p.numel() for p in a.parameters())
    assert n == sum(p.numel() for p in b.parameters()) and round(n / 1e6, 1) == paper_m
    cfg = a.pretrained_cfg
    assert cfg["url"].endswith(f"{theirs}.pth") and cfg["hf_hub_id"] == f"timm/{theirs}.ms_in1k"
    assert cfg["crop_pct"] == 0.875 and cfg["license"] == "mit" and cfg["notes"]
