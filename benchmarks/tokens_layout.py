"""Residual streams as tokens (``attnzoo.blocks.tokens``) against the 4-D NHWC stream, each beside timm's twin.

The shipped NAT, DaViT and FocalNet blocks keep every tensor that several ops read as tokens ``[B, H*W, C]``;
``--variant nhwc`` swaps in the blocks' earlier forwards (kept below as the baseline), which held them as
``[B, H, W, C]`` maps, where Inductor's layout optimisation stores them with H innermost. Both variants compute
the same function and run the same kernels eagerly; under ``torch.compile`` they do not. One variant per process
(Dynamo may share a compiled graph between two instances of one model class), each model timed beside its timm
twin (the fixed reference) in alternating order. bf16 autocast, channels-last input, batch 128, 224², drop path 0,
``do_bench`` medians; inference = forward under ``no_grad``, train = forward + backward + AdamW step.

    python -m benchmarks.tokens_layout --variant nhwc --warm davit_t   # fill the Inductor cache, one process each
    python -m benchmarks.tokens_layout --variant nhwc --models davit_t focalnet_t_srf --out benchmarks/results
    python -m benchmarks.tokens_layout --variant tokens --models davit_t focalnet_t_srf --out benchmarks/results
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.backbones.agent_swin import AgentSwinBlock
from attnzoo.backbones.biformer import BiFormerBlock
from attnzoo.backbones.davit import DualAttentionBlock
from attnzoo.backbones.focalnet import FocalNetBlock
from attnzoo.backbones.nat import NATLayer
from attnzoo.blocks.focal_modulation import FocalModulation, _nchw
from benchmarks.harness import RESULTS_DIR, Report, model_steps, time_ms
from benchmarks.models import dynamo_limits


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _nat_nhwc(self: NATLayer, x: torch.Tensor) -> torch.Tensor:
    if self.gamma1 is None:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
    x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
    return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


def _davit_nhwc(self: DualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    x = x + _nhwc(self.cpe1.proj(_nchw(x)))
    x = x + self.drop_path1(self._attend(self.norm1(x)))
    x = x + _nhwc(self.cpe2.proj(_nchw(x)))
    return x + self.drop_path2(self.mlp(self.norm2(x)))


def _focalnet_nhwc(self: FocalNetBlock, x: torch.Tensor) -> torch.Tensor:
    x = x + self.drop_path1(self.ls1(self.norm1_post(self.modulation(self.norm1(x)))))
    return x + self.drop_path2(self.ls2(self.norm2_post(self.mlp(self.norm2(x)))))


def _modulation_nhwc(self: FocalModulation, x: torch.Tensor) -> torch.Tensor:
    q, ctx, gates = self.f(x).split([self.dim, self.dim, self.focal_level + 1], dim=-1)
    ctx = self.focal_layers[0](_nchw(ctx))
    ctx_all = _nhwc(ctx) * gates[..., :1]
    for level in range(1, self.focal_level):
        ctx = self.focal_layers[level](ctx)
        ctx_all = ctx_all + _nhwc(ctx) * gates[..., level:level + 1]
    ctx_all = ctx_all + _nhwc(self.act(ctx.mean((2, 3), keepdim=True))) * gates[..., self.focal_level:]
    if self.normalize_modulator:
        ctx_all = ctx_all / (self.focal_level + 1)
    return self.proj_drop(self.proj(self.ln(q * self.h(ctx_all))))


def _biformer_nhwc(self: BiFormerBlock, x: torch.Tensor) -> torch.Tensor:
    if self.pos_embed is not None:
        x = x + self.pos_embed(x)
    x = _nhwc(x)
    x = x + self.drop_path(self.attn(self.norm1(x)))
    x = x + self.drop_path(self.mlp(self.norm2(x)))
    return _nchw(x)


def _agent_swin_nhwc(self: AgentSwinBlock, x: torch.Tensor) -> torch.Tensor:
    B, H, W, C = x.shape
    y = self.norm1(x)
    y = self.attn(y) if self.attn_type == "B" else self.attn(y.reshape(B, H * W, C), (H, W)).reshape(B, H, W, C)
    x = x + self.drop_path1(y)
    return x + self.drop_path2(self.mlp(self.norm2(x)))


NHWC_FORWARDS: dict[type, Callable] = {
    NATLayer: _nat_nhwc, DualAttentionBlock: _davit_nhwc, FocalNetBlock: _focalnet_nhwc,
    FocalModulation: _modulation_nhwc, BiFormerBlock: _biformer_nhwc, AgentSwinBlock: _agent_swin_nhwc}
VARIANTS = ("tokens", "nhwc")


TWINS = {"davit_t": "davit_tiny", "focalnet_t_srf": "focalnet_tiny_srf", "focalnet_t_lrf": "focalnet_tiny_lrf"}


def use_variant(name: str) -> None:
    """Run the blocks' shipped forwards (``tokens``) or, from now on in this process, the 4-D baseline (``nhwc``)."""
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
    if name == "nhwc":
        for cls, fn in NHWC_FORWARDS.items():
            cls.forward = fn


def _time(models: list[str], compile: bool, modes: list[str], repeats: int, batch: int, img: int, device: str,
          quick: bool) -> dict[tuple[str, str], list[float]]:
    """Step times (ms) per (model, mode), the models and their twins timed ``repeats`` times in alternating order."""
    names = [n for m in models for n in (m, TWINS.get(m)) if n]
    cases = {name: model_steps(name, batch, img, compile, device) for name in names}
    times: dict[tuple[str, str], list[float]] = {}
    t0 = time.perf_counter()
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            for mode in modes:
                times.setdefault((name, mode), []).append(
                    time_ms(cases[name][mode], warmup=5 if quick else 25, rep=20 if quick else 500))
        print(f"repeat {r + 1}/{repeats} done after {time.perf_counter() - t0:.0f} s", flush=True)
    return times


def main(argv: list[str] | None = None) -> Report | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=VARIANTS, default="tokens")
    ap.add_argument("--models", nargs="+", default=["davit_t", "focalnet_t_srf"])
    ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="without torch.compile (both variants run the same kernels)")
    ap.add_argument("--warm", metavar="MODEL", help="only compile MODEL's steps once (fills the Inductor cache)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: batch 2 at 64², eager")
    ap.add_argument("--name", default=None, help="result name (default: tokens_layout_<variant>)")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    use_variant(args.variant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, img = (2, 64) if args.quick else (128, 224)
    compile = not (args.quick or args.eager)
    if args.warm:
        for step in model_steps(args.warm, batch, img, compile, device).values():
            step()
        return None
    with dynamo_limits(4 * len(args.models)):  # every model enters through one code object
        times = _time(args.models, compile, args.modes, args.repeats, batch, img, device, args.quick)
    rep = Report(args.name or f"tokens_layout_{args.variant}",
                 f"Residual stream as {args.variant} (attnzoo.blocks.tokens), beside timm's twins", notes=(
                     f"batch {batch}, {img}², {'bf16 autocast' if device == 'cuda' else 'fp32'}, drop path 0, "
                     f"torch.compile={compile}; img/s = batch / median of {args.repeats} do_bench medians taken in "
                     "alternating order; nhwc = the blocks' earlier 4-D forwards (benchmarks/tokens_layout.py), tokens "
                     "= the shipped blocks; vs_twin = img/s / the twin's img/s"))
    for model in args.models:
        for mode in args.modes:
            img_s = {n: batch / statistics.median(times[(n, mode)]) * 1e3 for n in (model, TWINS.get(model)) if n}
            ms = times[(model, mode)]
            twin = TWINS.get(model)
            rep.add(model=model, variant=args.variant, compiled=compile, mode=mode, img_s=round(img_s[model], 1),
                    spread=round((max(ms) - min(ms)) / statistics.median(ms), 4), twin=twin or "-",
                    twin_img_s=round(img_s[twin], 1) if twin else None,
                    vs_twin=round(img_s[model] / img_s[twin], 3) if twin else None, repeats=len(ms))
    rep.save(args.out)
    print(rep.markdown())
    return rep


if __name__ == "__main__":
    main()
