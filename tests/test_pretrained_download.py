"""``pretrained=True`` for checkpoints behind links without a file name (BiFormer's OneDrive, Agent's
Tsinghua cloud): timm downloads to the variant's own file name and the model loads it strictly.

The download itself is replaced by a local file (no network in the suite); what is tested is the path
from ``timm.create_model(..., pretrained=True)`` through timm's ``custom_load`` to our loader.
"""
import pytest
import timm
import timm.models._builder as timm_builder
import torch

import attnzoo  # noqa: F401


@pytest.mark.parametrize("name", ["biformer_tiny", "agent_swin_t", "agent_pvt_t", "agent_deit_t"])
def test_pretrained_true_downloads_under_the_variant_name_and_loads(name, tmp_path, monkeypatch):
    source = timm.create_model(name)
    path = tmp_path / "official.pth"
    torch.save({"model": source.state_dict()}, path)  # the official files wrap the state dict
    asked = []

    def fake_download(url, *args, **kwargs):
        asked.append(url)
        return str(path)

    monkeypatch.setattr(timm_builder, "download_cached_file", fake_download)
    model = timm.create_model(name, pretrained=True)
    assert len(asked) == 1 and isinstance(asked[0], tuple), asked
    url, file_name = asked[0]
    assert url.startswith("https://") and file_name == f"{name}_in1k.pth"
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    head = timm.create_model(name, pretrained=True, num_classes=10)  # new head, the rest loaded
    assert head.get_classifier().out_features == 10
    body = next(k for k in source.state_dict() if not k.startswith(source.pretrained_cfg["classifier"]))
    assert torch.equal(head.state_dict()[body], source.state_dict()[body])


def test_truncated_file_lists_missing_keys(tmp_path, monkeypatch):
    state = timm.create_model("agent_deit_t").state_dict()
    dropped = sorted(state)[:3]
    for k in dropped:
        del state[k]
    path = tmp_path / "truncated.pth"
    torch.save({"model": state}, path)
    monkeypatch.setattr(timm_builder, "download_cached_file", lambda *a, **k: str(path))
    with pytest.raises(RuntimeError, match="Missing key"):
        timm.create_model("agent_deit_t", pretrained=True)
