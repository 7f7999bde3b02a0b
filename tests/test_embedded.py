"""The two embedded models, end to end (tens of seconds: marked slow)."""


import pytest
import torch
from conftest import invoke_json

import slimkit
from slimkit.core import arch as A
from slimkit.io import sources as S
from slimkit.measure.quality import EvalConfig

pytestmark = pytest.mark.slow


def test_smollm2_loads_from_cache_without_dequantizing(monkeypatch):
    slimkit.load("smollm2-135m")  # converts once if this machine has no cache yet

    def no_second_conversion(*a, **k):
        raise AssertionError("GGUF dequantized again although a cached copy exists")

    monkeypatch.setattr(S, "_read_gguf", no_second_conversion)
    lm = slimkit.load("smollm2-135m")
    assert lm.kind == A.CAUSAL_LM
    assert lm.config.model_type == "llama" and lm.config.num_hidden_layers == 30
    assert 134_000_000 < lm.num_parameters() < 135_000_000


def test_smollm2_eval_cli_json():
    out = invoke_json("eval", "smollm2-135m", "--max-tokens", "512")
    assert out["kind"] == "causal-lm" and out["tokens"] == 511
    assert 5 < out["perplexity"] < 40  # a working 135M model on English prose


def test_smollm2_generates_sensible_text():
    lm = slimkit.load("smollm2-135m")
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1] :])


def test_minilm_bench_cli_json():
    out = invoke_json("bench", "minilm-l6", "--batch-sizes", "1,4", "--threads", "2")
    assert out["kind"] == "encoder"
    assert set(out["latency_ms"]) >= {"p50", "p90", "p99"}
    assert out["peak_memory_mb"] > 0 and 80 < out["size_on_disk_mb"] < 100


def test_minilm_bf16_embeddings_stay_close():
    fp32 = slimkit.load("minilm-l6")
    bf16 = slimkit.load("minilm-l6", dtype=torch.bfloat16)
    r = slimkit.evaluate(bf16, reference=fp32, config=EvalConfig(max_passages=64))
    assert r.cosine_to_reference > 0.99 and r.retrieval_top10_overlap > 0.8
