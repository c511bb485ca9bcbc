"""Benchmark tools on CPU: tools/benchmark.py in --quick mode (model, scaling and report paths end to end) and
benchmarks.saved_memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), *args], cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_models_scaling_and_report(tmp_path):
    """tools/benchmark.py's models command end to end, then the scaling and report commands' entry points in this
    process (one interpreter start is enough for the command-line path)."""
    from benchmarks import report, scaling

    _run("models", "--quick", "--models", "nat_mini", "--backends", "auto", "reference", "--out-dir", str(tmp_path))
    scaling.main(["--quick", "--models", "nat_mini", "--out-dir", str(tmp_path)])
    models = json.loads((tmp_path / "models_quick.json").read_text())
    assert [(r["model"], r["backend"]) for r in models["rows"]] == [("nat_mini", "auto"), ("nat_mini", "reference")]
    assert all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 and "error" not in r for r in models["rows"])
    assert all(r["repeats"] == 2 and r["train_spread"] >= 0 for r in models["rows"])  # alternating repeats
    assert "alternating order" in (tmp_path / "models_quick.md").read_text()
    scaling = json.loads((tmp_path / "scaling_quick.json").read_text())
    assert [r["size"] for r in scaling["rows"]] == [64, 96] and all(r["fwd_bwd_ms"] > 0 for r in scaling["rows"])
    for name in ("models", "scaling"):  # the report reads results under their full-run names
        for ext in ("json", "md"):
            (tmp_path / f"{name}_quick.{ext}").rename(tmp_path / f"{name}.{ext}")
    out = tmp_path / "BENCHMARKS.md"
    report.main(["--results-dir", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert "## Models" in text and "## Scaling with resolution" in text and "nat_mini" in text
    assert (tmp_path / "models.png").stat().st_size > 0 and (tmp_path / "scaling.png").stat().st_size > 0


def test_saved_memory_compares_a_pair(tmp_path, capsys):
    """benchmarks.saved_memory: one row per model of a pair, saved bytes and op counts, the differences printed."""
    from benchmarks import saved_memory

    report = saved_memory.main(["focalnet_t_srf:focalnet_tiny_srf", "--img-size", "64", "--batch", "1",
                                "--out-dir", str(tmp_path)])
    rows = {r["model"]: r for r in report.rows}
    assert set(rows) == {"focalnet_t_srf", "focalnet_tiny_srf"}
    assert rows["focalnet_t_srf"]["saved_mib"] == rows["focalnet_tiny_srf"]["saved_mib"] > 0  # same activations
    assert all(r["kernels"] > r["copies"] > 0 and r["aten_ops"] > r["kernels"] for r in rows.values())
    assert "kernel calls by aten op" in capsys.readouterr().out
    assert (tmp_path / "saved_memory.json").exists()
    with pytest.raises(SystemExit):
        saved_memory.main(["davit_t"])  # not a pair


def test_models_compiles_every_case_or_fails():
    """benchmarks.models compiles many models in one process, all through one Dynamo code object. Past the
    default recompile_limit (8) Dynamo silently ran the rest eagerly: a "compiled" row that timed eager code
    (seen on the GPU: 3 models x 3 graphs). Inside ``dynamo_limits`` every graph compiles, and running past
    the limit is an error, not a fallback."""
    import torch._dynamo.testing

    from benchmarks.models import dynamo_limits

    x = torch.randn(2, 4)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 4 + i), torch.nn.GELU()) for i in range(10)]
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    with dynamo_limits(len(models)):
        for m in models:
            torch.compile(m, backend=counter)(x)
    assert counter.frame_count == len(models)
    torch._dynamo.reset()
    # from Dynamo's default limit (another test of this process may have raised the global one)
    with torch._dynamo.config.patch(recompile_limit=8), dynamo_limits(0), \
            pytest.raises(Exception, match="recompile_limit"):
        for i in range(20):
            torch.compile(torch.nn.Linear(4, 4 + i), backend="eager")(x)
    torch._dynamo.reset()


def test_finetune_runs_spread_over_gpus_and_time_out(tmp_path, monkeypatch):
    """benchmarks.finetune.run_all: pretrained runs first, each to the least busy GPU, at most K a GPU; a run over
    --run-timeout is stopped (with its process group) and says so."""
    from benchmarks import finetune as bench

    started: list[tuple[str, int | None, int]] = []

    def fake_start(run, work_dir, extra, gpu):  # a process that sleeps instead of tools/finetune.py
        seconds = 30 if run.model == "slow" else 0.2
        run.gpu, run.log = gpu, work_dir / f"{run.name}.log"
        run.file = open(run.log, "w")
        run.started = bench.time.monotonic()
        run.proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"],
                                    start_new_session=True)
        started.append((run.name, gpu, sum(1 for r in runs if r.proc is not None and r.proc.poll() is None)))

    monkeypatch.setattr(bench, "_start", fake_start)
    runs = [bench.Run(m, s) for m in ("a", "b", "c") for s in (False, True)]
    bench.run_all(runs, tmp_path, [], gpus=2, per_gpu=2, timeout=None)
    assert [(name, gpu) for name, gpu, _ in started[:4]] == [("a-pretrained", 0), ("b-pretrained", 1),
                                                              ("c-pretrained", 0), ("a-scratch", 1)]
    assert max(n for *_, n in started) <= 4 and all(r.proc.returncode == 0 for r in runs)

    slow = [bench.Run("slow", False)]
    t0 = bench.time.monotonic()
    bench.run_all(slow, tmp_path, [], gpus=0, per_gpu=1, timeout=1.0)
    assert bench.time.monotonic() - t0 < 10 and slow[0].proc.returncode == -15
    assert bench.result(slow[0], tmp_path)["error"] == "stopped by --run-timeout 1 s"


def test_na2d_sass_reads_registers_without_a_gpu(tmp_path):
    """benchmarks.na2d_sass compiles the kernels for sm_90 with Triton's ptxas (a process without the interpreter)
    and reads their resource usage; the dq kernel's d_rpb stores must show up as more stores.

    The dS stores go out in 4-byte pairs of keys: the 64 x 16 scores of a 2 x 8 key block over 128 threads are 8 per
    thread, 4 stores. That needs the launch's 16-byte alignment attributes, which the tool once left out (every
    store then compiled to 2 bytes, and the register counts it reported were those of unaligned pointers). With two
    images per program the dq and delta stores are each the no-gradient kernel's and the summed dS is stored once,
    so the count holds for either choice of ``choose_tiles``."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    subprocess.run([sys.executable, "-m", "benchmarks.na2d_sass", "--cases", "nat7", "--out", str(tmp_path)], cwd=ROOT,
                   env=env, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "na2d_sass.json").read_text())
    rows = {(r["kernel"], r["rpb"], r["grad"]): r for r in report["rows"]}
    assert len(rows) == 7 and all(r["hgmma"] > 0 and 0 < r["registers"] <= 255 for r in rows.values()), rows
    with_grad, without = rows[("dq", True, True)], rows[("dq", True, False)]
    from attnzoo.kernels.na2d_triton import choose_tiles

    t = choose_tiles("dq", 7, 7, (7, 7), 32, 2, rpb_grad=True)
    pairs = t.BY * t.BX * t.KBY * t.KBX // (32 * t.num_warps) // 2  # one key block's dS per thread, 2 keys a store
    assert with_grad["stg"] - t.imgs * without["stg"] == pairs, rows


def test_na2d_opaque_baseline_routes_compiled_calls_through_its_own_op(monkeypatch):
    """benchmarks.na2d_opaque (the compiled-model baseline) swaps the registration that torch.compile sees and keeps
    the numbers."""
    import importlib

    from attnzoo.kernels import na2d
    from benchmarks import na2d_opaque

    mod = importlib.import_module("attnzoo.kernels.na2d")
    monkeypatch.setattr(mod, "_na2d_triton", mod._na2d_triton)  # restored after the test
    na2d_opaque.install()
    graphs = []

    def backend(gm, _):
        graphs.append(gm.code)
        return gm.forward

    q, k, v = (torch.randn(1, 9, 10, 2, 16) for _ in range(3))
    out = torch.compile(lambda q, k, v: na2d(q, k, v, 3, backend="triton"), fullgraph=True, backend=backend)(q, k, v)
    assert "attnzoo.na2d_opaque_fwd" in graphs[0]
    assert torch.allclose(out, na2d(q, k, v, 3, backend="reference"), atol=1e-5)
