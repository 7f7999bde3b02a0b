"""Decoding through torch.compile with a static cache gives the eager tokens."""

import pytest
import torch

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.measure.decoding import CompiledDecoder
from slimkit.measure.speed import BenchConfig, benchmark


def _eager_tokens(lm, ids, n):
    out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(n - 1):
        out = lm.model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("method", [None, "int8-wo"])
def test_compiled_decoding_matches_eager(tiny, method):
    lm = slimkit.load(tiny("llama"))
    lm = slimkit.quantize(lm, method, compute_dtype="bf16") if method else lm
    ids = torch.arange(5, 25)[None]
    with torch.inference_mode():
        expected = _eager_tokens(lm, ids, 8)
        dec = CompiledDecoder(lm, max_len=40)
        got = [dec.prefill(ids).argmax(-1, keepdim=True)]
        for _ in range(7):
            got.append(dec.step(got[-1]).argmax(-1, keepdim=True))
        again = dec.prefill(ids).argmax(-1, keepdim=True)  # the cache resets for a new prompt
    assert torch.equal(torch.cat(got, 1), expected)
    assert torch.equal(again, expected[:, :1])
    assert dec.compile_seconds is not None and dec.compile_seconds > 0


def test_benchmark_reports_the_decode_runtime(tiny):
    config = BenchConfig(batch_sizes=(1,), seq_len=16, new_tokens=4, min_iters=1, min_seconds=0, decode_repeats=1, threads=1, measure_size=False)
    eager = benchmark(tiny("llama"), config)
    compiled = benchmark(tiny("llama"), BenchConfig(**{**config.__dict__, "compile": True}))
    assert eager.decode_runtime == "eager" and eager.compile_seconds is None
    assert compiled.decode_runtime == "torch.compile" and compiled.compile_seconds > 0 and compiled.decode_tokens_per_s > 0


def test_compile_refuses_what_it_cannot_serve(tiny):
    with pytest.raises(SlimkitError, match="compiled decoding is for PyTorch causal LMs"):
        CompiledDecoder(slimkit.load(tiny("bert")), max_len=32)
    dec = CompiledDecoder(slimkit.load(tiny("llama")), max_len=8)
    with pytest.raises(SlimkitError, match="more than the compiled cache holds"):
        dec.prefill(torch.arange(5, 15)[None])


def test_generate_compiled_gives_the_eager_text(tiny):
    from slimkit.measure.generation import generate

    lm = slimkit.load(tiny("llama"))
    eager = generate(lm, "def main(): return", max_new_tokens=6)
    compiled = generate(lm, "def main(): return", max_new_tokens=6, compile=True)
    assert compiled.text == eager.text and compiled.new_tokens == eager.new_tokens


def test_encoder_latency_through_compile(tiny):
    config = BenchConfig(batch_sizes=(1,), seq_len=16, min_iters=2, min_seconds=0, threads=1, measure_size=False, compile=True)
    result = benchmark(tiny("bert"), config)
    assert result.latency_ms.p50 > 0 and result.decode_runtime is None and result.compile_seconds > 0
