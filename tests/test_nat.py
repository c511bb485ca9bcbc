"""NAT backbones: official configs, official-checkpoint parity, small-map padding, timm API, compile."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo
import attnzoo.backbones.dinat  # noqa: F401  (registers the models)
import attnzoo.backbones.nat  # noqa: F401
from attnzoo.backbones.nat import NATIsotropic, checkpoint_filter_fn
from attnzoo.blocks import set_attention_backend
from attnzoo.blocks.neighborhood import NeighborhoodAttention2d
from attnzoo.kernels.na2d import na2d
from tests.helpers import assert_rel_l2
from tests.parity import create_from_official, load_fixture, official_state_dict, parity_error, \
    save_official_checkpoint

# Official classification/*.py configs: embed_dim, depths, heads, mlp_ratio, kernel, per-level dilation of the
# odd blocks (None: NAT), layer scale, drop_path_rate, and the params (M) of the official README tables.
_NAT4 = (3, 4, 18, 5)
_S4 = (2, 2, 18, 2)
OFFICIAL = {
    "nat_mini": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3, 7, None, None, 0.2, 20),
    "nat_tiny": (64, _NAT4, (2, 4, 8, 16), 3, 7, None, None, 0.2, 28),
    "nat_small": (96, _NAT4, (3, 6, 12, 24), 2, 7, None, 1e-5, 0.3, 51),
    "nat_base": (128, _NAT4, (4, 8, 16, 32), 2, 7, None, 1e-5, 0.5, 90),
    "dinat_mini": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3, 7, (8, 4, 2, 1), None, 0.2, 20),
    "dinat_tiny": (64, _NAT4, (2, 4, 8, 16), 3, 7, (8, 4, 2, 1), None, 0.2, 28),
    "dinat_small": (96, _NAT4, (3, 6, 12, 24), 2, 7, (8, 4, 2, 1), None, 0.3, 51),
    "dinat_base": (128, _NAT4, (4, 8, 16, 32), 2, 7, (8, 4, 2, 1), 1e-5, 0.5, 90),
    "dinat_large": (192, _NAT4, (6, 12, 24, 48), 2, 7, (8, 4, 2, 1), None, 0.35, 200),
    "dinat_large_384": (192, _NAT4, (6, 12, 24, 48), 2, 7, (13, 6, 3, 1), None, 0.35, 200),
    "dinat_large_384_11x11": (192, _NAT4, (6, 12, 24, 48), 2, 11, (8, 4, 2, 1), None, 0.35, 200),
    "dinat_s_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 4, 7, (8, 4, 2, 1), None, 0.2, 28),
    "dinat_s_small": (96, _S4, (3, 6, 12, 24), 4, 7, (8, 4, 2, 1), None, 0.3, 50),
    "dinat_s_base": (128, _S4, (4, 8, 16, 32), 4, 7, (8, 4, 2, 1), None, 0.5, 88),
    "dinat_s_large": (192, _S4, (6, 12, 24, 48), 4, 7, (8, 4, 2, 1), None, 0.35, 197),
    "dinat_s_large_384": (192, _S4, (6, 12, 24, 48), 4, 7, (13, 6, 3, 1), None, 0.35, 197),
    "nat_isotropic_small": (384, (12,), (12,), 4, 7, None, None, 0.1, 22),
    "nat_isotropic_base": (768, (12,), (24,), 4, 7, None, None, 0.4, 86),
    "dinat_isotropic_small": (384, (12,), (12,), 4, 7, (2,), None, 0.1, 22),
    "dinat_isotropic_base": (768, (12,), (24,), 4, 7, (2,), None, 0.4, 86),
}


def _levels(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    if isinstance(model, NATIsotropic):
        return [list(model.layers)]
    return [list(level.blocks) for level in model.levels]


def check_official_config(name: str) -> None:
    """Build ``name`` on the meta device (no weights), compare every block with the official config and
    run a shape-only forward on a 64x64 input (maps smaller than the windows: the padding path)."""
    dim, depths, heads, mlp_ratio, kernel, dil, layer_scale, dpr, params_m = OFFICIAL[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        levels = _levels(model)
        assert [len(blocks) for blocks in levels] == list(depths)
        for i, blocks in enumerate(levels):
            width = dim * 2 ** i
            for j, block in enumerate(blocks):
                attn = block.attn
                expected_dilation = 1 if dil is None or j % 2 == 0 else dil[i]
                assert (attn.kernel_size, attn.dilation, attn.num_heads) == (kernel, expected_dilation, heads[i]), \
                    (name, i, j)
                assert attn.qkv.in_features == width and block.mlp.fc1.out_features == int(width * mlp_ratio)
                assert attn.rpb.shape == (heads[i], 2 * kernel - 1, 2 * kernel - 1)
                if layer_scale is None:
                    assert block.gamma1 is None
                else:
                    assert block.gamma1.shape == (width,)
        assert math.isclose(levels[-1][-1].drop_path.drop_prob, dpr, rel_tol=1e-6)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n_params - params_m) <= 0.5 + 0.005 * params_m, (name, n_params)
        out = model(torch.empty(2, 3, 64, 64))
    assert out.shape == (2, 1000)


def test_every_variant_is_checked():
    assert set(attnzoo.list_models("*nat*")) == set(OFFICIAL) | {"nat_nano"}


@pytest.mark.parametrize("name", [n for n in OFFICIAL if n.startswith("nat_")])
def test_official_config(name):
    check_official_config(name)


def test_parity_nat_mini(tmp_path):
    fx = load_fixture("nat", "nat_mini")
    model = create_from_official("nat_mini", save_official_checkpoint(fx, tmp_path / "nat_mini.pth"))
    assert sum(p.numel() for p in model.parameters()) == fx.meta["params"]
    err = parity_error(model, fx)
    assert err <= 2e-5, f"nat_mini logits: relative L2 error {err:.2e} > 2e-5"


def test_truncated_checkpoint_names_keys(tmp_path):
    fx = load_fixture("nat", "nat_mini")
    sd = official_state_dict(fx)
    del sd["levels.2.blocks.3.attn.rpb"]
    sd["levels.2.blocks.3.attn.extra_table"] = torch.zeros(3)
    path = tmp_path / "truncated.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError) as err:
        create_from_official("nat_mini", path)
    assert "levels.2.blocks.3.attn.rpb" in str(err.value)
    assert "levels.2.blocks.3.attn.extra_table" in str(err.value)


def test_filter_unwraps_and_renames():
    model = timm.create_model("nat_nano", num_classes=5)
    official = {k.replace("head.fc.", "head."): v for k, v in model.state_dict().items()}
    for wrapped in (official, {"model": official}, {"state_dict": official}):
        mapped = checkpoint_filter_fn(wrapped, model)
        assert mapped.keys() == model.state_dict().keys()
        assert all(mapped[k] is official[k.replace("head.fc.", "head.")] for k in mapped)


@pytest.mark.parametrize("size,dilation", [((5, 9), 1), ((12, 30), 3), ((21, 4), 2)])
def test_small_maps_are_zero_padded_before_qkv(size, dilation):
    """A map smaller than kernel*dilation behaves as the official module: zero-pad bottom/right before the
    qkv projection (padded tokens are keys/values carrying the qkv bias), attend, crop."""
    attn = NeighborhoodAttention2d(32, 4, kernel_size=7, dilation=dilation).eval()
    torch.nn.init.normal_(attn.qkv.bias)
    x = torch.randn(2, *size, 32)
    window = 7 * dilation
    padded = F.pad(x, (0, 0, 0, max(0, window - size[1]), 0, max(0, window - size[0])))
    with torch.no_grad():
        out = attn(x)
        ref = attn(padded)[:, :size[0], :size[1]]
        # the alternative rule, padding q/k/v after the projection, gives different outputs
        qkv = F.pad(attn.qkv(x), (0, 0, 0, padded.shape[2] - size[1], 0, padded.shape[1] - size[0]))
        q, k, v = qkv.unflatten(-1, (3, 4, 8)).unbind(3)
        alt = attn.proj(na2d(q, k, v, 7, dilation, rpb=attn.rpb, backend="reference")[:, :size[0], :size[1]].flatten(3))
    assert out.shape == x.shape
    assert_rel_l2(out, ref)
    assert (out - alt).abs().max() > 1e-3


def _expected_maps(h: int, w: int) -> list[tuple[int, int]]:
    """Map sizes at strides 4..32: the conv stem (two k3 s2 p1 convs) and each downsampler round up."""
    sizes = [(math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2))]
    for _ in range(3):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


def test_features_only_nat_mini():
    model = timm.create_model("nat_mini", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    expected = [(1, c, *hw) for c, hw in zip((64, 128, 256, 512), _expected_maps(64, 64))]
    assert [tuple(f.shape) for f in feats] == expected


@pytest.mark.parametrize("size", [(200, 300), (61, 93)])
def test_features_only_any_size(size):
    model = timm.create_model("nat_nano", in_chans=3, features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, *size))
    assert [tuple(f.shape) for f in feats] == [(2, c, *hw) for c, hw in zip((32, 64, 128, 256), _expected_maps(*size))]
    assert all(torch.isfinite(f).all() for f in feats)


def test_out_indices_and_intermediates_match_forward():
    torch.manual_seed(0)
    model = timm.create_model("nat_nano", in_chans=3).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        feats = model.forward_features(x)
        assert [t.shape[1] for t in inter] == [32, 64, 128, 256]
        assert_rel_l2(final, feats)
        assert_rel_l2(model.forward_head(final), model(x))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert_rel_l2(last2[0], inter[2])
        assert_rel_l2(last2[1], inter[3])
        fmodel = timm.create_model("nat_nano", in_chans=3, features_only=True, out_indices=(1, 2))
        fmodel.model.load_state_dict(
            {k: v for k, v in model.state_dict().items() if k in fmodel.model.state_dict()}, strict=True)
        f1, f2 = fmodel.eval()(x)
    assert_rel_l2(f1, inter[1])
    assert_rel_l2(f2, inter[2])
    assert len(fmodel.model.levels) == 3  # pruned after the last level it needs


def test_timm_api_nano():
    model = timm.create_model("nat_nano")
    assert model.pretrained_cfg["input_size"] == (1, 28, 28) and model.num_classes == 10
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 3e6
    x = torch.randn(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (3, 256)
    model.reset_classifier(7, global_pool="max")
    assert model(x).shape == (3, 7) and model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (3, 256)
    assert timm.create_model("nat_nano", in_chans=3, global_pool="")(torch.randn(1, 3, 32, 32)).shape == (1, 1, 1, 10)
    assert "levels.0.blocks.0.attn.rpb" in model.no_weight_decay()
    dp = timm.create_model("nat_nano", drop_path_rate=0.3)
    assert math.isclose(dp.levels[-1].blocks[-1].drop_path.drop_prob, 0.3, rel_tol=1e-6)


def test_backward_and_grad_checkpointing():
    model = timm.create_model("nat_nano", drop_path_rate=0.0)
    x = torch.randn(2, 1, 28, 28)
    model(x).logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["levels.0.blocks.0.attn.rpb"].abs().sum() > 0
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        assert_rel_l2(p.grad, grads[n], tol=1e-5, name=n)


@pytest.mark.triton_interpret
def test_attention_backends_agree():
    model = timm.create_model("nat_nano").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = set_attention_backend(model, "reference")(x)
        tri = set_attention_backend(model, "triton")(x)
    assert all(m.attn_backend == "triton" for m in model.modules() if isinstance(m, NeighborhoodAttention2d))
    assert_rel_l2(tri, ref, tol=1e-5)


def test_dense_backend_agrees():
    """Every backend name reaches the model's kernels: the masked dense path computes the same model."""
    model = timm.create_model("nat_nano").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = set_attention_backend(model, "reference")(x)
        dense = set_attention_backend(model, "dense")(x)
    assert_rel_l2(dense, ref, tol=1e-5)


def test_compile_fullgraph_nat_mini():
    model = timm.create_model("nat_mini").eval()
    set_attention_backend(model, "reference")
    x = torch.randn(1, 3, 64, 96)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo: any graph break raises
    with torch.no_grad():
        assert_rel_l2(compiled(x), model(x))


def test_isotropic_any_size_and_features():
    model = timm.create_model("nat_isotropic_small", features_only=True, out_indices=(3, 7, 11),
                              depth=12, embed_dim=48, num_heads=2).eval()
    assert model.feature_info.reduction() == [16, 16, 16]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 72, 200))
    assert [f.shape for f in feats] == [(1, 48, 5, 13)] * 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=30, num_heads=4), "dim must be divisible by num_heads"),
    (dict(dim=32, num_heads=4, kernel_size=4), "kernel_size must be an odd integer >= 3, got 4"),
    (dict(dim=32, num_heads=4, dilation=0), "dilation must be >= 1, got 0"),
])
def test_block_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeighborhoodAttention2d(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(stem="overlap"), "stem must be one of"),
    (dict(downsample="pool"), "downsample must be one of"),
    (dict(kernel_size=(7, 7)), r"kernel_size must be an int or have one entry per level \(4\)"),
    (dict(dilations=[[1, 2, 1], [1, 2, 1, 2], [1] * 6]), r"dilations must list one dilation per block"),
])
def test_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("nat_nano", **kwargs)


@pytest.mark.gpu
def test_gpu_reduce_overhead_training_matches_eager():
    """A few AdamW steps of a small DiNAT under ``torch.compile(mode="reduce-overhead")`` (forward and backward
    replayed as CUDA graphs around the fused na2d kernels; ``tools/train.py --torchcompile-mode``) follow eager
    training's losses, with no CUDA-graph skip; the losses fall, so the replays train."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = timm.create_model("dinat_tiny", depths=(1, 1, 2, 1), embed_dim=32, num_heads=(1, 2, 4, 8),
                              dilations=((1,), (2,), (1, 2), (1,)), num_classes=10, drop_path_rate=0.0).cuda()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3, 112, 112, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")

    def losses(m, fn, steps=5):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        out = []
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(fn(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    torch._dynamo.reset()
    counters.clear()
    eager = losses(model, model)
    graphed = losses(twin, torch.compile(twin, mode="reduce-overhead"))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert eager[-1] < 0.8 * eager[0], eager
    assert graphed == pytest.approx(eager, rel=3e-2, abs=1e-2)
