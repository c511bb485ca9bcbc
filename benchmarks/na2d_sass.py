"""Registers, shared memory and SASS instruction counts of the na2d Triton kernels, compiled for Hopper
(sm_90) by Triton's own ptxas: no GPU needed.

Occupancy follows registers: 4-warp programs at <= 128 registers fit 4 per SM, at <= 168 three, at <= 255 two.
This shows what a kernel change costs in registers before any device time is spent, and which walked tiles
keep the dq kernel's d_rpb stores (one pointer per score element) from halving its occupancy.

    python -m benchmarks.na2d_sass                       # the launch plans' tiles, NAT stage shapes
    python -m benchmarks.na2d_sass --dq-tiles 2x16 2x8   # the dq kernel with a bias gradient, walked tiles forced
"""
from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnzoo.kernels import na2d_triton as T
from benchmarks.harness import RESULTS_DIR, Report

# (name, H, W, heads, D, kernel, dilation), batch 128 (only the launch grid depends on it)
CASES = [("nat56", 56, 56, 2, 32, 7, 1), ("nat28", 28, 28, 4, 32, 7, 1), ("nat14", 14, 14, 8, 32, 7, 1),
         ("nat7", 7, 7, 16, 32, 7, 1), ("dinat56_d8", 56, 56, 2, 32, 7, 8), ("hires_k13_d64", 256, 256, 4, 64, 13, 1)]
KERNELS = {"fwd": T._na2d_fwd_kernel, "dq": T._na2d_bwd_dq_kernel, "dkdv": T._na2d_bwd_dkdv_kernel}
SASS_OPS = ("HGMMA", "HMMA", "LDG", "STG", "LDS", "STS", "SHFL", "BAR", "MUFU.EX2", "LDL", "STL")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _signature(jit, meta: dict, case) -> tuple[dict, dict, dict]:
    """Signature, constexprs and the 16-divisibility attributes a launch on contiguous ``case`` tensors gets
    (Triton specializes 16-byte aligned pointers and int arguments divisible by 16; alignment decides whether
    loads and stores vectorize)."""
    _, H, W, N, D, k, _ = case
    ints = dict(B=128, H=H, W=W, srn=(2 * k - 1) ** 2)
    for t in "qkvo":
        ints.update({f"s{t}b": H * W * N * D, f"s{t}h": W * N * D, f"s{t}w": N * D, f"s{t}n": D})
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(jit.fn).parameters):
        if name in meta:
            sig[name], consts[name] = "constexpr", meta[name]
            continue
        if name in ("RPB", "LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "DSNB"):
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if name.endswith("scale") else "i32"
        if sig[name].startswith("*") or ints.get(name, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_stats(kernel: str, meta: dict, num_warps: int, num_stages: int, case) -> dict:
    """Compile one kernel for sm_90 and read its resource usage and SASS from the cubin."""
    sig, consts, attrs = _signature(KERNELS[kernel], meta, case)
    compiled = triton.compile(ASTSource(fn=KERNELS[kernel], signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"(REG|SHARED|LOCAL):(\d+)", usage)}
    body = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(\S+)", sass)  # one per instruction: its opcode (or predicate)
    return dict(registers=res["REG"], local_bytes=res["LOCAL"], static_shared=res["SHARED"], instructions=len(body),
                **{op.lower().replace(".", "_"): len(re.findall(rf"\b{re.escape(op)}\b", sass)) for op in SASS_OPS})


def _plan(case, kernel: str, rpb: bool, grad: bool):
    name, H, W, N, D, k, d = case
    key = ((H, W, N, D), torch.bfloat16, (k, k), (d, d), rpb, grad, False)
    return T._plan(kernel, *key) if kernel != "fwd" else T._plan("fwd", *key[:5], False, False)


def main() -> None:
    if not isinstance(T._na2d_fwd_kernel, triton.runtime.JITFunction):
        raise SystemExit("benchmarks.na2d_sass compiles the kernels: run it without TRITON_INTERPRET=1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=[c[0] for c in CASES], default=["nat56", "nat28", "nat14", "nat7"])
    ap.add_argument("--dq-tiles", nargs="*", default=[], metavar="KBYxKBX",
                    help="also compile the dq kernel with a bias gradient at these walked tiles")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    report = Report("na2d_sass", "na2d Triton kernels compiled for sm_90: registers and SASS",
                    notes=f"triton {triton.__version__}, bf16, num_warps/num_stages of the launch plan; rpb: bias on, "
                          "grad: the dq kernel stores dS for d_rpb; counts are static SASS instructions (loop bodies "
                          "once); local_bytes > 0 means spills.")
    for case in [c for c in CASES if c[0] in args.cases]:
        configs = [("fwd", False, False), ("fwd", True, False), ("dq", False, False), ("dq", True, False),
                   ("dq", True, True), ("dkdv", False, False), ("dkdv", True, False)]
        for kernel, rpb, grad in configs:
            plan = _plan(case, kernel, rpb, grad)
            meta = dict(plan.meta)
            nw, ns = meta.pop("num_warps"), meta.pop("num_stages")
            walked = "{}x{}".format(meta.get("KBY", meta.get("QBY")), meta.get("KBX", meta.get("QBX")))
            row = report.add(case=case[0], kernel=kernel, rpb=rpb, grad=grad, walked=walked, warps=nw, stages=ns,
                             **compile_stats(kernel, meta, nw, ns, case))
            print(row, flush=True)
        for tiles in args.dq_tiles:
            kby, kbx = map(int, tiles.split("x"))
            plan = _plan(case, "dq", True, True)
            meta = dict(plan.meta, KBY=kby, KBX=kbx)
            nw, ns = meta.pop("num_warps"), meta.pop("num_stages")
            row = report.add(case=case[0], kernel="dq", rpb=True, grad=True, walked=tiles, warps=nw, stages=ns,
                             **compile_stats("dq", meta, nw, ns, case))
            print(row, flush=True)
    report.save(args.out)


if __name__ == "__main__":
    main()
