import json

import pytest

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.measure.speed import BenchConfig, PeakMemory, benchmark, latency_stats

FAST = BenchConfig(seq_len=32, batch_sizes=(1, 2), new_tokens=8, warmup=1, min_iters=5, min_seconds=0.0, decode_repeats=2, threads=1)


def test_latency_percentiles():
    s = latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s.p50 == pytest.approx(50.5)
    assert s.p90 == pytest.approx(90.1)
    assert s.p99 == pytest.approx(99.01)
    assert s.iterations == 100


def test_causal_lm_benchmark(tiny):
    r = benchmark(tiny("llama"), FAST)
    assert r.kind == "causal-lm" and r.threads == 1 and r.seq_len == 32
    assert 0 < r.latency_ms.p50 <= r.latency_ms.p90 <= r.latency_ms.p99
    assert r.latency_ms.iterations >= 5
    assert r.prefill_tokens_per_s == pytest.approx(32 * 1000 / r.latency_ms.p50)
    assert r.decode_tokens_per_s > 0 and r.new_tokens == 8
    assert [t["batch_size"] for t in r.throughput] == [1, 2]
    assert r.peak_memory_mb > 10
    lm = slimkit.load(tiny("llama"))
    weights_bytes = sum(p.numel() * 4 for p in lm.model.parameters())
    assert r.weights_on_disk_mb * 2**20 >= weights_bytes
    assert r.size_on_disk_mb > r.weights_on_disk_mb
    assert r.environment["torch"] and r.environment["threads"] == 1
    json.dumps(r.to_dict())


def test_encoder_benchmark_has_no_decode(tiny):
    r = benchmark(tiny("bert"), FAST)
    assert r.kind == "encoder"
    assert r.decode_tokens_per_s is None and r.prefill_tokens_per_s is None
    assert r.latency_ms.p50 > 0


def test_gpt2_decodes(tiny):
    assert benchmark(tiny("gpt2"), FAST).decode_tokens_per_s > 0


def test_peak_memory_sees_an_allocation():
    import numpy as np

    with PeakMemory() as small:
        pass
    with PeakMemory() as big:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        del block
    assert big.peak_mb >= small.peak_mb + 150


@pytest.mark.parametrize("kw", [{"seq_len": 0}, {"batch_sizes": ()}, {"batch_sizes": (0,)}, {"threads": 0}, {"new_tokens": 0}])
def test_config_ranges(kw):
    with pytest.raises(SlimkitError, match="out of range"):
        BenchConfig(**kw)
