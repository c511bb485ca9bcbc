"""DiNAT, DiNAT-s and isotropic backbones: official configs, parity, official key layouts, features, backward."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg

import attnzoo.backbones.dinat  # noqa: F401  (registers the models)
from tests.helpers import assert_rel_l2
from tests.parity import FIXTURES, create_from_official, load_fixture, parity_error, save_official_checkpoint
from tests.test_nat import OFFICIAL, check_official_config

# A reduced DiNAT-s (official layout and dilation pattern, small widths) for CPU-cheap structural tests.
SMALL_S = dict(embed_dim=32, num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2), dilations=[[1, 8], [1, 4], [1, 2], [1, 1]])


@pytest.mark.parametrize("name", [n for n in OFFICIAL if n.startswith("dinat_")])
def test_official_config(name):
    check_official_config(name)


@pytest.mark.parametrize("variant", ["dinat_mini", "dinat_s_tiny", "dinat_isotropic_small"])
def test_parity(tmp_path, variant):
    fx = load_fixture("dinat", variant)
    model = create_from_official(variant, save_official_checkpoint(fx, tmp_path / f"{variant}.pth"))
    assert sum(p.numel() for p in model.parameters()) == fx.meta["params"]
    err = parity_error(model, fx)
    assert err <= 2e-5, f"{variant} logits: relative L2 error {err:.2e} > 2e-5"


def test_parity_small_input_padding(tmp_path):
    """At 96x96 every DiNAT-s level is smaller than a window: the official pad-before-qkv rule decides."""
    fx = load_fixture("dinat", "dinat_s_tiny")
    expected = torch.load(FIXTURES / "dinat" / "dinat_s_tiny" / "expected.pt", weights_only=True)["x96_logits"]
    model = create_from_official("dinat_s_tiny", save_official_checkpoint(fx, tmp_path / "dinat_s_tiny.pth")).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1)))
    assert_rel_l2(out, expected, tol=2e-5, name="dinat_s_tiny 96x96 logits")


def _to_official(name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """attnzoo names -> the official file's names (DiNAT-s: ``layers.*``; all: ``head.*``)."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("head.fc.", "head.")
        if name.startswith("dinat_s_"):
            key = key.replace("levels.", "layers.", 1)
        out[key] = value
    return out


@pytest.mark.parametrize("name,kwargs", [
    ("dinat_s_tiny", SMALL_S),
    ("dinat_isotropic_small", dict(embed_dim=48, num_heads=2, depth=4)),
])
def test_official_key_layout_loads_strictly(tmp_path, name, kwargs):
    """A file in the official key layout (DiNAT-s ``layers.N.downsample.{norm,reduction}``, isotropic
    ``layers.N``, plain ``head``) loads through timm, strictly, to the same model; a missing key fails."""
    src = timm.create_model(name, **kwargs).eval()
    official = _to_official(name, src.state_dict())
    if name.startswith("dinat_s_"):
        assert "layers.0.downsample.reduction.weight" in official and "patch_embed.proj.weight" in official
    path = tmp_path / f"{name}.pth"
    torch.save({"model": official}, path)
    model = create_from_official(name, path, **kwargs).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert_rel_l2(model(x), src(x))
    missing = "layers.1.blocks.0.norm1.weight" if name.startswith("dinat_s_") else "layers.1.norm1.weight"
    del official[missing]
    torch.save(official, path)
    with pytest.raises(RuntimeError, match=missing.replace(".", r"\.").replace("layers", "(layers|levels)")):
        create_from_official(name, path, **kwargs)


@pytest.mark.parametrize("size", [(64, 64), (101, 67)])
def test_dinat_s_features_any_size(size):
    model = timm.create_model("dinat_s_tiny", features_only=True, **SMALL_S).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)  # patchify pads to a multiple of 4
    for i, f in enumerate(feats):
        assert f.shape == (1, 32 * 2 ** i, h, w) and torch.isfinite(f).all()
        h, w = math.ceil(h / 2), math.ceil(w / 2)  # patch merging pads odd maps


def test_dinat_backward_through_dilated_padded_blocks():
    model = timm.create_model("dinat_mini", embed_dim=32, num_heads=(1, 2, 4, 8), drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 64, 72)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.levels[0].blocks[1].attn.dilation == 8 and model.levels[0].blocks[1].attn.rpb.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_pretrained_cfg(name):
    cfg = get_pretrained_cfg(name)
    assert cfg.url.startswith("https://shi-labs.com/projects/") and cfg.url.endswith(".pth")
    assert cfg.license == "mit" and cfg.mean == IMAGENET_DEFAULT_MEAN and cfg.std == IMAGENET_DEFAULT_STD
    assert cfg.notes[0].startswith("paper top-1 ")
    assert cfg.first_conv == ("patch_embed.proj.0" if cfg.first_conv.endswith(".0") else "patch_embed.proj")
    if "384" in name:
        assert cfg.input_size == (3, 384, 384) and cfg.crop_pct == 1.0 and "_384" in cfg.url
    else:
        assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875
