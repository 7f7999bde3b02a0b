"""slimkit optimize on a tiny model with real (test-registered) techniques."""

import copy
import json
from dataclasses import dataclass

import pytest
import torch

import slimkit
from slimkit import optimize as O
from slimkit import registry
from slimkit.errors import SlimkitError


@dataclass(frozen=True)
class NoiseConfig:
    scale: float = 0.0


@pytest.fixture
def techniques(monkeypatch):
    """Two real transformations: a bf16 cast (smaller) and weight noise (worse)."""
    registry.techniques()  # register the built-ins first, into the real table
    monkeypatch.setattr(registry, "_TECHNIQUES", dict(registry._TECHNIQUES))

    def cast(model, config, **ctx):
        new = copy.deepcopy(model)
        new.model.to(torch.bfloat16)
        return new

    def noise(model, config, **ctx):
        new = copy.deepcopy(model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in new.model.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g) * config.scale)  # absolute: weights are ~0.02
        return new

    registry.register("test-bf16", "quantize", NoiseConfig, "cast")(cast)
    registry.register("test-noise", "quantize", NoiseConfig, "noise")(noise)


def _run(tiny, tmp_path, monkeypatch, preset, budget=0.05):
    monkeypatch.setitem(O.PRESETS, "test", preset)
    cfg = O.OptimizeConfig(target="size", max_quality_drop=budget, preset="test", proxy_tokens=200, full_tokens=400, threads=1)
    return O.optimize(slimkit.load(tiny("llama")), cfg, tmp_path / "out")


def test_picks_the_best_passing_candidate(techniques, tiny, tmp_path, monkeypatch):
    results = _run(tiny, tmp_path, monkeypatch, [[("test-noise", {"scale": 3.0})], [("test-bf16", {})], [("test-noise", {"scale": 0.0})]])
    names = [c["name"] for c in results["candidates"]]
    assert names == ["test-noise(scale=3.0)", "test-bf16", "test-noise"]
    by = {c["name"]: c for c in results["candidates"]}
    assert not by["test-noise(scale=3.0)"]["passed"] and "far over" in by["test-noise(scale=3.0)"]["reason"]
    assert results["winner"] == "test-bf16"  # smaller on disk than the unchanged copy, within budget
    assert by["test-bf16"]["stage"] == "full" and by["test-bf16"]["metrics"]["quality_drop"] <= 0.05
    assert by["test-bf16"]["metrics"]["size_on_disk_mb"] < results["baseline"]["size_on_disk_mb"]
    out = tmp_path / "out"
    saved = slimkit.load(str(out / "model"))
    assert {p.dtype for p in saved.model.parameters()} == {torch.bfloat16}
    assert saved.manifest["recipe"]["steps"] == [{"method": "test-bf16", "scale": 0.0}]
    assert json.loads((out / "results.json").read_text())["winner"] == "test-bf16"
    assert "Use test-bf16" in (out / "report.md").read_text()
    assert (out / "report.html").read_text().count("<svg") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no work directories left


def test_nothing_passes_returns_the_original(techniques, tiny, tmp_path, monkeypatch):
    results = _run(tiny, tmp_path, monkeypatch, [[("test-noise", {"scale": 3.0})]], budget=0.001)
    assert results["winner"] is None
    saved = slimkit.load(str(tmp_path / "out" / "model"))
    original = slimkit.load(tiny("llama"))
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert torch.equal(saved.model(input_ids=ids).logits, original.model(input_ids=ids).logits)
    assert "original model is kept" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    "kw,message",
    [({"target": "speed"}, "unknown target"), ({"max_quality_drop": 0}, "between 0 and 100%"),
     ({"preset": "fast"}, "unknown preset"), ({"runtime": "tensorrt"}, "not available"), ({"time_budget_s": 0}, "positive")],
)
def test_config_errors(kw, message):
    with pytest.raises(SlimkitError, match=message):
        O.OptimizeConfig(**kw)


def test_parsers():
    assert O.parse_duration("10m") == 600 and O.parse_duration("90s") == 90 and O.parse_duration("2") == 2
    assert O.parse_fraction("1%") == pytest.approx(0.01) and O.parse_fraction("0.05") == 0.05
    with pytest.raises(SlimkitError, match="duration"):
        O.parse_duration("soon")


def test_budget_keeps_time_for_the_confirmation(techniques, tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(O.PRESETS, "test", [[("test-bf16", {})]])
    cfg = O.OptimizeConfig(target="size", max_quality_drop=0.05, preset="test", proxy_tokens=200, full_tokens=400, threads=1, time_budget_s=1)
    results = O.optimize(slimkit.load(tiny("llama")), cfg, tmp_path / "out")
    (cand,) = results["candidates"]
    assert cand["stage"] == "skipped" and "final confirmation" in cand["reason"]
    assert results["winner"] is None


def test_confirmation_estimate_scales_with_the_evaluation(tiny):
    lm = slimkit.load(tiny("llama"))
    small = O.confirmation_seconds(lm, 1.0, O.OptimizeConfig(proxy_tokens=200, full_tokens=400))
    large = O.confirmation_seconds(lm, 1.0, O.OptimizeConfig(proxy_tokens=200, full_tokens=1600))
    assert 15 < small < large
