"""The model contract: every registered attnzoo model passes the checks timm's own suite runs on its models.

Models run on CPU (the pure-PyTorch kernel paths) at reduced width and depth (``REDUCED``: the checks test the
API, which does not depend on size) and on small inputs; each model is built once per worker and copied.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import attnzoo

MODELS = attnzoo.list_models()
SIZE = (32, 64)  # input for the API checks: stride-32 maps are 1x2, non-square to catch H/W mix-ups
TOL = dict(rtol=1e-4, atol=1e-5)

# Per name prefix (first match wins): model kwargs that shrink a variant to a few small blocks.
REDUCED = (
    ("nat_isotropic_", dict(embed_dim=32, depth=3, num_heads=2)),
    ("dinat_isotropic_", dict(embed_dim=32, depth=3, num_heads=2)),
    ("dinat_", dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), dilations=[[1], [1], [1, 2], [1]])),
    ("nat_", dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))),
    # the refactored BRA needs n_win tokens per side at stride 16 (2x4 here): 2x2-region grids
    ("biformer_stl_nchw", dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), n_win=2, topks=(1, 2, 4, -2))),
    ("biformer_", dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128))),
    ("maxvit_", dict(embed_dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), stem_width=16, head_hidden_size=64)),
    ("davit_", dict(embed_dims=(16, 32, 64, 64), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1))),
    ("focalnet_", dict(embed_dim=16, depths=(1, 1, 1, 1))),
    ("agent_swin_", dict(embed_dim=16, num_heads=(1, 1, 2, 2), depths=(1, 1, 2, 1))),
    ("agent_pvt_", dict(embed_dims=(16, 32, 32, 64), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1))),
    ("agent_deit_", dict(embed_dim=32, num_heads=2)),
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models and inputs here are tiny: intra-op threads only add synchronisation (and, with ``-n 2`` on
    two cores, oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reduced_kwargs(name: str) -> dict:
    kwargs = next(kw for prefix, kw in REDUCED if name.startswith(prefix))
    return dict(kwargs, in_chans=3, drop_path_rate=0.0)


@functools.lru_cache(maxsize=None)
def _cached(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **reduced_kwargs(name)).eval()


def build(name: str) -> torch.nn.Module:
    """A fresh copy of the reduced model (tests modify their model)."""
    return copy.deepcopy(_cached(name))


def image(size: int | tuple[int, int] = SIZE, batch: int = 2) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def spatial(t: torch.Tensor, fmt: str) -> tuple[int, int]:
    return tuple(t.shape[1:3]) if fmt == "NHWC" else tuple(t.shape[2:4])


def channels(t: torch.Tensor, fmt: str) -> int:
    return t.shape[-1] if fmt in ("NHWC", "NLC") else t.shape[1]


def test_every_family_is_covered():
    assert len(MODELS) >= 48
    for name in MODELS:
        assert any(name.startswith(p) for p, _ in REDUCED), f"{name}: no REDUCED entry"


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_and_grad_checkpointing(name):
    """Finite logits; every parameter gets a gradient; checkpointing changes neither outputs nor gradients."""
    model = build(name).train()
    x = image()
    out = model(x)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.mean().backward()
    torch.testing.assert_close(out_ckpt, out, **TOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], **TOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", MODELS)
def test_builds_on_the_meta_device(name):
    """Full-size construction under ``torch.device("meta")`` (deferred initialisation, as for timm's models): no
    tensor data is read while building. agent_* models called ``.tolist()`` on a meta tensor."""
    with torch.device("meta"):
        model = timm.create_model(name)
    assert all(p.is_meta for p in model.parameters()), name


@pytest.mark.parametrize("name", MODELS)
def test_attributes_pool_size_and_heads(name):
    model = build(name)
    cfg = model.pretrained_cfg
    fmt = getattr(model, "output_fmt", "NCHW")
    assert isinstance(model.num_classes, int) and model.num_classes == cfg["num_classes"]
    for attr in ("num_features", "head_hidden_size"):
        assert isinstance(getattr(model, attr), int), attr
    sd = model.state_dict()
    assert cfg["classifier"] + ".weight" in sd, f"pretrained_cfg classifier {cfg['classifier']!r} is no weight"
    assert cfg["first_conv"] + ".weight" in sd, f"pretrained_cfg first_conv {cfg['first_conv']!r} is no weight"
    assert cfg.get("license"), "pretrained_cfg has no license"
    assert cfg.get("min_input_size"), "pretrained_cfg has no min_input_size"
    stride = model.feature_info[-1]["reduction"]
    with torch.no_grad():
        x = image()
        feats = model.forward_features(x)
        assert channels(feats, fmt) == model.num_features
        if cfg["pool_size"] is None:  # token models: [B, tokens, C]
            assert feats.ndim == 3
        else:  # the final map is the input over the last stride: pool_size at input_size, this size here
            assert tuple(cfg["pool_size"]) == tuple(math.ceil(s / stride) for s in cfg["input_size"][1:])
            assert spatial(feats, fmt) == tuple(math.ceil(s / stride) for s in SIZE), "unpooled feature shape"

        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre, **TOL)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.ndim == feats.ndim and unpooled.shape[0] == 2
        if feats.ndim == 4:
            assert spatial(unpooled, "NHWC" if fmt == "NHWC" else "NCHW") == spatial(feats, fmt)
        no_head = timm.create_model(name, num_classes=0, global_pool="", **reduced_kwargs(name)).eval()
        assert no_head(x).shape == unpooled.shape


@pytest.mark.parametrize("name", MODELS)
def test_features_only_matches_feature_info(name):
    model = timm.create_model(name, features_only=True, **reduced_kwargs(name)).eval()
    with torch.no_grad():
        feats = model(image())
    info = model.feature_info
    assert len(feats) >= 3 and len(feats) == len(info.channels())
    for f, c, r in zip(feats, info.channels(), info.reduction()):
        assert f.shape[1] == c and f.shape[2:] == tuple(math.ceil(s / r) for s in SIZE), (tuple(f.shape), c, r)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    """Final output equals forward_features (also with checkpointing on); NHWC equals permuted NCHW;
    indices / stop_early / norm behave as timm documents."""
    model = build(name)
    x = image()
    n = len(model.feature_info)
    with torch.enable_grad():  # so the checkpointed path runs
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats, **TOL)
        model.set_grad_checkpointing(True)
        final_ckpt, inter_ckpt = model.forward_intermediates(x)
        torch.testing.assert_close(final_ckpt, feats, **TOL)
        model.set_grad_checkpointing(False)
    with torch.no_grad():
        assert len(inter) == n
        for t, info in zip(inter, model.feature_info):
            assert t.shape[1] == info["num_chs"]
        nhwc = model.forward_intermediates(x, indices=[0, n - 1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inter[0].permute(0, 2, 3, 1), **TOL)
        torch.testing.assert_close(nhwc[1], inter[-1].permute(0, 2, 3, 1), **TOL)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[1], **TOL)
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        assert normed[0].shape == inter[-1].shape
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("name", MODELS)
def test_prune_intermediate_layers(name):
    """timm's ConvNeXt contract: pruning to [0, 1] keeps those outputs and re-sizes the head to the new width."""
    model = build(name)
    x = image()
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        kept = model.prune_intermediate_layers(indices=[0, 1], prune_norm=False, prune_head=False)
        assert kept == [0, 1]
        for name_norm in (False, True):
            got = model.forward_intermediates(x, indices=[0, 1], norm=name_norm, intermediates_only=True)
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, **TOL)
        assert model.num_features == model.head_hidden_size == model.feature_info[1]["num_chs"]
        model(x)  # no head: the map of the last kept level
        model.reset_classifier(5, "avg")
        assert model(x).shape == (2, 5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("name", MODELS)
def test_fx_feature_extraction(name):
    """torchvision FX extraction with timm's no-trace leaves (attnzoo's kernel ops among them): identical
    outputs, and every parameter trained through the traced graph."""
    model = build(name)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  tracer_kwargs=tracer_kwargs)
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx.eval()(x).values())), model(x), **TOL)
    out = next(iter(fx.train()(x).values()))
    out.mean().backward()
    untrained = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not untrained, f"parameters without gradient through FX: {untrained[:5]}"


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_works_or_names_the_family(name):
    model = build(name)
    try:
        scripted = torch.jit.script(model)
    except Exception as err:  # noqa: BLE001  (the contract is about the message)
        assert type(model).__name__ in str(err), f"unclear TorchScript error: {str(err)[:300]}"
        return
    with torch.no_grad():
        torch.testing.assert_close(scripted(image()), model(image()), **TOL)


@pytest.mark.parametrize("name", MODELS)
def test_no_weight_decay_names_parameters(name):
    model = build(name)
    params = dict(model.named_parameters())
    names = model.no_weight_decay()
    assert names <= params.keys(), f"not parameters: {sorted(names - params.keys())[:5]}"


@pytest.mark.parametrize("name", ["agent_swin_t", "agent_pvt_t", "nat_mini", "maxvit_t"])
def test_no_weight_decay_covers_every_position_table(name):
    """Full-size models: every position-bias table is exempt (issue 16: the agent models returned bare names,
    which timm matches against full names, so none was)."""
    model = timm.create_model(name)
    tables = {n for n, p in model.named_parameters()
              if p.ndim >= 2 and n.endswith(("_bias", ".rpb", "relative_position_bias_table"))}
    assert tables and tables <= model.no_weight_decay()


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_reloads_through_pretrained_and_dense_adapter(name, tmp_path):
    """The model's own state_dict loads back through timm's pretrained path (the family converter must tell it
    from an official file) and through the mmdet/mmseg adapter's init_cfg."""
    model = build(name)
    path = tmp_path / "own.pth"
    torch.save(model.state_dict(), path)
    reloaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 **reduced_kwargs(name)).eval()
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)

    pytest.importorskip("mmengine")
    from attnzoo.openmmlab.backbone import AttnZooBackbone

    kwargs = reduced_kwargs(name)
    backbone = AttnZooBackbone(name, out_indices=(0, 1), drop_path_rate=0.0, model_kwargs=kwargs,
                               init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    own = model.state_dict()
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, own[key]), key


@pytest.mark.parametrize("name", MODELS)
def test_empty_batch_and_unbatched_input(name):
    model = build(name)
    x = image()
    with torch.no_grad():
        assert model(x[:0]).shape == (0, model.num_classes)
        assert model.forward_features(x[:0]).shape[1:] == model.forward_features(x).shape[1:]
        empty = model.forward_intermediates(x[:0], intermediates_only=True)
        assert [t.shape[1:] for t in empty] == [t.shape[1:] for t in model.forward_intermediates(
            x, intermediates_only=True)]
        with pytest.raises(ValueError, match=r"4-D image batch.*x\[None\]"):
            model(x[0])


@pytest.mark.parametrize("name", MODELS)
def test_variable_input_sizes(name):
    """Any H, W at or above pretrained_cfg['min_input_size'] runs, without set_input_size."""
    model = build(name)
    _, h, w = model.pretrained_cfg["min_input_size"]
    with torch.no_grad():
        for size in ((h, w), (h + 7, w + 29)):
            out = model(image(size, batch=1))
            assert out.shape == (1, model.num_classes) and torch.isfinite(out).all(), size
