"""A typed candidate serialises to the keys results.json documents (README, "JSON interface")."""

import json
from dataclasses import fields

import pytest
from bench_stand_in import bench_result

from slimkit.core.recipe import Recipe
from slimkit.exporters import ExportConfig
from slimkit.search.candidate import (
    Baseline,
    Candidate,
    CausalQuality,
    EncoderQuality,
    Metrics,
    RollbackPlanned,
    RollbackSkipped,
    RolledBack,
    Speed,
)
from slimkit.search.config import target_for
from slimkit.search.presets import TARGETS

BENCH_KEYS = ["latency_ms_p50", "decode_tokens_per_s", "prefill_tokens_per_s", "throughput_tokens_per_s", "peak_memory_mb",
              "size_on_disk_mb", "runtime", "decode_runtime", "compile_seconds", "bench_seconds"]


def _speed(compile_error=None) -> Speed:
    speed = Speed.of(bench_result(size_mb=60.0, speed=120.0, compile=True), "torch.compile", 41.5)
    speed.compile_error = compile_error
    return speed


def test_a_confirmed_candidate_has_every_documented_key_in_measuring_order():
    proxy = CausalQuality(16.2, 0.004, kl_divergence=None, top1_agreement=None, reference_quality=16.135, tokens=200)
    cand = Candidate("int4", Recipe.of(("int4", {}), seed=3), metrics=Metrics(proxy, proxy.drop, 1.25, _speed()), passed=True,
                     reason="proxy within budget", artifact="/tmp/cand-0", seconds=52.0)
    full = CausalQuality(15.9, 0.003, kl_divergence=None, top1_agreement=None, reference_quality=15.85, tokens=400)
    cand.metrics.quality, cand.metrics.full_quality_drop, cand.stage = full, full.drop, "full"
    out = json.loads(json.dumps(cand.to_dict()))
    assert list(out) == ["name", "recipe", "metrics", "passed", "reason", "stage", "seconds"]  # no work-space artifact
    assert out["recipe"] == Recipe.of("int4", seed=3).to_dict() and out["recipe"]["seed"] == 3
    quality = ["quality_value", "quality_drop", "kl_divergence", "top1_agreement", "reference_quality", "tokens"]
    assert list(out["metrics"]) == [*quality, "proxy_quality_drop", "proxy_seconds", *BENCH_KEYS, "full_quality_drop"]
    m = out["metrics"]
    assert (m["quality_value"], m["quality_drop"], m["proxy_quality_drop"], m["full_quality_drop"]) == (15.9, 0.003, 0.004, 0.003)
    assert m["kl_divergence"] is None and m["runtime"] == "torch.compile" and m["compile_seconds"] == 1.0 and m["bench_seconds"] == 41.5
    assert m["throughput_tokens_per_s"] == 120.0 and m["size_on_disk_mb"] == 60.0  # the best batch size's tokens/s


def test_what_was_not_measured_is_absent():
    skipped = Candidate("nf4", Recipe.of("nf4"), reason="not tried: ...", stage="skipped")
    assert skipped.to_dict() == {"name": "nf4", "recipe": Recipe.of("nf4").to_dict(), "metrics": {}, "passed": False,
                                 "reason": "not tried: ...", "stage": "skipped"}
    far = EncoderQuality(0.7, 0.3, retrieval_top10_overlap=0.5, samples=64)  # far over budget: proxied, never benchmarked
    cand = Candidate("int4", Recipe.of("int4"), metrics=Metrics(far, far.drop, 0.5), rollback=RollbackSkipped("no rollback: ..."))
    assert list(cand.to_dict()["metrics"]) == ["quality_value", "quality_drop", "retrieval_top10_overlap", "samples", "proxy_quality_drop",
                                               "proxy_seconds"]
    assert cand.to_dict()["rollback"] == {"skipped": "no rollback: ..."}


def test_export_rollback_and_compile_error_keys():
    ort = Candidate("onnxruntime int8", Recipe(), export=ExportConfig("onnxruntime", "int8"), metrics=Metrics(speed=_speed("no compiler")))
    out = ort.to_dict()
    assert list(out) == ["name", "recipe", "metrics", "passed", "reason", "stage", "export"]
    assert out["export"]["format"] == "onnxruntime" and out["export"]["quantize"] == "int8" and "tolerance" not in out["export"]  # None: left out
    assert list(out["metrics"]) == [*BENCH_KEYS, "compile_error"] and out["metrics"]["compile_error"] == "no compiler"
    planned = RollbackPlanned("int4 + rollback", probe_score=0.2, probe_bound=0.07)
    assert Candidate("int4", Recipe(), rollback=planned).to_dict()["rollback"] == {"planned": "int4 + rollback", "probe_score": 0.2, "probe_bound": 0.07}
    done = RolledBack(of="int4", high="int8-wo", kept_high="1 of 2 blocks", probe_metric="kl", probe_bound=0.07, probe_score=0.06, seconds=3.0)
    assert list(Candidate("int4 + rollback", Recipe(), rollback=done).to_dict()["rollback"]) == [
        "of", "high", "kept_high", "probe_metric", "probe_bound", "probe_score", "seconds"]


def test_the_baseline_is_its_bench_keys_and_its_quality():
    base = Baseline(_speed(), 16.135, "proxy")
    assert list(base.to_dict()) == [*BENCH_KEYS, "quality_value", "quality_drop", "quality_on"]
    assert base.to_dict()["quality_drop"] == 0.0  # the original against itself, in a candidate's key
    assert "environment" not in base.to_dict() and base.speed.environment == {"cpu": "test"}  # recorded once, at the top


@pytest.mark.parametrize("kind", ["causal-lm", "encoder"])
def test_every_target_ranks_by_a_benchmark_figure(kind):
    figures = {f.name for f in fields(Speed)}
    assert all(target_for(t, kind).metric in figures for t in TARGETS)
