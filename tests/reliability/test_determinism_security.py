"""Same inputs give the same bytes and metrics; loading never unpickles."""

import pickle

import pytest
import torch

import slimkit
from slimkit.measure.quality import EvalConfig


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


def _distill_recipe(tmp_path, **paths):
    from slimkit.core.recipe import Recipe

    step = {"student_layers": 1, "steps": 2, "seq_len": 16, "batch_size": 2, "eval_batches": 1, "mixed_precision": "no", **paths}
    return Recipe.of(("distill", step)).save(tmp_path / "r.yaml")


@pytest.mark.parametrize("where", ["../escaped", "ABSOLUTE", ".", "link/logs"])
def test_recipe_paths_cannot_write_outside_the_output_directory(tiny, tmp_path, where):
    from conftest import assert_user_error, invoke_cli

    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    if where == "link/logs":  # a symlink inside OUT that leads out of it
        out.mkdir()
        (out / "link").symlink_to(outside)
    where = str(outside / "logs") if where == "ABSOLUTE" else where
    recipe = _distill_recipe(tmp_path, log_dir=where)
    proc = invoke_cli("run", str(recipe), "--model", str(tiny("llama")), "--out", str(out), "--overwrite")
    assert_user_error(proc, "steps[0].log_dir", "not inside the output directory")
    assert not (tmp_path / "escaped").exists() and not any(outside.iterdir())
    assert not out.exists() or [p.name for p in out.iterdir()] == ["link"]


def test_recipe_paths_land_inside_the_output_directory(tiny, tmp_path):
    from conftest import invoke_cli

    out = tmp_path / "out"
    recipe = _distill_recipe(tmp_path, log_dir="logs", checkpoint_dir="training/checkpoints", checkpoint_every=1)
    proc = invoke_cli("run", str(recipe), "--model", str(tiny("llama")), "--out", str(out), "--max-tokens", "64", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert any((out / "logs").iterdir()) and any((out / "training" / "checkpoints").iterdir())
    saved = slimkit.load(str(out))  # the kept folders do not disturb the artifact's hash check
    assert saved.manifest["recipe"]["steps"][0]["log_dir"] == "logs"  # recorded as written, not as resolved here
