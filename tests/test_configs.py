"""mmdet configs inherit their siblings: a 3x config is its 1x config plus the ms-crop 3x schedule, a cascade
config is its 3x Mask R-CNN config with mmdet's Cascade Mask R-CNN (its own base's values) and attnzoo's
4conv-1fc GIoU box heads. Loads configs only (mmengine + mmdet's config files; no mmcv ops)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
_MISSING = [m for m in ("mmengine", "mmdet") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.dense, pytest.mark.skipif(bool(_MISSING), reason=f"needs {_MISSING} (the 'dense' extra)")]

MMDET = REPO / "configs" / "mmdet"
THREE_X = sorted(p.relative_to(REPO).as_posix() for p in MMDET.glob("*/mask-rcnn_*_ms-crop-3x_coco.py"))
CASCADE = sorted(p.relative_to(REPO).as_posix() for p in MMDET.glob("*/cascade-mask-rcnn_*.py"))
SCHEDULE = {"max_epochs", "train_cfg", "param_scheduler", "train_pipeline", "train_dataloader", "ms_crop_3x"}


def _load(path: str) -> dict[str, Any]:
    from mmengine.config import Config
    return Config.fromfile(str(REPO / path), import_custom_modules=False).to_dict()


def _without(cfg: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in keys}


def test_every_3x_and_cascade_config_is_checked():
    assert len(THREE_X) == 16 and len(CASCADE) == 8


@pytest.mark.parametrize("path", THREE_X)
def test_3x_config_is_its_1x_config_with_the_3x_schedule(path: str) -> None:
    three, one = _load(path), _load(path.replace("_ms-crop-3x_", "_1x_"))
    assert _without(three, SCHEDULE) == _without(one, SCHEDULE)  # model, optimizer, data, runtime
    assert three["max_epochs"] == three["train_cfg"]["max_epochs"] == 36 and one["max_epochs"] == 12
    assert dict(three["train_cfg"], max_epochs=12) == one["train_cfg"]
    warmup, steps = three["param_scheduler"]
    assert warmup == one["param_scheduler"][0]
    assert dict(steps, end=12, milestones=[8, 11]) == one["param_scheduler"][1] and steps["milestones"] == [27, 33]
    pipe = three["train_dataloader"]["dataset"]["pipeline"]
    assert pipe == three["train_pipeline"]
    assert [t["type"] for t in pipe] == ["LoadImageFromFile", "LoadAnnotations", "RandomFlip", "RandomChoice",
                                         "PackDetInputs"]
    # loading, flip and packing as in the 1x pipeline (mmdet's own, which also names its scope)
    assert pipe[:3] + pipe[4:] == [_without(one["train_pipeline"][i], {"_scope_"}) for i in (0, 1, 3, 4)]
    loader, one_loader = three["train_dataloader"], one["train_dataloader"]
    assert dict(loader, dataset=_without(loader["dataset"], {"pipeline"})) == \
        dict(one_loader, dataset=_without(one_loader["dataset"], {"pipeline"}))


@pytest.mark.parametrize("path", CASCADE)
def test_cascade_config_is_its_mask_rcnn_config_with_mmdets_cascade(path: str) -> None:
    from mmengine.config import Config
    cascade, mask_rcnn = _load(path), _load(path.replace("cascade-mask-rcnn_", "mask-rcnn_"))
    own = {"model", "cascade_mask_rcnn", "head_norm_cfg"}
    assert _without(cascade, own) == _without(mask_rcnn, own)  # schedule, data, runtime
    model = cascade["model"]
    backbone = _without(model["backbone"], {"drop_path_rate"})
    assert backbone == _without(mask_rcnn["model"]["backbone"], {"drop_path_rate"})
    assert model["neck"] == mask_rcnn["model"]["neck"]
    mmdet_configs = Path(importlib.util.find_spec("mmdet").submodule_search_locations[0]) / ".mim" / "configs"
    ref = Config.fromfile(str(mmdet_configs / "_base_/models/cascade-mask-rcnn_r50_fpn.py")).model.to_dict()
    heads, ref_heads = model["roi_head"]["bbox_head"], ref["roi_head"]["bbox_head"]
    def strip(m: dict[str, Any]) -> dict[str, Any]:
        return dict(_without(m, {"backbone", "neck", "_scope_"}), roi_head=_without(m["roi_head"], {"bbox_head"}))

    assert strip(model) == strip(ref)  # everything else as mmdet's cascade base
    assert len(heads) == len(ref_heads) == 3
    for head, ref_head in zip(heads, ref_heads):
        assert head["type"] == "ConvFCBBoxHead" and head["num_shared_convs"] == 4 and head["num_shared_fcs"] == 1
        assert head["loss_bbox"] == dict(type="GIoULoss", loss_weight=10.0) and head["reg_decoded_bbox"]
        assert head["bbox_coder"] == ref_head["bbox_coder"]
