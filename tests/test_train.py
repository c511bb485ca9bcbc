"""tools/train.py and tools/validate.py on tiny synthetic ImageFolders: exact resume (SIGKILL fault injection),
DDP over gloo, evaluation, run folders that are never overwritten, any channel count, checkpoints that load
with weights_only=True everywhere, and the one-line errors."""
from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from attnzoo.training import UsageError
from attnzoo.training import checkpoint as ckpt
from attnzoo.training import data as data_mod
from attnzoo.training.args import parse_with_config, train_parser
from attnzoo.training.loop import create_model
from attnzoo.training.loop import main as train_main
from attnzoo.training.validate import run as validate_run

REPO = Path(__file__).resolve().parents[1]
# a 0.4 M-parameter timm model with stochastic depth, so the resume test also checks the RNG stream
TINY = ["--model", "test_resnet", "--img-size", "16", "-b", "8", "--lr", "1e-3", "--warmup-epochs", "1",
        "--no-progress", "--no-plot", "--log-interval", "100"]


def make_image_folder(root: Path, classes: int = 3, train: int = 12, val: int = 5, seed: int = 0,
                      gray: bool = False) -> Path:
    """Colour-coded (or, with ``gray``, brightness-coded 8-bit grayscale) 20x20 PNGs in root/{train,val}/classK,
    learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
                a[..., c % 3] += 150
                Image.fromarray(a[..., c % 3] if gray else a).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory) -> Path:
    """The run folder of one TINY epoch on ``folder`` (output/run), for the tests that read its checkpoint."""
    out = tmp_path_factory.mktemp("trained")
    train_main([str(folder), *TINY, "--epochs", "1", "-j", "0", "--output", str(out), "--experiment", "run"])
    return out / "run"


def _no_timing(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith(("_time_s", "_img_per_s"))}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_config_yaml_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: resnet10t\ndrop_path: 0.3\nepochs: 7\nscale: [0.5, 1.0]\n")
    args = parse_with_config(train_parser(), ["-c", str(cfg), "--epochs", "2", "/data"])
    expected = ("resnet10t", 0.3, 2, [0.5, 1.0], "/data")
    assert (args.model, args.drop_path, args.epochs, args.scale, args.data_dir) == expected
    cfg.write_text("model: resnet10t\ndroppath: 0.3\n")
    with pytest.raises(UsageError, match=r"unknown keys \['droppath'\]"):
        parse_with_config(train_parser(), ["-c", str(cfg)])


# 36 images, -b 8: 4 updates per epoch, 2 epochs; every RNG consumer on (augmentation, mixup, drop-path, EMA),
# so a resume that misses any state shows up as different weights
KILL_RUN = [*TINY, "--epochs", "2", "-j", "0", "--drop-path", "0.2", "--mixup", "0.8", "--cutmix", "1.0",
            "--reprob", "0.5", "--aa", "rand-m9-mstd0.5", "--model-ema", "--model-ema-decay", "0.9",
            "--sched-on-updates"]
_KILL_WORKER = textwrap.dedent("""
    import io, os, signal, sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    from timm.scheduler.scheduler import Scheduler
    from attnzoo.training.loop import main
    kind, at = sys.argv[2], int(sys.argv[3])
    if kind == "step":  # SIGKILL right after optimizer update `at`
        step_update = Scheduler.step_update
        def killing_step_update(self, num_updates, metric=None):
            if num_updates == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step_update(self, num_updates, metric)
        Scheduler.step_update = killing_step_update
    else:  # SIGKILL half-way through writing checkpoint file number `at`
        save, calls = torch.save, []
        def killing_save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) == at:
                buf = io.BytesIO()
                save(obj, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *args, **kwargs)
        torch.save = killing_save
    main(sys.argv[4:])
""")


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    train_main([str(folder), *KILL_RUN, "--output", str(out), "--experiment", "full"])
    return out / "full" / "last.pth.tar"


def _assert_same(a, b, where: str = "checkpoint") -> None:
    """Bit-identical nested checkpoint content (tensors with torch.equal, everything else with ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# per seed, a random one of epoch 2's updates (5..8, after the first checkpoint); plus a kill half-way through
# writing epoch 2's last.pth.tar (save number 3: epoch 1 writes last and best)
@pytest.mark.parametrize("kill", [*(("step", random.Random(seed).randint(5, 8)) for seed in (0, 1)), ("save", 3)],
                         ids=lambda k: f"{k[0]}{k[1]}")
def test_sigkill_at_any_point_then_resume_is_bit_identical(kill, folder, uninterrupted, tmp_path):
    """A run killed with SIGKILL leaves only readable checkpoints and, resumed, ends bit-identical to the
    uninterrupted run: weights, optimizer, scheduler, EMA, RNG; the partial temp file of a killed save is removed."""
    kind, at = kill
    run = [str(folder), *KILL_RUN, "--output", str(tmp_path), "--experiment", "killed"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _KILL_WORKER, str(torch.get_num_threads()), kind, str(at), *run],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_dir = tmp_path / "killed"
    for path in run_dir.glob("*.pth.tar"):
        assert torch.load(path, weights_only=True)["format"] == ckpt.FORMAT, path
    last = run_dir / "last.pth.tar"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    if kind == "save":
        assert list(run_dir.glob(".last.pth.tar.tmp*")), "the kill should leave a partial temp file"
    resumed = train_main([*run, "--resume", str(last)])
    assert resumed.output_dir == run_dir.resolve()
    assert not list(resumed.output_dir.glob(".*.tmp*")), "stale temp file left after resume"
    a = torch.load(uninterrupted, weights_only=True)
    b = torch.load(resumed.output_dir / "last.pth.tar", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in ("state_dict", "state_dict_ema", "optimizer", "scheduler", "ema_sr_generator", "rng", "scaler",
                "best_metric", "data_config"):
        _assert_same(a[key], b[key], key)
    _assert_same(_no_timing(a["metrics"]), _no_timing(b["metrics"]), "metrics")
    first = next(iter(a["state_dict"]))
    assert not torch.equal(a["state_dict"][first], a["state_dict_ema"][f"module.{first}"])  # EMA really averaged
    assert [r["epoch"] for r in _read_csv(resumed.output_dir / "summary.csv")] == ["1", "2"]


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


def _fake_debian_package(folder, monkeypatch, size: int) -> dict[str, bytes]:
    """The four .gz files of Debian's dataset-fashion-mnist (random bytes) as the system folder."""
    folder.mkdir()
    payload = {name: os.urandom(size) for name in data_mod.FASHION_MNIST_FILES}
    for name, blob in payload.items():
        with gzip.open(folder / f"{name}.gz", "wb") as f:
            f.write(blob)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIR", folder)
    return payload


def test_fashion_mnist_from_the_debian_package_layout(tmp_path, monkeypatch):
    payload = _fake_debian_package(tmp_path / "usr_share", monkeypatch, 64)
    raw = data_mod.prepare_fashion_mnist(tmp_path / "data")
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == payload
    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        data_mod.prepare_fashion_mnist(tmp_path / "empty")


def test_fashion_mnist_prepared_by_two_runs_at_once(tmp_path, monkeypatch):
    """Two runs preparing the same folder at once (the fine-tuning benchmark starts one per GPU) both succeed
    with whole files; with one shared temporary name the second rename raised FileNotFoundError."""
    payload = _fake_debian_package(tmp_path / "usr_share", monkeypatch, 4096)
    copy, other_ran = data_mod.shutil.copyfileobj, []

    def copy_while_another_run_prepares(fin, fout, *args):
        if not other_ran:  # the other run does all its work between this run's open and its rename
            other_ran.append(True)
            data_mod.prepare_fashion_mnist(tmp_path / "data")
        copy(fin, fout, *args)

    monkeypatch.setattr(data_mod.shutil, "copyfileobj", copy_while_another_run_prepares)
    raw = data_mod.prepare_fashion_mnist(tmp_path / "data")
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == payload


def test_fashion_mnist_dir_from_the_environment(tmp_path):
    """ATTNZOO_FASHION_MNIST_DIR replaces the Debian package's folder for pretraining and the pasted sets alike."""
    code = ("from attnzoo.training import data; from tools import make_dense_demo_data as m; "
            "print(data.FASHION_MNIST_SYSTEM_DIR, m.FASHION_MNIST_DIR)")
    env = dict(os.environ, ATTNZOO_FASHION_MNIST_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path)] * 2


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


def test_new_run_never_overwrites_another_run(trained, folder):
    """The same command twice writes a fresh <experiment>-1 and says so; --resume pointing into the folder
    continues there; the final line names no curves.png under --no-plot."""
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    again = train_main([str(folder), *TINY, "--epochs", "1", "-j", "0", "--output", str(trained.parent),
                        "--experiment", "run"])
    assert again.output_dir == trained.parent / "run-1"
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before, "the first run was touched"
    log = (again.output_dir / "log_rank0.txt").read_text()
    assert f"{trained} holds another run, kept as it is: this run writes to {again.output_dir}" in log
    done = next(ln for ln in log.splitlines() if "done:" in ln)
    assert "curves" not in done and str(again.output_dir / "last.pth.tar") in done
    assert torch.load(again.output_dir / "last.pth.tar", weights_only=True)["epoch"] == 1
    resumed = train_main([str(folder), *TINY, "--epochs", "1", "-j", "0", "--output", str(trained.parent),
                          "--experiment", "run", "--resume", str(trained / "last.pth.tar")])
    assert resumed.output_dir == trained.resolve()
    assert sorted(p.name for p in trained.parent.iterdir()) == ["run", "run-1"]


def test_any_channel_count_follows_the_model(tmp_path):
    """Images load in the model's channel count (a grayscale folder with --in-chans 1, the same folder as RGB
    for --in-chans 3 even with a 1-channel --input-size); the reported input sizes are the real ones; a count
    images cannot give is refused before the first step."""
    gray = make_image_folder(tmp_path / "gray", classes=2, train=8, val=2, gray=True)
    common = [str(gray), *TINY, "--epochs", "1", "-j", "0", "--output", str(tmp_path)]
    one = train_main([*common, "--in-chans", "1", "--experiment", "one"])
    state = torch.load(one.output_dir / "last.pth.tar", weights_only=True)
    assert state["data_config"]["input_size"] == (1, 16, 16) and len(state["data_config"]["mean"]) == 1
    out = validate_run([str(gray), "--checkpoint", str(one.output_dir / "last.pth.tar"), "-j", "0", "--no-progress",
                        "--results-file", str(tmp_path / "r.json")])
    assert out["input_size"] == [1, 16, 16] and out["images"] == 4
    three = train_main([*common, "--in-chans", "3", "--input-size", "1", "16", "16", "--experiment", "three"])
    state = torch.load(three.output_dir / "last.pth.tar", weights_only=True)
    assert state["data_config"]["input_size"] == (3, 16, 16)
    assert "input (3, 16, 16)" in (three.output_dir / "log_rank0.txt").read_text()
    with pytest.raises(UsageError, match="takes 2-channel input but images load with 1 .* pass --in-chans 1, 3 or 4"):
        train_main([*common, "--in-chans", "2", "--experiment", "two"])


def test_training_checkpoint_loads_with_weights_only_everywhere(trained, folder):
    """last.pth.tar holds only tensors and plain types: torch.load(weights_only=True), timm's
    pretrained_cfg_overlay=dict(file=...) and --pretrained-path load it."""
    path = trained / "last.pth.tar"
    state = torch.load(path, weights_only=True)
    model = timm.create_model("test_resnet", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    args = parse_with_config(train_parser(), [str(folder), "--model", "test_resnet", "--pretrained",
                                              "--pretrained-path", str(path)])
    for m in (model, create_model(args, 3)):
        for k, v in state["state_dict"].items():
            assert torch.equal(m.state_dict()[k], v), k


def test_dense_adapter_loads_a_training_checkpoint(trained):
    pytest.importorskip("mmengine", reason="the dense backbone needs mmengine (the 'dense' extra)")
    from attnzoo.openmmlab.backbone import AttnZooBackbone

    path = trained / "last.pth.tar"
    bb = AttnZooBackbone("test_resnet", out_indices=(0, 1, 2), init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    bb.init_weights()
    sd = torch.load(path, weights_only=True)["state_dict"]
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def _tool(name: str):
    """tools/<name>.py as a module, to run its main() in-process."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unusable_weight_files_give_one_line_errors(folder, tmp_path, monkeypatch, capsys):
    """Missing, empty and non-checkpoint files and another model's weights: one UsageError naming the flag,
    and the CLI prints one line (exit 2), no traceback."""
    missing, empty, text = tmp_path / "missing.pth", tmp_path / "empty.pth", tmp_path / "notes.pth"
    empty.write_bytes(b"")
    text.write_text("epoch 1: top-1 91%\n")
    train = [str(folder), *TINY, "--epochs", "1", "-j", "0", "--output", str(tmp_path)]
    for path, msg in ((missing, "no such file"), (empty, "the file is empty"), (text, "not a PyTorch checkpoint")):
        with pytest.raises(UsageError, match=f"--pretrained-path {path}: {msg}"):
            train_main([*train, "--pretrained", "--pretrained-path", str(path)])
        for flag in ("--initial-checkpoint", "--resume"):
            with pytest.raises(UsageError, match=f"{flag} {path}: {msg}"):
                train_main([*train, flag, str(path)])
        with pytest.raises(UsageError, match=f"--checkpoint {path}: {msg}"):
            validate_run([str(folder), "--model", "test_resnet", "--checkpoint", str(path)])
    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), other)
    with pytest.raises(UsageError, match=f"--checkpoint {other} does not fit davit_t \\(ValueError"):
        validate_run([str(folder), "--model", "davit_t", "--checkpoint", str(other), "--no-progress"])
    monkeypatch.setattr(sys, "argv", ["train.py", *train, "--pretrained", "--pretrained-path", str(empty)])
    assert _tool("train").main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: --pretrained-path") and "Traceback" not in "".join(err), err


def test_offline_pretrained_names_the_link_and_the_local_file_route(folder, tmp_path, monkeypatch):
    """pretrained=True without network: one error naming the download link and pretrained_cfg_overlay=dict(file=...),
    for a URL checkpoint (NAT) and for a Hugging Face hub one (DaViT) without the hub client's retry storm."""
    import time

    import huggingface_hub
    from huggingface_hub.constants import ENDPOINT

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # what an offline machine's name lookups do
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    url = timm.models.get_pretrained_cfg("nat_mini").url
    assert url.startswith("https://")
    with pytest.raises(UsageError, match=f"cannot download the pretrained weights from {url} .*"
                                         r"pretrained_cfg_overlay=dict\(file='PATH'\)\); here: --pretrained-path PATH"):
        train_main([str(folder), *TINY[2:], "--model", "nat_mini", "--output", str(tmp_path), "--pretrained"])
    hub = f"{ENDPOINT}/{timm.models.get_pretrained_cfg('davit_t').hf_hub_id}"
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match=f"davit_t: cannot download the pretrained weights from {hub} "
                                         r".*pretrained_cfg_overlay=dict\(file="):
        validate_run([str(folder), "--model", "davit_t", "--pretrained", "--no-progress"])
    assert time.perf_counter() - t0 < 20, "the hub client retried instead of failing at once"  # its retries: 45 s


def test_interrupt_names_only_a_checkpoint_that_exists(folder, trained, tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 1 says there is nothing to resume; later it names the run's last.pth.tar."""
    from timm.scheduler.scheduler import Scheduler

    original = Scheduler.step_update
    tool = _tool("train")
    for at, where in ((1, ["--output", str(tmp_path), "--experiment", "early"]),
                      (5, ["--resume", str(trained / "last.pth.tar")])):  # epoch 2 of a run with one saved epoch
        def step_update(self, num_updates, metric=None, at=at):
            if num_updates == at:
                raise KeyboardInterrupt
            return original(self, num_updates, metric)

        monkeypatch.setattr(Scheduler, "step_update", step_update)
        monkeypatch.setattr(sys, "argv", ["train.py", str(folder), *TINY, "--epochs", "2", "-j", "0", *where])
        assert tool.main() == 130
        last = capsys.readouterr().err.strip().splitlines()[-1]
        if at == 1:
            assert "--resume" not in last and "no checkpoint" in last, last
        else:
            assert last.endswith(f"continue with --resume {trained.resolve() / 'last.pth.tar'}"), last


def test_positional_data_dir_replaces_the_config_data_dir(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data_dir: data\nepochs: 3\n")
    assert parse_with_config(train_parser(), ["-c", str(cfg), "/imgs"]).data_dir == "/imgs"
    assert parse_with_config(train_parser(), ["-c", str(cfg)]).data_dir == "data"
    assert parse_with_config(train_parser(), ["-c", str(cfg), "--data-dir", "/x"]).data_dir == "/x"
    with pytest.raises(UsageError, match="got data dir '/imgs' and --data-dir '/x'; pass one"):
        parse_with_config(train_parser(), ["-c", str(cfg), "/imgs", "--data-dir", "/x"])


def test_torchcompile_mode_reaches_torch_compile_and_bad_modes_are_usage_errors(folder, tmp_path, monkeypatch):
    """``--torchcompile-mode`` (timm train.py's flag) is handed to ``torch.compile``; a mode that is not one, a mode
    without the inductor backend, or a bad config value fails before any work with the flag named."""
    calls = []

    def compile_(model, backend=None, mode=None):
        calls.append((backend, mode))
        return model

    monkeypatch.setattr(torch, "compile", compile_)
    train_main([str(folder), *TINY, "--epochs", "1", "-j", "0", "--output", str(tmp_path),
                "--torchcompile", "--torchcompile-mode", "reduce-overhead"])
    assert calls == [("inductor", "reduce-overhead")]
    with pytest.raises(UsageError, match="--torchcompile-mode 'fast': expected one of default, reduce-overhead"):
        parse_with_config(train_parser(), ["--torchcompile", "--torchcompile-mode", "fast"])
    with pytest.raises(UsageError, match="--torchcompile-mode max-autotune needs --torchcompile inductor, got "
                                         "--torchcompile None"):
        parse_with_config(train_parser(), ["--torchcompile-mode", "max-autotune"])
    with pytest.raises(UsageError, match="needs --torchcompile inductor, got --torchcompile eager"):
        parse_with_config(train_parser(), ["--torchcompile", "eager", "--torchcompile-mode", "default"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("torchcompile: inductor\ntorchcompile_mode: reduce_overhead\n")
    with pytest.raises(UsageError, match="--torchcompile-mode 'reduce_overhead': expected one of"):
        parse_with_config(train_parser(), ["-c", str(cfg)])


def test_save_removes_temp_files_of_killed_saves(tmp_path):
    path = tmp_path / "last.pth.tar"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".last.pth.tar.tmp{dead}"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    live = tmp_path / f".last.pth.tar.tmp{os.getppid()}"  # a running process may still be writing it
    live.write_bytes(b"PK\x03\x04")
    ckpt.save_atomic({"epoch": 1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name])
