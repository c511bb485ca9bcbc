"""Partitioned attention: reference vs a brute-force float64 definition, Triton vs reference, the block."""
from __future__ import annotations

import zlib

import pytest
import torch

from attnzoo.blocks import set_attention_backend
from attnzoo.blocks.window import PartitionAttention2d
from attnzoo.kernels.partitioned_attention import partitioned_attention
from tests.helpers import assert_rel_l2, check_compiled_launches_kernels, check_cuda_graph_replay, poison_

HAS_CUDA = torch.cuda.is_available()


def brute_force(q, k, v, part, mode, shift=(0, 0), rpb=None, scale=None):
    """Token-by-token float64 definition: for each real query, list its partition's keys by coordinates."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, W, nh, D = q.shape
    ph, pw = part
    Hp, Wp = -(-H // ph) * ph, -(-W // pw) * pw
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty_like(q)

    def region(r, padded, p, s):  # Swin's three slices of the shifted axis
        return 0 if s == 0 or r < padded - p else (1 if r < padded - s else 2)

    for y in range(H):
        for x in range(W):
            if mode == "window":
                ry, rx = (y - shift[0]) % Hp, (x - shift[1]) % Wp  # position on the rolled map
                y0, x0 = ry // ph * ph, rx // pw * pw
                members = [((y0 + i + shift[0]) % Hp, (x0 + j + shift[1]) % Wp, y0 + i, x0 + j, i, j)
                           for i in range(ph) for j in range(pw)]
                qi, qj = ry - y0, rx - x0
                qreg = (region(ry, Hp, ph, shift[0]), region(rx, Wp, pw, shift[1]))
            else:
                sh, sw = Hp // ph, Wp // pw
                members = [(i * sh + y % sh, j * sw + x % sw, None, None, i, j) for i in range(ph) for j in range(pw)]
                qi, qj = y // sh, x // sw
                qreg = None
            keys, biases = [], []
            for ky, kx, rky, rkx, i, j in members:
                if ky >= H or kx >= W:
                    continue
                if qreg is not None and (region(rky, Hp, ph, shift[0]), region(rkx, Wp, pw, shift[1])) != qreg:
                    continue
                keys.append((ky, kx))
                biases.append(None if rpb is None else rpb[:, i - qi + ph - 1, j - qj + pw - 1].double())
            kk = torch.stack([k[:, a, b] for a, b in keys], 1)  # [B, n, nh, D]
            vv = torch.stack([v[:, a, b] for a, b in keys], 1)
            logits = torch.einsum("bhd,bnhd->bhn", q[:, y, x] * scale, kk)
            if rpb is not None:
                logits = logits + torch.stack(biases, 1)[None]
            out[:, y, x] = torch.einsum("bhn,bnhd->bhd", logits.softmax(-1), vv)
    return out


CASES = [  # B, H, W, heads, D, partition, mode, shift, rpb
    (2, 7, 7, 2, 8, (7, 7), "window", (0, 0), True),
    (1, 9, 11, 3, 16, (4, 3), "window", (0, 0), True),
    (2, 8, 10, 1, 8, (4, 5), "window", (2, 3), True),
    (1, 11, 9, 2, 12, (4, 4), "window", (2, 1), False),
    (1, 14, 14, 2, 8, (7, 7), "grid", (0, 0), True),
    (1, 7, 10, 2, 16, (3, 4), "grid", (0, 0), True),
    (1, 5, 6, 1, 8, (7, 7), "grid", (0, 0), False),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_brute_force(case):
    B, H, W, nh, D, part, mode, shift, use_rpb = case
    q, k, v = (torch.randn(B, H, W, nh, D, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(nh, 2 * part[0] - 1, 2 * part[1] - 1, dtype=torch.float64) if use_rpb else None
    out = partitioned_attention(q, k, v, part, mode=mode, shift=shift, rpb=rpb, backend="reference")
    assert_rel_l2(out, brute_force(q, k, v, part, mode, shift, rpb))


def test_block_matches_timm_partition_layout():
    """Window and grid modes partition exactly like timm's MaxViT helpers on divisible maps."""
    from timm.models.maxxvit import grid_partition, window_partition

    B, H, W, nh, D = 2, 14, 21, 2, 8
    q, k, v = (torch.randn(B, H, W, nh, D, dtype=torch.float64) for _ in range(3))
    for mode, fn in (("window", window_partition), ("grid", grid_partition)):
        parts = [fn(t.reshape(B, H, W, -1), [7, 7]).reshape(-1, 49, nh, D).transpose(1, 2) for t in (q, k, v)]
        o = torch.softmax(parts[0] @ parts[1].transpose(-1, -2) * D ** -0.5, -1) @ parts[2]
        o = o.transpose(1, 2).reshape(-1, 7, 7, nh * D)
        rev = __import__("timm.models.maxxvit", fromlist=["x"]).window_reverse if mode == "window" else \
            __import__("timm.models.maxxvit", fromlist=["x"]).grid_reverse
        expected = rev(o, [7, 7], [H, W]).reshape(B, H, W, nh, D)
        assert_rel_l2(partitioned_attention(q, k, v, 7, mode=mode, backend="reference"), expected)


def test_errors_name_the_argument():
    q = torch.randn(1, 8, 8, 2, 8)
    with pytest.raises(ValueError, match="mode"):
        partitioned_attention(q, q, q, 4, mode="diag")
    with pytest.raises(ValueError, match="shift"):
        partitioned_attention(q, q, q, 4, shift=4)
    with pytest.raises(ValueError, match="shift"):
        partitioned_attention(q, q, q, 4, mode="grid", shift=1)
    with pytest.raises(ValueError, match="rpb"):
        partitioned_attention(q, q, q, 4, rpb=torch.zeros(2, 7, 8))
    with pytest.raises(ValueError, match="k must have"):
        partitioned_attention(q, q[:, :7], q, 4)
    with pytest.raises(ValueError, match="partition_size"):
        partitioned_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="backend"):
        partitioned_attention(q, q, q, 4, backend="cuda")
    with pytest.raises(ValueError, match="q must be"):
        partitioned_attention(q[0], q[0], q[0], 4)
    with pytest.raises(ValueError, match="attn_drop"):
        PartitionAttention2d(16, num_heads=2, attn_drop=0.1)


def test_block_shapes_backend_attribute_and_grad():
    blk = PartitionAttention2d(32, head_dim=8, partition_size=(3, 4), mode="window", shift_size=(1, 2),
                               rel_pos_bias=True)
    assert blk.attn_backend == "auto" and blk.relative_position_bias_table.shape == (4, 5, 7)
    x = torch.randn(2, 10, 9, 32, requires_grad=True)
    y = blk(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and blk.relative_position_bias_table.grad.abs().sum() > 0
    set_attention_backend(blk, "reference")
    assert blk.attn_backend == "reference"


# Triton (interpreter on CPU, compiled on CUDA) against the float64 reference: forward and backward on
# fused-qkv views, odd map sizes, padding, shifts, grid mode, multi-block partitions (9x9 = 81 tokens).
TRITON_CASES = [  # B, H, W, heads, D, partition, mode, shift, rpb
    (2, 7, 7, 2, 32, (7, 7), "window", (0, 0), True),
    (1, 5, 7, 3, 8, (4, 3), "window", (0, 0), False),
    (2, 10, 9, 1, 24, (4, 5), "window", (2, 3), True),
    (1, 7, 10, 2, 16, (3, 4), "grid", (0, 0), True),
    (1, 12, 11, 1, 8, (9, 9), "window", (3, 4), True),
]


def _poisoning_alloc(shape, dtype, device):
    return poison_(torch.empty(shape, dtype=dtype, device=device))


def _fwd_bwd(case, dtype, device, backend):
    B, H, W, nh, D, part, mode, shift, use_rpb = case
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    qkv = torch.randn(B, H, W, 3, nh, D, generator=g).to(device, dtype).requires_grad_()
    rpb = None
    if use_rpb:
        rpb = torch.randn(nh, 2 * part[0] - 1, 2 * part[1] - 1, generator=g).to(device).requires_grad_()
    go = torch.randn(B, H, W, nh, D, generator=g).to(device, dtype)
    q, k, v = qkv.unbind(3)
    out = partitioned_attention(q, k, v, part, mode=mode, shift=shift, rpb=rpb, backend=backend)
    grads = torch.autograd.grad(out, [qkv] + ([rpb] if use_rpb else []), go)
    return out, grads, (qkv, rpb, go)


def _check_against_float64(case, dtype, device, tol=None):
    out, grads, (qkv, rpb, go) = _fwd_bwd(case, dtype, device, "triton")
    B, H, W, nh, D, part, mode, shift, use_rpb = case
    qkv64 = qkv.detach().cpu().double().requires_grad_()
    rpb64 = rpb.detach().cpu().double().requires_grad_() if use_rpb else None
    ref = partitioned_attention(*qkv64.unbind(3), part, mode=mode, shift=shift, rpb=rpb64, backend="reference")
    ref_grads = torch.autograd.grad(ref, [qkv64] + ([rpb64] if use_rpb else []), go.cpu().double())
    assert out.dtype == dtype
    assert_rel_l2(out, ref, tol, "out")
    assert_rel_l2(grads[0], ref_grads[0], None if tol is None else 2 * tol, "dqkv")
    if use_rpb:
        assert grads[1].dtype == rpb.dtype
        assert_rel_l2(grads[1], ref_grads[1], None if tol is None else 4 * tol, "drpb")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference_fp32(case, monkeypatch):
    from attnzoo.kernels import partitioned_attention_triton

    monkeypatch.setattr(partitioned_attention_triton, "_alloc", _poisoning_alloc)
    _check_against_float64(case, torch.float32, "cpu")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_interpreter(dtype, monkeypatch):
    from attnzoo.kernels import partitioned_attention_triton

    monkeypatch.setattr(partitioned_attention_triton, "_alloc", _poisoning_alloc)
    tol = 4e-3 if dtype == torch.float16 else 1e-2
    _check_against_float64((1, 8, 9, 2, 16, (4, 4), "window", (1, 2), True), dtype, "cpu", tol=tol)


@pytest.mark.triton_interpret
def test_triton_custom_op_registration():
    """Fake kernel, schema and autograd registration of the Triton custom op (torch.library.opcheck)."""
    from attnzoo.kernels.partitioned_attention import _pa_triton

    qkv = torch.randn(1, 5, 6, 3, 1, 8, requires_grad=True)
    rpb = torch.randn(1, 5, 5, requires_grad=True)
    torch.library.opcheck(_pa_triton.fwd_op, (*qkv.unbind(3), rpb, 3, 3, False, 1, 2, 0.35),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode,shift", [("window", (3, 3)), ("grid", (0, 0))])
def test_gpu_compiled_model_launches_kernels_itself(mode, shift):
    """Under torch.compile the partitioned-attention ops are triton_ops: Inductor launches the two kernels from
    its own code (no opaque ``attnzoo.partitioned_attention_*`` call). Batches of 64-80 give several partitions
    per backward program (``parts`` symbolic in the batch), and the third batch size does not recompile."""
    def make_inputs(batch):
        g = torch.Generator().manual_seed(batch)
        q, k, v = torch.randn(3, batch, 56, 56, 4, 32, generator=g).to("cuda", torch.bfloat16)
        rpb = torch.randn(4, 13, 13, generator=g).to("cuda")
        return [t.requires_grad_() for t in (q, k, v, rpb)]

    check_compiled_launches_kernels(
        lambda q, k, v, rpb: partitioned_attention(q, k, v, 7, mode, shift, rpb, backend="triton"), make_inputs,
        (64, 72, 80), ("_pa_fwd", "_pa_bwd"), "partitioned_attention",
        (1e-4, 1e-4, 1e-4, 1e-4, 1e-2))  # the bias gradient is summed with atomics


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_matches_eager():
    """Forward and backward capture as one CUDA graph and replay to eager's numbers on new inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 28, 28, 4, 32, generator=g).to("cuda", torch.bfloat16)
    rpb = torch.randn(4, 13, 13, generator=g).to("cuda")
    check_cuda_graph_replay(lambda q, k, v, rpb: partitioned_attention(q, k, v, 7, "window", (3, 3), rpb,
                                                                       backend="triton"),
                            [t.requires_grad_() for t in (q, k, v, rpb)],
                            (0.0, 0.0, 0.0, 0.0, 1e-2))  # the bias gradient is summed with atomics


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", TRITON_CASES + [(4, 56, 56, 2, 32, (7, 7), "grid", (0, 0), True),
                                                 (2, 30, 45, 4, 64, (12, 12), "window", (6, 6), True),
                                                 (2, 14, 14, 1, 128, (14, 14), "window", (0, 0), False)])
def test_triton_gpu(case, dtype, monkeypatch):
    from attnzoo.kernels import partitioned_attention_triton

    monkeypatch.setattr(partitioned_attention_triton, "_alloc", _poisoning_alloc)
    tol = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]
    _check_against_float64(case, dtype, "cuda", tol)


@pytest.mark.triton_interpret
def test_triton_rejects_unsupported_inputs():
    q = torch.randn(1, 8, 8, 2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtypes"):
        partitioned_attention(q, q, q, 4, backend="triton")
    q = torch.randn(1, 8, 8, 1, 160)
    with pytest.raises(ValueError, match=r"q/k/v head dim in \[1, 128\], got 160"):
        partitioned_attention(q, q, q, 4, backend="triton")
    q = torch.randn(1, 17, 17, 1, 8)
    with pytest.raises(ValueError, match="partition"):
        partitioned_attention(q, q, q, 17, backend="triton")


_COMPILE_SCRIPT = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attnzoo.kernels import partitioned_attention_triton as pat

def build(fn, dt, **constexprs):
    names = list(inspect.signature(fn.fn).parameters)
    ptr = {n: "*" + dt for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptr.update(LSE="*fp32", BIAS="*fp32", DBIAS="*fp32", scale="fp64")  # Inductor passes unspecialised floats as fp64
    sig = {n: "constexpr" if n in constexprs else ptr.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))

for dt, D, rpb, grid, one in (("bf16", 32, True, False, True), ("fp16", 24, False, True, False),
                              ("fp32", 32, True, False, False)):
    c = dict(D=D, GRID=grid, HAS_RPB=rpb, DOT_PRECISION="ieee" if dt == "fp32" else "tf32", N_PAD=64,
             BLOCK_M=64, BLOCK_N=64, BLOCK_D=triton.next_power_of_2(D))
    build(pat._pa_fwd, dt, **c)
    build(pat._pa_bwd, dt, PARTS=4 if one else 1, ONE_BLOCK=one, **c)
print("compiled")
"""


def test_triton_kernels_compile_for_hopper():
    """The interpreter accepts code the compiler rejects (e.g. branches returning different shapes):
    compile forward and backward for sm_90 (no GPU needed) in a process without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_swin_table_conversion_documented_in_block():
    """The Swin-table mapping in PartitionAttention2d's docstring reproduces timm's Swin bias exactly."""
    from timm.models.swin_transformer import get_relative_position_index

    from attnzoo.kernels.partitioned_attention_reference import rpb_bias

    ph, pw, heads = 3, 5, 2
    table = torch.randn((2 * ph - 1) * (2 * pw - 1), heads, dtype=torch.float64)
    swin = table[get_relative_position_index(ph, pw).view(-1)].view(ph * pw, ph * pw, heads).permute(2, 0, 1)
    ours = rpb_bias(table.T.reshape(heads, 2 * ph - 1, 2 * pw - 1).flip(1, 2), (ph, pw))
    assert torch.equal(ours, swin)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_training_step_after_inference_mode_forward(backend):
    """Shape-keyed caches (relative index, bias-tile index) first filled under ``torch.inference_mode``
    must not be inference tensors: a later forward+backward saves them for backward."""
    from attnzoo.kernels import partitioned_attention_triton as pat
    from attnzoo.kernels.partitioned_attention_reference import relative_index

    relative_index.cache_clear()
    pat._tile_index.cache_clear()
    blk = PartitionAttention2d(16, head_dim=8, partition_size=(3, 5), mode="grid", rel_pos_bias=True)
    set_attention_backend(blk, backend)
    x = torch.randn(2, 6, 10, 16)
    with torch.inference_mode():
        y0 = blk(x)
    y = blk(x.requires_grad_())
    y.square().sum().backward()
    assert torch.allclose(y, y0, atol=1e-5)
    assert torch.isfinite(x.grad).all() and blk.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.triton_interpret
def test_compiled_graph_uses_custom_op_and_matches_eager():
    """Under torch.compile the op traces as the ``attnzoo::partitioned_attention_fwd`` op (a custom op under Triton's
    interpreter, a triton op on CUDA); eager calls take the autograd.Function. Both give the same output and
    gradients."""
    case = (1, 6, 7, 2, 8, (3, 4), "window", (1, 2), True)
    out, grads, (qkv, rpb, go) = _fwd_bwd(case, torch.float32, "cpu", "triton")
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    fn = torch.compile(lambda q, k, v, r: partitioned_attention(q, k, v, (3, 4), shift=(1, 2), rpb=r,
                                                                backend="triton"), backend=backend, fullgraph=True)
    out_c = fn(*qkv.unbind(3), rpb)
    grads_c = torch.autograd.grad(out_c, [qkv, rpb], go)
    assert any("partitioned_attention_fwd" in t for t in seen), seen
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)
    for g_c, g in zip(grads_c, grads):
        torch.testing.assert_close(g_c, g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES[:4] + [(2, 14, 7, 2, 8, (7, 7), "window", (0, 0), False)])
def test_dense_backend_matches_brute_force(case):
    """backend="dense" (partition copies + SDPA in the input dtype) is exact: fp32 vs the float64 definition."""
    B, H, W, nh, D, part, mode, shift, use_rpb = case
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v = torch.randn(3, B, H, W, nh, D, generator=g).unbind(0)
    rpb = torch.randn(nh, 2 * part[0] - 1, 2 * part[1] - 1, generator=g) if use_rpb else None
    out = partitioned_attention(q, k, v, part, mode=mode, shift=shift, rpb=rpb, backend="dense")
    assert_rel_l2(out, brute_force(q, k, v, part, mode, shift, rpb), None, "out")


def test_auto_rule_prefers_dense_only_for_small_unbiased_unshifted_maps():
    from attnzoo.kernels.partitioned_attention import DENSE_MAX_PARTITIONS, auto_backend

    def prefers(H, W, shift=(0, 0), rpb=False):
        q = torch.empty(1, H, W, 2, 8)
        return auto_backend(q, (7, 7), shift, torch.empty(2, 13, 13) if rpb else None) == "dense"

    assert DENSE_MAX_PARTITIONS == 4
    assert prefers(7, 7) and prefers(14, 14)  # DaViT-T stages 4 and 3
    assert not prefers(28, 28) and not prefers(56, 56)  # stages 1-2: the kernel
    assert not prefers(14, 14, rpb=True) and not prefers(14, 14, shift=(3, 3)) and not prefers(13, 14)


@pytest.mark.parametrize("mode,rpb,size", [("window", False, (14, 21)), ("window", True, (14, 14)),
                                           ("grid", True, (21, 14)), ("grid", False, (14, 14))])
def test_block_dense_route_matches_reference(mode, rpb, size):
    """The block's dense route (partitions first, as timm) computes what the reference path computes."""
    blk = PartitionAttention2d(32, head_dim=8, partition_size=7, mode=mode, rel_pos_bias=rpb)
    x = torch.randn(2, *size, 32)
    results = []
    for backend in ("reference", "dense"):
        set_attention_backend(blk, backend)
        blk.zero_grad()
        xg = x.clone().requires_grad_()
        y = blk(xg)
        y.square().sum().backward()
        results.append((y, xg.grad, *(p.grad for p in blk.parameters())))
    for name, a, b in zip(("out", "dx", *(n for n, _ in blk.named_parameters())), *results):
        assert_rel_l2(b, a, name=name)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_block_dense_route_keeps_what_timm_keeps(autocast):
    """On the dense route the layer saves for backward exactly what timm's window partition + attention +
    reverse saves: it used to run the reference's copies of q, k, v and keep its output copy too."""
    from timm.models import davit as timm_davit

    from benchmarks.saved_memory import count_step

    class TimmWindows(torch.nn.Module):
        def __init__(self, attn: torch.nn.Module):
            super().__init__()
            self.attn = attn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, H, W, C = x.shape
            windows = timm_davit.window_partition(x, (7, 7)).view(-1, 49, C)
            return timm_davit.window_reverse(self.attn(windows).view(-1, 7, 7, C), (7, 7), H, W)

    ours = set_attention_backend(PartitionAttention2d(64, num_heads=4, partition_size=7), "dense")
    theirs = TimmWindows(timm_davit.WindowAttention(64, (7, 7), 4))
    theirs.attn.load_state_dict(ours.state_dict())
    x = torch.randn(2, 14, 21, 64)
    with torch.no_grad():
        assert_rel_l2(ours(x), theirs(x), name="dense route vs timm")
    a, b = (count_step(m, x, autocast, count_ops=False).saved_total for m in (ours, theirs))
    assert a <= b, f"dense route saves {a} bytes for backward, timm's windows {b} ({autocast})"
