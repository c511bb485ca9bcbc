"""tools/benchmark.py in --quick mode: the model, scaling and report paths run end to end on CPU."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), *args], cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=600)


def test_quick_models_scaling_and_report(tmp_path):
    _run("models", "--quick", "--models", "nat_mini", "--backends", "auto", "reference", "--out-dir", str(tmp_path))
    _run("scaling", "--quick", "--models", "nat_mini", "--out-dir", str(tmp_path))
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
    _run("report", "--results-dir", str(tmp_path), "--out", str(out))
    text = out.read_text()
    assert "## Models" in text and "## Scaling with resolution" in text and "nat_mini" in text
    assert (tmp_path / "models.png").stat().st_size > 0 and (tmp_path / "scaling.png").stat().st_size > 0
