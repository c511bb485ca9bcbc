"""tools/train.py and tools/validate.py on tiny synthetic ImageFolders: exact resume, DDP over gloo,
evaluation, checkpoint safety and the one-line errors."""
from __future__ import annotations

import csv
import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.training import UsageError
from attnzoo.training import checkpoint as ckpt
from attnzoo.training import data as data_mod
from attnzoo.training.args import parse_with_config, train_parser
from attnzoo.training.loop import main as train_main
from attnzoo.training.validate import run as validate_run

REPO = Path(__file__).resolve().parents[1]
# a 0.4 M-parameter timm model with stochastic depth, so the resume test also checks the RNG stream
TINY = ["--model", "test_resnet", "--img-size", "16", "-b", "8", "--lr", "1e-3", "--warmup-epochs", "1",
        "--no-progress", "--no-plot", "--log-interval", "100"]


def make_image_folder(root: Path, classes: int = 3, train: int = 12, val: int = 5, seed: int = 0) -> Path:
    """Colour-coded 20x20 PNGs in root/{train,val}/classK, learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
                a[..., c % 3] += 150
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"))


def _no_timing(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith(("_time_s", "_img_per_s"))}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_config_yaml_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: resnet10t\ndrop_path: 0.3\nepochs: 7\nscale: [0.5, 1.0]\n")
    args = parse_with_config(train_parser(), ["-c", str(cfg), "--epochs", "2", "/data"])
    assert (args.model, args.drop_path, args.epochs, args.scale, args.data_dir) == ("resnet10t", 0.3, 2, [0.5, 1.0], "/data")
    cfg.write_text("model: resnet10t\ndroppath: 0.3\n")
    with pytest.raises(UsageError, match=r"unknown keys \['droppath'\]"):
        parse_with_config(train_parser(), ["-c", str(cfg)])


def test_resume_after_mid_epoch_kill_matches_uninterrupted_run(folder, tmp_path, monkeypatch):
    """Kill epoch 2 of 2 after two optimizer steps, resume from last.pth.tar: same weights, optimizer
    and EMA bit for bit as the uninterrupted run (augmentation, mixup, drop-path and worker RNG included)."""
    common = [str(folder), *TINY, "--epochs", "2", "-j", "1", "--drop-path", "0.2", "--mixup", "0.8",
              "--cutmix", "1.0", "--reprob", "0.5", "--aa", "rand-m9-mstd0.5", "--model-ema",
              "--model-ema-decay", "0.9", "--sched-on-updates", "--output", str(tmp_path)]
    full = train_main([*common, "--experiment", "full"])

    from timm.scheduler.scheduler import Scheduler
    original = Scheduler.step_update

    class Killed(Exception):
        pass

    def step_update(self, num_updates, metric=None):
        if num_updates == 4 + 2:  # 4 updates per epoch: second step of epoch 2
            raise Killed
        return original(self, num_updates, metric)

    monkeypatch.setattr(Scheduler, "step_update", step_update)
    with pytest.raises(Killed):
        train_main([*common, "--experiment", "resumed"])
    monkeypatch.setattr(Scheduler, "step_update", original)
    run_dir = tmp_path / "resumed"
    assert torch.load(run_dir / "last.pth.tar", weights_only=False)["epoch"] == 1
    resumed = train_main([*common, "--experiment", "resumed", "--resume", str(run_dir / "last.pth.tar")])

    a = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=False)
    b = torch.load(run_dir / "last.pth.tar", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key in ("state_dict", "state_dict_ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}[{name}] differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    first = next(iter(a["state_dict"]))
    assert not torch.equal(a["state_dict"][first], a["state_dict_ema"][f"module.{first}"])  # EMA really averaged
    rows = _read_csv(run_dir / "summary.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[-1]["eval_top1"] == _read_csv(tmp_path / "full" / "summary.csv")[-1]["eval_top1"]
    assert _no_timing(resumed.last_metrics) == _no_timing(full.last_metrics)


def test_validate_reproduces_training_eval_and_writes_curves(folder, tmp_path):
    res = train_main([str(folder), *TINY, "--epochs", "2", "-j", "0", "--lr", "3e-3", "--warmup-epochs", "0",
                      "--output", str(tmp_path), "--experiment", "run"])
    run_dir = tmp_path / "run"
    ckpt_path = run_dir / "last.pth.tar"
    png = run_dir / "curves.png"
    assert not png.exists()  # --no-plot
    from attnzoo.training.metrics import plot_curves
    plot_curves(run_dir / "summary.csv", png)
    assert png.stat().st_size > 10_000 and Image.open(png).size == (1000, 400)
    out = validate_run([str(folder), "--checkpoint", str(ckpt_path), "-j", "0", "--no-progress",
                        "--results-file", str(tmp_path / "r.json")])
    assert out["images"] == 15 and out["model"] == "test_resnet"
    assert out["top1"] == pytest.approx(res.last_metrics["eval_top1"], abs=1e-3)
    assert out["loss"] == pytest.approx(res.last_metrics["eval_loss"], rel=1e-4)
    assert (tmp_path / "r.json").exists()

    two = make_image_folder(tmp_path / "two", classes=2)
    with pytest.raises(UsageError, match="predicts 3 classes but the data .* has 2"):
        validate_run([str(two), "--checkpoint", str(ckpt_path), "-j", "0", "--no-progress"])
    with pytest.raises(UsageError, match="has 3 classes but the model/dataset has 2"):
        train_main([str(two), *TINY, "--epochs", "1", "-j", "0", "--output", str(tmp_path),
                    "--experiment", "x", "--resume", str(ckpt_path)])
    with pytest.raises(UsageError, match="trained as test_resnet"):
        validate_run([str(folder), "--model", "resnet10t", "--checkpoint", str(ckpt_path), "--no-progress"])


def test_bad_input_gives_one_line_errors(folder, tmp_path):
    with pytest.raises(UsageError, match="no such directory"):
        train_main([str(tmp_path / "nope"), *TINY, "--output", str(tmp_path)])
    with pytest.raises(UsageError, match="unknown model; did you mean .*resnet10t"):
        train_main([str(folder), *TINY[2:], "--model", "resnet10tt", "--output", str(tmp_path)])
    with pytest.raises(UsageError, match="--num-classes 5 but the training data .* has 3"):
        train_main([str(folder), *TINY, "--num-classes", "5", "--output", str(tmp_path)])
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(1000)}, good)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(good.read_bytes()[:700])
    with pytest.raises(UsageError, match="corrupt or not a PyTorch file"):
        validate_run([str(folder), "--model", "test_resnet", "--checkpoint", str(bad)])
    with pytest.raises(UsageError, match="no such file"):
        train_main([str(folder), *TINY, "--output", str(tmp_path), "--resume", str(tmp_path / "missing.pth")])
    # the CLI prints one line and exits 2, no traceback
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "validate.py"), str(tmp_path / "nope"),
                           "--model", "test_resnet"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such directory" in proc.stderr, proc.stderr


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pth.tar"
    ckpt.save_atomic({"epoch": 1}, path)
    real_save = torch.save

    def dies_midway(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        ckpt.save_atomic({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load_file(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]


def test_fashion_mnist_from_the_debian_package_layout(tmp_path, monkeypatch):
    system = tmp_path / "usr_share"
    system.mkdir()
    payload = {name: os.urandom(64) for name in data_mod.FASHION_MNIST_FILES}
    for name, blob in payload.items():
        with gzip.open(system / f"{name}.gz", "wb") as f:
            f.write(blob)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIR", system)
    raw = data_mod.prepare_fashion_mnist(tmp_path / "data")
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == payload
    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        data_mod.prepare_fashion_mnist(tmp_path / "empty")


_DDP_WORKER = textwrap.dedent("""
    import os, sys, torch
    from attnzoo.training.loop import main
    res = main(sys.argv[2:])
    rank = os.environ["RANK"]
    torch.save(res.model.state_dict(), f"{sys.argv[1]}/rank_{rank}.pt")
    torch.save(res.last_metrics, f"{sys.argv[1]}/metrics_{rank}.pt")
""")


def test_torchrun_two_cpu_ranks_keep_identical_weights(folder, tmp_path):
    """torchrun, 2 CPU processes over gloo: one epoch leaves both ranks with the same (changed) weights,
    and the all-reduced evaluation equals a single-process evaluation of those weights."""
    worker = tmp_path / "worker.py"
    worker.write_text(_DDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path), str(folder), *TINY, "--epochs", "1", "-j", "0", "--output", str(tmp_path),
           "--experiment", "ddp", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"rank_{r}.pt") for r in (0, 1))
    for name, t in w0.items():
        assert torch.equal(t, w1[name]), f"{name} differs between ranks"
    init = torch.load(tmp_path / "ddp" / "last.pth.tar", weights_only=False)
    assert init["rng"][0]["torch"].shape == init["rng"][1]["torch"].shape and len(init["rng"]) == 2
    assert not torch.equal(init["rng"][0]["torch"], init["rng"][1]["torch"]), "ranks share one RNG stream"
    assert (tmp_path / "ddp" / "log_rank1.txt").read_text().count("[rank 1]") >= 1
    m0 = torch.load(tmp_path / "metrics_0.pt")
    assert _no_timing(m0) == _no_timing(torch.load(tmp_path / "metrics_1.pt"))
    single = validate_run([str(folder), "--checkpoint", str(tmp_path / "ddp" / "last.pth.tar"), "-j", "0",
                           "--no-progress"])
    assert single["top1"] == pytest.approx(m0["eval_top1"], abs=1e-3)  # 15 val images over 2 ranks: padding dropped
    assert single["loss"] == pytest.approx(m0["eval_loss"], rel=1e-4)
