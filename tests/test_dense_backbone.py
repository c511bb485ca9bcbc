"""AttnZooBackbone on its own (mmengine + timm only): levels at odd sizes with each family's dense knobs,
classification checkpoints through the converters, frozen stages, argument errors."""
from __future__ import annotations

import math

import pytest
import timm
import torch

pytest.importorskip("mmengine", reason="the dense backbone needs mmengine (the 'dense' extra: make test installs it)")

from attnzoo.openmmlab.backbone import AttnZooBackbone  # noqa: E402
from tests.parity import load_fixture, save_official_checkpoint  # noqa: E402

pytestmark = pytest.mark.dense

AGENT_SWIN_SHAPES = [(9, 9), (12, 12), (14, 14), (7, 7)]
AGENT_PVT_SHAPES = [(12, 12), (16, 16), (28, 28), (28, 28)]

SHALLOW = dict(depths=(1, 1, 1, 1))  # one block per level keeps the CPU test fast; the knobs are what matter
# The T model of each family with the knobs its dense configs pass (COCO values unless noted).
FAMILIES = {
    "nat": ("nat_mini", SHALLOW),
    "dinat": ("dinat_mini", dict(depths=(3, 4, 6, 5), dilations=[[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7],
                                                                  [1, 3, 1, 3, 1]])),
    "biformer_coco": ("biformer_tiny", dict(SHALLOW, n_win=16, topks=[1, 4, 16, -2])),
    "biformer_ade": ("biformer_tiny", dict(SHALLOW, n_win=8, topks=[1, 4, 16, -2])),
    "maxvit": ("maxvit_t", SHALLOW),
    "davit": ("davit_t", SHALLOW),
    "focalnet": ("focalnet_t_lrf", dict(SHALLOW, focal_windows=[9, 9, 9, 9])),
    "agent_swin": ("agent_swin_t", dict(SHALLOW, agent_shapes=AGENT_SWIN_SHAPES)),
    "agent_pvt": ("agent_pvt_t", dict(agent_shapes=AGENT_PVT_SHAPES)),  # agent_pvt_t fixes its depths
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_levels_at_odd_sizes(family: str) -> None:
    """Four NCHW maps at strides 4..32 (ceil), channels as declared, finite, for a 97x131 input."""
    name, knobs = FAMILIES[family]
    bb = AttnZooBackbone(name, drop_path_rate=0.0, model_kwargs=knobs).eval()
    h, w = 97, 131
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, h, w))
    assert len(feats) == 4
    for i, (f, c) in enumerate(zip(feats, bb.channels)):
        stride = 2 ** (i + 2)
        assert f.shape == (1, c, math.ceil(h / stride), math.ceil(w / stride)), (i, tuple(f.shape))
        assert torch.isfinite(f).all()
        # the output norm normalises each position over channels
        assert f.mean(1).abs().max() < 1e-4


def test_out_indices_subset_prunes_the_rest() -> None:
    bb = AttnZooBackbone("nat_mini", out_indices=(1, 2), drop_path_rate=0.0).eval()
    feats = bb(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 128, 8, 12), (1, 256, 4, 6)]
    assert len(bb.model.levels) == 3, "levels after the last requested one should be pruned"


# Official-output fixtures (tests/fixtures/parity) as released files -> dense backbone with the dense knobs
# that change parameter shapes (dilations and n_win do not; test_levels_at_odd_sizes covers them).
CHECKPOINTS = {
    "nat": ("nat", "nat_mini", "nat_mini", {}),
    "dinat": ("dinat", "dinat_mini", "dinat_mini", {}),
    "biformer": ("biformer", "biformer_tiny", "biformer_tiny", {}),
    "davit": ("davit", "davit_tiny", "davit_t", {}),
    "focalnet": ("focalnet", "focalnet_tiny_srf", "focalnet_t_srf", dict(focal_windows=[9, 9, 9, 9])),
    "agent_swin": ("agent", "agent_swin_t", "agent_swin_t", dict(agent_shapes=AGENT_SWIN_SHAPES)),
    "agent_pvt": ("agent", "agent_pvt_t", "agent_pvt_t", dict(agent_shapes=AGENT_PVT_SHAPES)),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_official_checkpoint_loads_through_init_cfg(case: str, tmp_path) -> None:
    """init_cfg Pretrained loads the official file; only the classifier/final norm go unused, only the dense
    output norms come from elsewhere, and the maps equal the classifier's own intermediates."""
    family, fixture, name, knobs = CHECKPOINTS[case]
    path = save_official_checkpoint(load_fixture(family, fixture), tmp_path / f"{fixture}.pth",
                                    wrap=lambda sd: {"model": sd})
    bb = AttnZooBackbone(name, drop_path_rate=0.0, out_norms=False, model_kwargs=knobs,
                         init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    report = bb.load_classification_checkpoint(str(path))
    assert report["unused"], "the classifier head should be reported unused"
    assert all(k.split(".")[0] in ("head", "norm", "fc_norm", "pre_logits") for k in report["unused"]), report
    assert report["not_in_checkpoint"] == []  # out_norms=False: nothing else

    # the classification model at ImageNet settings, loaded by the family's own pretrained path
    cls_knobs = {k: v for k, v in knobs.items() if k != "focal_windows"}
    ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **cls_knobs).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = bb.eval()(x)
        theirs = ref.forward_intermediates(x, intermediates_only=True)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        # FocalNet: 3/5/7 kernels centred in 9/11/13 zero kernels compute the same function
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"level {i}")


def test_init_weights_reads_init_cfg(tmp_path) -> None:
    path = save_official_checkpoint(load_fixture("nat", "nat_mini"), tmp_path / "nat_mini.pth")
    bb = AttnZooBackbone("nat_mini", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    first = next(bb.model.parameters())
    before = first.detach().clone()
    bb.init_weights()
    assert not torch.equal(before, first), "init_weights did not load the checkpoint"
    ref = timm.create_model("nat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in bb.model.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k], rtol=0, atol=0, msg=k)


def test_frozen_stages_freeze_stem_and_levels() -> None:
    bb = AttnZooBackbone("nat_mini", frozen_stages=1, drop_path_rate=0.0)
    bb.train()
    frozen = {n for n, p in bb.model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    assert all(not n.startswith(("levels.2", "levels.3")) for n in frozen), sorted(frozen)[:5]
    # frozen_stages=1: group 0 (stem) and group 1 (level 0), as mmdet's Swin counts them
    assert any(n.startswith("patch_embed") for n in frozen) and any(n.startswith("levels.0") for n in frozen)
    assert not any(n.startswith("levels.1") for n in frozen)
    assert all(not m.training for m in bb._frozen_modules)
    sum(f.sum() for f in bb(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is None for n, p in bb.model.named_parameters() if n in frozen)
    assert all(p.grad is not None for n, p in bb.model.named_parameters() if n.startswith("levels.3"))


def test_bad_arguments_name_what_is_expected(tmp_path) -> None:
    with pytest.raises(ValueError, match="model_name"):
        AttnZooBackbone("no_such_model")
    with pytest.raises(ValueError, match="out_indices"):
        AttnZooBackbone("nat_mini", out_indices=(0, 4))
    bb = AttnZooBackbone("nat_mini")
    with pytest.raises(FileNotFoundError, match="init_cfg.checkpoint"):
        bb.load_classification_checkpoint(str(tmp_path / "missing.pth"))
    torch.save({"model": {"stem.0.weight": torch.zeros(1)}}, tmp_path / "junk.pth")
    with pytest.raises(RuntimeError):
        bb.load_classification_checkpoint(str(tmp_path / "junk.pth"))
