"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention").

A small grid of *agent* tokens, average-pooled from the queries, first gathers from all keys (softmax
over keys, bias ``an + ah + aw``) and then broadcasts back to every query (softmax over agents, bias
``na + ha + wa``); a depthwise 3x3 convolution on V adds local detail. Both attentions are short in one
dimension (the agents), so the cost is linear in the number of tokens.

Both attentions run on PyTorch's fused ``scaled_dot_product_attention`` with the agent biases as a float
``attn_mask`` (on CUDA that is a FlashAttention-style memory-efficient kernel that takes an additive
bias), so no ``[tokens, agents]`` probability matrix is written out. ``backend="reference"`` is the
explicit, unfused math the official code runs; ``benchmarks/agent_attention.py`` times the two.

Parameter layout. ``an_bias``/``na_bias`` are ``[heads, agents, 7, 7]`` as in the official code; the
axial tables drop the official broadcast singleton dims: ``ah_bias [heads, agents, Hk]``,
``aw_bias [heads, agents, Wk]``, ``ha_bias [heads, H, agents]``, ``wa_bias [heads, W, agents]`` (official
``[1, heads, agents, Hk, 1]``, ``[1, heads, agents, 1, Wk]``, ``[1, heads, H, 1, agents]``,
``[1, heads, 1, W, agents]``) and the cls biases are ``ac_bias``/``ca_bias [heads, agents]`` (official
``[1, heads, agents, 1]``/``[1, heads, 1, agents]``). No parameter is 5-D, so
``model.to(memory_format=torch.channels_last)`` works; :func:`convert_agent_tables` maps official
checkpoints exactly.

Resizing rule (any input size). The tables are stored for the map the model was trained at:
``an_bias``/``na_bias`` always bilinearly resized to the map, ``ah/aw`` for the key map and ``ha/wa``
for the query map. For another map size the summed ``ah + aw`` (``ha + wa``) table is resized
bilinearly (``align_corners=False``) to the actual map, and when the agent grid differs from the
trained ``sqrt(agent_num)`` grid (``agent_shape``, the official dense backbones'
``downstream_agent_shapes``) every bias is also resized bilinearly over the agent grid.
This is exactly what the official detection/segmentation backbones compute, and at the trained size it
is the identity, so classification checkpoints reproduce the official logits.

Bias cache. The resized biases are cached per (map size, key-map size, agent grid, dtype, device) and
reused only when no graph is being recorded for them (inference, or frozen biases); the cache is dropped
whenever a bias parameter changes in place (optimizer step, ``load_state_dict``) or moves (``.to()``,
including ``memory_format=torch.channels_last``, which leaves the values unchanged), so it can never
serve stale values. Entries are ordinary tensors even when made under ``torch.inference_mode``.
Training recomputes them once per forward, which is cheap next to the attention itself.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, trunc_normal_
from torch import nn

from attnzoo.kernels._op import BACKENDS

AGENT_BIAS_NAMES = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")  # position biases of every block
_CACHE_SIZE = 8  # distinct map sizes kept per module (multi-scale inference)
FUSED_GRAD_MAX_TOKENS = 4096  # above this, training uses the explicit math (see agent_attention)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
                    agent_key_bias: torch.Tensor, query_agent_bias: torch.Tensor, dropout_p: float = 0.0,
                    backend: str = "auto") -> torch.Tensor:
    """The two softmax attentions of agent attention, heads-first ``[B, heads, tokens, head_dim]``.

    ``q [B, h, N, d]``, ``k, v [B, h, Nk, d]``, ``agents [B, h, A, d]``; ``agent_key_bias [h, A, Nk]``
    and ``query_agent_bias [h, N, A]`` are added to the scaled logits. Returns ``[B, h, N, d]``.
    ``backend``: "auto"/"triton" use the fused SDPA kernels (agent attention has no separate Triton
    kernel: SDPA already fuses it on CUDA), "reference" the explicit softmax(QKᵀ·s + bias)·V math.
    "auto" also takes the explicit math when a bias needs a gradient and a side has more than
    ``FUSED_GRAD_MAX_TOKENS`` tokens: SDPA's bias gradient is then the slow part (measured in
    ``benchmarks/results/agent_attention.md``, made by ``benchmarks/agent_attention.py``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"agent_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 4 or k.shape != v.shape or agents.shape[:2] != q.shape[:2] or agents.shape[-1] != q.shape[-1]:
        raise ValueError(f"agent_attention: expected q [B, h, N, d], k/v [B, h, Nk, d], agents [B, h, A, d]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, agents {tuple(agents.shape)}")
    h, N, Nk, A = q.shape[1], q.shape[2], k.shape[2], agents.shape[2]
    if agent_key_bias.shape != (h, A, Nk):
        raise ValueError(f"agent_attention: agent_key_bias must be [{h}, {A}, {Nk}], got {tuple(agent_key_bias.shape)}")
    if query_agent_bias.shape != (h, N, A):
        raise ValueError(f"agent_attention: query_agent_bias must be [{h}, {N}, {A}], "
                         f"got {tuple(query_agent_bias.shape)}")
    bias_grad = torch.is_grad_enabled() and (agent_key_bias.requires_grad or query_agent_bias.requires_grad)
    if backend == "reference" or (backend == "auto" and bias_grad and max(N, Nk) > FUSED_GRAD_MAX_TOKENS):
        scale = q.shape[-1] ** -0.5
        attn = ((agents * scale) @ k.transpose(-2, -1) + agent_key_bias).softmax(-1)
        agent_v = F.dropout(attn, dropout_p) @ v
        attn = ((q * scale) @ agents.transpose(-2, -1) + query_agent_bias).softmax(-1)
        return F.dropout(attn, dropout_p) @ agent_v
    agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=agent_key_bias.to(q.dtype), dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=query_agent_bias.to(q.dtype),
                                          dropout_p=dropout_p)


def _resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of the last two dims of a 4-D tensor; identity at equal size."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


@register_notrace_module  # an FX leaf: shape-dependent padding and kernel dispatch do not trace
class AgentAttention(nn.Module):
    """Agent attention over a token map, optionally with prefix (cls) tokens and PVT spatial reduction.

    Args:
        dim: channels. num_heads: heads (``dim`` divisible by it).
        agent_num: agents at training time, a square number (the pooled grid is ``sqrt(agent_num)``²).
        bias_size: the query map (H, W) the position tables are stored for (the training map).
        fused_qkv: one ``qkv`` projection (Swin, DeiT) or ``q`` + ``kv`` (PVT), as in the checkpoints.
        sr_ratio: PVT spatial reduction of keys/values (strided conv + LayerNorm) when > 1.
        num_prefix_tokens: leading non-spatial tokens (1 = DeiT cls token, biases ``ac``/``ca``).
        agent_shape: agent grid at run time (default the trained grid); biases are resized to it.

    ``forward(x [B, prefix + H*W, C], size=(H, W)) -> [B, prefix + H*W, C]``.
    """

    def __init__(self, dim: int, num_heads: int, agent_num: int, bias_size: tuple[int, int],
                 qkv_bias: bool = True, fused_qkv: bool = True, sr_ratio: int = 1, num_prefix_tokens: int = 0,
                 agent_shape: tuple[int, int] | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AgentAttention: dim={dim} must be divisible by num_heads={num_heads}")
        pool = int(round(agent_num ** 0.5))
        if pool * pool != agent_num:
            raise ValueError(f"AgentAttention: agent_num must be a square number, got {agent_num}")
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f"AgentAttention: num_prefix_tokens must be 0 or 1, got {num_prefix_tokens}")
        self.dim, self.num_heads, self.agent_num = dim, num_heads, agent_num
        self.pool_size = (pool, pool)
        self.agent_shape = tuple(agent_shape) if agent_shape is not None else self.pool_size
        self.bias_size = tuple(bias_size)
        self.sr_ratio = sr_ratio
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_backend = "auto"
        self.cache_biases = True
        self._bias_cache: OrderedDict = OrderedDict()
        self._bias_state: tuple = ()

        kh, kw = self.bias_size[0] // sr_ratio, self.bias_size[1] // sr_ratio
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(num_heads, agent_num, kh))
        self.aw_bias = nn.Parameter(torch.zeros(num_heads, agent_num, kw))
        self.ha_bias = nn.Parameter(torch.zeros(num_heads, self.bias_size[0], agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(num_heads, self.bias_size[1], agent_num))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(num_heads, agent_num))
            self.ca_bias = nn.Parameter(torch.zeros(num_heads, agent_num))
        for p in self._bias_params():
            trunc_normal_(p, std=0.02)

        if fused_qkv:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def _bias_params(self) -> list[nn.Parameter]:
        names = list(AGENT_BIAS_NAMES)
        names += ["ac_bias", "ca_bias"] if self.num_prefix_tokens else []
        return [getattr(self, n) for n in names]

    def _resize_agents(self, t: torch.Tensor) -> torch.Tensor:
        """``[h, X, pool²] -> [h, X, agents]``: bilinear over the agent grid when it differs from training."""
        if self.agent_shape == self.pool_size:
            return t
        h, n = t.shape[:2]
        t = _resize(t.reshape(h * n, 1, *self.pool_size), self.agent_shape)
        return t.reshape(h, n, -1)

    def compute_biases(self, size: tuple[int, int], kv_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Agent→key bias ``[h, A, prefix + Hk*Wk]`` and query→agent bias ``[h, prefix + H*W, A]``."""
        h = self.num_heads
        axial_k = self.ah_bias[:, :, :, None] + self.aw_bias[:, :, None, :]  # [h, A, Hk, Wk]
        key_bias = _resize(self.an_bias, kv_size) + _resize(axial_k, kv_size)
        key_bias = self._resize_agents(key_bias.flatten(2).transpose(1, 2)).transpose(1, 2)  # [h, A, Nk]
        axial_q = (self.ha_bias[:, :, None, :] + self.wa_bias[:, None, :, :]).permute(0, 3, 1, 2)  # [h, A, H, W]
        query_bias = _resize(self.na_bias, size) + _resize(axial_q, size)
        query_bias = self._resize_agents(query_bias.flatten(2).transpose(1, 2))  # [h, N, A]
        if self.num_prefix_tokens:
            ac = self._resize_agents(self.ac_bias[:, None, :]).transpose(1, 2)  # [h, A, 1]
            ca = self._resize_agents(self.ca_bias[:, None, :])  # [h, 1, A]
            key_bias = torch.cat([ac.expand(h, -1, 1), key_bias], dim=2)
            query_bias = torch.cat([ca, query_bias], dim=1)
        return key_bias, query_bias

    def _biases(self, size: tuple[int, int], kv_size: tuple[int, int], dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        params = self._bias_params()
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if not self.cache_biases or recording or torch.compiler.is_compiling():
            return tuple(t.to(dtype) for t in self.compute_biases(size, kv_size))
        state = tuple((p.data_ptr(), p._version) for p in params)
        if state != self._bias_state:  # a bias changed in place or moved: nothing cached is valid
            self._bias_cache.clear()
            self._bias_state = state
        key = (tuple(size), tuple(kv_size), self.agent_shape, dtype, device)
        hit = self._bias_cache.get(key)
        if hit is None:
            # ordinary tensors even under inference_mode, so a later (frozen-bias) training step can save them
            with torch.inference_mode(False), torch.no_grad():
                hit = tuple(t.to(dtype) for t in self.compute_biases(size, kv_size))
            self._bias_cache[key] = hit
            while len(self._bias_cache) > _CACHE_SIZE:
                self._bias_cache.popitem(last=False)
        return hit

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        P = self.num_prefix_tokens
        if N != P + H * W or C != self.dim:
            raise ValueError(f"AgentAttention: x must be [B, {P} + {H}*{W}, {self.dim}] for size={tuple(size)}, "
                             f"got {tuple(x.shape)}")
        h, d = self.num_heads, C // self.num_heads
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            kv_size = (H, W)
        else:
            q = self.q(x)
            src = x
            kv_size = (H, W)
            if self.sr_ratio > 1:
                if P:
                    raise ValueError("AgentAttention: sr_ratio > 1 does not support prefix tokens")
                src = self.sr(x.transpose(1, 2).reshape(B, C, H, W))
                kv_size = tuple(src.shape[-2:])
                src = self.norm(src.flatten(2).transpose(1, 2))
            k, v = self.kv(src).chunk(2, dim=-1)

        q_map = q[:, P:].transpose(1, 2).reshape(B, C, H, W)
        agents = F.adaptive_avg_pool2d(q_map, self.agent_shape).flatten(2).transpose(1, 2)  # [B, A, C]
        heads = lambda t: t.reshape(B, t.shape[1], h, d).transpose(1, 2)  # noqa: E731  [B, h, n, d]
        key_bias, query_bias = self._biases((H, W), kv_size, q.dtype, q.device)
        out = agent_attention(heads(q), heads(k), heads(v), heads(agents), key_bias, query_bias,
                              dropout_p=self.attn_drop if self.training else 0.0, backend=self.attn_backend)
        out = out.transpose(1, 2).reshape(B, N, C)

        v_map = v[:, P:].transpose(1, 2).reshape(B, C, *kv_size)
        if tuple(kv_size) != (H, W):
            v_map = F.interpolate(v_map, size=(H, W), mode="bilinear", align_corners=False)
        local = self.dwc(v_map).flatten(2).transpose(1, 2)
        out = torch.cat([out[:, :P], out[:, P:] + local], dim=1) if P else out + local
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, "
                f"agent_shape={self.agent_shape}, bias_size={self.bias_size}, sr_ratio={self.sr_ratio}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")


# Agent bias tables whose official layout carries broadcast singleton dims: official rank, those dims
# (squeezed here), and the map axis of the squeezed table (None: no map axis).
_OFFICIAL_TABLES = {"ah_bias": (5, (0, 4), 2), "aw_bias": (5, (0, 3), 2), "ha_bias": (5, (0, 3), 1),
                    "wa_bias": (5, (0, 2), 1), "ac_bias": (4, (0, 3), None), "ca_bias": (4, (0, 2), None)}


def convert_agent_tables(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Bring agent bias tables of an official (or this package's) state dict to ``model``'s parameters.

    Official tables (``ah/aw/ha/wa`` 5-D, ``ac/ca`` 4-D) lose their broadcast singleton dims (an exact
    reshape); tables stored for another map size are then resized linearly (align_corners=False) along
    the map axis, the official rule for fine-tuning at another resolution. Tables whose other dims do
    not fit (heads, agents, a non-singleton "singleton") are left alone, so strict loading reports them.
    """
    target = model.state_dict()
    out = dict(state_dict)
    for k, v in state_dict.items():
        spec = _OFFICIAL_TABLES.get(k.rsplit(".", 1)[-1])
        if spec is None or k not in target:
            continue
        rank, singleton, axis = spec
        if v.dim() == rank and all(v.shape[d] == 1 for d in singleton):
            v = out[k] = v.squeeze(singleton)
        want = target[k].shape
        if axis is None or v.dim() != len(want) or v.shape == want:
            continue
        if [s for i, s in enumerate(v.shape) if i != axis] != [s for i, s in enumerate(want) if i != axis]:
            continue
        t = v.movedim(axis, -1)
        lead = t.shape[:-1]
        t = F.interpolate(t.reshape(1, -1, t.shape[-1]).float(), size=want[axis], mode="linear", align_corners=False)
        out[k] = t.reshape(*lead, want[axis]).movedim(-1, axis).to(v.dtype)
    return out
