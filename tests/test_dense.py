"""mmdetection / mmsegmentation integration: every config builds; one training iteration and one inference
pass per family on the tiny Fashion-MNIST set; ``tools/dense_train.py`` runs a few iterations."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import dense_stack_missing

REPO = Path(__file__).resolve().parents[1]
_MISSING = dense_stack_missing()

pytestmark = [pytest.mark.dense, pytest.mark.skipif(bool(_MISSING), reason=_MISSING)]

if not _MISSING:
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    import attnzoo.openmmlab  # noqa: F401  (registers AttnZooBackbone)
    from tools.make_dense_demo_data import CLASSES, main as make_demo_data

# the family configs; configs/mm*/finetune/ holds family configs plus a data/schedule recipe, which
# tests/test_finetune.py compares with their family config
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("mm*/*/*.py")
                 if p.parent.name not in ("_base_", "finetune"))
SHALLOW = dict(depths=(1, 1, 1, 1))
DET_SIZE, SEG_SIZE = (160, 128), (128, 128)  # (W, H) of the resized tiny images


def _registry(cfg: "Config"):
    scope = cfg.get("default_scope", "mmdet")
    init_default_scope(scope)
    return importlib.import_module(f"{scope}.registry")


def _build(cfg: "Config", shallow: bool = False) -> torch.nn.Module:
    """Build ``cfg.model`` without loading weights; ``shallow`` keeps one block per level (fast CPU steps)."""
    model_cfg = cfg.model.copy()
    model_cfg.backbone.init_cfg = None
    if shallow and not model_cfg.backbone.model_name.startswith("agent_pvt"):  # agent_pvt_* fix their depths
        kwargs = dict(model_cfg.backbone.get("model_kwargs") or {}, **SHALLOW)
        if "dilations" in kwargs:  # one block per level: keep each level's largest dense dilation
            kwargs["dilations"] = [[max(level)] for level in kwargs["dilations"]]
        model_cfg.backbone.model_kwargs = kwargs
    return _registry(cfg).MODELS.build(model_cfg)


def test_every_family_has_its_configs() -> None:
    names = set(CONFIGS)
    for fam in ("nat", "dinat", "biformer", "maxvit", "davit", "focalnet", "agent_swin", "agent_pvt"):
        short = fam.replace("_", "-")
        for size in ("tiny", "small"):
            assert f"configs/mmdet/{fam}/mask-rcnn_{short}-{size}_fpn_1x_coco.py" in names
            assert f"configs/mmdet/{fam}/mask-rcnn_{short}-{size}_fpn_ms-crop-3x_coco.py" in names
            assert f"configs/mmseg/{fam}/upernet_{short}-{size}_8xb2-160k_ade20k-512x512.py" in names
            cascade = f"configs/mmdet/{fam}/cascade-mask-rcnn_{short}-{size}_fpn_ms-crop-3x_coco.py"
            assert (cascade in names) == (fam in ("nat", "dinat", "focalnet", "agent_swin"))


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds(path: str) -> None:
    cfg = Config.fromfile(str(REPO / path))
    backbone = cfg.model.backbone
    assert backbone.type == "AttnZooBackbone"
    ckpt = backbone.init_cfg.checkpoint
    assert ckpt.startswith(("https://", "hf-hub:")), f"{path}: init_cfg.checkpoint {ckpt!r}"
    with torch.device("meta"):  # structure only: no memory, no weight initialisation
        model = _build(cfg)
    assert all(p.is_meta for p in model.parameters())
    widths = model.backbone.channels
    neck_in = cfg.model.neck.in_channels if "neck" in cfg.model else cfg.model.decode_head.in_channels
    assert list(neck_in) == widths, f"{path}: head expects {neck_in}, backbone gives {widths}"
    knobs = backbone.get("model_kwargs") or {}
    if "n_win" in knobs:  # BiFormer: 16 regions per side for COCO, 8 for ADE20K 512^2
        assert knobs["n_win"] == (8 if path.startswith("configs/mmseg") else 16)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dense_demo")
    # real Fashion-MNIST items when dataset-fashion-mnist is installed, random blobs otherwise
    make_demo_data([str(root), "--train", "6", "--val", "2", "--size", "120", "150", "--allow-random-glyphs"])
    return root


def _det_dataset(root: Path, split: str, train: bool) -> dict:
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
                dict(type="Resize", scale=DET_SIZE, keep_ratio=True)]
    pipeline += [dict(type="RandomFlip", prob=0.5)] if train else []
    pipeline += [dict(type="PackDetInputs")]
    return dict(type="CocoDataset", data_root=str(root / "det"), ann_file=f"annotations/instances_{split}.json",
                data_prefix=dict(img=f"images/{split}/"), metainfo=dict(classes=CLASSES),
                filter_cfg=dict(filter_empty_gt=train), pipeline=pipeline, test_mode=not train)


def _seg_dataset(root: Path, split: str) -> dict:
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
                dict(type="Resize", scale=SEG_SIZE, keep_ratio=True), dict(type="PackSegInputs")]
    return dict(type="BaseSegDataset", data_root=str(root / "seg"), img_suffix=".png", seg_map_suffix=".png",
                data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"),
                reduce_zero_label=True, metainfo=dict(classes=CLASSES), pipeline=pipeline)


def _train_and_infer(cfg: "Config", train_set: dict, val_set: dict):
    """One loss + backward on two images (finite, gradients reach every backbone level), one prediction."""
    model = _build(cfg, shallow=True)
    datasets = importlib.import_module(f"{cfg.default_scope}.registry").DATASETS
    train, val = datasets.build(train_set), datasets.build(val_set)
    model.train()
    data = model.data_preprocessor(pseudo_collate([train[0], train[1]]), True)
    losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss), log_vars
    loss.backward()
    backbone = model.backbone.model
    for level in range(4):
        prefix = backbone.feature_info[level]["module"] + "."
        grads = [p.grad for n, p in backbone.named_parameters() if n.startswith(prefix) and p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), f"level {level}"
        assert any(g.abs().sum() > 0 for g in grads), f"no gradient reaches backbone level {level}"
    model.eval()
    with torch.no_grad():
        out = model.test_step(pseudo_collate([val[0]]))
    assert len(out) == 1
    return out[0]


DET_FAMILIES = ["nat", "dinat", "biformer", "maxvit", "davit", "focalnet", "agent_swin", "agent_pvt"]


@pytest.mark.parametrize("family", DET_FAMILIES)
def test_mask_rcnn_trains_and_predicts(family: str, demo_root: Path) -> None:
    short = family.replace("_", "-")
    cfg = Config.fromfile(str(REPO / f"configs/mmdet/{family}/mask-rcnn_{short}-tiny_fpn_1x_coco.py"))
    out = _train_and_infer(cfg, _det_dataset(demo_root, "train", True), _det_dataset(demo_root, "val", False))
    pred = out.pred_instances
    assert pred.bboxes.shape[-1] == 4 and len(pred.masks) == len(pred.bboxes)
    h, w = out.ori_shape
    assert (pred.bboxes[:, 2] <= w + 1e-3).all() and (pred.bboxes[:, 3] <= h + 1e-3).all()


@pytest.mark.parametrize("family", ["nat", "biformer", "agent_swin"])
def test_upernet_trains_and_predicts(family: str, demo_root: Path) -> None:
    short = family.replace("_", "-")
    cfg = Config.fromfile(str(REPO / f"configs/mmseg/{family}/upernet_{short}-tiny_8xb2-160k_ade20k-512x512.py"))
    cfg.model.data_preprocessor.size = None  # no 512x512 padding on CPU: pad to stride 32 instead
    cfg.model.data_preprocessor.size_divisor = 32
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.norm_cfg = dict(type="BN", requires_grad=True)
    out = _train_and_infer(cfg, _seg_dataset(demo_root, "train"), _seg_dataset(demo_root, "val"))
    assert out.pred_sem_seg.data.shape[-2:] == tuple(out.ori_shape)


@pytest.mark.slow
def test_dense_train_tool_runs_a_few_iterations(demo_root: Path, tmp_path: Path) -> None:
    """A user's config that inherits a shipped one and points it at the tiny set (10 classes), plus
    --cfg-options: three training iterations, then mmengine's final-epoch COCO evaluation."""
    det = demo_root / "det"
    data = dict(data_root=str(det), metainfo=dict(classes=CLASSES))
    user_cfg = tmp_path / "tiny_nat.py"
    user_cfg.write_text(
        f"_base_ = [{str(REPO / 'configs/mmdet/nat/mask-rcnn_nat-tiny_fpn_1x_coco.py')!r}]\n"
        f"train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict("
        f"**{data!r}, ann_file='annotations/instances_train.json', data_prefix=dict(img='images/train/')))\n"
        f"val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict("
        f"**{data!r}, ann_file='annotations/instances_val.json', data_prefix=dict(img='images/val/')))\n"
        "test_dataloader = val_dataloader\n"
        f"model = dict(roi_head=dict(bbox_head=dict(num_classes={len(CLASSES)}), "
        f"mask_head=dict(num_classes={len(CLASSES)})))\n"
        f"val_evaluator = dict(ann_file={str(det / 'annotations/instances_val.json')!r})\n"
        "test_evaluator = val_evaluator\n")
    options = ["model.backbone.init_cfg=None", "model.backbone.model_kwargs.depths=[1,1,1,1]",
               "train_cfg.max_epochs=1", "default_hooks.logger.interval=1",
               f"train_dataloader.dataset.pipeline.2.scale=({DET_SIZE[0]},{DET_SIZE[1]})",
               f"val_dataloader.dataset.pipeline.1.scale=({DET_SIZE[0]},{DET_SIZE[1]})", "param_scheduler.0.end=2",
               # toy-size RoI work (the shipped 2000 proposals, 512 sampled RoIs and 100 masks per image made each
               # CPU step 8 s and each validation image 3.5 s); the shipped heads train in test_mask_rcnn_*
               "model.train_cfg.rpn_proposal.max_per_img=100", "model.train_cfg.rcnn.sampler.num=64",
               "model.test_cfg.rpn.max_per_img=100", "model.test_cfg.rcnn.max_per_img=10"]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = subprocess.run([sys.executable, "tools/dense_train.py", str(user_cfg), "--work-dir", str(tmp_path / "work"),
                          "--cfg-options", *options], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "work" / "epoch_1.pth").is_file()
    log = "".join(p.read_text() for p in (tmp_path / "work").rglob("*.log"))
    assert "Epoch(train) [1][3/3]" in log, log[-2000:]
    assert "coco/bbox_mAP" in log and "coco/segm_mAP" in log, log[-2000:]  # the final-epoch validation ran
