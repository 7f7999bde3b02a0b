"""onnxruntime-genai export of a tiny Llama: parity, perplexity and decode through the genai runtime."""

import json

import pytest
import torch

import slimkit
from slimkit.errors import SlimkitError

pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai: pip install 'slimkit[onnx]'")

from slimkit.export import ExportConfig, export  # noqa: E402
from slimkit.export.ort_genai import GenaiCache, GenaiModel  # noqa: E402
from slimkit.generate import generate  # noqa: E402


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
