"""BenchResult crosses a process boundary as JSON (`slimkit bench --json`): it must come back equal."""

import json

import pytest

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.measure.speed import BenchConfig, BenchResult, Latency, benchmark


def test_a_real_result_survives_json_exactly(tiny):
    config = BenchConfig(seq_len=16, batch_sizes=(1, 2), new_tokens=4, warmup=0, min_iters=2, min_seconds=0.0, decode_repeats=1, threads=1)
    result = benchmark(slimkit.load(tiny("llama")), config)
    back = BenchResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result
    assert isinstance(back.latency_ms, Latency) and back.latency_ms.p50 == result.latency_ms.p50
    assert back.best_tokens_per_s == max(t["tokens_per_s"] for t in result.throughput)


def test_a_result_of_another_shape_is_refused():
    data = BenchResult("m", "encoder", "float32", "cpu", 1, 16, Latency(1.0, 1.0, 1.0, 1.0, 3)).to_dict()
    assert BenchResult.from_dict(data).latency_ms.iterations == 3
    with pytest.raises(SlimkitError, match=r"unknown keys tokens_per_second\): run the benchmark with the same slimkit"):
        BenchResult.from_dict({**data, "tokens_per_second": 1.0})
