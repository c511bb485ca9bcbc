"""AttnZooBackbone on its own (mmengine + timm only): levels at odd sizes with each family's dense knobs,
classification checkpoints through the converters, tools/train.py checkpoints (state dict or EMA, refusals naming
what does not fit), frozen stages, argument errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

pytest.importorskip("mmengine", reason="the dense backbone needs mmengine (the 'dense' extra: make test installs it)")

from attnzoo.openmmlab.backbone import AttnZooBackbone  # noqa: E402
from attnzoo.training.loop import main as train_main  # noqa: E402
from tests.parity import load_fixture, save_official_checkpoint  # noqa: E402
from tests.test_train import make_image_folder  # noqa: E402

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


@pytest.fixture(scope="module")
def trained_nat(tmp_path_factory) -> Path:
    """last.pth.tar of one tools/train.py epoch of a one-block-per-level nat_mini that kept an EMA."""
    out = tmp_path_factory.mktemp("run")
    images = make_image_folder(out / "images", classes=2, train=2, val=1)
    train_main([str(images), "--model", "nat_mini", "--model-kwargs", "{depths: [1, 1, 1, 1]}", "--input-size", "3",
                "32", "32", "-b", "2", "--epochs", "1", "-j", "0", "--lr", "1e-2", "--warmup-epochs", "0",
                "--model-ema", "--model-ema-decay", "0.5", "--output", str(out), "--experiment", "run",
                "--no-progress", "--no-plot"])
    return out / "run" / "last.pth.tar"


def _nat_backbone() -> AttnZooBackbone:
    return AttnZooBackbone("nat_mini", drop_path_rate=0.0, model_kwargs=SHALLOW)


def test_training_checkpoint_gives_its_state_dict_or_its_ema(trained_nat: Path) -> None:
    """A tools/train.py checkpoint loads the weights tools/validate.py evaluates, its EMA only when asked (timm's
    file loader took the EMA weights whenever a run kept them)."""
    state = torch.load(trained_nat, map_location="cpu", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in state["state_dict_ema"].items()}
    plain, averaged = _nat_backbone(), _nat_backbone()
    report = plain.load_classification_checkpoint(str(trained_nat))
    averaged.load_classification_checkpoint(str(trained_nat), use_ema=True)
    assert sorted(report["unused"]) == ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]
    for key, value in plain.model.state_dict().items():
        torch.testing.assert_close(value, state["state_dict"][key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(averaged.model.state_dict()[key], ema[key], rtol=0, atol=0, msg=key)
    key = "levels.0.blocks.0.attn.qkv.weight"
    assert not torch.equal(state["state_dict"][key], ema[key])  # the run moved away from its average


def _resaved(path: Path, tmp_path: Path, **changes) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state.update(changes)
    torch.save(state, tmp_path / "changed.pth.tar")
    return str(tmp_path / "changed.pth.tar")


def test_training_checkpoints_of_other_keys_models_or_channels_are_refused(trained_nat: Path, tmp_path) -> None:
    state = torch.load(trained_nat, map_location="cpu", weights_only=True)
    sd = state["state_dict"]
    missing = {k: v for k, v in sd.items() if k != "levels.2.blocks.0.attn.proj.weight"}
    with pytest.raises(RuntimeError, match=r"init_cfg.checkpoint .* does not fit nat_mini.*Missing key.*"
                                           r"levels\.2\.blocks\.0\.attn\.proj\.weight"):
        _nat_backbone().load_classification_checkpoint(_resaved(trained_nat, tmp_path, state_dict=missing))
    extra = dict(sd, **{"levels.2.blocks.0.attn.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"Unexpected key.*levels\.2\.blocks\.0\.attn\.extra"):
        _nat_backbone().load_classification_checkpoint(_resaved(trained_nat, tmp_path, state_dict=extra))
    # a DiNAT checkpoint has NAT's keys and shapes: only its recorded arch tells them apart
    with pytest.raises(ValueError, match="trained as 'dinat_mini', the backbone is 'nat_mini'"):
        _nat_backbone().load_classification_checkpoint(_resaved(trained_nat, tmp_path, arch="dinat_mini"))
    gray = dict(state["data_config"], input_size=(1, 32, 32))
    with pytest.raises(ValueError, match="1-channel input, the backbone takes 3: pretrain with --input-size 3"):
        _nat_backbone().load_classification_checkpoint(_resaved(trained_nat, tmp_path, data_config=gray))
    with pytest.raises(ValueError, match="has no EMA weights"):
        _nat_backbone().load_classification_checkpoint(_resaved(trained_nat, tmp_path, state_dict_ema=None),
                                                       use_ema=True)
    official = save_official_checkpoint(load_fixture("nat", "nat_mini"), tmp_path / "nat_mini.pth")
    with pytest.raises(ValueError, match="init_cfg.use_ema: .* is not a tools/train.py checkpoint"):
        AttnZooBackbone("nat_mini").load_classification_checkpoint(str(official), use_ema=True)
