"""One benchmark command: kernels, models, scaling with resolution, and the report.

    python tools/benchmark.py kernels [--quick]     # na2d, bra, partitioned attention vs their baselines
    python tools/benchmark.py models [--quick] ...  # img/s and peak memory, attnzoo vs timm
    python tools/benchmark.py scaling [--quick] ... # time/memory from 224² to 1024²
    python tools/benchmark.py report                # BENCHMARKS.md + PNG plots from the JSON results
    python tools/benchmark.py all                   # everything above, in that order

Each sub-command writes ``benchmarks/results/<name>.{json,md}`` stamped with device and versions.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KERNEL_SCRIPTS = ["na2d", "bra", "partitioned_attention"]


def kernels(args: list[str]) -> None:
    """Each kernel benchmark runs in its own process so one failure or autotune cache stays local."""
    failed = []
    for name in KERNEL_SCRIPTS:
        print(f"== benchmarks.{name}", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT).returncode:
            failed.append(name)
    if failed:
        sys.exit(f"kernel benchmarks failed: {', '.join(failed)}")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("kernels", "models", "scaling", "report", "all"):
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    from benchmarks import models, report, scaling

    if cmd in ("kernels", "all"):
        kernels(args if cmd == "kernels" else [a for a in args if a == "--quick"])
    if cmd in ("models", "all"):
        models.main(args if cmd == "models" else [a for a in args if a == "--quick"])
    if cmd in ("scaling", "all"):
        scaling.main(args if cmd == "scaling" else [a for a in args if a == "--quick"])
    if cmd in ("report", "all"):
        print(f"wrote {report.main(args if cmd == 'report' else [])}")


if __name__ == "__main__":
    main()
