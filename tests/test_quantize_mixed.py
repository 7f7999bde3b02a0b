"""Mixed precision on tiny models: budget met, sensitive layers high, reload and reproduce exactly."""

import json

import pytest
import torch
from test_quantize_sensitivity import PROBE, SENSITIVE, make_sensitive
from torch import nn

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.core.options import parse_options
from slimkit.io.artifacts import save
from slimkit.quantization.embedding import Int8Embedding
from slimkit.quantization.mixed import MixedConfig, fallback
from slimkit.quantization.modules import WeightOnlyLinear

pytestmark = pytest.mark.usefixtures("one_thread")

LOW = {"low": "int4-wo", "low_options": {"group_size": 32}}


@pytest.fixture
def sensitive_llama(tiny):
    return make_sensitive(slimkit.load(tiny("llama")))


def _bits(model) -> dict[str, int]:
    return {n: m.bits for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}


def _logits(lm):
    with torch.no_grad():
        return lm.model(input_ids=torch.arange(5, 45)[None]).logits


def test_budget_is_met_with_the_sensitive_layer_high(sensitive_llama):
    before = {k: v.clone() for k, v in sensitive_llama.model.state_dict().items()}
    q, report = fallback(sensitive_llama, "int4-wo", {"group_size": 32}, "int8-wo", {"max_kl": 2e-4}, granularity="layer")
    assert report.met and report.score <= 2e-4 < report.tried[0]["score"]  # all-low missed it
    assert report.high_layers == [SENSITIVE]  # one outlier layer explains the loss
    bits = _bits(q.model)
    assert bits[SENSITIVE] == 8 and sum(b == 4 for b in bits.values()) == 14 - len(report.high_layers)
    assert isinstance(q.model.model.embed_tokens, Int8Embedding)  # embeddings follow the low method
    assert len(report.tried) <= 2 + 4  # all-low, all-high, then bisection over 14 units
    assert all(torch.equal(before[k], v) for k, v in sensitive_llama.model.state_dict().items())  # caller untouched
    step = q.manifest["recipe"][-1]
    assert step["method"] == "mixed" and step["high_layers"] == report.high_layers and len(q.manifest["recipe"]) == 1
    assert json.loads(json.dumps(report.to_dict()))["sensitivity"]["units"][0]["name"] == SENSITIVE


def test_impossible_budget_keeps_every_layer_high(sensitive_llama):
    q, report = fallback(sensitive_llama, "int4-wo", {"group_size": 32}, "int8-wo", {"max_kl": 1e-12}, granularity="block")
    assert not report.met and report.score > 1e-12
    assert set(_bits(q.model).values()) == {8} and len(report.high_layers) == 14 and report.low_layers == []
    assert [t["high_units"] for t in report.tried] == [0, 2]


def test_loose_budget_keeps_every_layer_low(sensitive_llama):
    q = slimkit.quantize(sensitive_llama, "mixed", **LOW, max_kl=10.0, **PROBE)
    assert set(_bits(q.model).values()) == {4} and q.manifest["recipe"][-1]["high_layers"] == []


def test_high_none_keeps_sensitive_layers_in_float(sensitive_llama):
    q = slimkit.quantize(sensitive_llama, "mixed", **LOW, high="none", max_kl=2e-4, granularity="layer", **PROBE)
    assert type(q.model.get_submodule(SENSITIVE)) is nn.Linear
    assert SENSITIVE not in _bits(q.model) and set(_bits(q.model).values()) == {4}


def test_perplexity_budget(sensitive_llama):
    q = slimkit.quantize(sensitive_llama, "mixed", **LOW, max_ppl_increase=0.5, **PROBE)
    assert q.manifest["recipe"][-1]["max_ppl_increase"] == 0.5  # loose: nothing needs to go high
    assert set(_bits(q.model).values()) == {4}


def test_save_reload_is_exact_and_the_recipe_reproduces(sensitive_llama, tmp_path):
    q = slimkit.quantize(sensitive_llama, "mixed", **LOW, max_kl=2e-4, granularity="layer", **PROBE)
    out = save(q, tmp_path / "mixed")
    manifest = json.loads((out / "slimkit.json").read_text())
    assert {m["bits"] for m in manifest["modules"].values() if m["format"] == "weight-only"} == {4, 8}
    assert manifest["modules"][SENSITIVE]["bits"] == 8
    back = slimkit.load(str(out))
    assert torch.equal(_logits(q), _logits(back))
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in q.model.state_dict().items())
    # the recorded step rebuilds the same model without searching
    step = {k: v for k, v in manifest["recipe"][-1].items() if k not in ("stage", "method")}
    again = slimkit.quantize(sensitive_llama, "mixed", **step)
    assert torch.equal(_logits(again), _logits(q))


def test_yaml_recipe_nests_the_options(sensitive_llama, tmp_path):
    from slimkit.core.recipe import Recipe

    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - method: mixed\n    low: int4-wo\n    low_options: {group_size: 32, ignore: [lm_head]}\n"
                    "    high: int8-wo\n    max_kl: 10\n    calibration_samples: 2\n    seq_len: 64\n")
    recipe = Recipe.load(path)
    config = recipe.steps[0].config
    assert config.low_options == {"group_size": 32, "ignore": ["lm_head"]} and config.max_kl == 10.0
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert set(_bits(recipe.apply(sensitive_llama).model).values()) == {4}
    path.write_text("steps:\n  - method: mixed\n    low_options: {group_size: 48}\n    max_kl: 0.1\n")
    with pytest.raises(SlimkitError, match=r"steps\[0\]: low=int4-wo: group_size=48 is not supported"):
        Recipe.load(path)


def test_cli_options_nest_with_a_dot(sensitive_llama, tiny, tmp_path):
    from conftest import assert_user_error, invoke_cli

    options = parse_options("mixed", ["low=int4-wo", "low.group_size=32", "low.ignore=lm_head,q_proj", "high=int8-wo", "high.group_size=none", "max_kl=0.02"])
    assert options == {"low": "int4-wo", "high": "int8-wo", "max_kl": 0.02, "low_options": {"group_size": 32, "ignore": ("lm_head", "q_proj")},
                       "high_options": {"group_size": None}}
    assert parse_options("mixed", ["high_layers=a.b,c.d"]) == {"high_layers": ("a.b", "c.d")}
    with pytest.raises(SlimkitError, match="unknown option 'bits' for quantize method 'nf4'"):
        parse_options("mixed", ["low=nf4", "low.bits=4"])
    with pytest.raises(SlimkitError, match="write -o low.OPTION=VALUE"):
        parse_options("mixed", ["low_options=group_size=32"])
    out = tmp_path / "m"
    proc = invoke_cli("quantize", str(tiny("llama")), "--method", "mixed", "--out", str(out), "-o", "low.group_size=32",
                      "-o", "max_kl=10", "-o", "calibration_samples=2", "-o", "seq_len=64", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["options"]["low_options"] == {"group_size": 32}
    assert_user_error(invoke_cli("quantize", str(tiny("llama")), "--method", "mixed", "--out", str(tmp_path / "x")), "needs a quality budget")


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"low": "int5-wo", "max_kl": 0.1}, "low=int5-wo: unknown quantize method 'int5-wo'"),
        ({"high": "int9", "max_kl": 0.1}, "high=int9: unknown quantize method 'int9'"),
        ({"low": "bf16", "max_kl": 0.1}, "method 'bf16' has no targets option"),
        ({"low": "none", "max_kl": 0.1}, "low='none' cannot be the low precision"),
        ({"high": "mixed", "max_kl": 0.1}, "cannot nest"),
        ({}, "mixed needs a quality budget: set max_kl"),
        ({"max_kl": 0.1, "max_ppl_increase": 0.01}, "one quality budget, got max_kl and max_ppl_increase"),
        ({"max_kl": -1.0}, "max_kl=-1.0 is out of range"),
        ({"max_kl": float("nan")}, "max_kl=nan is out of range"),
        ({"max_ppl_increase": 1.5}, "it is a fraction below 1, e.g. max_ppl_increase=0.01"),
        ({"low_options": {"group_size": 48}, "max_kl": 0.1}, "low=int4-wo: group_size=48 is not supported"),
        ({"low_options": {"bits": 3}, "max_kl": 0.1}, "unknown option(s) bits for quantize method 'int4-wo'"),
        ({"high_options": {"targets": ["q_proj"]}, "max_kl": 0.1}, "high_options cannot set targets"),
        ({"high": "none", "high_options": {"group_size": 32}, "max_kl": 0.1}, "high='none' keeps the layers in float and takes no options"),
        ({"high": "int4-wo", "max_kl": 0.1}, "low and high are both int4-wo with the same options"),
        ({"granularity": "row", "max_kl": 0.1}, "granularity 'row' is unknown"),
        ({"high_layers": "model.layers.0", "max_kl": 0.1}, "high_layers must be a list of layer names"),
        ({"low_options": "group_size=32", "max_kl": 0.1}, "low_options must be a mapping"),
    ],
)
def test_bad_config_names_the_fix(kwargs, fragment):
    with pytest.raises(SlimkitError) as info:
        MixedConfig(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_high_layer_and_bad_budget_key(sensitive_llama):
    with pytest.raises(SlimkitError, match="high_layers names model.layers.9.mlp.up_proj, which the low method does not quantize"):
        slimkit.quantize(sensitive_llama, "mixed", high_layers=["model.layers.9.mlp.up_proj"])
    with pytest.raises(SlimkitError, match="budget must be one of max_kl, max_ppl_increase, max_cosine_drop"):
        fallback(sensitive_llama, "int4-wo", budget={"max_loss": 0.1})


def test_encoder_budget_is_cosine(tiny):
    q, report = fallback(tiny("bert"), "int4-wo", {"group_size": 32}, "int8-wo", {"max_cosine_drop": 1e-9})
    assert report.metric == "cosine" and not report.met and set(_bits(q.model).values()) == {8}
    with pytest.raises(SlimkitError, match="metric 'kl' does not fit a encoder model: use cosine"):
        fallback(tiny("bert"), "int4-wo", budget={"max_kl": 0.1})


@pytest.mark.slow
def test_minilm_mixed_meets_a_cosine_budget():
    lm = slimkit.load("minilm-l6")
    q, report = fallback(lm, "int4-wo", {"group_size": 32}, "int8-wo", {"max_cosine_drop": 0.002})
    assert report.metric == "cosine" and report.met and report.score <= 0.002 < report.tried[0]["score"]  # all-low missed it
    assert report.sensitivity.units[-1].name == "pooler.dense"  # mean-pooled embeddings never read the pooler
    assert report.sensitivity.granularity == "block" and len(report.sensitivity.units) == 7  # 6 blocks + pooler
    assert len(report.tried) <= 2 + 3
