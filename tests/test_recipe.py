from dataclasses import dataclass

import pytest

from slimkit.core import registry
from slimkit.core.errors import SlimkitError
from slimkit.core.recipe import Recipe


@dataclass(frozen=True)
class ScaleConfig:
    factor: float = 2.0
    targets: tuple[str, ...] = ("*",)
    label: str | None = None

    def __post_init__(self):
        if self.factor <= 0:
            raise SlimkitError(f"factor must be positive, got {self.factor}")


@pytest.fixture
def scale_technique(monkeypatch):
    """A real technique: multiplies every Linear weight of a copy of the model."""
    import copy

    import torch

    registry.techniques()  # register the built-ins first, into the real table
    monkeypatch.setattr(registry, "TECHNIQUES", dict(registry.TECHNIQUES))

    def apply(model, config, ctx):
        new = copy.deepcopy(model)
        with torch.no_grad():
            for m in new.model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(config.factor)
        return new

    registry.register("test-scale", "quantize", ScaleConfig, "multiply weights")(apply)


def test_yaml_round_trip(scale_technique, tmp_path):
    r = Recipe.of(("test-scale", {"factor": 3, "targets": ["mlp.*"]}), "test-scale", model="m", seed=7)
    assert r.steps[0].config == ScaleConfig(factor=3.0, targets=("mlp.*",))
    assert Recipe.load(r.save(tmp_path / "r.yaml")) == r
    assert Recipe.load(r.save(tmp_path / "r.json")) == r
    assert r.label == "test-scale(factor=3.0, targets=('mlp.*',)) -> test-scale"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"steps": [{"method": "test-scale", "factr": 2}]}, r"recipe.steps\[0\].factr: unknown key for 'test-scale'; valid keys are factor, targets, label"),
        ({"steps": [{"method": "test-scale", "factor": "big"}]}, r"recipe.steps\[0\].factor: expected float, got str"),
        ({"steps": [{"method": "test-scale", "factor": True}]}, r"steps\[0\].factor: expected float, got a boolean"),
        ({"steps": [{"method": "test-scale", "targets": "mlp"}]}, r"steps\[0\].targets: expected a list"),
        ({"steps": [{"method": "test-scale", "factor": -1}]}, r"steps\[0\]: factor must be positive"),
        ({"steps": [{"factor": 2}]}, r"steps\[0\] has no 'method'"),
        ({"steps": [{"method": "test-scal"}]}, r"did you mean 'test-scale'"),
        ({"steps": {"method": "test-scale"}}, r"steps must be a list"),
        ({"step": []}, r"unknown key 'step'"),
        ({"steps": [], "seed": "x"}, r"recipe.seed: expected int"),
        ([1, 2], r"must be a mapping"),
    ],
)
def test_validation_names_the_key_path(scale_technique, data, message):
    with pytest.raises(SlimkitError, match=message):
        Recipe.from_dict(data)


def test_bad_files(tmp_path):
    with pytest.raises(SlimkitError, match="no such recipe file"):
        Recipe.load(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [\n")
    with pytest.raises(SlimkitError, match="not valid YAML"):
        Recipe.load(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SlimkitError, match="not valid JSON"):
        Recipe.load(tmp_path / "bad.json")


def test_apply_runs_steps_in_order_without_touching_the_input(scale_technique, tiny):
    import torch

    import slimkit

    lm = slimkit.load(tiny("llama"))
    before = lm.model.model.layers[0].mlp.up_proj.weight.clone()
    out = Recipe.of(("test-scale", {"factor": 2}), ("test-scale", {"factor": 3})).apply(lm)
    assert torch.allclose(out.model.model.layers[0].mlp.up_proj.weight, before * 6)
    assert torch.equal(lm.model.model.layers[0].mlp.up_proj.weight, before)


def test_run_command_applies_measures_and_saves(scale_technique, tiny, tmp_path):
    import json

    import torch
    from conftest import assert_user_error, invoke_cli

    import slimkit

    recipe = Recipe.of(("test-scale", {"factor": 1.5})).save(tmp_path / "r.yaml")
    out = tmp_path / "out"
    proc = invoke_cli("run", str(recipe), "--model", str(tiny("llama")), "--out", str(out), "--max-tokens", "100",
                      "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["eval"]["kl_divergence"] > 0 and report["bench"]["decode_tokens_per_s"] > 0
    saved = slimkit.load(str(out))
    assert Recipe.from_dict(saved.manifest["recipe"]) == Recipe.load(recipe)
    base = slimkit.load(tiny("llama")).model.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(saved.model.model.layers[0].mlp.up_proj.weight, base * 1.5)
    # a second run into the same directory is refused before any work
    assert_user_error(invoke_cli("run", str(recipe), "--model", str(tiny("llama")), "--out", str(out)), "--overwrite")
