"""Pretrain -> init_cfg -> dense fine-tune: every family's tools/train.py checkpoint loads into the backbone of its
Mask R-CNN fine-tune config weight for weight (the refusals of partial or foreign checkpoints are in
test_dense_backbone.py), tools/finetune.py runs end to end at toy size and its Mask R-CNN loss drops, and the
fine-tune configs change only data, size and schedule."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import dense_stack_missing

REPO = Path(__file__).resolve().parents[1]
_MISSING = dense_stack_missing()

pytestmark = [pytest.mark.dense, pytest.mark.skipif(bool(_MISSING), reason=_MISSING)]

if not _MISSING:
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import attnzoo.openmmlab  # noqa: F401  (registers AttnZooBackbone)
    from attnzoo.openmmlab import finetune
    from attnzoo.training import UsageError
    from attnzoo.training.loop import main as train_main
    from tests.test_train import make_image_folder
    from tools import finetune as finetune_cli

SHALLOW = "{depths: [1, 1, 1, 1]}"  # one block per level: the handoff is about keys and values, not depth
# The smallest variant of each family, as tools/train.py would pretrain it (--model-kwargs), and its detection
# config: a shipped fine-tune config (maxvit_t), one written over the family config (most), or over a sibling's
# with the name and widths replaced (nat_mini, dinat_mini).
FAMILIES = {
    "nat": ("nat_mini", SHALLOW),
    "dinat": ("dinat_mini", "{depths: [1, 1, 1, 1], dilations: [[1], [1], [1], [1]]}"),
    "biformer": ("biformer_tiny", SHALLOW),
    "maxvit": ("maxvit_t", SHALLOW),
    "davit": ("davit_t", SHALLOW),
    "focalnet": ("focalnet_t_lrf", SHALLOW),
    "agent_swin": ("agent_swin_t", SHALLOW),
    "agent_pvt": ("agent_pvt_t", None),  # agent_pvt_* fix their depths
}
HEAD = ("head.", "norm.", "fc_norm.", "pre_logits.")  # what a dense backbone leaves out of a classifier


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("cls"), classes=2, train=2, val=1)


@pytest.fixture(scope="module")
def pretrained(images, tmp_path_factory):
    """family -> the run folder of one tools/train.py epoch."""
    out = tmp_path_factory.mktemp("pretrain")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            model, kwargs = FAMILIES[family]
            argv = [str(images), "--model", model, "--input-size", "3", "32", "32", "-b", "2", "--epochs", "1",
                    "-j", "0", "--opt", "momentum", "--momentum", "0", "--lr", "1e-2", "--warmup-epochs", "0",
                    "--output", str(out), "--experiment", family,
                    "--no-progress", "--no-plot"]
            argv += ["--model-kwargs", kwargs] if kwargs else []
            cache[family] = train_main(argv).output_dir
        return cache[family]

    return get


def _backbone(family: str, checkpoint: Path, tmp_path: Path):
    """The backbone of ``family``'s Mask R-CNN fine-tune config (shallow, as pretrained), init_cfg -> ``checkpoint``
    (built alone: the detector's init_weights calls the backbone's, and the CLI test runs the whole detector)."""
    model, kwargs = FAMILIES[family]
    path, overrides = finetune.resolve_config(model, "det", REPO / "configs", tmp_path)
    cfg = Config.fromfile(str(path))
    cfg.merge_from_dict(overrides)
    backbone = cfg.model.backbone
    knobs = dict(backbone.get("model_kwargs") or {})
    if kwargs:
        knobs["depths"] = (1, 1, 1, 1)
    if "dilations" in knobs:  # one block per level: keep each level's largest dense dilation
        knobs["dilations"] = [[max(level)] for level in knobs["dilations"]]
    backbone.model_kwargs = knobs
    backbone.init_cfg = dict(type="Pretrained", checkpoint=str(checkpoint))
    init_default_scope("mmdet")
    from mmdet.registry import MODELS

    return MODELS.build(cfg.model.backbone)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretrain_checkpoint_loads_every_backbone_weight(family: str, pretrained, tmp_path: Path) -> None:
    """tools/train.py's last.pth.tar -> init_cfg -> the fine-tune config's backbone: the same keys (classifier head and
    final norm aside), every tensor equal (FocalNet's dense focal kernels: the trained kernel centred in zeros)."""
    run = pretrained(family)
    state = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)
    trained = state["state_dict"]
    backbone = _backbone(family, run / "last.pth.tar", tmp_path)
    backbone.init_weights()
    loaded = backbone.model.state_dict()
    expected = {k for k in trained if not k.startswith(HEAD)}
    assert not expected - set(loaded), f"backbone keys not loaded: {sorted(expected - set(loaded))}"
    assert not set(loaded) - expected, f"backbone keys the checkpoint lacks: {sorted(set(loaded) - expected)}"
    padded = 0
    for key, value in loaded.items():
        ref = trained[key]
        if value.shape != ref.shape:  # dense kernels larger than the trained ones
            assert family == "focalnet" and "focal_layers" in key, (key, value.shape, ref.shape)
            ph, pw = (value.shape[2] - ref.shape[2]) // 2, (value.shape[3] - ref.shape[3]) // 2
            inner = value[:, :, ph:ph + ref.shape[2], pw:pw + ref.shape[3]]
            assert torch.equal(inner, ref), key
            outside = value.clone()
            outside[:, :, ph:ph + ref.shape[2], pw:pw + ref.shape[3]] = 0
            assert not outside.any(), f"{key}: non-zero outside the trained kernel"
            padded += 1
        else:
            assert torch.equal(value, ref), f"{key} differs from the checkpoint"
    assert padded == (12 if family == "focalnet" else 0)  # 4 levels x 3 focal levels


# fewer proposals and sampled RoIs than COCO's (the CPU step is dominated by the RoI heads otherwise), no checkpoint
SMALL = ["model.train_cfg.rpn_proposal.max_per_img=100", "model.train_cfg.rcnn.sampler.num=64",
         "default_hooks.checkpoint=None"]


@pytest.mark.slow
def test_finetune_cli_pretrains_then_fine_tunes_and_lowers_the_detection_loss(images: Path, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """tools/finetune.py at toy size: tools/train.py pretraining on an image folder, the pasted sets written,
    Mask R-CNN and UPerNet fine-tuned from the pretraining checkpoint through init_cfg (the recipe's optimizer, seed
    0), summary.json and curves.png. The Mask R-CNN loss of the last three of its 12 steps is far below that of the
    first three."""
    monkeypatch.chdir(tmp_path)  # relative paths of the run land here
    argv = ["--model", "nat_nano", "--output", "runs", "--data-dir", "pasted", "--train-images", "8",
            "--val-images", "2", "--image-size", "64", "96", "--det-epochs", "3", "--seg-iters", "2",
            "--batch-size", "2", "--workers", "0", "--log-interval", "1", "--allow-random-glyphs",
            "--model-kwargs", SHALLOW,
            "--pretrain-args", f"--dataset '' --data-dir {images} --num-classes 2 -b 2 --no-progress --no-plot",
            "--det-cfg-options", *SMALL, "--seg-cfg-options", "default_hooks.checkpoint=None"]
    assert finetune_cli.main(argv) == 0
    run = Path("runs/nat_nano")
    summary = json.loads((run / "summary.json").read_text())
    checkpoint = "runs/nat_nano/pretrain/last.pth.tar"
    assert summary["init"] == "pretrained" and summary["pretrain"]["checkpoint"] == checkpoint
    assert summary["data"]["train"] == 8 and (Path("pasted") / "det/annotations/instances_val.json").is_file()
    dumped = Config.fromfile(str(run / "det" / "det_nat_nano_finetune.py"))  # what the Runner ran
    assert dumped.model.backbone.init_cfg.checkpoint == checkpoint
    assert dumped.model.backbone.model_name == "nat_nano" and dumped.model.neck.in_channels == [32, 64, 128, 256]
    for task, metrics in (("det", ("bbox_mAP", "segm_mAP")), ("seg", ("mIoU",))):
        record = summary[task]
        log = next(Path(record["log_dir"]).glob("*.log")).read_text()
        assert f"nat_nano: loaded {checkpoint}" in log  # init_weights went through the adapter
        assert record["wall_s"] > 0 and record["img_per_s"] > 0
        assert all(0.0 <= record[m] <= 1.0 for m in metrics), record
    loss = summary["det"]["curve"]["loss"]
    assert len(loss) == 12 and summary["det"]["curve"]["val_iter"] == [4, 8, 12]
    assert sum(loss[-3:]) < 0.7 * sum(loss[:3]), f"Mask R-CNN loss did not drop: {loss}"
    assert len(summary["seg"]["curve"]["loss"]) == 2 and summary["seg"]["curve"]["val_iter"] == [1, 2]
    assert (run / "curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in Path(".").iterdir()) == ["pasted", "runs"]  # the data went in atomically


def test_shipped_finetune_configs_are_their_family_config_plus_the_recipe() -> None:
    """Each configs/mm*/finetune config is exactly recipe_text over its family config, and loads as that config
    with only data, image size, class count, normalisation, schedule and the learning rate changed."""
    allowed = {"det": {"data_root", "max_epochs", "train_pipeline", "test_pipeline", "train_dataloader",
                       "val_dataloader", "test_dataloader", "val_evaluator", "test_evaluator", "train_cfg",
                       "param_scheduler", "default_hooks", "log_processor", "optim_wrapper", "fashion_det"},
               "seg": {"data_preprocessor", "crop_size", "dataset_type", "data_root", "train_pipeline",
                       "test_pipeline", "train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator",
                       "test_evaluator", "train_cfg", "param_scheduler", "default_hooks", "optim_wrapper",
                       "fashion_seg"}}
    model_changes = {"det": [("data_preprocessor", "mean"), ("data_preprocessor", "std"),
                             ("roi_head", "bbox_head", "num_classes"), ("roi_head", "mask_head", "num_classes")],
                     "seg": [("data_preprocessor", "mean"), ("data_preprocessor", "std"), ("data_preprocessor", "size"),
                             ("decode_head", "num_classes"), ("auxiliary_head", "num_classes")]}
    for task in ("det", "seg"):
        shipped = finetune.shipped_finetune_configs(task, REPO / "configs")
        assert set(shipped) == {"nat_tiny", "biformer_small", "maxvit_t"}, shipped
        families = finetune.family_configs(task, REPO / "configs")
        for model, path in shipped.items():
            body = "".join(line for line in path.read_text().splitlines(keepends=True) if not line.startswith("#"))
            assert body == finetune.recipe_text(families[model], task, base_dir=path.parent), path
            tuned = Config.fromfile(str(path), import_custom_modules=False).to_dict()
            family = Config.fromfile(str(families[model]), import_custom_modules=False).to_dict()
            for keys in model_changes[task]:  # the model changes only where the data reaches it
                a, b = tuned["model"], family["model"]
                for k in keys[:-1]:
                    a, b = a[k], b[k]
                a.pop(keys[-1]), b.pop(keys[-1])
            assert tuned["model"] == family["model"], path
            # the family's optimizer at the recipe's rate (results/finetune_det_lr.md, finetune_seg_lr.md)
            assert tuned["optim_wrapper"]["optimizer"].pop("lr") == 2e-4, path
            assert family["optim_wrapper"]["optimizer"].pop("lr") != 2e-4, path
            assert tuned["optim_wrapper"] == family["optim_wrapper"], path
            same = set(family) - allowed[task]
            assert set(tuned) - allowed[task] == same, path
            assert {k: tuned[k] for k in same} == {k: family[k] for k in same}, path


def test_config_resolution_and_its_errors(tmp_path: Path) -> None:
    configs = REPO / "configs"
    path, overrides = finetune.resolve_config("maxvit_t", "seg", configs, tmp_path)
    assert path.parent == configs / "mmseg" / "finetune" and overrides == {}
    path, overrides = finetune.resolve_config("davit_t", "det", configs, tmp_path)  # family config, no shipped one
    assert path.parent == tmp_path and overrides == {}
    assert Config.fromfile(str(path)).model.backbone.model_name == "davit_t"
    path, overrides = finetune.resolve_config("nat_nano", "seg", configs, tmp_path)  # a sibling's (nat_tiny's)
    assert overrides == {"model.backbone.model_name": "nat_nano", "model.decode_head.in_channels": [32, 64, 128, 256],
                         "model.auxiliary_head.in_channels": 128}
    with pytest.raises(UsageError, match="--model agent_deit_t: no mmdet config of its family"):
        finetune.resolve_config("agent_deit_t", "det", configs, tmp_path)


def test_configure_sets_data_size_schedule_and_init(tmp_path: Path) -> None:
    common = dict(work_dir=tmp_path / "w", data_root=tmp_path / "d", image_size=(96, 128), batch_size=4,
                  train_images=40, workers=0, seed=3, model_kwargs=dict(in_chans=3))
    shipped = {task: finetune.shipped_finetune_configs(task, REPO / "configs")["nat_tiny"] for task in ("det", "seg")}
    det = finetune.configure(Config.fromfile(str(shipped["det"])), "det", length=5, checkpoint="ck.pth", **common)
    assert det.train_cfg.max_epochs == det.max_epochs == 5 and det.param_scheduler[1].T_max == 5
    assert det.param_scheduler[0].end == 10  # a fifth of the 50 iterations (5 epochs x 10 batches)
    assert det.model.backbone.init_cfg == dict(type="Pretrained", checkpoint="ck.pth")
    assert det.model.backbone.model_kwargs["in_chans"] == 3 and det.randomness.seed == 3
    assert det.val_evaluator.ann_file == str(tmp_path / "d" / "det" / "annotations" / "instances_val.json")
    for loader in (det.train_dataloader, det.val_dataloader, det.test_dataloader):
        assert loader.dataset.data_root == f"{tmp_path / 'd' / 'det'}/" and not loader.persistent_workers
        assert [t.scale for t in loader.dataset.pipeline if t.type == "Resize"] == [(128, 96)]
    seg = finetune.configure(Config.fromfile(str(shipped["seg"])), "seg", length=8, checkpoint=None, **common)
    assert seg.model.backbone.init_cfg is None  # --from-scratch
    assert seg.train_cfg.max_iters == 8 and seg.train_cfg.val_interval == 2
    assert seg.param_scheduler[0].start_factor == 1.0  # 8 iterations: no warm-up
    assert seg.model.data_preprocessor.size == (96, 128) and seg.train_dataloader.batch_size == 4
    # a config with scale jitter and crops (benchmarks/finetune_levers.py's augmented one) gets the size there too
    aug = finetune.configure(Config.fromfile(str(REPO / "benchmarks" / "configs" /
                                                 "upernet_nat-tiny_fashion-seg_augmented.py")), "seg", length=8,
                             checkpoint=None, **common)
    steps = {t.type: t for t in aug.train_dataloader.dataset.pipeline}
    assert steps["RandomResize"].scale == (128, 96) and steps["RandomCrop"].crop_size == (96, 128)
    assert aug.train_pipeline == aug.train_dataloader.dataset.pipeline


def test_scalars_give_curves_and_an_evaluation_without_boxes_counts_as_map_0(tmp_path: Path) -> None:
    """mmdet's CocoMetric logs no metric when nothing was detected (a short schedule's first evaluations)."""
    rows = [dict(lr=1e-4, loss=4.0, time=2.0, step=1), dict(lr=1e-4, loss=3.0, time=1.0, step=2),
            dict(data_time=0.1, time=0.5, step=2),
            dict(lr=1e-4, loss=2.0, time=1.0, step=3), {"coco/bbox_mAP": 0.25, "coco/segm_mAP": 0.5, "step": 3}]
    path = tmp_path / "scalars.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = finetune.read_scalars(path, "det")
    assert (record["bbox_mAP"], record["segm_mAP"], record["no_detections"]) == (0.25, 0.5, [2])
    assert record["curve"] == dict(iter=[1, 2, 3], loss=[4.0, 3.0, 2.0], val_iter=[2, 3], bbox_mAP=[0.0, 0.25],
                                   segm_mAP=[0.0, 0.5])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    with pytest.raises(RuntimeError, match="an evaluation at step 2 logged none of mIoU"):
        finetune.read_scalars(path, "seg")


def test_runs_and_data_are_never_overwritten(tmp_path: Path, monkeypatch) -> None:
    first = finetune.fresh_folder(tmp_path, "nat_nano")
    (first / "summary.json").write_text("{}")
    assert finetune.fresh_folder(tmp_path, "nat_nano") == tmp_path / "nat_nano-1"
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pasted"
    data.mkdir()
    (data / finetune_cli.DATA_META).write_text(json.dumps(dict(train=64, val=16, size=[160, 192], seed=0)))
    args = finetune_cli.parse_args(["--data-dir", str(data), "--train-images", "32"])
    with pytest.raises(UsageError, match=r"holds 64\+16 images of 160x192, this run asks for 32\+16"):
        finetune_cli.prepare_data(args)
    with pytest.raises(SystemExit):
        finetune_cli.parse_args(["--from-scratch", "--checkpoint", "x.pth"])
    assert os.listdir(data) == [finetune_cli.DATA_META]


@pytest.mark.parametrize("schedule, extra, expected", [
    ("toy", "", dict(lr=2.5e-3, warmup_epochs=0, clip_grad=None, batch_size=128, input_size=[3, 28, 28])),
    ("full", "", dict(lr=1e-3, warmup_epochs=1, clip_grad=1.0, batch_size=512, input_size=[3, 56, 56])),
    ("full", "--lr 3e-4", dict(lr=3e-4, warmup_epochs=1, clip_grad=1.0, batch_size=512, input_size=[3, 56, 56])),
])
def test_pretraining_recipe_per_schedule(schedule: str, extra: str, expected: dict, tmp_path: Path,
                                         monkeypatch) -> None:
    """The "full" pretraining runs at 56 px and batch 512 with a lower rate, a warm-up epoch and clipping (the demo's
    2.5e-3 from the first step sent nat_tiny to chance accuracy on an H200); --pretrain-args still overrides it."""
    import attnzoo.training.loop as loop
    from attnzoo.training.args import parse_with_config, train_parser

    seen = {}

    def fake_train(argv):
        seen.update(vars(parse_with_config(train_parser(), argv)))
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(loop, "main", fake_train)
    args = finetune_cli.parse_args(["--model", "nat_nano", "--schedule", schedule, "--device", "cpu",
                                    "--pretrain-args", extra])
    with pytest.raises(KeyboardInterrupt):
        finetune_cli.pretrain(args, tmp_path)
    assert {k: seen[k] for k in expected} == expected


@pytest.mark.parametrize("visible, expected", [(None, "1"), ("2,3", "3")])
def test_benchmark_runs_on_the_gpus_it_was_given(visible: str | None, expected: str, tmp_path: Path,
                                                 monkeypatch) -> None:
    """Run i of ``benchmarks.finetune --gpus N`` goes to the i-th GPU of the benchmark's own
    CUDA_VISIBLE_DEVICES (physical GPU i before: a benchmark given GPUs 2,3 ran on 0,1)."""
    from benchmarks import finetune as bench

    seen = {}

    def popen(cmd, env, **kwargs):
        seen.update(env)
        return None

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    run = bench.Run("nat_nano", scratch=True)
    bench._start(run, tmp_path, [], gpu=1)
    run.file.close()
    assert seen["CUDA_VISIBLE_DEVICES"] == expected


def test_benchmark_reports_finished_runs_of_one_stage(tmp_path: Path) -> None:
    """``--report-from`` rebuilds the report from runs already in a folder, on the measuring machine's stamp;
    runs of one stage (``--tasks seg``) are judged on that stage (the report raised TypeError on the missing
    detection metrics)."""
    from benchmarks import finetune as bench

    args = dict(pretrain_epochs=3, pretrain_batch_size=512, pretrain_size=56, det_epochs=4, seg_iters=1000,
                batch_size=8, train_images=1024, tasks=["seg"], det_cfg_options=[],
                seg_cfg_options=["optim_wrapper.optimizer.lr=2e-4"])
    for init, miou in (("pretrained", 0.55), ("scratch", 0.5)):
        run = tmp_path / "runs" / f"nat_nano-{init}"
        run.mkdir(parents=True)
        summary = dict(model="nat_nano", init=init, args=args, wall_s=200.0, device="NVIDIA H200",
                       versions=dict(python="3.12.3", torch="2.11.0", attnzoo=None),
                       seg=dict(mIoU=miou, wall_s=150.0, img_per_s=60.0, peak_memory_mib=1000.0))
        (run / "summary.json").write_text(json.dumps(summary))
        os.utime(run / "summary.json", (0, 0))
    bench.main(["--report-from", str(tmp_path / "runs"), "--models", "nat_nano", "--out", str(tmp_path / "out"),
                "--name", "seg_lr"])
    report = json.loads((tmp_path / "out" / "seg_lr.json").read_text())
    pretrained, scratch = report["rows"]
    assert pretrained["targets"] == "missed: mIoU 0.550 < 0.6" and scratch["targets"] is None
    assert pretrained["bbox mAP"] is None and pretrained["mIoU"] == 0.55
    assert "seg only, seg optim_wrapper.optimizer.lr=2e-4" in pretrained["schedule"]
    assert pretrained["measured"] == "1970-01-01 00:00 UTC"
    assert report["env"]["device"] == "NVIDIA H200" and report["env"]["torch"] == "2.11.0"


def test_levers_report_and_variant_flags(tmp_path: Path) -> None:
    """``benchmarks.finetune_levers --report-from``: a finished variant's mIoU curve and the checkpoint's variant, a
    stopped one marked as such; every variant's flags parse as tools/finetune.py's and name files that exist."""
    from benchmarks import finetune_levers as levers
    from tools.finetune import parse_args

    for name, flags, _ in levers.VARIANTS.values():
        args = parse_args(["--model", levers.MODELS[name], *levers.COMMON, *flags])
        assert args.seg_config is None or (REPO / args.seg_config).is_file()
    done = dict(model="nat_tiny", wall_s=300.0, device="NVIDIA H200", versions=dict(torch="2.11.0"),
                pretrain=dict(checkpoint="output/finetune_levers/nat_b16/pretrain/last.pth.tar"),
                seg=dict(mIoU=0.53, wall_s=250.0, img_per_s=50.0, peak_memory_mib=1000.0,
                         curve=dict(mIoU=[0.3, 0.4, 0.5, 0.53])))
    for name, summary in (("nat_b16", done), ("nat_b32", dict(done, seg=None, wall_s=None))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if v}))
    levers.main(["--report-from", "--work-dir", str(tmp_path), "--variants", "nat_b16", "nat_b32", "--out",
                 str(tmp_path / "out")])
    first, stopped = json.loads((tmp_path / "out" / "finetune_seg_levers.json").read_text())["rows"]
    assert first["mIoU"] == 0.53 and first["mIoU at each evaluation"] == "0.300 / 0.400 / 0.500 / 0.530"
    assert first["pretrained in"] == "nat_b16" and stopped["pretrained in"] == "nat_b16"
    assert stopped["mIoU"] is None and stopped["finished"] == "stopped early"
