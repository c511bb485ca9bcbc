"""Build BENCHMARKS.md and the PNG plots from the JSON results under benchmarks/results/.

    python -m benchmarks.report [--results-dir benchmarks/results] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.harness import RESULTS_DIR  # noqa: E402

KERNEL_RESULTS = ["na2d", "na2d_r9", "na2d_r13", "na2d_r14", "na2d_r15", "na2d_r16", "na2d_r17", "na2d_r18",
                  "na2d_ab_r13", "na2d_ab_r13_where",
                  "na2d_drpb_r14", "na2d_drpb_r18", "na2d_ab_r15", "na2d_ab_r15_imgs2", "na2d_ab_r17",
                  "na2d_ab_onetile_r17",
                  "na2d_check", "na2d_tune",
                  "na2d_tune_r13", "na2d_tune_imgs_r15", "na2d_tune_imgs_norpb_r15", "na2d_tune_warps_dq_r17",
                  "na2d_tune_warps_dkdv_r17", "na2d_tune_warps_fwd_r17", "na2d_tune_bwd",
                  "na2d_tune_walked",
                  "na2d_tune_walked_norpb", "na2d_sass", "na2d_host", "na2d_reference_cpu", "bra", "bra_r16",
                  "partitioned_attention", "partitioned_attention_r9_runtime_parts", "agent_attention"]
SECTIONS = [("Kernels", KERNEL_RESULTS),
            ("Models", ["models", "models_kernels_v2", "models_eager", "models_compile", "models_compile_16core",
                        "models_compile_r8", "models_compile_r8_opaque", "models_compile_r9", "models_kernels_r10",
                        "models_twins_compile", "models_twins_r9", "profile_twins_r9", "models_twins_r10_dp0",
                        "models_twins_r10_lrf_compiled", "models_twins_r12", "tokens_layout_nhwc",
                        "tokens_layout_tokens", "tokens_layout_train_nhwc", "tokens_layout_train_tokens",
                        "models_nat_r12", "models_nat_r13", "models_nat_r16", "models_biformer_small_r17",
                        "models_dinat_tiny_r18",
                        "focalnet_modulation",
                        "focalnet_modulation_eager", "models_twins_davit",
                        "models_biformer_1024", "saved_memory", "saved_memory_bf16"]),
            ("Deploy", ["onnx_latency", "compile_refpath_nat_tiny", "compile_refpath_dinat_tiny",
                        "compile_refpath_biformer_small"]),
            ("Scaling with resolution", ["scaling"]), ("Training loop", ["train_throughput"]),
            ("Dense prediction", ["dense", "finetune", "finetune_det_lr", "finetune_seg_lr",
                                  "finetune_seg_iters", "finetune_seg_levers"])]


def _load(results_dir: Path, name: str) -> dict | None:
    path = results_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def plot_models(data: dict, path: Path) -> Path | None:
    """Training img/s per model: attnzoo (Triton path) beside its timm peer, grouped by family."""
    rows = [r for r in data["rows"] if "train_img_s" in r and r.get("backend") in ("auto", None)]
    if not rows:
        return None
    fams = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, len(fams), figsize=(3.2 * len(fams), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        fr = [r for r in rows if r["family"] == fam]
        colors = ["tab:blue" if r["source"] == "attnzoo" else "tab:gray" for r in fr]
        ax.bar(range(len(fr)), [r["train_img_s"] for r in fr], color=colors)
        ax.set_xticks(range(len(fr)), [r["model"] for r in fr], rotation=60, ha="right", fontsize=7)
        ax.set_title(fam)
    axes[0][0].set_ylabel("training img/s (blue: attnzoo, grey: timm)")
    fig.suptitle(f"{data['title']} — {data['env'].get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(data: dict, path: Path) -> Path | None:
    """Log-log per-image time and peak memory against pixels, one line per model, slopes in the legend."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in data["rows"]:
        if "ms_per_image" in r:
            by_model[r["model"]].append(r)
    if not by_model:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    for model, rs in by_model.items():
        px = [r["pixels"] for r in rs]
        ts, ms = rs[0].get("time_slope"), rs[0].get("memory_slope")
        ax_t.loglog(px, [r["ms_per_image"] for r in rs], "o-", label=f"{model} (slope {ts:.2f})" if ts else model)
        if rs[0].get("mib_per_image") is not None:
            ax_m.loglog(px, [r["mib_per_image"] for r in rs], "o-", label=f"{model} (slope {ms:.2f})" if ms else model)
    ax_t.set(xlabel="pixels per image", ylabel="forward+backward ms per image", title="time")
    ax_m.set(xlabel="pixels per image", ylabel="peak MiB per image", title="memory")
    for ax in (ax_t, ax_m):
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{data['title']} — {data['env'].get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build(results_dir: Path = RESULTS_DIR, out: Path = Path("BENCHMARKS.md")) -> Path:
    lines = ["# attnzoo benchmarks", "",
             "Generated by `python tools/benchmark.py report` from the JSON files in `benchmarks/results/`; "
             "each table names the device, versions and command that produced it.", ""]
    targets = Path(__file__).parent / "TARGETS.md"  # hand-kept verdicts on the issues' targets, with bounds
    if targets.exists():
        lines += [targets.read_text().rstrip(), ""]
    plots = {"models": plot_models, "scaling": plot_scaling}
    for title, names in SECTIONS:
        found = [(n, _load(results_dir, n)) for n in names]
        found = [(n, d) for n, d in found if d]
        if not found:
            continue
        lines += [f"## {title}", ""]
        for name, data in found:
            if name in plots:
                png = plots[name](data, results_dir / f"{name}.png")
                if png:
                    lines += [f"![{name}]({os.path.relpath(png, out.parent)})", ""]
            md = (results_dir / f"{name}.md").read_text().splitlines()
            lines += ["##" + md[0], *md[1:], ""]
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    a = p.parse_args(argv)
    return build(a.results_dir.resolve(), a.out.resolve())


if __name__ == "__main__":
    main()
