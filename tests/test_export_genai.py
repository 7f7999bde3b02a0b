"""onnxruntime-genai export of a tiny Llama: parity, perplexity and decode through the genai runtime."""

import json

import pytest
import torch

import slimkit
from slimkit.core.errors import SlimkitError

pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai: pip install 'slimkit[onnx]'")

from slimkit.exporters import ExportConfig, export  # noqa: E402
from slimkit.exporters.ort_genai import GenaiCache, GenaiModel  # noqa: E402
from slimkit.measure.generation import generate  # noqa: E402


@pytest.fixture(scope="module")
def genai_int4(tiny, tmp_path_factory):
    return export(tiny("llama"), tmp_path_factory.mktemp("genai") / "int4", ExportConfig("ort-genai", quantize="int4"))


def test_fp32_export_matches_torch(tiny, tmp_path):
    ref = slimkit.load(tiny("llama"))
    out = export(ref, tmp_path / "fp32", ExportConfig("ort-genai"))
    manifest = json.loads((out / "slimkit.json").read_text())
    assert manifest["runtime"] == "ort-genai" and "genai_config.json" in manifest["files"]
    assert manifest["export"]["parity"]["fp32"]["max_abs_diff"] < 1e-4
    served = slimkit.load(str(out))
    assert isinstance(served.model, GenaiModel)
    prompt, nxt = torch.randint(5, 500, (1, 8)), torch.tensor([[42]])
    with torch.no_grad():
        want = ref.model(input_ids=prompt, use_cache=True)
        want2 = ref.model(input_ids=nxt, past_key_values=want.past_key_values, use_cache=True)
    got = served.model(input_ids=prompt, use_cache=True)
    assert isinstance(got.past_key_values, GenaiCache) and got.past_key_values.get_seq_length() == 8
    got2 = served.model(input_ids=nxt, past_key_values=got.past_key_values, use_cache=True)
    assert torch.allclose(got.logits, want.logits, atol=1e-4) and torch.allclose(got2.logits, want2.logits, atol=1e-4)
    assert generate(served, "The def statement", 6).text == generate(ref, "The def statement", 6).text


def test_int4_quality_and_speed_are_measured_through_genai(genai_int4, tiny):
    served = slimkit.load(str(genai_int4))
    assert served.manifest["dtypes"] == ["int4"]
    q = slimkit.evaluate(served, tiny("llama"), config=slimkit.EvalConfig(window=64, stride=32, max_tokens=300))
    assert q.top1_agreement > 0.85 and q.perplexity == pytest.approx(q.reference_perplexity, rel=0.05)
    b = slimkit.benchmark(served, slimkit.BenchConfig(seq_len=16, batch_sizes=(1, 2), new_tokens=4, min_iters=2,
                                                      min_seconds=0, decode_repeats=1, threads=1))
    assert b.decode_tokens_per_s > 0 and b.dtype == "int4"
    assert b.size_on_disk_mb == pytest.approx(sum(p.stat().st_size for p in genai_int4.iterdir()) / 2**20)


def test_the_printed_genai_lines_generate(genai_int4, capsys):
    from slimkit.io.serving import how_to_serve

    way, last = how_to_serve(genai_int4)
    assert (way.runtime, last.runtime) == ("onnxruntime-genai", "slimkit")
    scope = {}
    exec("\n".join(way.lines), scope)  # as printed: og.Model(dir), a generator, decode
    assert len(scope["generator"].get_sequence(0)) > len(scope["tokenizer"].encode("Hello"))
    assert capsys.readouterr().out.strip()


def test_padded_input_is_refused(genai_int4):
    model = slimkit.load(str(genai_int4)).model
    with pytest.raises(SlimkitError, match="without padding"):
        model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[0, 1, 1]]))


def test_genai_refuses_an_encoder(tiny, tmp_path):
    with pytest.raises(SlimkitError, match="serves causal LMs"):
        export(tiny("bert"), tmp_path / "o", ExportConfig("ort-genai"))
    assert list(tmp_path.iterdir()) == []


def test_builder_failure_is_one_line(tiny, tmp_path):
    with pytest.raises(SlimkitError, match="model builder cannot export"):
        export(tiny("gpt2"), tmp_path / "o", ExportConfig("ort-genai"))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- slimkit's own codes in MatMulNBits


def _graph(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"], inits


@pytest.fixture(scope="module")
def int4_integer(tiny):
    return slimkit.quantize(tiny("llama"), "int4", zero_point="integer")


def test_carried_int4_reproduces_the_artifact_exactly(int4_integer, tmp_path):
    from onnx.helper import get_attribute_value

    from slimkit.exporters.genai_weights import nbits_dequantize

    out = export(int4_integer, tmp_path / "exact", ExportConfig("ort-genai", accuracy_level=0))
    manifest = json.loads((out / "slimkit.json").read_text())
    info = manifest["export"]
    assert manifest["dtypes"] == ["int4"] and info["carried"]["requantized"] == []
    assert info["carried"]["layers"] == 15 and info["carried"]["max_weight_diff"] == 0.0  # 14 linears + the tied head
    assert info["parity"]["int4"]["max_abs_diff"] < 1e-4  # fp32 rounding: the genai graph computes with slimkit's weights
    nodes, inits = _graph(out)
    attrs = {n.name: {a.name: get_attribute_value(a) for a in n.attribute} for n in nodes}
    assert attrs["/lm_head/MatMul_Q8"]["bits"] == 8 and attrs["/model/layers.0/attn/qkv_proj/MatMul_Q4"]["N"] == 128
    head = next(n for n in nodes if n.name == "/lm_head/MatMul_Q8")
    emb = int4_integer.model.model.embed_tokens
    assert len(head.input) == 3  # int8 rows are symmetric: zero point 128, the kernel's default, is left out
    written = nbits_dequantize(inits[head.input[1]], inits[head.input[2]], None, 8, 64)
    assert torch.equal(written, emb.weight_q.float() * emb.weight_scale[:, None])  # the int8 head, exactly
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in _graph_nodes(out))  # every MatMul carried
    lookup = next(n for n in _graph_nodes(out) if n.op_type == "GatherBlockQuantized")  # the int8 rows, shared with the head
    assert info["carried"]["quantized_embeddings"] == {"model.embed_tokens": lookup.name} and lookup.input[2] == head.input[2]
    assert "model.embed_tokens.weight" not in inits  # no fp32 table
    served = slimkit.load(str(out))
    ids = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = int4_integer.model(input_ids=ids).logits
    got = served.model(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 0.02  # the artifact itself runs bf16 activations in its kernels


def _graph_nodes(path):
    import onnx

    return list(onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("method,options", [("gptq", {"group_size": 32, "calibration_samples": 2, "seq_len": 32}),
                                            ("awq", {"group_size": 32, "calibration_samples": 2, "seq_len": 32, "grid": 4}),
                                            ("int4-wo", {"symmetric": True, "group_size": 64, "embeddings": False})])
def test_gptq_and_symmetric_int4_are_carried(tiny, tmp_path, method, options):
    zero_point = {} if options.get("symmetric") else {"zero_point": "integer"}
    q = slimkit.quantize(tiny("llama"), method, **options, **zero_point)
    out = export(q, tmp_path / method, ExportConfig("ort-genai"))
    info = json.loads((out / "slimkit.json").read_text())["export"]
    assert info["carried"]["max_weight_diff"] == 0.0 and info["carried"]["accuracy_level"] == 4
    assert info["parity"]["int4"]["rel_l2"] < 0.03  # int8 activations in MatMulNBits, nothing else
    if method == "awq":  # the tied head's AWQ scale: the lookup reads E diag(s), then * 1 / s
        assert q.model.model.embed_tokens.inv_column_scale is not None
        assert any(n.op_type == "Mul" and n.name.startswith("/model/embed_tokens/") for n in _graph_nodes(out))
    heads = [n for n in _graph_nodes(out) if n.name.startswith("/lm_head/")]
    assert [n.op_type for n in heads] == (["MatMul"] if method == "int4-wo" else ["MatMulNBits"])  # a float head stays float


def test_untied_int8_embedding_and_float_head(tiny, tmp_path):
    lm = slimkit.load(tiny("llama"))
    lm.model.lm_head.weight = torch.nn.Parameter(lm.model.lm_head.weight.detach() * 0.5)  # untied, left float
    lm.model.config.tie_word_embeddings = False
    q = slimkit.quantize(lm, "int4", zero_point="integer")
    out = export(q, tmp_path / "untied", ExportConfig("ort-genai", accuracy_level=0))
    info = json.loads((out / "slimkit.json").read_text())["export"]
    assert info["parity"]["int4"]["max_abs_diff"] < 1e-4 and info["carried"]["layers"] == 14
    nodes = {n.op_type: n for n in _graph_nodes(out)}
    assert nodes["GatherBlockQuantized"].input[0] == "model.embed_tokens.weight_Q8"
    assert [n.op_type for n in _graph_nodes(out) if n.name.startswith("/lm_head/")] == ["MatMul"]


def test_a_run_artifacts_recipe_then_the_export_in_the_manifest(tiny, tmp_path):
    """`slimkit run` (and optimize) save a recipe as {"steps", "seed"}: an export of it lists those steps, then itself."""
    from slimkit.exporters import write_manifest

    lm = slimkit.load(tiny("llama"))
    lm.manifest["recipe"] = {"steps": [{"method": "int4", "zero_point": "integer"}], "seed": 0}
    write_manifest(tmp_path, lm, ExportConfig("ort-genai"), {"runtime": "ort-genai", "weights": []})
    step, exported = json.loads((tmp_path / "slimkit.json").read_text())["recipe"]
    assert step == {"method": "int4", "zero_point": "integer"} and exported["export"]["format"] == "ort-genai"


def test_float_offsets_are_refused_in_one_line(tiny, tmp_path):
    q = slimkit.quantize(tiny("llama"), "int4")  # zero_point="float": offsets that are no whole number of steps
    with pytest.raises(SlimkitError, match=r"float offsets.*-o zero_point=integer.*--quantize int4") as err:
        export(q, tmp_path / "o", ExportConfig("ort-genai"))
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_quantize_int4_requantizes_what_cannot_be_carried(tiny, tmp_path):
    q = slimkit.quantize(tiny("llama"), "nf4", embeddings=True)
    out = export(q, tmp_path / "nf4", ExportConfig("ort-genai", quantize="int4"))
    info = json.loads((out / "slimkit.json").read_text())["export"]
    assert len(info["carried"]["requantized"]) == 14 and info["carried"]["layers"] == 1  # the int8 head is exact
    assert info["parity"]["int4"]["tolerance"] == 0.5 and info["block_size"] == 32


def test_a_requantized_four_bit_head_leaves_the_lookup_an_exact_float_table(tiny, tmp_path):
    """Float offsets cannot be carried: the head is re-quantized, and the embedding keeps slimkit's rows in fp32."""
    q = slimkit.quantize(tiny("llama"), "int4", embedding_bits=4)
    out = export(q, tmp_path / "offsets", ExportConfig("ort-genai", quantize="int4"))
    info = json.loads((out / "slimkit.json").read_text())["export"]
    assert "lm_head" in info["carried"]["requantized"] and info["carried"]["quantized_embeddings"] == {}
    _, inits = _graph(out)
    assert torch.equal(torch.from_numpy(inits["model.embed_tokens.weight"]), q.model.lm_head.dequantize())


@pytest.mark.parametrize("bits,group,k,sym", [(4, 32, 96, False), (4, 32, 96, True), (4, None, 128, True), (8, None, 96, True),
                                              (8, 64, 128, False)])
def test_matmulnbits_layout_matches_the_kernel(bits, group, k, sym):
    """The packing (B, scales, zero points), checked against ONNX Runtime's own MatMulNBits at fp32 accuracy;
    symmetric codes also without the zero points input (the kernel's default 2^(bits-1))."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slimkit.exporters.genai_weights import block_size, default_zero, layer_codes, nbits_dequantize, nbits_tensors
    from slimkit.quantization.modules import WeightOnlyLinear

    torch.manual_seed(0)
    layer = torch.nn.Linear(k, 48, bias=False)
    q = WeightOnlyLinear.from_float(layer, bits=bits, group_size=group, symmetric=sym, zero_point="float" if sym else "integer")
    codes = layer_codes(q)
    block = block_size(codes.group, k)
    b, s, z = nbits_tensors(codes, block)
    assert torch.equal(nbits_dequantize(b, s, z, bits, k), q.dequantize())
    assert default_zero(codes) == sym
    x = torch.randn(3, k)
    for zero in [z, None] if sym else [z]:
        if zero is None:
            assert torch.equal(nbits_dequantize(b, s, None, bits, k), q.dequantize())
        inputs = ["X", "B", "S"] + ([] if zero is None else ["Z"])
        node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=48, bits=bits,
                                block_size=block, accuracy_level=0)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 48])],
                                  [numpy_helper.from_array(a, n) for a, n in zip((b, s, zero), ["B", "S", "Z"]) if a is not None])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x.numpy()})[0]
        assert torch.allclose(torch.from_numpy(got), x @ q.dequantize().T, atol=1e-5)


def test_bad_accuracy_level_names_the_fix():
    with pytest.raises(SlimkitError, match="use 4 .* or 0"):
        ExportConfig("ort-genai", accuracy_level=7)


@pytest.mark.parametrize("method,options", [("int4", {"zero_point": "integer"}), ("int4", {"symmetric": True}),
                                            ("awq", {"group_size": 32, "calibration_samples": 2, "seq_len": 32, "grid": 4, "zero_point": "integer"})])
def test_four_bit_tied_head_is_carried_and_shared_with_the_lookup(tiny, tmp_path, method, options):
    """embedding_bits=4: the head is a 4-bit MatMulNBits and the embedding a 4-bit GatherBlockQuantized on its codes
    (symmetric: both without zero points, the kernels' default)."""
    from onnx.helper import get_attribute_value

    q = slimkit.quantize(tiny("llama"), method, embedding_bits=4, **options)
    out = export(q, tmp_path / "genai", ExportConfig("ort-genai", accuracy_level=0))
    info = json.loads((out / "slimkit.json").read_text())["export"]
    assert info["carried"]["requantized"] == [] and info["carried"]["max_weight_diff"] == 0.0
    assert info["parity"]["int4"]["max_abs_diff"] < 1e-4  # fp32 activations: slimkit's own weights, lookup included
    nodes, inits = _graph(out)
    head = next(n for n in nodes if n.name.startswith("/lm_head/"))
    assert get_attribute_value(next(a for a in head.attribute if a.name == "bits")) == 4
    lookup = next(n for n in _graph_nodes(out) if n.op_type == "GatherBlockQuantized")
    assert get_attribute_value(next(a for a in lookup.attribute if a.name == "bits")) == 4
    assert lookup.input[2:] == head.input[2:]  # the same scales and zero points: one copy of the vocabulary
    assert len(head.input) == (3 if options.get("symmetric") else 4)
    assert info["carried"]["quantized_embeddings"] == {"model.embed_tokens": lookup.name}
    assert "model.embed_tokens.weight" not in inits
    served = slimkit.load(str(out))
    ids = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = q.model(input_ids=ids).logits
    got = served.model(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 0.02
