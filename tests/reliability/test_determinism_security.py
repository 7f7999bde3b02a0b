"""Same inputs give the same bytes and metrics; loading never unpickles."""

import pickle

import pytest
import torch

import slimkit
from slimkit.evaluate import EvalConfig


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_artifact_bytes_are_deterministic(tiny, tmp_path, arch):
    a = slimkit.save(slimkit.load(tiny(arch)), tmp_path / "a")
    b = slimkit.save(slimkit.load(tiny(arch)), tmp_path / "b")
    assert _files(a) == _files(b)


def test_metrics_are_deterministic(tiny):
    cfg = EvalConfig(window=32, stride=16, max_tokens=200)
    r1 = slimkit.evaluate(tiny("llama"), reference=tiny("llama", seed=1), config=cfg)
    r2 = slimkit.evaluate(tiny("llama"), reference=tiny("llama", seed=1), config=cfg)
    assert (r1.perplexity, r1.kl_divergence, r1.top1_agreement) == (r2.perplexity, r2.kl_divergence, r2.top1_agreement)


def test_loading_never_unpickles(tiny, tmp_path, monkeypatch):
    artifact = slimkit.save(slimkit.load(tiny("llama")), tmp_path / "a")

    def refuse(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    for source in (tiny("llama"), tiny("bert-cls"), str(artifact)):
        slimkit.load(source)


def test_remote_code_is_off_by_default(tiny, tmp_path):
    import json
    import shutil

    d = shutil.copytree(tiny("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Config"}
    cfg["model_type"] = "evil"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(slimkit.SlimkitError, match="--trust-remote-code"):
        slimkit.load(str(d))
