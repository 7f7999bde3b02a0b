"""slimkit optimize on a tiny model with real (test-registered) techniques."""

import copy
import json
import sys
from dataclasses import dataclass

import pytest
import torch
from bench_stand_in import bench_result

import slimkit
from slimkit.core import registry
from slimkit.core.errors import SlimkitError
from slimkit.core.recipe import Recipe
from slimkit.search import loop, measurements
from slimkit.search.budget import confirmation_seconds, rescaled_reserve
from slimkit.search.candidate import Candidate, Metrics, Quality, Speed, ranked
from slimkit.search.config import (
    OptimizeConfig,
    Target,
    parse_duration,
    parse_fraction,
    target_for,
)
from slimkit.search.loop import optimize
from slimkit.search.plan import auto_runtimes, candidate_plans, check_installed
from slimkit.search.presets import GENAI_PRESETS, ORT_PRESETS, PRESETS, TRT_PRESETS


@dataclass(frozen=True)
class NoiseConfig:
    scale: float = 0.0


@pytest.fixture
def techniques(monkeypatch):
    """Two real transformations: a bf16 cast (smaller) and weight noise (worse)."""
    registry.techniques()  # register the built-ins first, into the real table
    monkeypatch.setattr(registry, "TECHNIQUES", dict(registry.TECHNIQUES))

    def cast(model, config, ctx):
        new = copy.deepcopy(model)
        new.model.to(torch.bfloat16)
        return new

    def noise(model, config, ctx):
        new = copy.deepcopy(model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in new.model.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g) * config.scale)  # absolute: weights are ~0.02
        return new

    registry.register("test-bf16", "quantize", NoiseConfig, "cast")(cast)
    registry.register("test-noise", "quantize", NoiseConfig, "noise")(noise)


def _run(tiny, tmp_path, monkeypatch, preset, budget=0.05):
    monkeypatch.setitem(PRESETS, "test", preset)
    cfg = OptimizeConfig(target="size", max_quality_drop=budget, preset="test", proxy_tokens=200, full_tokens=400, threads=1)
    return optimize(slimkit.load(tiny("llama")), cfg, tmp_path / "out")


def test_picks_the_best_passing_candidate(techniques, tiny, tmp_path, monkeypatch, fake_bench):
    results = _run(tiny, tmp_path, monkeypatch, [[("test-noise", {"scale": 3.0})], [("test-bf16", {})], [("test-noise", {"scale": 0.0})]])
    names = [c["name"] for c in results["candidates"]]
    assert names == ["test-noise(scale=3.0)", "test-bf16", "test-noise"]
    by = {c["name"]: c for c in results["candidates"]}
    assert not by["test-noise(scale=3.0)"]["passed"] and "far over" in by["test-noise(scale=3.0)"]["reason"]
    assert results["winner"] == "test-bf16"  # smaller on disk than the unchanged copy, within budget
    assert by["test-bf16"]["stage"] == "full" and by["test-bf16"]["metrics"]["quality_drop"] <= 0.05
    assert by["test-bf16"]["metrics"]["size_on_disk_mb"] < results["baseline"]["size_on_disk_mb"]
    out = tmp_path / "out"
    saved = slimkit.load(str(out / "model"))
    assert {p.dtype for p in saved.model.parameters()} == {torch.bfloat16}
    assert saved.manifest["recipe"]["steps"] == [{"method": "test-bf16", "scale": 0.0}]
    assert json.loads((out / "results.json").read_text())["winner"] == "test-bf16"
    assert "Use test-bf16" in (out / "report.md").read_text()
    serve = {w["runtime"]: w["lines"] for w in results["serve"]}  # a bf16 artifact: plain transformers reads it
    assert serve["transformers"][1] == f'model = AutoModelForCausalLM.from_pretrained("{out / "model"}")'
    assert (out / "report.md").read_text().rstrip().endswith(f'lm = slimkit.load("{out / "model"}")\n```')
    assert (out / "report.html").read_text().count("<svg") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no work directories left


def test_nothing_passes_returns_the_original(techniques, tiny, tmp_path, monkeypatch):
    """The one search here whose benchmark is a real `slimkit bench` process (the original's); the others use fake_bench."""
    results = _run(tiny, tmp_path, monkeypatch, [[("test-noise", {"scale": 3.0})]], budget=0.001)
    assert results["winner"] is None
    saved = slimkit.load(str(tmp_path / "out" / "model"))
    original = slimkit.load(tiny("llama"))
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert torch.equal(saved.model(input_ids=ids).logits, original.model(input_ids=ids).logits)
    assert "original model is kept" in (tmp_path / "out" / "report.md").read_text()


def test_combinations_wait_for_a_wide_enough_budget(techniques, tiny, tmp_path, monkeypatch, fake_bench):
    combo = ([("test-noise", {"scale": 0.0}), ("test-bf16", {})], 0.04)  # (steps, min_budget)
    (tmp_path / "narrow").mkdir(), (tmp_path / "wide").mkdir()
    narrow = _run(tiny, tmp_path / "narrow", monkeypatch, [combo], budget=0.03)
    (skipped,) = narrow["candidates"]
    assert skipped["stage"] == "skipped" and "quality budgets of 4% or more" in skipped["reason"]
    wide = _run(tiny, tmp_path / "wide", monkeypatch, [combo], budget=0.05)
    assert wide["winner"] == "test-noise -> test-bf16" and wide["candidates"][0]["stage"] == "full"
    latency = candidate_plans("encoder", "latency", "torch")
    pruned = [p for p in latency if [s.method for s in p.recipe.steps] == ["structured", "int8-dynamic"]]
    assert len(pruned) == 1 and pruned[0].min_budget > 0.01  # the encoders' prune -> quantize combination


@pytest.mark.parametrize(
    "kw,message",
    [({"target": "speed"}, "unknown target"), ({"max_quality_drop": 0}, "between 0 and 100%"),
     ({"preset": "fast"}, "unknown preset"), ({"runtime": "tvm"}, "not available"), ({"time_budget_s": 0}, "positive"),
     ({"runtime": "ort-genai", "compile": True}, "--compile is for --runtime torch")],
)
def test_config_errors(kw, message):
    with pytest.raises(SlimkitError, match=message):
        OptimizeConfig(**kw)


def test_parsers():
    assert parse_duration("10m") == 600 and parse_duration("90s") == 90 and parse_duration("2") == 2
    assert parse_fraction("1%") == pytest.approx(0.01) and parse_fraction("0.05") == 0.05
    with pytest.raises(SlimkitError, match="duration"):
        parse_duration("soon")


def test_budget_keeps_time_for_the_confirmation(techniques, tiny, tmp_path, monkeypatch, fake_bench):
    monkeypatch.setitem(PRESETS, "test", [[("test-bf16", {})]])
    cfg = OptimizeConfig(target="size", max_quality_drop=0.05, preset="test", proxy_tokens=200, full_tokens=400, threads=1, time_budget_s=1)
    results = optimize(slimkit.load(tiny("llama")), cfg, tmp_path / "out")
    (cand,) = results["candidates"]
    assert cand["stage"] == "skipped" and "final confirmation" in cand["reason"]
    assert results["winner"] is None


def test_reserve_grows_with_a_slower_passing_candidate():
    assert rescaled_reserve(215.0, 8.0, [16.0]) == 15.0 + 100.0 + 200.0  # the candidate's half, twice as slow
    assert rescaled_reserve(215.0, 8.0, [4.0, 16.0]) == 15.0 + 100.0 + 200.0  # the slowest passing one
    assert rescaled_reserve(215.0, 8.0, []) == 215.0  # none passed: a failed candidate is never confirmed


def test_confirmation_estimate_scales_with_the_evaluation(tiny):
    lm = slimkit.load(tiny("llama"))
    small = confirmation_seconds(lm, 1.0, OptimizeConfig(proxy_tokens=200, full_tokens=400))
    large = confirmation_seconds(lm, 1.0, OptimizeConfig(proxy_tokens=200, full_tokens=1600))
    assert 15 < small < large


# --------------------------------------------------------------------------- search logic, with an in-process benchmark


@pytest.fixture
def fake_bench(monkeypatch):
    """Stands in for the benchmark process (seconds each): size on disk is real, speed follows
    size, times `jitter` — a random relative error like a shared machine's, unseeded on purpose."""
    import random

    from slimkit.measure.speed import dir_size_mb

    state = {"jitter": 0.0, "calls": []}
    noise = random.Random()

    def bench(path, threads, compile=False, device="cpu"):
        size = dir_size_mb(path)
        state["calls"].append(compile)
        return bench_result(size, 100 / size * (1 + noise.uniform(-state["jitter"], state["jitter"])), compile)

    monkeypatch.setattr(measurements, "bench_in_subprocess", bench)
    return state


def _measured(name: str, drop: float, passed: bool = True, speed: float = 100.0, size: float = 1.0) -> Candidate:
    """A candidate with a quality drop, benchmarked at `speed` tokens/s and `size` MiB on disk."""
    figures = Speed.of(bench_result(size, speed), "eager", 1.0)
    return Candidate(name, Recipe(), passed=passed, metrics=Metrics(quality=Quality(1.0, drop), speed=figures))


def test_ties_go_to_the_smaller_quality_drop_then_the_name():
    def c(name, speed, drop):
        return _measured(name, drop, speed=speed)

    latency = target_for("latency", "causal-lm")
    cands = [c("b", 100.0, 0.004), c("a", 98.0, 0.004), c("fast-bad", 101.0, 0.009), c("slow", 90.0, 0.0), c("x", 200.0, 0.0)]
    cands.append(_measured("failed", 0.5, passed=False, speed=999.0))
    order = [x.name for x in ranked(cands, latency, 0.03)]
    assert order == ["x", "a", "b", "fast-bad", "slow"]  # a, b, fast-bad within 3% of 101: by drop, then name
    assert [x.name for x in ranked(cands, latency, 0.0)] == ["x", "fast-bad", "b", "a", "slow"]
    size = target_for("size", "causal-lm")  # exact: no tolerance
    sized = [_measured(n, d, size=s) for n, s, d in [("p", 100.0, 0.01), ("q", 101.0, 0.0)]]
    assert [x.name for x in ranked(sized, size, 0.03)] == ["p", "q"]


def test_same_seed_same_winner_despite_speed_noise(techniques, tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    """Three candidates equally fast within the noise: the smallest quality drop wins, every time."""
    fake_bench["jitter"] = 0.01
    monkeypatch.setitem(PRESETS, "test", [[("test-noise", {"scale": 0.002})], [("test-noise", {"scale": 0.001})], [("test-noise", {})]])
    monkeypatch.setattr(loop, "target_for", lambda name, kind: Target("latency", "decode_tokens_per_s", "decode tokens/s", True))
    lm = slimkit.load(tiny("llama"))
    runs = []
    for i in range(2):
        cfg = OptimizeConfig(target="latency", max_quality_drop=0.05, preset="test", proxy_tokens=200, full_tokens=400, seed=3, compile=False)
        runs.append(optimize(lm, cfg, tmp_path / f"out{i}"))
    a, b = runs
    smallest = min(a["candidates"], key=lambda c: c["metrics"]["proxy_quality_drop"])["name"]
    assert a["winner"] == b["winner"] == smallest == "test-noise(scale=0.002)"  # noise made this random model's perplexity lower
    assert [c["metrics"]["quality_drop"] for c in a["candidates"]] == [c["metrics"]["quality_drop"] for c in b["candidates"]]
    assert [c["recipe"] for c in a["candidates"]] == [c["recipe"] for c in b["candidates"]] and a["candidates"][0]["recipe"]["seed"] == 3
    assert fake_bench["calls"] == [False] * 8  # --no-compile: eager everywhere


def test_near_miss_rolls_back_to_higher_precision(tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    """int4 misses a 0.12% budget by less than 2x: its sensitive blocks go back to int8-wo, and that passes."""
    from slimkit.core.recipe import Recipe

    monkeypatch.setitem(PRESETS, "test", [[("int4", {})]])
    lm = slimkit.load(tiny("llama"))
    cfg = OptimizeConfig(target="size", max_quality_drop=0.0012, preset="test", proxy_tokens=200, full_tokens=400)
    results = optimize(lm, cfg, tmp_path / "out")
    source, rolled = results["candidates"]
    assert source["name"] == "int4" and not source["passed"]
    assert 0.0012 < source["metrics"]["proxy_quality_drop"] <= 0.0024
    assert rolled["name"] == "int4 + rollback" and rolled["rollback"]["of"] == "int4" and rolled["rollback"]["high"] == "int8-wo"
    (step,) = rolled["recipe"]["steps"]
    assert step["method"] == "mixed" and step["low"] == "int4" and step["high"] == "int8-wo" and step["high_layers"]
    assert rolled["rollback"]["probe_bound"] < source["rollback"]["probe_score"]  # asks the probe for less loss than int4's
    assert results["winner"] == "int4 + rollback" and rolled["stage"] == "full"
    assert rolled["metrics"]["full_quality_drop"] <= 0.0012 and rolled["metrics"]["proxy_quality_drop"] < source["metrics"]["proxy_quality_drop"]
    out = tmp_path / "out"
    saved = slimkit.load(str(out / "model"))
    recipe = (out / "report.md").read_text().split("```yaml\n")[1].split("```")[0]
    (tmp_path / "recipe.yaml").write_text(recipe)  # the report's recipe, as a user would copy it
    rebuilt = Recipe.load(tmp_path / "recipe.yaml").apply(lm)  # high_layers recorded: no search, the same model
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(saved.model(input_ids=ids).logits, rebuilt.model(input_ids=ids).logits)
    assert "rollback of int4" in (out / "report.md").read_text()


def test_compiled_candidates_against_the_eager_baseline(techniques, tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    """Latency: candidates benchmarked compiled, the baseline eager, the original compiled as a reference."""
    monkeypatch.setitem(PRESETS, "test", [[("test-bf16", {})]])
    cfg = OptimizeConfig(target="latency", max_quality_drop=0.05, preset="test", proxy_tokens=200, full_tokens=400)
    results = optimize(slimkit.load(tiny("llama")), cfg, tmp_path / "out")
    assert fake_bench["calls"] == [False, True, True]  # baseline eager, candidate compiled, reference compiled
    assert results["baseline"]["runtime"] == "eager" and results["baseline_compiled"]["runtime"] == "torch.compile"
    (cand,) = results["candidates"]
    assert cand["metrics"]["runtime"] == "torch.compile" and results["winner"] == "test-bf16"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| original, torch.compile |" in md and "torch.compile (1 s)" in md
    assert "Serve it compiled" in md and "torch.compile alone" in md
    proxy, full = cand["metrics"]["proxy_quality_drop"], cand["metrics"]["full_quality_drop"]
    assert f"{100 * proxy:+.2f}% → {100 * full:+.2f}%" in md


def test_onnxruntime_candidates_for_an_encoder(tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(PRESETS, "test", [])
    monkeypatch.setitem(ORT_PRESETS, "test", ["int8"])
    cfg = OptimizeConfig(target="size", max_quality_drop=0.05, preset="test", runtime="onnxruntime", proxy_passages=16)
    results = optimize(slimkit.load(tiny("bert")), cfg, tmp_path / "out")
    (cand,) = results["candidates"]
    assert results["winner"] == "onnxruntime int8", cand["reason"]
    assert cand["export"]["quantize"] == "int8" and fake_bench["calls"] == [False, False]
    assert slimkit.load(str(tmp_path / "out" / "model")).manifest["runtime"] == "onnxruntime"
    assert "slimkit export MODEL --format onnxruntime --quantize int8" in (tmp_path / "out" / "report.md").read_text()


def test_auto_searches_pytorch_then_onnxruntime_for_encoders_only():
    pytest.importorskip("onnxruntime")
    names = lambda kind, runtime: [p.name for p in candidate_plans(kind, "latency", runtime)]  # noqa: E731
    assert OptimizeConfig().runtime == "auto" and OptimizeConfig().compiles("encoder")
    assert names("encoder", "auto") == names("encoder", "torch") + names("encoder", "onnxruntime")
    assert names("causal-lm", "auto") == names("causal-lm", "torch")
    assert auto_runtimes("classifier") == ["torch", "onnxruntime"] and auto_runtimes("causal-lm") == ["torch"]


def test_auto_measures_both_runtimes_and_the_winner_keeps_its_own(techniques, tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(PRESETS, "test", [[("test-bf16", {})]])
    monkeypatch.setitem(ORT_PRESETS, "test", ["int8"])
    cfg = OptimizeConfig(target="size", max_quality_drop=0.05, preset="test", proxy_passages=16)
    results = optimize(slimkit.load(tiny("bert")), cfg, tmp_path / "out")
    assert results["runtime"] == "auto" and results["runtimes"] == ["torch", "onnxruntime"]
    cast, ort = results["candidates"]
    assert cast["name"] == "test-bf16" and "export" not in cast and ort["export"]["format"] == "onnxruntime"
    assert fake_bench["calls"] == [False, False, False]  # the size target is not compiled
    assert cast["passed"] and ort["passed"], (cast["reason"], ort["reason"])
    smaller = min((cast, ort), key=lambda c: c["metrics"]["size_on_disk_mb"])
    assert results["winner"] == smaller["name"]  # the size target across both runtimes
    served = slimkit.load(str(tmp_path / "out" / "model")).manifest.get("runtime", "torch")
    assert served == ("onnxruntime" if smaller is ort else "torch")


def test_export_runtimes_candidates_in_order():
    genai = candidate_plans("causal-lm", "latency", "ort-genai", seed=2)
    assert [p.name for p in genai] == ["int4(zero_point=integer) -> ort-genai", "ort-genai int4", "ort-genai fp32"]
    carried = genai[0]
    assert carried.recipe.to_dict()["steps"][0]["zero_point"] == "integer" and carried.recipe.seed == 2
    assert (carried.export.format, carried.export.quantize) == ("ort-genai", None)
    assert [p.recipe.steps for p in genai[1:]] == [(), ()] and [p.export.quantize for p in genai[1:]] == ["int4", None]
    trt = candidate_plans("encoder", "latency", "tensorrt")
    assert [(p.name, p.export.format, p.export.quantize) for p in trt] == [("tensorrt fp16", "tensorrt", "fp16"),
                                                                          ("tensorrt int8", "tensorrt", "int8")]
    assert set(GENAI_PRESETS) == set(TRT_PRESETS) == set(ORT_PRESETS) == set(PRESETS)  # every preset, every runtime


def test_ort_genai_candidates_for_a_causal_lm(techniques, tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    """A recipe step, then the genai export: a noisy model fails the gate, slimkit's int4 carried into genai wins."""
    pytest.importorskip("onnxruntime_genai")
    from conftest import invoke_cli

    from slimkit.core.recipe import Recipe

    monkeypatch.setitem(PRESETS, "test", [])
    monkeypatch.setitem(GENAI_PRESETS, "test", [([("test-noise", {"scale": 3.0})], None), ([("int4", {"zero_point": "integer"})], None)])
    cfg = OptimizeConfig(target="size", max_quality_drop=0.05, preset="test", runtime="ort-genai", proxy_tokens=200, full_tokens=400)
    results = optimize(slimkit.load(tiny("llama")), cfg, tmp_path / "out")
    noisy, carried = results["candidates"]
    assert noisy["name"] == "test-noise(scale=3.0) -> ort-genai" and not noisy["passed"] and "far over" in noisy["reason"]
    assert results["winner"] == carried["name"] == "int4(zero_point=integer) -> ort-genai", carried["reason"]
    assert carried["stage"] == "full" and carried["metrics"]["full_quality_drop"] <= 0.05  # the gate, on the full split
    assert carried["metrics"]["runtime"] == "ort-genai" and fake_bench["calls"] == [False, False]
    assert carried["export"]["format"] == "ort-genai"
    out = tmp_path / "out"
    served = slimkit.load(str(out / "model"))
    assert served.manifest["runtime"] == "ort-genai" and served.manifest["export"]["carried"]["max_weight_diff"] == 0.0
    assert [w["runtime"] for w in results["serve"]] == ["onnxruntime-genai", "slimkit"]  # OUT/model is the genai directory
    quantized, exported = served.manifest["recipe"]  # what was done, in order: the int4 alias's method, then the export
    assert (quantized["method"], quantized["zero_point"]) == ("int4-wo", "integer") and exported["export"]["format"] == "ort-genai"
    md = (out / "report.md").read_text()
    assert "`slimkit run` on the recipe below, then `slimkit export` of its output with `--format ort-genai`" in md
    (tmp_path / "recipe.yaml").write_text(md.split("```yaml\n")[1].split("```")[0])  # the report's recipe, as a user would copy it
    assert Recipe.load(tmp_path / "recipe.yaml").to_dict() == {**carried["recipe"], "model": results["model"]}
    bench = invoke_cli("bench", str(out / "model"), "--json", "--seq-len", "16", "--batch-sizes", "1", "--new-tokens", "4")
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["decode_tokens_per_s"] > 0
    quality = invoke_cli("eval", str(out / "model"), "-r", str(tiny("llama")), "--json", "--max-tokens", "128", "--window", "64", "--stride", "32")
    assert quality.returncode == 0, quality.stderr
    assert json.loads(quality.stdout)["top1_agreement"] > 0.8


def test_runtime_errors_name_the_fix(tiny, tmp_path, monkeypatch):
    """ort-genai serves causal LMs only; TensorRT without CUDA is refused before the model loads; a missing package names the extra."""
    from conftest import assert_user_error, invoke_cli

    pytest.importorskip("onnxruntime_genai")
    proc = invoke_cli("optimize", str(tiny("bert")), "--runtime", "ort-genai", "--out", str(tmp_path / "o"))
    assert_user_error(proc, "--runtime ort-genai serves causal LMs, not encoders", "use --runtime onnxruntime")
    if not torch.cuda.is_available():
        proc = invoke_cli("optimize", str(tmp_path / "no-such-model"), "--runtime", "tensorrt", "--out", str(tmp_path / "o"))
        assert_user_error(proc, "--runtime tensorrt: TensorRT needs an NVIDIA GPU with CUDA", "use --runtime onnxruntime")
    assert not (tmp_path / "o").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as if not installed
    with pytest.raises(SlimkitError, match=r"--runtime ort-genai needs onnxruntime-genai: pip install 'slimkit\[onnx\]'"):
        check_installed("ort-genai")


@pytest.mark.parametrize(
    "args,message",
    [(["--max-quality-drop", "150%"], "between 0 and 100%"), (["--time-budget", "soon"], "duration"),
     (["--target", "speed"], "unknown target"), (["--runtime", "onnxruntime", "--compile"], "--runtime torch"),
     (["--runtime", "onnxruntime"], "encoders and classifiers"), (["--runtime", "tvm"], "not available")],
)
def test_cli_refuses_impossible_arguments(tiny, tmp_path, args, message):
    from conftest import assert_user_error, invoke_cli

    proc = invoke_cli("optimize", str(tiny("llama")), "--out", str(tmp_path / "o"), *args)
    assert_user_error(proc, message)
    assert not (tmp_path / "o").exists()


def test_no_rollback_when_a_passing_candidate_already_beats_its_source(tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    """Memory: every model peaks at 100 MiB here, so int8-wo matches int4 and a rollback of int4 cannot do better."""
    monkeypatch.setitem(PRESETS, "test", [[("int8-wo", {"embeddings": False})], [("int4", {})]])
    cfg = OptimizeConfig(target="memory", max_quality_drop=0.0012, preset="test", proxy_tokens=200, full_tokens=400)
    results = optimize(slimkit.load(tiny("llama")), cfg, tmp_path / "out")
    names = [c["name"] for c in results["candidates"]]
    assert names == ["int8-wo(embeddings=False)", "int4", "int4 + rollback"]
    rolled = results["candidates"][2]
    assert rolled["stage"] == "skipped" and "already beats int4" in rolled["reason"]
    assert results["winner"] == "int8-wo(embeddings=False)"


def test_causal_candidates_are_built_on_their_own_load(tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    """The search drops a causal LM while it builds candidates in place on fresh loads of its saved copy:
    the caller's model is untouched, the winner names the model it came from, and peak memory is reported."""
    monkeypatch.setitem(PRESETS, "test", [[("int4", {})], [("bf16", {})]])
    lm = slimkit.load(tiny("llama"))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = OptimizeConfig(target="size", max_quality_drop=0.5, preset="test", proxy_tokens=200, full_tokens=400)
    results = optimize(lm, cfg, tmp_path / "out")
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert results["winner"] == "int4"
    saved = slimkit.load(str(tmp_path / "out" / "model"))
    assert saved.source.endswith("model") and saved.manifest["source"] == f"{lm.source}+int4-wo"
    memory = results["memory"]
    assert memory["peak_rss_mib"] > 0 and memory["fp32_model_mib"] == round(4 * lm.num_parameters() / 2**20, 1)
    assert "Peak resident memory" in (tmp_path / "out" / "report.md").read_text()


def test_the_result_is_written_whole_where_its_folder_does_not_exist_yet(techniques, tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    """OUT's parent is made, and OUT appears only complete: nothing else is left beside it."""
    monkeypatch.setitem(PRESETS, "test", [[("test-bf16", {})]])
    cfg = OptimizeConfig(target="size", max_quality_drop=0.05, preset="test", proxy_tokens=200, full_tokens=400)
    out = tmp_path / "runs" / "today" / "out"
    results = optimize(slimkit.load(tiny("llama")), cfg, out)
    assert results["winner"] == "test-bf16"
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.html", "report.md", "results.json"]
    assert [p.name for p in out.parent.iterdir()] == ["out"] and [p.name for p in tmp_path.iterdir()] == ["runs"]


def test_a_gguf_source_is_recorded_and_its_4bit_results_are_marked(tiny, tmp_path, monkeypatch, fake_bench, one_thread):
    """A model loaded from a Q4_1 GGUF keeps what it was stored as, through its artifacts, into results.json and the report."""
    from slimkit.exporters import ExportConfig, export
    from slimkit.io import sources

    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path / "cache"))  # the GGUF's fp32 copy goes here
    monkeypatch.setitem(PRESETS, "test", [[("int4", {})], [("int8-wo", {})]])
    gguf = export(slimkit.load(tiny("llama")), tmp_path / "q.gguf", ExportConfig("gguf", quantize="q4_1"))
    lm = slimkit.load(str(gguf))
    assert lm.manifest["source_format"] == {"format": "gguf", "weights": "Q4_1", "bits": 4, "types": ["Q4_1", "Q8_0"]}
    assert slimkit.load(str(slimkit.save(lm, tmp_path / "saved"))).manifest["source_format"] == lm.manifest["source_format"]
    (sources.gguf_to_hf_dir(gguf) / sources.ORIGIN).unlink()  # a copy converted before the origin was recorded: read again
    assert slimkit.load(str(gguf)).manifest["source_format"] == lm.manifest["source_format"]
    cfg = OptimizeConfig(target="size", max_quality_drop=0.5, preset="test", proxy_tokens=200, full_tokens=400, rollback=False)
    results = optimize(lm, cfg, tmp_path / "out")
    assert results["source_format"]["weights"] == "Q4_1"
    md = (tmp_path / "out" / "report.md").read_text()
    notes = {line.split(" | ")[0].strip("| "): "optimistic" in line for line in md.splitlines() if line.startswith("| int")}
    assert notes == {"int4": True, "int8-wo": False}
    assert "source_format" not in slimkit.load(tiny("llama")).manifest  # a safetensors directory: float weights, nothing to say
