"""MaxViT: timm-weight parity, any input size, timm conventions, backend switching."""
from __future__ import annotations

import pytest
import timm
import torch

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.backbones.maxvit import checkpoint_filter_fn
from attnzoo.blocks import set_attention_backend
from tests.helpers import assert_rel_l2, rel_l2

# attnzoo name -> timm model it reproduces, and its parameter count in millions
VARIANTS = {"maxvit_t": ("maxvit_tiny_tf_224", 30.9), "maxvit_s": ("maxvit_small_tf_224", 68.9),
            "maxvit_b": ("maxvit_base_tf_224", 119.5), "maxvit_l": ("maxvit_large_tf_224", 211.8)}


SMALL = dict(embed_dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), stem_width=16, head_hidden_size=64)
SMALL_TIMM = dict(embed_dim=(32, 32, 64, 64), depths=(1, 1, 1, 1), stem_width=16, head_hidden_size=64)


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_maxvit_t_matches_timm_logits():
    """timm's maxvit_tiny_tf_224 (random weights and BatchNorm statistics) converted to maxvit_t."""
    ref = _randomize_bn(timm.create_model("maxvit_tiny_tf_224"))
    ours = timm.create_model("maxvit_t").eval()
    ours.load_state_dict(checkpoint_filter_fn({"state_dict": ref.state_dict()}, ours), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_rel_l2(ours(x), ref(x), 2e-5, "logits")


def test_pretrained_file_loads_strictly(tmp_path):
    """A timm checkpoint file loads through pretrained_cfg_overlay (same logits as timm's model, here a
    narrow timm MaxViT for speed); a file with missing keys fails strict loading and names them."""
    ref = _randomize_bn(timm.create_model("maxvit_tiny_tf_224", **SMALL_TIMM))
    path = tmp_path / "maxvit.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    ours = timm.create_model("maxvit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_rel_l2(ours.eval()(x), ref(x), 2e-5, "logits")
    torch.save({k: v for k, v in ref.state_dict().items() if "stages.3" not in k}, path)
    with pytest.raises(RuntimeError, match="stages.3"):
        timm.create_model("maxvit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_counts_match_timm(name):
    with torch.device("meta"):
        ours = timm.create_model(name)
        theirs = timm.create_model(VARIANTS[name][0])
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert abs(n / 1e6 - VARIANTS[name][1]) < 0.05, n


def test_odd_input_sizes():
    """200x300 and 513x513 run (timm's model rejects them); the kernel tests check the padding mask."""
    model = timm.create_model("maxvit_t", num_classes=10, **SMALL).eval()
    with torch.no_grad():
        for size in ((200, 300), (513, 513)):
            y = model(torch.randn(1, 3, *size))
            assert y.shape == (1, 10) and torch.isfinite(y).all()
        feats = model.forward_intermediates(torch.randn(1, 3, 200, 300), intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == [(50, 75), (25, 38), (13, 19), (7, 10)]


def test_features_only_and_intermediates():
    model = timm.create_model("maxvit_t", features_only=True, **SMALL)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [32, 32, 64, 64]
    x = torch.randn(1, 3, 96, 128)
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 24, 32), (1, 32, 12, 16), (1, 64, 6, 8), (1, 64, 3, 4)]

    full = timm.create_model("maxvit_t", num_classes=5, **SMALL).eval()
    with torch.no_grad():
        last, inter = full.forward_intermediates(x, indices=2)
        assert [tuple(f.shape[1:]) for f in inter] == [(64, 6, 8), (64, 3, 4)]
        assert torch.equal(last, full.forward_features(x))
    taken = full.prune_intermediate_layers(indices=[1])
    assert list(taken) == [1] and len(full.stages) == 2


def test_grad_checkpointing_reset_classifier_and_backend_switch():
    model = timm.create_model("maxvit_t", num_classes=7, drop_path_rate=0.1, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    assert model.stages[0].blocks[0].attn_block.attn.relative_position_bias_table.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        y0 = model(x)
    set_attention_backend(model, "reference")
    assert {m.attn_backend for m in model.modules() if hasattr(m, "attn_backend")} == {"reference"}
    with torch.no_grad():
        assert rel_l2(model(x), y0) < 1e-6
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


@pytest.mark.triton_interpret
def test_triton_backend_matches_reference_on_model():
    """One small MaxViT stage run through the Triton kernels (interpreter) equals the reference path."""
    from attnzoo.backbones.maxvit import MaxViTBlock

    block = MaxViTBlock(32, 32, partition_size=4, head_dim=16).eval()
    x = torch.randn(1, 32, 10, 9)
    with torch.no_grad():
        ref = set_attention_backend(block, "reference")(x)
        out = set_attention_backend(block, "triton")(x)
    assert_rel_l2(out, ref, 1e-5)


@pytest.mark.gpu
def test_triton_backend_on_gpu(monkeypatch):
    """MaxViT-T at 224² on CUDA: the Triton path matches the reference path in fp32 (logits and grads),
    and under bf16 autocast stays within bf16 error of the fp32 result. TF32 is off: cuDNN's default TF32
    convolutions turn the kernels' 1e-7 differences into 1e-3 ones and would hide what is compared."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = timm.create_model("maxvit_t").cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    results = {}
    for backend, dtype in (("reference", None), ("triton", None), ("triton", torch.bfloat16)):
        set_attention_backend(model, backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            y = model(x)
        y.float().square().sum().backward()
        table = model.stages[1].blocks[0].attn_grid.attn.relative_position_bias_table
        results[backend, dtype] = (y.float(), model.stem.conv1.weight.grad.clone(), table.grad.clone())
    names = ("logits", "stem grad", "rpb grad")
    for name, a, b in zip(names, results["triton", None], results["reference", None]):
        assert_rel_l2(a, b, 1e-4, name)
    assert_rel_l2(results["triton", torch.bfloat16][0], results["reference", None][0], 3e-2, "bf16 logits")
