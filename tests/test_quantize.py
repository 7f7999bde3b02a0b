"""Quantization methods on tiny random models: quality, selection, save/reload, errors."""

import json

import pytest
import torch
from torch import nn

import slimkit
from slimkit.core import registry
from slimkit.core.errors import SlimkitError
from slimkit.io.artifacts import save
from slimkit.measure.speed import dir_size_mb
from slimkit.quantization import formats as F
from slimkit.quantization.embedding import Int8Embedding, TiedInt8Head
from slimkit.quantization.modules import Int8DynamicLinear, NF4Linear, WeightOnlyLinear

METHODS = {
    "int8-dynamic": ({}, 25),
    "int8-wo": ({}, 25),
    "int4-wo": ({}, 10),
    "nf4": ({"double_quant": True}, 10),
    "bf16": ({}, 25),
    "fp16": ({}, 25),
}


def _out(lm, ids=None):
    ids = torch.arange(5, 45)[None] if ids is None else ids
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_method_keeps_outputs_close(tiny, arch, method):
    options, min_db = METHODS[method]
    lm = slimkit.load(tiny(arch))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    q = slimkit.quantize(lm, method, **options)
    assert q is not lm and q.model is not lm.model
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # caller untouched
    assert F.sqnr_db(_out(lm), _out(q)) > min_db
    assert q.manifest["recipe"][-1]["method"] == method


def test_gpt2_conv1d_layers_are_quantized(tiny):
    q = slimkit.quantize(tiny("gpt2"), "int8-wo", embeddings=False)
    kinds = {type(m).__name__ for n, m in q.model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))}
    assert kinds == {"WeightOnlyLinear"}


def test_targets_and_ignore(tiny):
    q = slimkit.quantize(tiny("llama"), "int8-dynamic", targets=["mlp.*"], ignore=["layers.1.*"])
    quantized = sorted(n for n, m in q.model.named_modules() if isinstance(m, Int8DynamicLinear))
    assert quantized == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert isinstance(q.model.lm_head, nn.Linear)  # ignored by default


def test_nothing_matches_names_the_patterns(tiny):
    with pytest.raises(SlimkitError, match=r"none matches targets \['nope\*'\].*check the patterns"):
        slimkit.quantize(tiny("llama"), "int4-wo", targets=["nope*"])


def test_tied_embedding_becomes_one_int8_matrix(tiny):
    lm = slimkit.load(tiny("llama"))
    q = slimkit.quantize(lm, "int4-wo")
    assert isinstance(q.model.model.embed_tokens, Int8Embedding)
    assert isinstance(q.model.lm_head, TiedInt8Head)
    assert q.num_parameters() == lm.num_parameters()  # packed buffers are counted, the tie once


@pytest.mark.parametrize(
    "method,options",
    [("int8-dynamic", {}), ("int8-dynamic", {"compute_dtype": "bf16"}), ("int8-wo", {}), ("int4-wo", {"compute_dtype": "bf16"}), ("int8-wo", {"group_size": 32, "symmetric": False}), ("int4-wo", {"group_size": 64, "symmetric": True}), ("nf4", {"double_quant": True}), ("bf16", {})],
)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_save_and_reload_is_exact(tiny, tmp_path, arch, method, options):
    q = slimkit.quantize(tiny(arch), method, **options)
    out = save(q, tmp_path / "q")
    back = slimkit.load(str(out))
    assert torch.equal(_out(q), _out(back))
    manifest = json.loads((out / "slimkit.json").read_text())
    assert manifest["recipe"][-1]["method"] == method
    if method != "bf16":
        formats = {spec["format"] for spec in manifest["modules"].values()}
        assert formats & {"int8-dynamic", "weight-only", "nf4"}
        assert {type(m) for m in back.model.modules()} & {Int8DynamicLinear, WeightOnlyLinear, NF4Linear}


@pytest.mark.parametrize("method", ["int8-wo", "int4-wo", "int8-dynamic"])
def test_compute_dtype_bf16_casts_what_stays_float(tiny, method):
    lm = slimkit.load(tiny("llama"))
    fp32 = slimkit.quantize(lm, method)
    q = slimkit.quantize(lm, method, compute_dtype="bf16")
    floats = {n: p.dtype for n, p in q.model.named_parameters() if ".bias" not in n}
    assert floats and set(floats.values()) == {torch.bfloat16}  # norms; quantized layers hold buffers
    assert q.model.model.embed_tokens(torch.tensor([[5]])).dtype == torch.bfloat16 or method == "int8-dynamic"
    with torch.no_grad():
        hidden = q.model.model(input_ids=torch.arange(5, 45)[None]).last_hidden_state
    assert hidden.dtype == torch.bfloat16
    assert F.sqnr_db(_out(fp32), _out(q)) > 25  # bf16 rounding on top of the same integers


def test_compute_dtype_is_validated():
    from slimkit.quantization.weight_only import Int8WeightOnlyConfig

    with pytest.raises(SlimkitError, match="compute_dtype='int8' is not supported: use one of fp32, bf16, fp16"):
        Int8WeightOnlyConfig(compute_dtype="int8")


def test_manifest_records_module_formats(tiny, tmp_path):
    out = save(slimkit.quantize(tiny("llama"), "int4-wo", group_size=64), tmp_path / "q")
    modules = json.loads((out / "slimkit.json").read_text())["modules"]
    assert modules["model.layers.0.mlp.up_proj"] == {
        "format": "weight-only", "bits": 4, "group_size": 64, "symmetric": False,
        "in_features": 64, "out_features": 128, "bias": False,
    }
    assert modules["lm_head"] == {"format": "tied-int8-head", "tied_to": "model.embed_tokens"}


def test_size_on_disk_shrinks(tiny, tmp_path):
    lm = slimkit.load(tiny("llama"))
    sizes = {"fp32": dir_size_mb(save(lm, tmp_path / "fp32"), "*.safetensors")}
    for method in ("int8-wo", "int4-wo", "nf4"):
        sizes[method] = dir_size_mb(save(slimkit.quantize(lm, method), tmp_path / method, layout="slimkit"), "*.safetensors")
    assert sizes["int8-wo"] < 0.32 * sizes["fp32"]
    assert sizes["int4-wo"] < sizes["int8-wo"] and sizes["nf4"] < sizes["int8-wo"]
    # the layout plain transformers reads holds asymmetric 4-bit codes one int8 each, with fp32 scales and zero points
    readable = dir_size_mb(save(slimkit.quantize(lm, "int4-wo"), tmp_path / "int4-wo-ct"), "*.safetensors")
    assert sizes["int4-wo"] < readable < 0.45 * sizes["fp32"]


def test_unknown_format_in_manifest_is_refused(tiny, tmp_path):
    out = save(slimkit.quantize(tiny("llama"), "int8-wo"), tmp_path / "q")
    manifest = json.loads((out / "slimkit.json").read_text())
    manifest["modules"]["model.layers.0.mlp.up_proj"]["format"] = "int3-magic"
    (out / "slimkit.json").write_text(json.dumps(manifest))
    with pytest.raises(SlimkitError, match="unknown quantized format 'int3-magic': upgrade slimkit"):
        slimkit.load(out)


def test_registry_lists_every_method():
    names = {t.name for t in registry.techniques("quantize")}
    assert {"bf16", "fp16", "int8-dynamic", "int8-wo", "int4-wo", "nf4", "int8", "int4"} <= names


@pytest.mark.parametrize(
    "method,options,fragment",
    [
        ("int4-wo", {"group_size": 48}, "group_size=48 is not supported: use one of 32, 64, 128, 256"),
        ("int4-wo", {"bits": 3}, "unknown option(s) bits for quantize method 'int4-wo'"),
        ("nf4", {"block_size": 100}, "block_size=100 is not supported"),
        ("int8-wo", {"targets": []}, "targets is empty"),
        ("int8-wo", {"targets": "q_proj"}, "targets must be a list"),
        ("int9", {}, "unknown quantize method 'int9'"),
    ],
)
def test_bad_options_name_the_fix(tiny, method, options, fragment):
    with pytest.raises(SlimkitError) as info:
        slimkit.quantize(tiny("llama"), method, **options)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_group_not_dividing_a_layer(tiny):
    with pytest.raises(SlimkitError, match="does not divide the input dimension 64"):
        slimkit.quantize(tiny("llama"), "int4-wo", group_size=128)


def test_smoothquant_on_outlier_channels(tiny):
    """A model whose MLP inputs have outlier channels: smoothing recovers accuracy."""
    lm = slimkit.load(tiny("llama"))
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.post_attention_layernorm.weight[:4] = 50.0  # a few huge input channels to gate/up
    ids = torch.arange(5, 69)[None]
    plain = slimkit.quantize(lm, "int8-dynamic", targets=["mlp.*"])
    smooth = slimkit.quantize(lm, "int8-dynamic", targets=["mlp.*"], smooth_alpha=0.5, calibration_samples=4, seq_len=64)
    assert smooth.model.model.layers[0].mlp.up_proj.inv_smooth is not None
    assert smooth.manifest["recipe"][-1]["smooth_alpha"] == 0.5
    ref = _out(lm, ids)
    assert F.sqnr_db(ref, _out(smooth, ids)) > F.sqnr_db(ref, _out(plain, ids)) + 3


def test_smoothquant_round_trip(tiny, tmp_path):
    q = slimkit.quantize(tiny("bert"), "int8-dynamic", smooth_alpha=0.5, calibration_samples=2, seq_len=32)
    back = slimkit.load(str(save(q, tmp_path / "q")))
    assert torch.equal(_out(q), _out(back))


def test_smooth_alpha_out_of_range(tiny):
    with pytest.raises(SlimkitError, match=r"smooth_alpha=1.5 is out of range: use a value in \(0, 1\)"):
        slimkit.quantize(tiny("llama"), "int8-dynamic", smooth_alpha=1.5)
