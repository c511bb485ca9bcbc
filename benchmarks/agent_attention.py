"""Agent attention: fused path (SDPA + cached biases) vs the official path, and Agent-Swin-T scaling.

Rows:
* ``block``: one Agent-Swin-T stage-1 agent-attention layer (dim 96, 3 heads, 9 agents) at the 224² and
  1024² maps, forward (inference, no grad) and forward+backward, for the fused path (``attn_backend=
  "auto"``: ``scaled_dot_product_attention`` with cached biases) and the official path (unfused softmax
  math, biases interpolated on every forward: ``attn_backend="reference"``, ``cache_biases=False``).
* ``model``: inference and training images/s and peak memory, Agent-Swin-T (fused and official path)
  vs timm ``swin_tiny_patch4_window7_224`` and a plain global-attention ViT (``vit_small_patch16_224``,
  dynamic image size), at 224² (batch 128) and up to 1024²; ``mib_per_mpix`` = peak memory per
  megapixel of input, whose ratio 1024²/224² is the scaling target (≤ 1.5).

Run ``python -m benchmarks.agent_attention`` on a GPU (bf16 autocast); ``--quick`` is a CPU smoke run.
"""
from __future__ import annotations

import argparse

import timm
import torch

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.blocks import set_attention_backend
from attnzoo.blocks.agent import AgentAttention
from benchmarks.harness import Report, peak_memory_mib, time_ms


def _official_path(model: torch.nn.Module) -> torch.nn.Module:
    """Unfused math and per-forward bias interpolation, as the official code runs."""
    set_attention_backend(model, "reference")
    for m in model.modules():
        if isinstance(m, AgentAttention):
            m.cache_biases = False
    return model


def _step(model: torch.nn.Module, x: torch.Tensor, train: bool, dtype: torch.dtype):
    def run():
        with torch.autocast(x.device.type, dtype=dtype, enabled=x.device.type == "cuda"):
            if train:
                model(x).float().mean().backward()
            else:
                with torch.no_grad():
                    model(x)
    return run


def bench_block(rep: Report, device: torch.device, dtype: torch.dtype, sizes: list[int], batch: int) -> None:
    for img in sizes:
        H = W = img // 4
        x = torch.randn(batch, H * W, 96, device=device)
        for path in ("fused", "official"):
            m = AgentAttention(96, 3, 9, (56, 56)).to(device)
            if path == "official":
                _official_path(m)
            for train in (False, True):
                m.train(train)
                fn = _step(lambda t, m=m, size=(H, W): m(t, size), x, train, dtype)
                rep.add(kind="block", case=f"agent stage1 {H}x{W} b{batch}", path=path,
                        mode="fwd+bwd" if train else "fwd", ms=time_ms(fn), peak_mib=peak_memory_mib(fn))


def bench_models(rep: Report, device: torch.device, dtype: torch.dtype, sizes: list[int], batch224: int) -> None:
    models = {  # each built for the benchmarked input size
        "agent_swin_t (fused)": lambda img: timm.create_model("agent_swin_t", img_size=img),
        "agent_swin_t (official path)": lambda img: _official_path(timm.create_model("agent_swin_t", img_size=img)),
        "swin_tiny_patch4_window7_224": lambda img: timm.create_model("swin_tiny_patch4_window7_224", img_size=img),
        "vit_small_patch16_224": lambda img: timm.create_model("vit_small_patch16_224", img_size=img),
    }
    for name, build in models.items():
        for img in sizes:
            model = build(img).to(device)
            batch = max(1, batch224 * 224 * 224 // (img * img))  # same pixels per step
            x = torch.randn(batch, 3, img, img, device=device)
            for train in (False, True):
                model.train(train)
                fn = _step(model, x, train, dtype)
                row = dict(kind="model", case=name, img=img, batch=batch, mode="train" if train else "infer")
                try:
                    ms, mib = time_ms(fn, warmup=5, rep=20), peak_memory_mib(fn)
                except torch.OutOfMemoryError:
                    rep.add(**row, ms="OOM")
                    torch.cuda.empty_cache()
                    continue
                mpix = batch * img * img / 1e6
                rep.add(**row, ms=ms, img_per_s=batch / ms * 1e3, peak_mib=mib,
                        mib_per_mpix=None if mib is None else mib / mpix)
            del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small CPU smoke run (no results worth citing)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    rep = Report("agent_attention", "Agent attention: fused vs official path; Agent-Swin-T scaling (bf16)",
                 notes="fused = SDPA + cached biases; official path = unfused math, biases interpolated "
                       "every forward. mib_per_mpix: peak memory per megapixel of input.")
    if args.quick:
        bench_block(rep, device, dtype, [64], 1)
        bench_models(rep, device, dtype, [64], 1)
    else:
        bench_block(rep, device, dtype, [224, 1024], 16)
        bench_models(rep, device, dtype, [224, 512, 1024], 128)
    print(rep.markdown())
    if not args.quick or args.out:
        rep.save(*([args.out] if args.out else []))


if __name__ == "__main__":
    main()
