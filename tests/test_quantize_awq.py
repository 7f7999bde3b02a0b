"""AWQ: the scale search on tensors, exact folding, and the method on tiny models."""

import json

import pytest
import torch

import slimkit
from slimkit.core import data as D
from slimkit.core.adapter import find
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.selection import select_linears
from slimkit.io.artifacts import save
from slimkit.io.model import copy_model
from slimkit.quantization import formats as F
from slimkit.quantization.awq import AWQConfig, scale_whole_
from slimkit.quantization.awq_math import awq_scales, fake_quantize, scaled_error, search_scale
from slimkit.quantization.embedding import Int8Embedding, TiedInt8Head, tied_head
from slimkit.quantization.modules import WeightOnlyLinear

CALIB = {"calibration_samples": 4, "seq_len": 64, "grid": 10}


def _layer(n=96, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(512, k, generator=g)
    x[:, [3, 40, 77]] *= 30  # outlier input channels
    return w, x


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 128, True), (8, None, True)])
def test_search_beats_round_to_nearest_on_outlier_channels(bits, group, sym):
    w, x = _layer()
    found = search_scale(w, x, bits, group, sym, grid=20)
    assert found.alpha > 0 and found.scale.shape == (128,)
    assert found.error < 0.7 * found.rtn_error
    ref = x @ w.T
    rtn = x @ fake_quantize(w, bits, group, sym).T
    awq = (x / found.scale) @ fake_quantize(w * found.scale, bits, group, sym).T
    assert F.sqnr_db(ref, awq) > F.sqnr_db(ref, rtn) + 1.5


def test_alpha_zero_is_round_to_nearest():
    w, x = _layer()
    s = awq_scales(x.abs().mean(0), 0.0)
    assert torch.equal(s, torch.ones(128))
    rtn = float((x @ w.T - x @ fake_quantize(w, 4, 64, False).T).pow(2).mean())
    assert scaled_error(w, x, s, 4, 64, False) == pytest.approx(rtn, rel=1e-5)
    assert search_scale(w, x, 4, 64, False, grid=5).rtn_error == pytest.approx(rtn, rel=1e-5)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (8, None, True)])
def test_error_taken_in_row_chunks_equals_the_whole(bits, group, sym):
    w, x = _layer()  # (N, K) with N not a multiple of the chunk below
    s = awq_scales(x.abs().mean(0), 0.5)
    whole = float((x @ w.T - (x / s) @ fake_quantize(w * s, bits, group, sym).T).pow(2).mean())
    assert scaled_error(w, x, s, bits, group, sym, rows=7) == pytest.approx(whole, rel=1e-5)
    assert scaled_error(w, x, s, bits, group, sym, rows=w.shape[0]) == pytest.approx(whole, rel=1e-5)


def test_scales_are_normalised_and_follow_activations():
    m = torch.tensor([0.1, 1.0, 10.0, 0.0])
    s = awq_scales(m, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))
    assert s[2] > s[1] > s[0]


def _out(lm, ids=None):
    ids = torch.arange(5, 69)[None] if ids is None else ids
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def _with_outliers(lm, arch):
    """Make a few input channels of every layer's norms large, as in trained LLMs."""
    with torch.no_grad():
        for name, m in lm.model.named_modules():
            if name.endswith(("input_layernorm", "post_attention_layernorm", "ln_1", "ln_2", "LayerNorm")):
                m.weight[:3] = 8.0
    return lm


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_folding_keeps_the_float_model_exact(tiny, arch):
    """Scales applied, nothing quantized: the same outputs up to float rounding."""
    lm = _with_outliers(slimkit.load(tiny(arch)), arch)
    scaled = copy_model(lm, "scaled")
    config = AWQConfig(**CALIB)
    model = scaled.model
    names = list(select_linears(model, tuple(config.targets), tuple(config.ignore)))
    batches = D.calibration_batches(scaled.tokenizer, D.TextSource.parse(None, "calibration"), config.seq_len, config.calibration_samples, batch_size=1)
    explicit, head_scale = scale_whole_(model, find(model), names, tied_head(model), batches, scaled.kind == CAUSAL_LM, config)
    for name, s in explicit.items():  # what WeightOnlyLinear.inv_input_scale does, in float
        layer = scaled.model.get_submodule(name)
        layer.weight.data.mul_(s[None, :] if isinstance(layer, torch.nn.Linear) else s[:, None])
        layer.register_forward_pre_hook(lambda m, args, s=s: (args[0] / s,))
    if head_scale is not None:  # the embedding lookup divides by s, the head reads E diag(s)
        emb = scaled.model.get_input_embeddings()
        emb.weight.data.mul_(head_scale[None, :])
        emb.register_forward_hook(lambda m, args, out: out / head_scale)
    assert F.sqnr_db(_out(lm), _out(scaled)) > 90
    folded_into_norms = {"llama": "q_proj", "gpt2": "c_attn", "bert": None}[arch]
    assert not any(n.endswith(str(folded_into_norms)) for n in explicit)
    if arch == "llama":  # everything folds, o_proj into v_proj across grouped-query heads
        assert explicit == {} and head_scale is not None
    if arch == "gpt2":
        assert "transformer.h.0.attn.c_proj" in explicit and head_scale is not None
    if arch == "bert":  # post-norm: the LayerNorm also feeds the residual, so q/k/v keep explicit scales
        assert "encoder.layer.0.attention.self.query" in explicit
        assert "encoder.layer.0.attention.output.dense" not in explicit  # folded into value's rows


# BERT's output is its last LayerNorm's (float), which the outlier channels
# dominate: AWQ gains little there (measured +0.2 dB at group 32, -0.02 at 64).
@pytest.mark.parametrize("arch,group,gain_db", [("llama", 64, 1.0), ("gpt2", 64, 1.0), ("bert", 32, 0.0)])
def test_awq_at_least_as_good_as_rtn(tiny, arch, group, gain_db):
    lm = _with_outliers(slimkit.load(tiny(arch)), arch)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    awq = slimkit.quantize(lm, "awq", group_size=group, **CALIB)
    rtn = slimkit.quantize(lm, "int4-wo", group_size=group)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # caller untouched
    ref = _out(lm)
    assert F.sqnr_db(ref, _out(awq)) > F.sqnr_db(ref, _out(rtn)) + gain_db
    if arch == "llama":  # block by block, every scale still folds into a norm, v's or up's rows
        assert all(getattr(m, "inv_input_scale", None) is None for m in awq.model.modules())
    assert awq.manifest["recipe"][-1]["method"] == "awq"


def test_int8_with_tied_head_keeps_the_kernel_and_gains(tiny):
    lm = _with_outliers(slimkit.load(tiny("llama")), "llama")
    q = slimkit.quantize(lm, "awq", bits=8, group_size=None, symmetric=True, **CALIB)
    assert isinstance(q.model.lm_head, TiedInt8Head)
    emb = q.model.model.embed_tokens
    assert isinstance(emb, Int8Embedding) and emb.inv_column_scale is not None
    up = q.model.model.layers[0].mlp.up_proj
    assert isinstance(up, WeightOnlyLinear) and up.kernel() == "int8pack" and up.inv_input_scale is None
    ref = _out(lm)
    assert F.sqnr_db(ref, _out(q)) >= F.sqnr_db(ref, _out(slimkit.quantize(lm, "int8-wo"))) - 0.5


@pytest.mark.parametrize("arch,options", [("llama", {"bits": 8, "group_size": None, "symmetric": True}), ("gpt2", {}), ("bert", {"group_size": 32})])
def test_save_and_reload_is_exact(tiny, tmp_path, arch, options):
    q = slimkit.quantize(tiny(arch), "awq", **options, **CALIB)
    out = save(q, tmp_path / "q")
    back = slimkit.load(str(out))
    assert torch.equal(_out(q), _out(back))
    modules = json.loads((out / "slimkit.json").read_text())["modules"]
    if arch == "gpt2":
        assert modules["transformer.h.0.attn.c_proj"]["input_scale"] is True
        assert torch.equal(back.model.transformer.h[0].attn.c_proj.inv_input_scale, q.model.transformer.h[0].attn.c_proj.inv_input_scale)
    if arch == "llama":
        assert modules["model.embed_tokens"]["column_scale"] is True


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"bits": 3}, "bits=3 is not supported by awq: use 4 or 8"),
        ({"group_size": None}, "awq int4 needs groups"),
        ({"group_size": 48}, "group_size=48 is not supported"),
        ({"grid": 1}, "grid=1 is out of range"),
        ({"rounding": "best"}, "rounding='best' is not supported: use 'nearest'"),
        ({"calibration_samples": 0}, "calibration needs calibration_samples >= 1"),
        ({"targets": []}, "targets is empty"),
    ],
)
def test_bad_options_name_the_fix(tiny, options, fragment):
    with pytest.raises(SlimkitError) as info:
        slimkit.quantize(tiny("llama"), "awq", **options)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_group_not_dividing_fails_before_calibrating(tiny):
    with pytest.raises(SlimkitError, match="does not divide the input dimension 64"):
        slimkit.quantize(tiny("llama"), "awq", group_size=128)


def test_cli_options_reach_int8_per_channel():
    from slimkit.core.options import parse_options

    assert parse_options("awq", ["bits=8", "group_size=none", "symmetric=true", "grid=10"]) == {"bits": 8, "group_size": None, "symmetric": True, "grid": 10}


def test_awq_with_integer_zero_points_on_tiny_llama(tiny):
    q = slimkit.quantize(tiny("llama"), "awq", group_size=32, zero_point="integer", calibration_samples=2, seq_len=32, grid=4)
    layer = q.model.model.layers[0].mlp.down_proj
    assert layer.spec()["zero_point"] == "integer" and layer.offset is None
    assert q.manifest["recipe"][-1]["zero_point"] == "integer"


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_four_bit_tied_head_owns_the_codes_and_reloads_exactly(tiny, tmp_path, method):
    """embedding_bits=4: the head is a 4-bit WeightOnlyLinear, the embedding looks its rows up there."""
    from slimkit.quantization.embedding import TiedEmbedding

    lm = _with_outliers(slimkit.load(tiny("llama")), "llama")
    extra = CALIB if method == "awq" else {"calibration_samples": 4, "seq_len": 64}
    q = slimkit.quantize(lm, method, group_size=32, zero_point="integer", embedding_bits=4, **extra)
    head, emb = q.model.lm_head, q.model.model.embed_tokens
    assert isinstance(head, WeightOnlyLinear) and head.bits == 4 and head.kernel() == "int4pack"
    assert isinstance(emb, TiedEmbedding) and emb.head is head
    assert (emb.inv_column_scale is not None) == (method == "awq")  # AWQ's head scale folds into the final norm
    ids = torch.tensor([[0, 7, 7, 63]])
    rows = head.dequantize()[ids[0]]
    if emb.inv_column_scale is not None:
        rows = rows * emb.inv_column_scale
    assert torch.equal(emb(ids)[0], rows)  # a lookup is the head's own dequantized rows
    n_float = lm.num_parameters()
    assert q.num_parameters() == n_float  # the tie survives: the vocabulary's weights are counted once, as in the float model
    int8 = slimkit.quantize(lm, method, group_size=32, zero_point="integer", **extra)
    ref = _out(lm)
    assert F.sqnr_db(ref, _out(q)) > 10 and F.sqnr_db(ref, _out(q)) < F.sqnr_db(ref, _out(int8)) + 0.5
    out = save(q, tmp_path / "q")
    modules = json.loads((out / "slimkit.json").read_text())["modules"]
    assert modules["model.embed_tokens"]["format"] == "tied-embedding" and modules["model.embed_tokens"]["tied_to"] == "lm_head"
    back = slimkit.load(str(out))
    assert isinstance(back.model.model.embed_tokens, TiedEmbedding) and back.model.model.embed_tokens.head is back.model.lm_head
    assert torch.equal(_out(q), _out(back))


@pytest.mark.parametrize(
    "arch,options,fragment",
    [
        ("llama", {"bits": 8, "group_size": None, "symmetric": True, "embedding_bits": 4}, "use bits=4, or embedding_bits=8"),
        ("llama", {"embedding_bits": 2}, "embedding_bits=2 is not supported by awq"),
        ("bert", {"group_size": 32, "embedding_bits": 4}, "not tied to its embedding: use embedding_bits=8"),
    ],
)
def test_embedding_bits_bad_input_names_the_fix(tiny, arch, options, fragment):
    with pytest.raises(SlimkitError) as info:
        slimkit.quantize(tiny(arch), "awq", **options, **CALIB)
    assert fragment in str(info.value) and "\n" not in str(info.value)



def test_scale_search_reaches_every_layer(tiny):
    lm = _with_outliers(slimkit.load(tiny("llama")), "llama")
    q = slimkit.quantize(lm, "awq", group_size=32, symmetric=True, embeddings=False, scale_search=True, **CALIB)
    for name, module in q.model.named_modules():
        if isinstance(module, WeightOnlyLinear):  # the full grid, signed scales: searched, not absmax / 7
            assert int(module.q_values().min()) == -8 and (module.scale < 0).any(), name
    assert F.sqnr_db(_out(lm), _out(q)) > 12
    with pytest.raises(SlimkitError, match="set symmetric=true"):
        slimkit.quantize(lm, "awq", group_size=32, symmetric=False, scale_search=True, **CALIB)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: c_proj keeps an explicit scale, so its Hessian is rescaled
def test_gptq_rounding_of_the_scaled_weights_is_closer(tiny, arch):
    lm = _with_outliers(slimkit.load(tiny(arch)), arch)
    nearest = slimkit.quantize(lm, "awq", group_size=32, embeddings=False, **CALIB)
    gptq = slimkit.quantize(lm, "awq", group_size=32, embeddings=False, rounding="gptq", **CALIB)
    ref = _out(lm)
    assert F.sqnr_db(ref, _out(gptq)) > F.sqnr_db(ref, _out(nearest)) + 1.0
