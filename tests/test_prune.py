"""Pruning methods on tiny random models: exact sparsity, shapes, GQA groups,
exact outputs when removed units were zero, reload, recovery, and errors."""

import json

import pytest
import torch

import slimkit
from slimkit.core.adapter import find
from slimkit.core.data import TextSource
from slimkit.core.errors import SlimkitError
from slimkit.core.selection import select_linears
from slimkit.pruning import common
from slimkit.pruning.recovery import RecoveryConfig, recover

IDS = torch.arange(5, 45)[None]


def outputs(lm, ids=IDS):
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def linears(lm):
    return select_linears(lm.model, ("*",), common.DEFAULT_IGNORE, what="prune")


# --------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_magnitude_per_layer_sparsity_is_exact_and_caller_untouched(tiny, arch):
    lm = slimkit.load(tiny(arch))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    pruned = slimkit.prune(lm, "magnitude", sparsity=0.5)
    for name, frac in pruned.manifest["prune_report"]["sparsity"]["layers"].items():
        assert frac == pytest.approx(0.5, abs=1e-9), name
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    if arch == "llama":  # the tied lm_head / embeddings are never pruned by default
        assert torch.equal(pruned.model.lm_head.weight, lm.model.lm_head.weight)
    assert pruned.manifest["recipe"][-1]["method"] == "magnitude"


def test_global_magnitude_hits_overall_sparsity_with_uneven_layers(tiny):
    lm = slimkit.load(tiny("llama"))
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight.mul_(0.1)  # one layer of small weights
    pruned = slimkit.prune(lm, "magnitude", sparsity=0.6, scope="global")
    report = pruned.manifest["prune_report"]["sparsity"]
    assert report["overall"] == pytest.approx(0.6, abs=1e-3)
    assert report["layers"]["model.layers.0.mlp.up_proj"] > 0.95  # loses far more than the others
    assert report["layers"]["model.layers.1.mlp.up_proj"] < 0.6


def test_wanda_zeroes_exact_fraction_per_output_row(tiny):
    lm = slimkit.load(tiny("llama"))
    pruned = slimkit.prune(lm, "wanda", sparsity=0.5)
    for name in linears(lm):
        w = pruned.model.get_submodule(name).weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
    assert "no speed without sparse kernels" in pruned.manifest["prune_report"]["speed"]


def test_targets_select_modules_and_nothing_matching_is_an_error(tiny):
    lm = slimkit.load(tiny("llama"))
    pruned = slimkit.prune(lm, "magnitude", sparsity=0.5, targets=["mlp.*"])
    assert set(pruned.manifest["prune_report"]["sparsity"]["layers"]) == {
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    }
    with pytest.raises(SlimkitError, match=r"no linear layers to prune.*nothing_here"):
        slimkit.prune(lm, "magnitude", targets=["nothing_here"])


def test_two_four_pattern_and_honest_speed_note(tiny):
    lm = slimkit.load(tiny("bert"))
    pruned = slimkit.prune(lm, "2:4")
    for name in linears(lm):
        w = pruned.model.get_submodule(name).weight
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
    assert pruned.manifest["prune_report"]["sparsity"]["overall"] == pytest.approx(0.5)
    assert "no speed without sparse kernels" in pruned.manifest["recipe"][-1]["speed"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse kernels need a CUDA GPU (Ampere or newer)")
def test_two_four_uses_sparse_kernels_on_cuda(tiny):
    lm = slimkit.load(tiny("llama"))
    lm.model.to("cuda", torch.float16)
    pruned = slimkit.prune(lm, "2:4", importance="magnitude-l1")
    from torch.sparse import SparseSemiStructuredTensor

    assert isinstance(pruned.model.model.layers[0].mlp.up_proj.weight, SparseSemiStructuredTensor)
    assert "sparse kernels" in pruned.manifest["prune_report"]["speed"]
    outputs(pruned, IDS.cuda())


def test_gradual_follows_cubic_schedule_and_keeps_masks_through_recovery(tiny):
    lm = slimkit.load(tiny("llama"))
    pruned = slimkit.prune(lm, "gradual", sparsity=0.5, steps=2, recover_minutes=1.0, max_steps_per_round=2)
    report = pruned.manifest["prune_report"]
    assert report["schedule"] == [pytest.approx(0.4375), pytest.approx(0.5)]
    assert [r["steps"] for r in report["recovery"]] == [2, 2]
    for frac in report["sparsity"]["layers"].values():
        assert frac == pytest.approx(0.5, abs=1e-9)


# --------------------------------------------------------------------------- structured


def test_structured_llama_removes_whole_gqa_groups_and_updates_config(tiny):
    lm = slimkit.load(tiny("llama"))  # 4 query heads, 2 kv heads, head_dim 16, MLP 128
    pruned = slimkit.prune(lm, "structured", head_groups=1, mlp_channels=32)
    cfg = pruned.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, 16, 96)
    for layer in pruned.model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        assert (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features, att.o_proj.in_features) == (32, 16, 16, 32)
        assert att.q_proj.weight.shape == (32, 64) and att.o_proj.weight.shape == (64, 32)
        assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (96, 96, 96)
        assert mlp.down_proj.weight.shape == (64, 96)
        assert att.num_key_value_groups == 2
    assert outputs(pruned).shape == outputs(lm).shape
    assert pruned.manifest["prune_report"]["removed_fraction"] == pytest.approx(1 - pruned.num_parameters() / lm.num_parameters())


def _zero_units(lm, group: int, channels: list[int]):
    """Zero one kv group (with its query heads) and some MLP channels in every layer."""
    with torch.no_grad():
        for layer in lm.model.model.layers:
            att, mlp, hd = layer.self_attn, layer.mlp, layer.self_attn.head_dim
            q = slice(group * 2 * hd, (group + 1) * 2 * hd)
            kv = slice(group * hd, (group + 1) * hd)
            att.q_proj.weight[q] = 0
            att.k_proj.weight[kv] = 0
            att.v_proj.weight[kv] = 0
            att.o_proj.weight[:, q] = 0
            mlp.gate_proj.weight[channels] = 0
            mlp.up_proj.weight[channels] = 0
            mlp.down_proj.weight[:, channels] = 0


def test_structured_preserves_outputs_when_removed_units_are_zero(tiny):
    lm = slimkit.load(tiny("llama"))
    _zero_units(lm, group=1, channels=list(range(10, 42)))
    pruned = slimkit.prune(lm, "structured", head_groups=1, mlp_channels=32, importance="magnitude-l1")
    assert pruned.model.model.layers[0].mlp.down_proj.in_features == 96
    assert torch.allclose(outputs(pruned), outputs(lm), atol=1e-5, rtol=0)


def test_structured_bert_heads_and_mlp_and_exact_output_when_zero(tiny):
    lm = slimkit.load(tiny("bert"))  # 4 heads of 16, MLP 128
    with torch.no_grad():
        for layer in lm.model.encoder.layer:
            layer.intermediate.dense.weight[:40] = 0
            layer.intermediate.dense.bias[:40] = 0
            layer.output.dense.weight[:, :40] = 0
    pruned = slimkit.prune(lm, "structured", units=["mlp"], mlp_channels=40, importance="magnitude-l1")
    assert pruned.model.config.intermediate_size == 88
    assert torch.allclose(outputs(pruned), outputs(lm), atol=1e-5, rtol=0)
    heads = slimkit.prune(lm, "structured", head_groups=1)
    for layer in heads.model.encoder.layer:
        assert layer.attention.self.query.out_features == 48 and layer.attention.output.dense.in_features == 48
        assert layer.attention.self.num_attention_heads == 3
    assert outputs(heads).shape == outputs(lm).shape


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_refit_brings_outputs_closer_than_slicing(tiny, arch):
    """The least-squares refit of the projections that lose inputs (down_proj / output.dense /
    c_proj, and o_proj for heads) beats plain slicing on the calibration text it was fitted on."""
    lm = slimkit.load(tiny(arch))
    units = ["mlp"] if arch == "gpt2" else ["heads", "mlp"]
    opts = dict(units=units, sparsity=0.2, importance="magnitude-l1", calibration_samples=16, seq_len=32)
    batches = common.calibration_inputs(lm, TextSource.parse(None, "calibration"), 16, 32, 4)

    def error(pruned):
        total = 0.0
        with torch.no_grad():
            for b in batches:
                ref, out = common.forward(lm, b), common.forward(pruned, b)
                key = "logits" if getattr(ref, "logits", None) is not None else "last_hidden_state"
                total += (getattr(ref, key) - getattr(out, key)).pow(2).sum().item()
        return total

    refit, sliced = slimkit.prune(lm, "structured", **opts), slimkit.prune(lm, "structured", refit=False, **opts)
    assert [p.shape for p in refit.model.parameters()] == [p.shape for p in sliced.model.parameters()]
    assert error(refit) < 0.9 * error(sliced)


def test_refit_solves_the_least_squares_problem():
    """refit_inputs on a linear layer with a bias gives the normal-equation solution."""
    from slimkit.pruning.removal import refit_inputs

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    x = torch.randn(200, 6) @ torch.randn(6, 6)  # correlated inputs: the kept ones can stand in for the rest
    target = layer(x).detach()
    xa = torch.cat([x, torch.ones(200, 1)], 1).double()
    gram = xa.T @ xa
    keep = torch.tensor([0, 2, 3, 5])
    refit_inputs(layer, keep, gram, damping=0.0)
    design = torch.cat([x[:, keep], torch.ones(200, 1)], 1).double()
    best = torch.linalg.lstsq(design, target.double()).solution  # (5, 3)
    torch.testing.assert_close(layer.weight.double(), best[:4].T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.double(), best[4], rtol=1e-5, atol=1e-6)


def test_obs_removes_the_feature_the_others_can_take_over():
    """A feature that duplicates another costs nothing once the refit moves its weight
    over: OBS removes it (or its twin) first, even though its weights are the largest."""
    from slimkit.pruning.removal import obs_keep, refit_inputs

    torch.manual_seed(0)
    x = torch.randn(300, 5)
    x = torch.cat([x, 2 * x[:, :1]], 1)  # feature 5 = 2 * feature 0
    layer = torch.nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight[:, 5] *= 10  # the largest weights: magnitude would keep it
    target = layer(x).detach()
    xa = torch.cat([x, torch.ones(300, 1)], 1).double()
    keep = obs_keep(layer, xa.T @ xa, 1, damping=1e-9)
    assert 0 not in keep.tolist() or 5 not in keep.tolist()
    refit_inputs(layer, keep, xa.T @ xa, damping=1e-9)
    torch.testing.assert_close(layer(x[:, keep]), target, rtol=1e-4, atol=1e-4)


def test_structured_sparsity_is_the_fraction_of_parameters_removed(tiny):
    lm = slimkit.load(tiny("llama"))
    pruned = slimkit.prune(lm, "structured", sparsity=0.25, units=["heads", "mlp"])
    assert pruned.manifest["prune_report"]["amounts"]["heads"] == 1
    assert pruned.manifest["prune_report"]["removed_fraction"] == pytest.approx(0.25, abs=0.02)
    mlp_only = slimkit.prune(slimkit.load(tiny("gpt2")), "structured", sparsity=0.2, units=["mlp"])
    assert mlp_only.manifest["prune_report"]["removed_fraction"] == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize("arch,field", [("llama", "num_hidden_layers"), ("gpt2", "n_layer"), ("bert", "num_hidden_layers")])
def test_structured_layer_removal_renumbers_and_generates(tiny, arch, field):
    lm = slimkit.load(tiny(arch))
    pruned = slimkit.prune(lm, "structured", units=["layers"], layers=1)
    assert getattr(pruned.model.config, field) == 1
    arch_info = find(pruned.model)
    assert len(arch_info.blocks) == 1
    if arch != "bert":
        gen = pruned.model.generate(IDS[:, :8], max_new_tokens=4, do_sample=False)  # KV cache indexes renumbered layers
        assert gen.shape == (1, 12)


def test_nonuniform_structured_records_shapes_and_round_trips(tiny, tmp_path):
    lm = slimkit.load(tiny("llama"))
    with torch.no_grad():  # make layer 0's MLP clearly less important than layer 1's
        for p in lm.model.model.layers[0].mlp.parameters():
            p.mul_(0.1)
    pruned = slimkit.prune(lm, "structured", units=["mlp"], mlp_channels=32, uniform=False)
    sizes = [layer.mlp.down_proj.in_features for layer in pruned.model.model.layers]
    assert sum(sizes) == 2 * 128 - 64 and sizes[0] < sizes[1]
    out = slimkit.save(pruned, tmp_path / "a")
    manifest = json.loads((out / "slimkit.json").read_text())
    assert manifest["pruned_shapes"]["model.layers.0.mlp.down_proj"] == {"type": "linear", "in": sizes[0], "out": 64, "bias": False}
    back = slimkit.load(str(out))
    assert torch.equal(outputs(back), outputs(pruned))


def test_uniform_structured_loads_with_plain_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    pruned = slimkit.prune(slimkit.load(tiny("llama")), "structured", sparsity=0.25, units=["heads", "mlp"])
    assert pruned.model.config.num_key_value_heads == 1
    out = slimkit.save(pruned, tmp_path / "a")
    assert "pruned_shapes" not in json.loads((out / "slimkit.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, outputs(pruned))
    assert torch.equal(outputs(slimkit.load(str(out))), outputs(pruned))


def test_bert_heads_round_trip_through_recorded_shapes(tiny, tmp_path):
    pruned = slimkit.prune(slimkit.load(tiny("bert")), "structured", head_groups=2, mlp_channels=0)
    out = slimkit.save(pruned, tmp_path / "a")
    assert "encoder.layer.0.attention.self.query" in json.loads((out / "slimkit.json").read_text())["pruned_shapes"]
    back = slimkit.load(str(out))
    assert back.model.encoder.layer[1].attention.self.num_attention_heads == 2
    assert torch.equal(outputs(back), outputs(pruned))


def test_taylor_importance_drives_structured_pruning(tiny):
    pruned = slimkit.prune(slimkit.load(tiny("llama")), "structured", sparsity=0.2, importance="fisher")
    assert pruned.model.config.intermediate_size < 128


# --------------------------------------------------------------------------- recovery


def test_recovery_lowers_the_loss_and_repairs_a_pruned_model(tiny):
    lm = slimkit.load(tiny("llama"))
    pruned = slimkit.prune(lm, "structured", sparsity=0.3)
    emb = pruned.model.model.embed_tokens.weight.clone()
    stats = recover(pruned, lm, RecoveryConfig(minutes=1, max_steps=4, lr=3e-3, seq_len=64))
    assert stats["steps"] == 4 and torch.equal(pruned.model.model.embed_tokens.weight, emb)  # frozen by default
    assert all(p.requires_grad for p in pruned.model.parameters())  # and trainable again afterwards
    stats = recover(pruned, lm, RecoveryConfig(minutes=1, max_steps=30, lr=3e-3, seq_len=64, train_embeddings=True))
    assert stats["steps"] == 30 and stats["loss_last"] < stats["loss_first"] - 0.2


def test_recovery_warms_up_over_its_steps_then_keeps_the_rate():
    from slimkit.core.training import lr_factor
    from slimkit.pruning.recovery import train_config

    cfg = train_config(RecoveryConfig(warmup_steps=4, lr=1e-3))
    assert cfg.schedule == "constant" and cfg.mixed_precision == "auto" and cfg.max_grad_norm == 0
    # step s runs at min(1, (s + 1) / warmup_steps) of the rate: full from the 4th step on, whatever the length
    assert [lr_factor(s, None, cfg.warmup, cfg.schedule, cfg.warmup_steps) for s in range(7)] == [0.25, 0.5, 0.75, 1, 1, 1, 1]
    assert [lr_factor(s, None, 0, "constant", train_config(RecoveryConfig(warmup_steps=w)).warmup_steps) for w in (0, 1) for s in (0, 1)] == [1] * 4
    assert train_config(RecoveryConfig(bf16=False)).mixed_precision == "no"


def test_recovery_trains_until_its_time_budget(tiny):
    lm = slimkit.load(tiny("llama"))
    pruned = slimkit.prune(lm, "magnitude", sparsity=0.5)
    stats = recover(pruned, lm, RecoveryConfig(minutes=0.03, seq_len=32, batch_size=2))  # 1.8 s, no max_steps
    assert stats["steps"] >= 3 and stats["tokens"] == stats["steps"] * 64
    assert 1.8 <= stats["seconds"] < 1.8 + 10  # the clock stopped it (one step past it at most, plus start-up slack)
    assert recover(pruned, lm, RecoveryConfig(minutes=0))["steps"] == 0


def test_encoder_recovery_moves_embeddings_back_towards_the_original(tiny):
    from slimkit.measure.quality import EvalConfig, evaluate

    lm = slimkit.load(tiny("bert"))
    pruned = slimkit.prune(lm, "structured", units=["layers"], layers=1)
    cfg = EvalConfig(max_passages=32)
    before = evaluate(pruned, lm, config=cfg).cosine_to_reference
    recover(pruned, lm, RecoveryConfig(minutes=1, max_steps=20, lr=1e-3, seq_len=64))
    after = evaluate(pruned, lm, config=cfg).cosine_to_reference
    assert after > before


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "method,options,fragment",
    [
        ("magnitude", {"sparsity": 1.0}, "sparsity must be a fraction in [0, 1), got 1.0"),
        ("wanda", {"sparsity": -0.1}, "sparsity must be a fraction in [0, 1)"),
        ("2:4", {"n": 4, "m": 4}, "N:M sparsity needs 0 < N < M, got 4:4"),
        ("structured", {"head_groups": 2}, "cannot remove 2 of the 2 kv head groups (4 query heads) of layer model.layers.0"),
        ("structured", {"sparsity": 0.9, "units": ["heads"]}, "cannot remove"),
        ("structured", {"sparsity": 0.2, "layers": 1}, "either sparsity or explicit amounts"),
        ("structured", {"units": ["layers", "mlp"]}, "prune layers alone"),
        ("structured", {"targets": ["decoder.*"]}, "no layers to prune"),
        ("magnitude", {"sparsity": 0.5, "spars": 1}, "unknown option(s) spars for prune method 'magnitude'"),
        ("magnitude", {"scope": "model"}, "unknown scope 'model'"),
        ("magnitude", {"importance": "tayler"}, "did you mean 'taylor'"),
        ("structured", {"recovery": "kd"}, "unknown recovery 'kd'"),
        ("magnitud", {}, "unknown prune method 'magnitud' (did you mean 'magnitude'?)"),
    ],
)
def test_bad_input_gives_one_line_errors(tiny, method, options, fragment):
    with pytest.raises(SlimkitError) as info:
        slimkit.prune(slimkit.load(tiny("llama")), method, **options)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_architecture_limits_are_explained(tiny):
    with pytest.raises(SlimkitError, match="GPT-2's fused c_attn heads"):
        slimkit.prune(slimkit.load(tiny("gpt2")), "structured", sparsity=0.2, units=["heads", "mlp"])
    with pytest.raises(SlimkitError, match="gradient criteria .* need a loss"):
        slimkit.prune(slimkit.load(tiny("bert")), "magnitude", importance="taylor")
    with pytest.raises(SlimkitError, match="cannot remove 4 of the 4 heads"):
        slimkit.prune(slimkit.load(tiny("bert")), "structured", head_groups=4)
