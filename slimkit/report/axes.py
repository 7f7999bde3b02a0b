"""Which speed the report shows, and the speed-up against the original on it.

A report has one speed that matters: what the search ranked by. For a causal LM's latency
target that is compiled decode tokens/s, not the prefill p50 that `slimkit bench` also times
(eagerly, for causal LMs): an int4 model can prefill slower than fp32 in eager PyTorch and still
decode 4x faster compiled. So the table's speed-up column and the size plot use the target
metric where the target is a speed, and the latency target's metric (decode tokens/s for
causal LMs, p50 latency otherwise) where it is size or memory; prefill and decode then
stand side by side in the table, so the time to the first token stays visible.
"""

from __future__ import annotations

from dataclasses import dataclass

SPEEDS = {"latency_ms_p50": "p50 latency", "decode_tokens_per_s": "decode tokens/s", "throughput_tokens_per_s": "throughput"}  # short names


@dataclass(frozen=True)
class Axis:
    metric: str  # a candidate's metrics key
    label: str
    higher_is_better: bool

    @property
    def short(self) -> str:
        return SPEEDS[self.metric]


def speed_axis(results: dict) -> Axis:
    """The speed the search optimised for; for a size or memory target, the latency target's."""
    if results["target_metric"] in SPEEDS:
        return Axis(results["target_metric"], results["target_label"], results["higher_is_better"])
    if results.get("kind") == "causal-lm":
        return Axis("decode_tokens_per_s", "decode tokens/s", True)
    return Axis("latency_ms_p50", "p50 latency (ms)", False)


def speedup(results: dict, m: dict) -> float | None:
    """How many times faster than the original (eager) `m` is on the speed axis; None where not measured."""
    axis = speed_axis(results)
    base, value = results["baseline"].get(axis.metric), m.get(axis.metric)
    if not base or not value:
        return None
    return value / base if axis.higher_is_better else base / value
