"""What a benchmark process would hand back, for tests of the search that cannot afford one per candidate:
a real `BenchResult`, as `slimkit bench --json` would print it, with the figures the test chooses."""

from __future__ import annotations

from slimkit.measure.speed import BenchResult, Latency


def bench_result(size_mb: float, speed: float, compile: bool = False, peak_memory_mb: float = 100.0) -> BenchResult:
    """A causal LM's result: `speed` tokens/s everywhere (decode, prefill, the best throughput), `size_mb` on disk."""
    return BenchResult(model="stand-in", kind="causal-lm", dtype="float32", device="cpu", threads=1, seq_len=128,
                       latency_ms=Latency(p50=1000 / speed, p90=1000 / speed, p99=1000 / speed, mean=1000 / speed, iterations=10),
                       throughput=[{"batch_size": 1, "sequences_per_s": speed / 256, "tokens_per_s": speed / 2},
                                   {"batch_size": 4, "sequences_per_s": speed / 128, "tokens_per_s": speed}],
                       prefill_tokens_per_s=speed, decode_tokens_per_s=speed, new_tokens=32,
                       decode_runtime="torch.compile" if compile else "eager", compile_seconds=1.0 if compile else None,
                       peak_memory_mb=peak_memory_mb, size_on_disk_mb=size_mb, environment={"cpu": "test"})
