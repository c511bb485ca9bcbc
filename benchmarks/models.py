"""Model throughput and peak memory: attnzoo models (per kernel backend) beside their timm peers.

Inference and training images/s at a fixed batch and resolution (bf16 autocast on CUDA), and the peak
memory of one training step. Every case and its peer are timed several times in alternating order
(``--repeats``), eager and, with ``--compile``, under ``torch.compile``; rows give medians and spreads.
``--quick`` runs a tiny CPU configuration for the test suite.

    python -m benchmarks.models [--quick] [--models nat_tiny swin_tiny_patch4_window7_224 ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import timm
import torch
from tqdm import tqdm

import attnzoo
from attnzoo.blocks import set_attention_backend
from benchmarks.harness import Report, peak_memory_mib, time_ms


@dataclass(frozen=True)
class Case:
    """One model measured under one kernel backend; ``peer`` names the model it is compared with."""

    model: str
    family: str
    backend: str = "auto"
    peer: str | None = None
    kwargs: dict = field(default_factory=dict, hash=False)
    compile: bool = False
    reduce_overhead: bool = False


def _fam(family: str, models: Iterable[str], peers: dict[str, str] | None = None,
         backends: tuple[str, ...] = ("auto",)) -> list[Case]:
    peers = peers or {}
    return [Case(m, family, b, peers.get(m)) for m in models for b in backends]


# T and S variants of every family; timm peers where timm has the same (or the closest) model. Second
# backends are the comparison paths the issues ask for: NAT/DiNAT on the reference, BiFormer on the
# official gather formulation, Agent models on the unfused per-forward-bias path.
DEFAULT_CASES: list[Case] = [
    *_fam("NAT", ["nat_tiny", "nat_small"], {"nat_tiny": "swin_tiny_patch4_window7_224"},
          backends=("auto", "reference")),
    *_fam("DiNAT", ["dinat_tiny"], backends=("auto", "reference")),
    *_fam("DiNAT", ["dinat_small"]),
    *_fam("BiFormer", ["biformer_tiny", "biformer_small"], backends=("auto", "reference")),
    *_fam("MaxViT", ["maxvit_t", "maxvit_s"], {"maxvit_t": "maxvit_tiny_tf_224", "maxvit_s": "maxvit_small_tf_224"}),
    *_fam("DaViT", ["davit_t", "davit_s"], {"davit_t": "davit_tiny", "davit_s": "davit_small"}),
    *_fam("FocalNet", ["focalnet_t_srf", "focalnet_t_lrf", "focalnet_s_srf", "focalnet_s_lrf"],
          {"focalnet_t_srf": "focalnet_tiny_srf", "focalnet_t_lrf": "focalnet_tiny_lrf",
           "focalnet_s_srf": "focalnet_small_srf", "focalnet_s_lrf": "focalnet_small_lrf"}),
    *_fam("Agent", ["agent_swin_t"], {"agent_swin_t": "swin_tiny_patch4_window7_224"}, backends=("auto", "reference")),
    *_fam("Agent", ["agent_swin_s", "agent_pvt_t", "agent_pvt_s", "agent_deit_t", "agent_deit_s"],
          {"agent_swin_s": "swin_small_patch4_window7_224", "agent_pvt_t": "pvt_v2_b1", "agent_pvt_s": "pvt_v2_b2",
           "agent_deit_t": "deit_tiny_patch16_224", "agent_deit_s": "deit_small_patch16_224"}),
]


def build(name: str, img_size: int, backend: str = "auto", **kwargs) -> torch.nn.Module:
    """Create ``name`` for ``img_size`` inputs.

    attnzoo models accept any input size; timm peers whose default size differs get ``img_size``.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if name not in attnzoo.list_models() and cfg is not None and cfg.input_size[-1] != img_size:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # convolutional models take any size without being told
            pass
    return set_attention_backend(timm.create_model(name, **kwargs), backend)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Prepared:
    """A built model with its inference and training-step closures, timed repeatedly by :func:`run`."""

    case: Case
    infer: Callable[[], None]
    train_step: Callable[[], None]
    model: torch.nn.Module
    infer_ro: Callable[[], None] | None = None
    train_ro: Callable[[], None] | None = None
    infer_ms: list[float] = field(default_factory=list)
    train_ms: list[float] = field(default_factory=list)
    infer_ro_ms: list[float] = field(default_factory=list)
    train_ro_ms: list[float] = field(default_factory=list)


def prepare(case: Case, batch: int, img_size: int, device: torch.device, channels_last: bool = True) -> Prepared:
    """Build ``case`` with its inputs and AdamW optimizer; nothing is timed yet."""
    model = build(case.model, img_size, case.backend, **case.kwargs).to(device)
    mem_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=mem_format)
    run_model = torch.compile(model) if case.compile else model
    x = torch.randn(batch, 3, img_size, img_size, device=device).to(memory_format=mem_format)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def infer():
        model.eval()
        with torch.no_grad() if case.compile else torch.inference_mode(), _autocast(device):
            run_model(x)

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        model.train()
        with _autocast(device):
            loss = torch.nn.functional.cross_entropy(fn(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_step():
        step(run_model)

    infer_ro = train_ro = None
    if case.compile and case.reduce_overhead:  # forward and backward replayed as CUDA graphs; AdamW stays eager
        ro_model = torch.compile(model, mode="reduce-overhead")

        def infer_ro():
            model.eval()
            with torch.no_grad(), _autocast(device):
                ro_model(x)

        def train_ro():
            step(ro_model)

    return Prepared(case, infer, train_step, model, infer_ro, train_ro)


def dynamo_limits(graphs: int) -> contextlib.AbstractContextManager:
    """Room for ``graphs`` compiled graphs per code object, and an error instead of a silent eager fallback.

    Every compiled model of one process enters Dynamo through the same code object, and each needs up to
    four graphs (training and inference, each also under CUDA graphs); past ``recompile_limit`` (8) Dynamo runs the
    frame uncompiled without failing, which would time eager code under a "compiled" label.
    """
    limit = max(torch._dynamo.config.recompile_limit, graphs + 8)
    return torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True)


def _row(p: Prepared, batch: int, peak: float | None) -> dict:
    """Median img/s over the repeats, with the spread ((max - min) / median) of each measurement."""
    def stats(ms: list[float]) -> tuple[float, float]:
        med = statistics.median(ms)
        return batch / med * 1e3, (max(ms) - min(ms)) / med

    infer, infer_spread = stats(p.infer_ms)
    train, train_spread = stats(p.train_ms)
    extra = {"kwargs": json.dumps(p.case.kwargs)} if p.case.kwargs else {}
    if p.infer_ro_ms:
        extra["infer_reduce_overhead_img_s"], extra["infer_reduce_overhead_spread"] = stats(p.infer_ro_ms)
    if p.train_ro_ms:
        extra["train_reduce_overhead_img_s"], extra["train_reduce_overhead_spread"] = stats(p.train_ro_ms)
    return dict(family=p.case.family, model=p.case.model, backend=p.case.backend, **extra,
                compiled=p.case.compile, params_m=sum(t.numel() for t in p.model.parameters()) / 1e6,
                infer_img_s=infer, infer_spread=infer_spread, train_img_s=train, train_spread=train_spread,
                repeats=len(p.train_ms), train_peak_mib=peak)


def _error_row(case: Case, e: Exception) -> dict:
    return dict(family=case.family, model=case.model, backend=case.backend, compiled=case.compile,
                error=f"{type(e).__name__}: {e}".splitlines()[0][:200])


def run(cases: list[Case], batch: int, img_size: int, name: str = "models", out_dir=None, repeats: int = 3,
        rep_ms: tuple[int, int] = (500, 1500), drop_path_rate: float | None = None) -> Report:
    """Every case and its timm peer, timed ``repeats`` times in alternating order (forward, then reversed),
    so drift of the host or the GPU clocks lands on both sides of each pair; medians and spreads.
    ``drop_path_rate`` (None: each model's default) is given to every model, peers included."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    known = set(timm.list_models())
    shared = {} if drop_path_rate is None else dict(drop_path_rate=drop_path_rate)
    todo: list[Case] = []
    for c in cases:
        todo.append(replace(c, kwargs={**c.kwargs, **shared}))
        peer = (Case(c.peer, c.family, "auto", kwargs=shared, compile=c.compile, reduce_overhead=c.reduce_overhead)
                if c.peer else None)
        if peer and c.backend == "auto" and peer not in todo:
            todo.append(peer)
    report = Report(name, f"Model throughput, batch {batch}, {img_size}², "
                    f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}",
                    notes=f"img/s = batch / median step time (do_bench) over {repeats} repeats in alternating order "
                          "(all cases in list order, then reversed, ...); spread = (max - min) / median of the "
                          "step times; train = forward + backward + AdamW step; backend = attnzoo kernel path "
                          "(auto: Triton on CUDA), timm models run their own code; compiled = torch.compile "
                          "(default mode; *_reduce_overhead: the same under mode='reduce-overhead', forward and "
                          "backward as CUDA graphs, the AdamW step eager).")
    prepared, failed, peaks = [], [], {}
    with dynamo_limits(sum(2 + 2 * c.reduce_overhead for c in todo if c.compile)):
        for c in todo:
            if c.model not in known:
                failed.append(dict(family=c.family, model=c.model, backend=c.backend, error="not registered"))
                continue
            try:
                prepared.append(prepare(c, batch, img_size, device))
            except Exception as e:  # noqa: BLE001 (one failing model must not end the whole run)
                failed.append(_error_row(c, e))
        for r in tqdm(range(repeats), desc="repeats"):
            for p in (list(prepared) if r % 2 == 0 else prepared[::-1]):
                try:
                    p.infer_ms.append(time_ms(p.infer, warmup=100, rep=rep_ms[0]))
                    p.train_ms.append(time_ms(p.train_step, warmup=200, rep=rep_ms[1]))
                    if p.infer_ro is not None:
                        p.infer_ro_ms.append(time_ms(p.infer_ro, warmup=100, rep=rep_ms[0]))
                        p.train_ro_ms.append(time_ms(p.train_ro, warmup=200, rep=rep_ms[1]))
                except Exception as e:  # noqa: BLE001
                    failed.append(_error_row(p.case, e))
                    prepared.remove(p)
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        for p in prepared:
            peaks[id(p)] = peak_memory_mib(p.train_step)
    for p in prepared:
        row = _row(p, batch, peaks[id(p)])
        row["source"] = "attnzoo" if p.case.model in attnzoo.list_models() else "timm"
        report.add(**row)
        tqdm.write(str({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))
    for row in failed:
        report.add(**row)
    report.save(out_dir) if out_dir else report.save()
    return report


def main(argv: list[str] | None = None) -> Report:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="model names (default: T/S of every family and their peers)")
    p.add_argument("--backends", nargs="*", default=["auto"], help="backends for --models")
    p.add_argument("--families", nargs="*", help="only these families of the default cases (e.g. NAT BiFormer)")
    p.add_argument("--kwargs", type=json.loads, default={},
                   help='model kwargs as JSON for --models, e.g. \'{"n_win": 16}\'')
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke configuration (batch 2, 64²)")
    p.add_argument("--compile", action="store_true", help="also measure the models under torch.compile")
    p.add_argument("--reduce-overhead", action="store_true",
                   help="with --compile: also inference and training under torch.compile(mode='reduce-overhead') "
                        "(CUDA graphs)")
    p.add_argument("--repeats", type=int, default=3, help="timings per case, in alternating order")
    p.add_argument("--drop-path-rate", type=float, default=None,
                   help="stochastic depth for every model and peer (default: each model's own; e.g. davit_t "
                        "defaults to the official 0.1, timm's davit_tiny to 0.0)")
    p.add_argument("--na2d-opaque", action="store_true",
                   help="the baseline registration of na2d under torch.compile: an opaque custom op "
                        "(benchmarks/na2d_opaque.py) instead of the shipped triton_op")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default=None, help="result file name (default: models or models_quick)")
    a = p.parse_args(argv)
    if a.na2d_opaque:
        from benchmarks import na2d_opaque

        na2d_opaque.install()
    if a.models:
        cases = [Case(m, "-", b, kwargs=a.kwargs, compile=c, reduce_overhead=c and a.reduce_overhead)
                 for m in a.models for b in a.backends
                 for c in ((False, True) if a.compile else (False,))]
    else:
        cases = [c for c in DEFAULT_CASES if not a.families or c.family in a.families]
        if a.compile:
            cases += [Case(c.model, c.family, c.backend, c.peer, c.kwargs, compile=True,
                           reduce_overhead=a.reduce_overhead)
                      for c in cases if c.backend == "auto"]
    batch, size = (2, 64) if a.quick else (a.batch, a.img_size)
    rep_ms = (20, 40) if a.quick else (500, 1500)
    return run(cases, batch, size, a.name or ("models_quick" if a.quick else "models"), a.out_dir,
               repeats=2 if a.quick else a.repeats, rep_ms=rep_ms, drop_path_rate=a.drop_path_rate)


if __name__ == "__main__":
    main()
