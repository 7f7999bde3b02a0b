"""ONNX Runtime fusions and quantization: parity, quality thresholds, the graphs' operators."""

import collections
import json

import pytest

import slimkit
from slimkit.core.errors import SlimkitError

pytest.importorskip("onnxruntime", reason="ONNX Runtime tests need the extra: pip install 'slimkit[onnx]'")
onnx = pytest.importorskip("onnx", reason="ONNX Runtime tests need the extra: pip install 'slimkit[onnx]'")

from slimkit.exporters import ExportConfig, export  # noqa: E402
from slimkit.measure.generation import generate  # noqa: E402

EVAL = slimkit.EvalConfig(window=64, stride=32, max_tokens=400, max_passages=16)


def _ops(out):
    model = onnx.load(str(out / "model.onnx"))
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """exported(arch, quantize=None) -> a tiny model exported for ONNX Runtime once per module: the tests only read it."""
    cache = {}

    def get(arch: str, quantize: str | None = None):
        if (arch, quantize) not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-{quantize}") / "o"
            cache[arch, quantize] = export(tiny(arch), out, ExportConfig("onnxruntime", quantize=quantize))
        return cache[arch, quantize]

    return get


def test_fusions_keep_parity(exported):
    out = exported("bert")
    manifest = json.loads((out / "slimkit.json").read_text())["export"]
    assert manifest["optimized"] and manifest["fusions"].get("BiasGelu", 0) > 0
    assert manifest["parity"]["optimized"]["max_abs_diff"] < 1e-4
    ops = _ops(out)
    # attention fused with the raw mask (parity covers a left-padded batch); SkipLayerNormalization left out on
    # purpose (slower on CPU); the eager trace has no NaN guards around softmax
    assert ops["Attention"] > 0 and ops["BiasGelu"] > 0
    assert not ops["SkipLayerNormalization"] and not ops["IsNaN"]


@pytest.mark.parametrize(("arch", "quant", "op"), [
    ("bert", "int8", "MatMulInteger"),
    ("bert-cls", "int8", "MatMulInteger"),
    ("bert-cls", "int8-static", "QuantizeLinear"),
    ("gpt2", "int8", "MatMulInteger"),
    ("llama", "int4", "MatMulNBits"),
    ("gpt2", "int8-static", "DequantizeLinear"),
])
def test_quantized_export_quality(tiny, exported, arch, quant, op):
    ref = slimkit.load(tiny(arch))
    out = exported(arch, quant)
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


def test_int4_is_smaller_on_disk(exported):
    fp32, int4 = exported("llama"), exported("llama", "int4")
    ops = _ops(int4)
    assert ops["GatherBlockQuantized"] == 1  # the embedding too
    assert _weight_bytes(int4) < 0.3 * _weight_bytes(fp32)  # a tiny graph's file is mostly structure


def _weight_bytes(out):
    model = onnx.load(str(out / "model.onnx"))
    return sum(len(i.raw_data) + 4 * len(i.float_data) for i in model.graph.initializer)


def test_int8_dynamic_keeps_the_lm_head_fp32(exported):
    out = exported("llama", "int8")
    model = onnx.load(str(out / "model.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer["logits"].op_type == "MatMul"


def test_quantized_generation_runs(exported):
    out = exported("gpt2", "int8")
    result = generate(str(out), "The def statement", 5)
    assert result.new_tokens >= 1 and result.prompt_tokens > 0


def test_generate_refuses_an_encoder(tiny):
    with pytest.raises(SlimkitError, match="not a causal LM"):
        generate(tiny("bert"), "hello")


def test_smoothing_is_exact_before_quantization_and_zeroes_padded_rows(tiny, exported, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from slimkit.exporters.onnx import example_inputs, graph_spec
    from slimkit.exporters.onnxruntime import calibration_feeds
    from slimkit.exporters.smoothquant import smooth

    lm = slimkit.load(tiny("bert"))
    spec = graph_spec(lm)
    out = exported("bert")
    done = smooth(out / "model.onnx", tmp_path / "smoothed.onnx", calibration_feeds(lm, spec, 8, 32))
    assert done["inputs"] == 8 and done["masked"] == 8  # per layer: Q/K/V, attention output, FFN in, FFN out
    feeds = {k: v.numpy() for k, v in example_inputs(spec, 3, 12, 0, "left", vocab=512, seed=5).items()}
    smoothed = onnx.load(str(tmp_path / "smoothed.onnx"))
    ffn_out = next(n.output[0] for n in smoothed.graph.node if n.op_type == "Mul" and n.name.endswith("output/dense/MatMul_smooth"))
    smoothed.graph.output.append(onnx.helper.make_tensor_value_info(ffn_out, onnx.TensorProto.FLOAT, None))
    want = ort.InferenceSession(str(out / "model.onnx")).run(None, feeds)[0]
    got, ffn_in = ort.InferenceSession(smoothed.SerializeToString()).run(None, feeds)
    keep = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-5)
    assert not keep.all() and np.all(ffn_in[~keep] == 0) and np.abs(ffn_in[keep]).max() > 0


def test_int8_smooths_encoders_and_checks_the_smoothed_graph(exported):
    manifest = json.loads((exported("bert", "int8") / "slimkit.json").read_text())["export"]
    assert manifest["smoothing"]["inputs"] == 8
    assert manifest["parity"]["smoothed"]["max_abs_diff"] < 1e-4
    cls = json.loads((exported("bert-cls", "int8") / "slimkit.json").read_text())["export"]
    assert "smoothing" not in cls and "smoothed" not in cls["parity"]  # padded rows may be read: see smoothquant.py


def test_smoothing_tames_outlier_channels(tiny, tmp_path):
    """A BERT whose LayerNorms emit outlier channels, like real ones: int8 error at least 2x lower smoothed."""
    import torch

    from slimkit.exporters.onnx import check_parity, graph_spec
    from slimkit.exporters.onnxruntime import quantize

    lm = slimkit.load(tiny("bert"))
    with torch.no_grad():
        for m in lm.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight *= 5  # sublayers that matter next to the residual
        for ln in [m for m in lm.model.modules() if isinstance(m, torch.nn.LayerNorm)][:-1]:
            ln.weight[:4] *= 10
            ln.bias[:4] *= 10
    spec = graph_spec(lm)
    fp32 = export(lm, tmp_path / "fp32", ExportConfig("onnxruntime"))
    plain = quantize(lm, spec, fp32 / "model.onnx", tmp_path / "plain.onnx", ExportConfig("onnxruntime", quantize="int8"))
    plain_err = check_parity(lm, plain, spec, 1.0, metric="rel_l2").rel_l2
    smoothed = export(lm, tmp_path / "int8", ExportConfig("onnxruntime", quantize="int8"))
    err = json.loads((smoothed / "slimkit.json").read_text())["export"]["parity"]["int8"]["rel_l2"]
    # at least a third less error: with VNNI (8-bit weights) it was under half; on x86 without VNNI
    # (7-bit weights, int8_pairs_saturate) 0.017 against 0.028
    assert err < 0.67 * plain_err, (err, plain_err)


@pytest.fixture(scope="module")
def minilm_int8(tmp_path_factory):
    ref = slimkit.load("minilm-l6")
    out = export(ref, tmp_path_factory.mktemp("minilm") / "o", ExportConfig("onnxruntime", quantize="int8"))
    return slimkit.evaluate(str(out), ref, config=slimkit.EvalConfig(max_passages=64))


@pytest.mark.slow
def test_minilm_int8_meets_the_issue_bar(minilm_int8):
    """Issue 6: cosine >= 0.995 (0.9936 unsmoothed; smoothed 0.9970 on 256 passages)."""
    assert minilm_int8.cosine_to_reference >= 0.995, minilm_int8.cosine_to_reference
    assert minilm_int8.retrieval_top10_overlap > 0.93, minilm_int8.retrieval_top10_overlap
