"""Agent attention block and the Agent-Swin / Agent-PVT / Agent-DeiT backbones.

The block is checked against a float64 port of the official formulas (classification models at the
trained size, the dense backbones' resize rule elsewhere); the models against official-output fixtures.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.backbones.agent_deit import checkpoint_filter_fn
from attnzoo.backbones.agent_swin import block_types
from attnzoo.blocks import set_attention_backend
from attnzoo.blocks.agent import AgentAttention, agent_attention, convert_agent_tables
from attnzoo.blocks.window import PartitionAttention2d
from tests.helpers import assert_rel_l2
from tests.parity import create_from_official, load_fixture, official_state_dict, parity_error, save_official_checkpoint

SWIN = ["agent_swin_t", "agent_swin_s", "agent_swin_b"]
PVT = ["agent_pvt_t", "agent_pvt_s", "agent_pvt_m", "agent_pvt_l"]
DEIT = ["agent_deit_t", "agent_deit_s", "agent_deit_b"]


# ---------------------------------------------------------------- float64 port of the official math

def _lin(layer: torch.nn.Linear, t: torch.Tensor) -> torch.Tensor:
    return F.linear(t, layer.weight.double(), None if layer.bias is None else layer.bias.double())


def _bilinear(t: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)


def official_tables(m: AgentAttention) -> dict[str, torch.Tensor]:
    """The block's bias tables in the official layout (broadcast singleton dims restored), float64."""
    t = {n: getattr(m, n).double() for n in ("an_bias", "na_bias")}
    t.update(ah_bias=m.ah_bias.double()[None, :, :, :, None], aw_bias=m.aw_bias.double()[None, :, :, None, :],
             ha_bias=m.ha_bias.double()[None, :, :, None, :], wa_bias=m.wa_bias.double()[None, :, None, :, :])
    if m.num_prefix_tokens:
        t.update(ac_bias=m.ac_bias.double()[None, :, :, None], ca_bias=m.ca_bias.double()[None, :, None, :])
    return t


def official_agent_attention(m: AgentAttention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The official AgentAttention forward in float64 (dense-backbone variant: biases interpolated to the
    map and to the agent grid; with a cls token as in Agent-DeiT; PVT spatial reduction)."""
    x = x.double()
    b, n, c = x.shape
    h, d, P = m.num_heads, c // m.num_heads, m.num_prefix_tokens
    p, ag = m.pool_size, m.agent_shape
    A = ag[0] * ag[1]
    if hasattr(m, "qkv"):
        q, k, v = _lin(m.qkv, x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
        Hk, Wk = H, W
    else:
        q, src, (Hk, Wk) = _lin(m.q, x), x, (H, W)
        if m.sr_ratio > 1:
            src = F.conv2d(x.permute(0, 2, 1).reshape(b, c, H, W), m.sr.weight.double(), m.sr.bias.double(),
                           stride=m.sr_ratio)
            Hk, Wk = src.shape[-2:]
            src = F.layer_norm(src.reshape(b, c, -1).permute(0, 2, 1), (c,), m.norm.weight.double(),
                               m.norm.bias.double(), m.norm.eps)
        k, v = _lin(m.kv, src).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
    agents = F.adaptive_avg_pool2d(q[:, P:].reshape(b, H, W, c).permute(0, 3, 1, 2), ag)
    agents = agents.reshape(b, c, -1).permute(0, 2, 1)
    split = lambda t: t.reshape(b, t.shape[1], h, d).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v, agents = split(q), split(k), split(v), split(agents)

    def to_agents(t, hw):  # [h, pool², hw] -> [h, A, hw] over the agent grid
        t = t.reshape(h, p[0], p[1], hw).permute(0, 3, 1, 2)
        return _bilinear(t, ag).reshape(h, hw, A).permute(0, 2, 1)

    t = official_tables(m)
    pb = to_agents(_bilinear(t["an_bias"], (Hk, Wk)).reshape(h, -1, Hk * Wk), Hk * Wk)
    ah_aw = _bilinear((t["ah_bias"] + t["aw_bias"]).squeeze(0), (Hk, Wk))
    pb = pb + to_agents(ah_aw.reshape(h, -1, Hk * Wk), Hk * Wk)
    ab = to_agents(_bilinear(t["na_bias"], (H, W)).reshape(h, -1, H * W), H * W).permute(0, 2, 1)
    ha_wa = (t["ha_bias"] + t["wa_bias"]).squeeze(0).permute(0, 3, 1, 2)
    ab = ab + to_agents(_bilinear(ha_wa, (H, W)).reshape(h, -1, H * W), H * W).permute(0, 2, 1)
    if P:
        pb = torch.cat([t["ac_bias"][0], pb], dim=-1)
        ab = torch.cat([t["ca_bias"][0], ab], dim=-2)
    scale = d ** -0.5
    agent_v = ((agents * scale) @ k.transpose(-2, -1) + pb).softmax(-1) @ v
    out = (((q * scale) @ agents.transpose(-2, -1) + ab).softmax(-1) @ agent_v).transpose(1, 2).reshape(b, n, c)
    v_map = v[:, :, P:].transpose(1, 2).reshape(b, Hk, Wk, c).permute(0, 3, 1, 2)
    if (Hk, Wk) != (H, W):
        v_map = _bilinear(v_map, (H, W))
    local = F.conv2d(v_map, m.dwc.weight.double(), m.dwc.bias.double(), padding=1, groups=c)
    out = out.clone()
    out[:, P:] += local.permute(0, 2, 3, 1).reshape(b, H * W, c)
    return _lin(m.proj, out)


def _randomize(m: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.5 if p.dim() >= 4 or n.endswith("_bias") else 0.2)
    return m


# ---------------------------------------------------------------- block

CASES = [  # dim, heads, agents, bias_size, kwargs, run size, agent_shape
    (48, 3, 9, (8, 8), dict(), (8, 8), None),  # Agent-Swin A block at its trained size
    (48, 3, 9, (8, 8), dict(), (5, 11), None),  # another (odd) map: tables resized
    (48, 3, 16, (7, 7), dict(), (9, 6), (5, 3)),  # dense-backbone agent grid
    (32, 2, 9, (6, 6), dict(fused_qkv=False), (6, 6), None),  # PVT projections
    (32, 2, 9, (8, 8), dict(fused_qkv=False, sr_ratio=2), (8, 8), None),  # PVT spatial reduction
    (32, 2, 9, (8, 8), dict(fused_qkv=False, sr_ratio=2), (11, 7), None),
    (48, 4, 16, (6, 6), dict(num_prefix_tokens=1), (6, 6), None),  # Agent-DeiT cls token
    (48, 4, 16, (6, 6), dict(num_prefix_tokens=1), (7, 5), None),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_block_matches_official_math(case, backend):
    dim, heads, agents, bias_size, kw, (H, W), agent_shape = CASES[case]
    m = _randomize(AgentAttention(dim, heads, agents, bias_size, agent_shape=agent_shape, **kw)).eval()
    m.attn_backend = backend
    x = torch.randn(2, m.num_prefix_tokens + H * W, dim)
    with torch.no_grad():
        out = m(x, (H, W))
    assert_rel_l2(out, official_agent_attention(m, x, H, W), tol=2e-6)


def test_fused_and_reference_agree_in_backward():
    m = _randomize(AgentAttention(32, 2, 9, (6, 6), num_prefix_tokens=1)).train()
    x = torch.randn(2, 1 + 7 * 5, 32)
    grads = {}
    for backend in ("auto", "reference"):
        m.zero_grad()
        m.attn_backend = backend
        xi = x.clone().requires_grad_()
        m(xi, (7, 5)).square().sum().backward()
        grads[backend] = [xi.grad] + [p.grad.clone() for p in m._bias_params()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads["auto"])
    for a, r in zip(grads["auto"], grads["reference"]):
        assert_rel_l2(a, r, tol=1e-5)


def test_functional_checks_arguments():
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 10, 8)
    a = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        agent_attention(q, k, k, a, torch.zeros(2, 4, 10), torch.zeros(2, 12, 4), backend="cuda")
    with pytest.raises(ValueError, match=r"agent_key_bias must be \[2, 4, 10\]"):
        agent_attention(q, k, k, a, torch.zeros(2, 4, 9), torch.zeros(2, 12, 4))
    with pytest.raises(ValueError, match="square number"):
        AgentAttention(32, 2, 10, (7, 7))
    m = AgentAttention(32, 2, 9, (7, 7))
    with pytest.raises(ValueError, match=r"x must be \[B, 0 \+ 7\*7, 32\]"):
        m(torch.randn(1, 48, 32), (7, 7))


def test_bias_cache_follows_size_and_parameter_changes():
    m = _randomize(AgentAttention(32, 2, 9, (8, 8))).eval()
    fresh = lambda x, s: (setattr(m, "cache_biases", False), m(x, s), setattr(m, "cache_biases", True))[1]  # noqa: E731
    xa, xb = torch.randn(1, 64, 32), torch.randn(1, 5 * 9, 32)
    with torch.no_grad():
        for x, s in ((xa, (8, 8)), (xb, (5, 9)), (xa, (8, 8)), (xb, (5, 9))):
            assert torch.equal(m(x, s), fresh(x, s)), s
        assert len(m._bias_cache) == 2
        cached = m._bias_cache[((5, 9), (5, 9), m.agent_shape, torch.float32, xb.device)]
        assert cached[0].shape == (2, 9, 45) and cached[1].shape == (2, 45, 9)
        before = m(xb, (5, 9))
        m.ah_bias.add_(1.0)  # an optimizer step or load_state_dict changes biases in place
        after = m(xb, (5, 9))
        assert not torch.allclose(before, after) and torch.equal(after, fresh(xb, (5, 9)))
        m.load_state_dict({k: v + 0.5 if k.endswith("na_bias") else v for k, v in m.state_dict().items()})
        assert torch.equal(m(xa, (8, 8)), fresh(xa, (8, 8)))
    # training with autograd never reuses cached tensors and reaches the bias parameters
    m.train()
    m._bias_cache.clear()
    m(xb, (5, 9)).sum().backward()
    assert not m._bias_cache and m.an_bias.grad is not None and m.wa_bias.grad.abs().sum() > 0


def test_bias_cache_made_in_inference_mode_serves_frozen_training():
    """Frozen biases (dense ``frozen_stages``) use the cache while training; entries made during an
    ``inference_mode`` evaluation must be ordinary tensors, which autograd may save for backward."""
    m = _randomize(AgentAttention(32, 2, 9, (8, 8)))
    for p in m._bias_params():
        p.requires_grad_(False)
    with torch.inference_mode():
        m(torch.randn(1, 64, 32), (8, 8))
    hit = m._biases((8, 8), (8, 8), torch.float32, torch.device("cpu"))
    assert hit is m._bias_cache[((8, 8), (8, 8), m.agent_shape, torch.float32, torch.device("cpu"))]
    assert not any(torch.is_inference(t) or t.requires_grad for t in hit)


def test_official_tables_convert_exactly():
    """Official 5-D/4-D tables are reshaped exactly (values unchanged), this package's layout passes as is,
    and a table whose singleton dims are not singletons is left for strict loading to report."""
    m = _randomize(AgentAttention(32, 2, 9, (6, 5), num_prefix_tokens=1))
    official = {k: v.float() for k, v in official_tables(m).items()}
    assert {k: v.dim() for k, v in official.items() if k not in ("an_bias", "na_bias")} == \
        dict(ah_bias=5, aw_bias=5, ha_bias=5, wa_bias=5, ac_bias=4, ca_bias=4)
    mine = m.state_dict()
    for sd in (official, mine):
        out = convert_agent_tables(sd, m)
        assert all(torch.equal(out[k], mine[k]) for k in official), sorted(k for k in official if k in out)
    bad = dict(mine, ah_bias=official["ah_bias"].expand(1, 2, 9, 6, 2))
    with pytest.raises(RuntimeError, match="size mismatch for ah_bias"):
        m.load_state_dict(convert_agent_tables(bad, m))


@pytest.mark.parametrize("name", ["agent_swin_t", "agent_pvt_t", "agent_deit_t"])
def test_channels_last_keeps_results(name):
    """``model.to(memory_format=torch.channels_last)`` (timm's --channels-last) works: no parameter is 5-D,
    the 4-D ones (an/na tables, convs) give the same biases bit for bit and the same outputs, and the
    bias cache is rebuilt for the moved parameters."""
    model = timm.create_model(name, num_classes=5).eval()
    attns = [m for m in model.modules() if isinstance(m, AgentAttention)]
    with torch.no_grad():
        for p in (p for m in attns for p in m._bias_params()):
            p.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        before = model(x)
        biases = [m.compute_biases((9, 7), (9, 7)) for m in attns]
        assert all(m._bias_cache for m in attns)
        model.to(memory_format=torch.channels_last)
        assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
        after = model(x)
        for m, b in zip(attns, biases):
            assert all(torch.equal(u, v) for u, v in zip(b, m.compute_biases((9, 7), (9, 7))))
            assert m._bias_state == tuple((p.data_ptr(), p._version) for p in m._bias_params())
    # channels-last convolutions sum in another order, by kernels that differ per CPU (1.0-1.2e-6 seen on one)
    assert_rel_l2(after, before, tol=1e-5)
    model.train()
    model(x).sum().backward()
    assert all(m.an_bias.grad is not None and m.ah_bias.grad.abs().sum() > 0 for m in attns)


def test_block_types_follow_official_strings():
    assert block_types("AAAB", (2, 2, 6, 2)) == ["AA", "AA", "AAAAAA", "BB"]
    assert block_types("AAMB2", (2, 2, 18, 2)) == ["AA", "AA", "AA" + "B" * 16, "BB"]
    with pytest.raises(ValueError, match="attn_type"):
        block_types("AAC", (2, 2, 2, 2))


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("name,fixture_dir", [("agent_swin_t", "agent_swin_t"), ("agent_pvt_t", "agent_pvt_t"),
                                               ("agent_deit_t", "agent_deit_t")])
def test_official_checkpoint_parity(name, fixture_dir, tmp_path):
    fx = load_fixture("agent", fixture_dir)
    ckpt = save_official_checkpoint(fx, tmp_path / "official.pth", wrap=lambda sd: {"model": sd})
    model = create_from_official(name, ckpt)
    assert parity_error(model, fx) <= 2e-5
    set_attention_backend(model, "reference")
    assert parity_error(model, fx) <= 2e-5


@pytest.mark.parametrize("name,fixture_dir", [("agent_swin_t", "agent_swin_t"), ("agent_pvt_t", "agent_pvt_t")])
def test_checkpoint_mismatch_is_reported(name, fixture_dir, tmp_path):
    fx = load_fixture("agent", fixture_dir)
    sd = official_state_dict(fx)
    missing = next(k for k in sd if k.endswith("attn.ha_bias"))
    del sd[missing]
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError) as err:
        create_from_official(name, tmp_path / "bad.pth")
    assert "ha_bias" in str(err.value) and "extra.weight" in str(err.value)


def test_checkpoint_shape_mismatch_is_reported(tmp_path):
    sd = official_state_dict(load_fixture("agent", "agent_pvt_t"))
    sd["head.weight"] = sd["head.weight"][:10]  # a 10-class head into a 1000-class model
    torch.save({"model": sd}, tmp_path / "shape.pth")
    # official head.* -> timm's head.fc.*
    with pytest.raises(RuntimeError, match=r"size mismatch for head\.fc\.weight"):
        create_from_official("agent_pvt_t", tmp_path / "shape.pth")


@pytest.mark.parametrize("name", SWIN + PVT + DEIT)
def test_every_variant_forward_backward(name):
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.1)
    x = torch.randn(2, 3, 48, 64)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad and ("attn" in n or "head" in n):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", ["agent_swin_t", "agent_pvt_t"])
def test_features_only_two_sizes(name):
    model = timm.create_model(name, features_only=True).eval()
    chs = model.feature_info.channels()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    for size in [(64, 96), (72, 50)]:
        with torch.no_grad():
            feats = model(torch.randn(1, 3, *size))
        assert len(feats) == 4
        for f, c, s in zip(feats, chs, (4, 8, 16, 32)):
            assert f.shape == (1, c, -(-size[0] // s), -(-size[1] // s)), (size, tuple(f.shape))


@pytest.mark.parametrize("name", ["agent_swin_t", "agent_pvt_t", "agent_deit_t"])
def test_intermediates_checkpointing_and_classifier(name):
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        ref = model(x)
        assert torch.allclose(model.forward_head(final), ref, atol=1e-5)
        assert all(t.dim() == 4 for t in inter)
    model.train()
    torch.manual_seed(1)
    out = model(x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out_ckpt = model(x)
    assert torch.allclose(out, out_ckpt, atol=1e-5)
    out_ckpt.sum().backward()
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_agent_swin_blocks_and_windows():
    model = timm.create_model("agent_swin_b")
    stage2 = model.layers[2].blocks
    kinds = [type(b.attn) for b in stage2]
    assert kinds[:2] == [AgentAttention] * 2 and set(kinds[2:]) == {PartitionAttention2d}
    assert [b.attn.shift_size for b in stage2[2:4]] == [(0, 0), (3, 3)]  # window 7 on the 14x14 map
    assert stage2[0].attn.bias_size == (14, 14) and model.layers[0].blocks[0].attn.bias_size == (56, 56)
    last = model.layers[3].blocks  # 7x7 map = one window, no shift
    assert [b.attn.shift_size for b in last] == [(0, 0), (0, 0)]
    model = timm.create_model("agent_swin_t", agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)]).eval()
    assert model.layers[0].blocks[0].attn.agent_shape == (9, 9)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 160, 96)).shape == (1, 1000)


def test_agent_deit_keys_match_official_definition():
    """Key names and shapes of the official VisionTransformer(AgentBlock ...) for each variant, written out
    from agent_transformer/models/agent_deit.py: agent blocks before ``agent_layer``, agents per block by
    ``stage_num[i // 2]``, window = 224 // 16. ``checkpoint_filter_fn`` maps them onto this model's shapes."""
    for name, dim, heads, agents, agent_layer in [("agent_deit_t", 192, 3, 49, 12), ("agent_deit_s", 384, 6, 49, 12),
                                                  ("agent_deit_b", 768, 12, 81, 4)]:
        expect = {"cls_token": (1, 1, dim), "pos_embed": (1, 197, dim), "patch_embed.proj.weight": (dim, 3, 16, 16),
                  "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
                  "head.weight": (1000, dim), "head.bias": (1000,)}
        for i in range(12):
            p = f"blocks.{i}."
            for n in ("norm1", "norm2"):
                expect[p + n + ".weight"] = expect[p + n + ".bias"] = (dim,)
            expect.update({p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                           p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                           p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                           p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)})
            if i < agent_layer:
                a = p + "attn."
                expect.update({a + "an_bias": (heads, agents, 7, 7), a + "na_bias": (heads, agents, 7, 7),
                               a + "ah_bias": (1, heads, agents, 14, 1), a + "aw_bias": (1, heads, agents, 1, 14),
                               a + "ha_bias": (1, heads, 14, 1, agents), a + "wa_bias": (1, heads, 1, 14, agents),
                               a + "ac_bias": (1, heads, agents, 1), a + "ca_bias": (1, heads, 1, agents),
                               a + "dwc.weight": (dim, 1, 3, 3), a + "dwc.bias": (dim,)})
        model = timm.create_model(name)
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        mapped = checkpoint_filter_fn({k: torch.empty(s) for k, s in expect.items()}, model)
        assert {k: tuple(v.shape) for k, v in mapped.items()} == got, name


def test_agent_deit_loads_wrapped_checkpoint_and_resizes_pos_embed(tmp_path):
    src = timm.create_model("agent_deit_t").eval()
    torch.save({"model": src.state_dict()}, tmp_path / "deit.pth")
    x = torch.randn(1, 3, 224, 224)
    loaded = create_from_official("agent_deit_t", tmp_path / "deit.pth").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))
    bigger = create_from_official("agent_deit_t", tmp_path / "deit.pth", img_size=256)
    assert bigger.pos_embed.shape == (1, 1 + 16 * 16, 192)
    assert bigger.blocks[0].attn.ah_bias.shape == (3, 49, 16)
    assert bigger.blocks[0].attn.wa_bias.shape == (3, 16, 49)
    feats = timm.create_model("agent_deit_t", features_only=True).eval()
    with torch.no_grad():
        maps = feats(torch.randn(1, 3, 64, 48))
    assert [tuple(f.shape) for f in maps] == [(1, 192, 4, 3)] * 3


def test_agent_pvt_parameter_groups_and_depth_override():
    """timm's layer grouping (layer decay, frozen stages) works, and callers may override depths."""
    from timm.models import group_parameters

    model = timm.create_model("agent_pvt_t", depths=(1, 1, 1, 1))
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1, 1]
    groups = group_parameters(model, model.group_matcher(coarse=True))
    assert all(n.startswith("stages.0.") for n in groups[0]) and len(groups) == 6
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))


def test_auto_uses_explicit_math_for_large_maps_with_bias_grad(monkeypatch):
    """auto: fused SDPA by default, explicit math when a bias needs a gradient on a large map."""
    from attnzoo.blocks import agent as agent_mod

    calls = []
    real_sdpa = agent_mod.F.scaled_dot_product_attention
    monkeypatch.setattr(agent_mod.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    monkeypatch.setattr(agent_mod, "FUSED_GRAD_MAX_TOKENS", 16)
    q, k, v = (torch.randn(1, 2, 25, 8) for _ in range(3))
    agents = torch.randn(1, 2, 4, 8)
    kb, qb = torch.randn(2, 4, 25), torch.randn(2, 25, 4)
    ref = agent_mod.agent_attention(q, k, v, agents, kb, qb, backend="reference")
    out = agent_mod.agent_attention(q, k, v, agents, kb, qb)  # no bias grad: fused
    assert len(calls) == 2
    kb.requires_grad_(True)
    out_grad = agent_mod.agent_attention(q, k, v, agents, kb, qb)  # bias grad, 25 > 16 tokens: explicit
    assert len(calls) == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_grad, ref, rtol=1e-5, atol=1e-5)
