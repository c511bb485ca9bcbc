"""The package skeleton: import, version, model listing, no collision with timm's own names, the README's example."""
import json
import re
import subprocess
import sys
from pathlib import Path

import timm
import torch

import attnzoo
from benchmarks.harness import Report
from tests.helpers import assert_rel_l2, rel_l2
from tests.parity import FIXTURES, load_fixture, official_state_dict


def test_version_and_listing():
    assert isinstance(attnzoo.__version__, str) and attnzoo.__version__.count(".") == 2
    names = attnzoo.list_models()
    assert names == sorted(names)
    for name in names:
        assert name in timm.list_models(), name
    assert attnzoo.list_models("zzz_no_such_*") == []


def test_names_do_not_collide_with_timm():
    code = "import json, timm; print(json.dumps(timm.list_models()))"
    timm_names = set(json.loads(subprocess.check_output([sys.executable, "-c", code], text=True)))
    assert not timm_names & set(attnzoo.list_models())


def test_rel_l2_catches_errors():
    ref = torch.randn(64, dtype=torch.float64)
    assert rel_l2(ref, ref) == 0.0
    bad = ref.clone()
    bad[3] = float("nan")
    try:
        assert_rel_l2(bad.float(), ref)
    except AssertionError as e:
        assert "non-finite" in str(e)
    else:
        raise AssertionError("NaN passed the comparison")
    try:
        assert_rel_l2((ref * 1.01).float(), ref)
    except AssertionError as e:
        assert "relative L2" in str(e)
    else:
        raise AssertionError("a 1% error passed the fp32 tolerance")


def test_parity_weight_rule_matches_fixtures():
    """The regenerated official state dicts have the fixtures' keys, shapes and parameter counts."""
    for variant_dir in sorted(p for p in FIXTURES.glob("*/*") if p.is_dir()):
        fx = load_fixture(variant_dir.parent.name, variant_dir.name)
        sd = official_state_dict(fx)
        assert list(sd) == [e["key"] for e in fx.manifest]
        for e in fx.manifest:
            assert list(sd[e["key"]].shape) == e["shape"], e["key"]
        n_params = sum(sd[e["key"]].numel() for e in fx.manifest if e["kind"] == "param")
        assert n_params == fx.meta["params"], (variant_dir, n_params, fx.meta["params"])
        assert fx.expected_logits.shape == (2, 1000) and torch.isfinite(fx.expected_logits).all()


def test_report_writes_json_and_markdown(tmp_path):
    rep = Report("unit", "Unit table", notes="note")
    rep.add(case="a", ms=1.2345, speedup=3.0)
    js, md = rep.save(tmp_path)
    data = json.loads(js.read_text())
    assert data["rows"][0]["case"] == "a" and "torch" in data["env"] and "device" in data["env"]
    text = md.read_text()
    assert "| case | ms | speedup |" in text and "| a | 1.23 | 3 |" in text


def test_readme_kernel_snippet_runs_as_written():
    """The README's kernel example is copied by users: it must run as it stands (reference path on CPU)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    snippet = next(b for b in blocks if "from attnzoo.kernels import" in b)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["out"].shape == scope["q"].shape and torch.isfinite(scope["out"]).all()
