"""ONNX Runtime fusions and quantization: parity, quality thresholds, the graphs' operators."""

import collections
import json

import pytest

import slimkit
from slimkit.errors import SlimkitError

pytest.importorskip("onnxruntime", reason="ONNX Runtime tests need the extra: pip install 'slimkit[onnx]'")
onnx = pytest.importorskip("onnx", reason="ONNX Runtime tests need the extra: pip install 'slimkit[onnx]'")

from slimkit.export import ExportConfig, export  # noqa: E402
from slimkit.generate import generate  # noqa: E402

EVAL = slimkit.EvalConfig(window=64, stride=32, max_tokens=400, max_passages=16)


def _ops(out):
    model = onnx.load(str(out / "model.onnx"))
    return collections.Counter(n.op_type for n in model.graph.node)


def test_fusions_keep_parity(tiny, tmp_path):
    out = export(tiny("bert"), tmp_path / "o", ExportConfig("onnxruntime"))
    manifest = json.loads((out / "slimkit.json").read_text())["export"]
    assert manifest["optimized"] and manifest["fusions"].get("SkipLayerNormalization", 0) > 0
    assert manifest["parity"]["optimized"]["max_abs_diff"] < 1e-4
    assert _ops(out)["SkipLayerNormalization"] > 0


@pytest.mark.parametrize(("arch", "quant", "op"), [
    ("bert", "int8", "MatMulInteger"),
    ("bert-cls", "int8-static", "QuantizeLinear"),
    ("gpt2", "int8", "MatMulInteger"),
    ("llama", "int4", "MatMulNBits"),
    ("gpt2", "int8-static", "DequantizeLinear"),
])
def test_quantized_export_quality(tiny, tmp_path, arch, quant, op):
    ref = slimkit.load(tiny(arch))
    out = export(ref, tmp_path / "o", ExportConfig("onnxruntime", quantize=quant))
    assert _ops(out)[op] > 0
    served = slimkit.load(str(out))
    assert served.manifest["dtypes"] == [quant]
    parity = served.manifest["export"]["parity"][quant]
    assert 0 < parity["rel_l2"] < parity["tolerance"]
    q = slimkit.evaluate(served, ref, config=EVAL)
    if ref.kind == "causal-lm":
        assert q.top1_agreement > 0.85 and q.kl_divergence < 0.1
        assert q.perplexity == pytest.approx(q.reference_perplexity, rel=0.05)
    elif ref.kind == "encoder":
        assert q.cosine_to_reference > 0.99
    else:
        assert q.agreement_with_reference > 0.9


def test_int4_is_smaller_on_disk(tiny, tmp_path):
    fp32 = export(tiny("llama"), tmp_path / "fp32", ExportConfig("onnxruntime"))
    int4 = export(tiny("llama"), tmp_path / "int4", ExportConfig("onnxruntime", quantize="int4"))
    ops = _ops(int4)
    assert ops["GatherBlockQuantized"] == 1  # the embedding too
    assert _weight_bytes(int4) < 0.3 * _weight_bytes(fp32)  # a tiny graph's file is mostly structure


def _weight_bytes(out):
    model = onnx.load(str(out / "model.onnx"))
    return sum(len(i.raw_data) + 4 * len(i.float_data) for i in model.graph.initializer)


def test_int8_dynamic_keeps_the_lm_head_fp32(tiny, tmp_path):
    out = export(tiny("llama"), tmp_path / "o", ExportConfig("onnxruntime", quantize="int8"))
    model = onnx.load(str(out / "model.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer["logits"].op_type == "MatMul"


def test_quantized_generation_runs(tiny, tmp_path):
    out = export(tiny("gpt2"), tmp_path / "o", ExportConfig("onnxruntime", quantize="int8"))
    result = generate(str(out), "The def statement", 5)
    assert result.new_tokens >= 1 and result.prompt_tokens > 0


def test_generate_refuses_an_encoder(tiny):
    with pytest.raises(SlimkitError, match="not a causal LM"):
        generate(tiny("bert"), "hello")


@pytest.fixture(scope="module")
def minilm_int8(tmp_path_factory):
    ref = slimkit.load("minilm-l6")
    out = export(ref, tmp_path_factory.mktemp("minilm") / "o", ExportConfig("onnxruntime", quantize="int8"))
    return slimkit.evaluate(str(out), ref, config=slimkit.EvalConfig(max_passages=64))


@pytest.mark.slow
def test_minilm_int8_keeps_embeddings(minilm_int8):
    """What ORT int8 reaches today (cosine 0.9937): a guard against regressions."""
    assert minilm_int8.cosine_to_reference >= 0.99, minilm_int8.cosine_to_reference
    assert minilm_int8.retrieval_top10_overlap > 0.9


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 6 bar not met yet: ORT dynamic int8 gives cosine 0.9937 < 0.995")
def test_minilm_int8_meets_the_issue_bar(minilm_int8):
    assert minilm_int8.cosine_to_reference >= 0.995, minilm_int8.cosine_to_reference
