"""`slimkit optimize`: search for the best compressed model under a quality budget.

1. Measure the original: quality on the evaluation split, speed in a separate
   process (so peak memory is the model's own), in eager PyTorch. Every
   speed ratio is against this fp32 eager baseline.
2. For each candidate of the preset (kept short: a candidate costs its build,
   a quality proxy and a benchmark in a fresh process), while the time budget
   lasts (the budget is wall time for the whole run: a candidate is tried only
   if the time left covers it — as long as the slowest so far (the first: as
   long as measuring the original took), twice that for a rollback — and one
   final confirmation, scaled from the original's proxy; an estimate, so a
   machine that slows down mid-run, or a calibrated method much slower than
   the candidates before it, overruns):
     build it -> a cheap quality proxy (perplexity or embedding cosine on a
     slice of the evaluation split, compared with the original on the same
     slice) -> if the proxy is within 3x the budget, save it as an artifact and
     benchmark it in a fresh process, in the runtime that would serve it:
     for the latency target (and throughput on encoders), through
     torch.compile (`slimkit bench --compile`: a compiled decode step with a
     static KV cache for causal LMs, compiled forwards for encoders), since
     eager PyTorch on a CPU is bound by per-op overhead and hides what
     quantized weights gain. With another `--runtime`, each candidate is an
     export (`slimkit.export`), its quality and speed measured through the
     runtime that serves it; `auto` (the default) searches PyTorch's
     candidates and then, for encoders and classifiers, ONNX Runtime's
     (`auto_runtimes`), so the fastest runtime present wins:
       onnxruntime  encoders and classifiers: ONNX Runtime graphs, fp32 with
                    fusions, int8, int8-static, int4 (ORT_PRESETS)
       ort-genai    causal LMs: onnxruntime-genai model directories (GENAI_PRESETS):
                    slimkit's int4 with integer zero points, its codes carried
                    exactly into MatMulNBits (a recipe step, then the export),
                    the builder's own int4, and fp32
       tensorrt     encoders and classifiers on a CUDA GPU with TensorRT: fp16 and
                    int8 engines (TRT_PRESETS); refused before any work where
                    `slimkit.export.tensorrt.check` says no engine can be built
                    (without CUDA or TensorRT 10; the engine path is untested
                    on a GPU in this version)
     Each candidate records the runtime that measured it and the compile time.
3. Rollback: a candidate whose proxy misses the budget by at most 2x, built
   by one method that `mixed` can apply per layer (ROLLBACK_HIGH), is tried
   again later as "<name> + rollback": `quantize.mixed.fallback` keeps its
   most sensitive blocks at a higher precision (int8-wo for 4-bit methods,
   float for 8-bit ones). The mixed search measures on calibration text (a
   few windows), not on the evaluation text the gate reads, and the two see
   the same model differently (on a tiny model, a 4x different loss); what
   carries over is the relative reduction. So its bound is the near miss's
   own loss on the calibration probe (KL, or 1 - cosine), scaled by
   budget / proxy drop, with a margin (ROLLBACK_MARGIN). The rolled-back
   model is then measured like any candidate.
4. The winner is chosen in a fixed order: proxy-passing candidates by the
   target metric, where measured speeds (and memory) within `tie_tolerance`
   (3%) of the best count as a tie — minutes apart on a shared CPU they drift
   by that much — and a tie goes to the smaller proxy quality drop (exact and
   repeatable for one seed), then to the name. Size on disk is exact: no
   tolerance. The first in that order is confirmed by a full measurement
   (the whole evaluation split, against the original); if it fails the
   budget the next one is. A candidate that misses the budget is never
   returned; if none passes, the original is.
5. Where candidates were compiled and time is left, the original is also
   benchmarked through torch.compile, so the report shows what compiling
   alone gives. Every measured candidate goes into results.json, the Pareto
   frontier (quality drop vs the target metric) and the report, with its
   proxy and full quality drops side by side.

The winner is written to OUT/model (an artifact with its recipe, which the
report also prints as YAML for `slimkit run`), the report to OUT/report.html
and OUT/report.md, the measurements to OUT/results.json. An exported winner's
export is no recipe step: the candidate records it apart (`export`, the
ExportConfig's fields), its manifest lists it after the recipe's steps, and the
report reproduces it as `slimkit run` on the recipe (where it has steps), then
`slimkit export` with the same format and options.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slimkit.core import registry
from slimkit.core.arch import CAUSAL_LM, ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.core.memory import detach_from_files, peak_memory, release_memory
from slimkit.core.recipe import Recipe
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel


@dataclass(frozen=True)
class Target:
    name: str
    metric: str  # key in a candidate's metrics
    label: str
    higher_is_better: bool
    noisy: bool = True  # measured speed or memory (ties within tie_tolerance); size on disk is exact


def target_for(name: str, kind: str) -> Target:
    if name == "latency":
        if kind == CAUSAL_LM:
            return Target(name, "decode_tokens_per_s", "decode tokens/s", True)
        return Target(name, "latency_ms_p50", "p50 latency (ms)", False)
    if name == "throughput":
        return Target(name, "throughput_tokens_per_s", "throughput (tokens/s)", True)
    if name == "memory":
        return Target(name, "peak_memory_mb", "peak memory (MiB)", False)
    if name == "size":
        return Target(name, "size_on_disk_mb", "size on disk (MiB)", False, noisy=False)
    raise SlimkitError(f"unknown target '{name}': use one of {', '.join(TARGETS)}")


TARGETS = ("latency", "throughput", "memory", "size")
RUNTIMES = ("auto", "torch", "onnxruntime", "ort-genai", "tensorrt")

# Each preset is an ordered list of candidate recipes (as step lists), either
# for every kind or per model kind ("*": the others). Unregistered methods are
# skipped. Order matters when the time budget runs short: the likely winners
# come first. Latency, measured (benchmarks/RESULTS-quantize.md, vs fp32 eager):
#   SmolLM2 decode, compiled: int4 4.91x (+0.37% ppl), int8 3.86x (+0.24%), bf16 1.92x
#   MiniLM p50, compiled:     int8-dynamic 2.58x (cosine 0.9979), bf16 1.88x, int8-static 2.79x (0.9835)
_INT8_DYNAMIC = [("int8-dynamic", {"smooth_alpha": 0.5})]
# A combination: 9% of the parameters out as whole MLP channels (OBS choice, least-squares refit; about
# 30% of MiniLM's channels: 1.21x faster, cosine 0.981 one-shot, benchmarks/RESULTS-prune.md), then int8.
# An entry (steps, min_budget) is tried only when --max-quality-drop is at least min_budget.
_PRUNED_INT8 = ([("structured", {"units": ["mlp"], "sparsity": 0.09}), *_INT8_DYNAMIC], 0.02)
PRESETS: dict[str, list | dict[str, list]] = {
    "latency": {
        CAUSAL_LM: [[("int4", {})], [("int8", {})], [("bf16", {})]],
        "*": [_INT8_DYNAMIC, [("bf16", {})], [("int8-static", {})], _PRUNED_INT8],
    },
    "throughput": {
        CAUSAL_LM: [[("bf16", {})], _INT8_DYNAMIC, [("int8-wo", {})]],
        "*": [[("bf16", {})], _INT8_DYNAMIC, [("int8-wo", {})], _PRUNED_INT8],
    },
    "memory": [[("int4", {})], [("int8-wo", {})], [("nf4", {"double_quant": True})], [("bf16", {})]],
    "size": [[("int4", {})], [("nf4", {"double_quant": True})], [("int8-wo", {})], [("bf16", {})]],
    "edge": [[("int4", {})], [("int8-wo", {})], _INT8_DYNAMIC],
}

# --runtime onnxruntime: `slimkit export --format onnxruntime --quantize Q` (None: fp32 with fusions).
ORT_PRESETS: dict[str, list[str | None]] = {
    "latency": ["int8", None, "int8-static"],
    "throughput": ["int8", None, "int8-static"],
    "memory": ["int4", "int8", None],
    "size": ["int4", "int8", None],
    "edge": ["int8", "int4"],
}

# --runtime ort-genai (causal LMs): (recipe steps applied first, then `slimkit export --format ort-genai
# --quantize Q`). Measured on SmolLM2-135M (benchmarks/RESULTS-export.md): the builder's int4 and
# slimkit's carried int4 decode at the same speed, slimkit's with lower perplexity (+19.5% vs +35.9%);
# fp32 decodes 5.9x faster than eager PyTorch and loses nothing.
_CARRIED_INT4 = [("int4", {"zero_point": "integer"})]  # integer zero points: MatMulNBits holds the codes exactly
_GENAI = [(_CARRIED_INT4, None), ([], "int4"), ([], None)]
GENAI_PRESETS: dict[str, list[tuple[list, str | None]]] = {
    "latency": _GENAI, "throughput": _GENAI, "memory": _GENAI, "size": _GENAI, "edge": _GENAI[:2]}

# --runtime tensorrt (encoders and classifiers, CUDA): `slimkit export --format tensorrt --quantize Q`.
TRT_PRESETS: dict[str, list[str | None]] = {
    "latency": ["fp16", "int8"],
    "throughput": ["fp16", "int8"],
    "memory": ["int8", "fp16"],
    "size": ["int8", "fp16"],
    "edge": ["int8", "fp16"],
}

# Methods whose near misses roll back, and to what. Each is cheap to rank per
# block (no calibration, or a forward pass); calibrated methods (awq, the int8
# alias, gptq, qat, int8-static) would recalibrate once per block.
ROLLBACK_HIGH = {"int4": "int8-wo", "int4-wo": "int8-wo", "nf4": "int8-wo", "int8-wo": "none", "int8-dynamic": "none"}
ROLLBACK_MARGIN = 0.7  # aim the rollback's probe loss at 70% of what the proportional reduction asks
# techniques whose apply reads its input model only to copy it (`copy_model`): a candidate of one of them
# can be built on its own load of the original, changed in place (`LoadedModel.donated`)
DONATABLE = {"int4", "int8", "bf16", "fp16", "int4-wo", "int8-wo", "nf4", "awq", "gptq", "int8-dynamic", "int8-static"}
NEAR_MISS = 2.0  # a proxy drop up to 2x the budget is rolled back
BENCH_WITHIN = 3.0  # a proxy drop up to 3x the budget is still benchmarked (for the report and its rollback)


@dataclass(frozen=True)
class OptimizeConfig:
    target: str = "latency"
    max_quality_drop: float = 0.01
    preset: str | None = None  # default: the target's preset
    runtime: str = "auto"  # auto: torch, and ONNX Runtime for encoders and classifiers where it is installed (auto_runtimes)
    time_budget_s: float = 600.0
    proxy_tokens: int = 4096
    proxy_passages: int = 64
    full_tokens: int | None = None  # None: the whole evaluation split
    threads: int | None = None
    seed: int = 0
    compile: bool | None = None  # None: compile the candidates where the target is served compiled (latency; throughput of encoders)
    rollback: bool = True  # roll near misses back to a higher precision on their most sensitive blocks
    tie_tolerance: float = 0.03  # measured speeds / memory this close to the best count as a tie

    def __post_init__(self):
        if self.target not in TARGETS:
            raise SlimkitError(f"unknown target '{self.target}': use one of {', '.join(TARGETS)}")
        if not 0 < self.max_quality_drop < 1:
            raise SlimkitError(f"max quality drop must be between 0 and 100%, got {100 * self.max_quality_drop:g}%")
        if self.preset is not None and self.preset not in PRESETS:
            raise SlimkitError(f"unknown preset '{self.preset}': use one of {', '.join(PRESETS)}")
        if self.runtime not in RUNTIMES:
            raise SlimkitError(f"runtime '{self.runtime}' is not available for optimize: use --runtime auto, torch, onnxruntime "
                               "(encoders, classifiers), ort-genai (causal LMs) or tensorrt (encoders, classifiers; CUDA)")
        if self.runtime not in ("torch", "auto") and self.compile:
            raise SlimkitError(f"--compile is for --runtime torch: a {self.runtime} export is not compiled by torch")
        if self.time_budget_s <= 0:
            raise SlimkitError(f"time budget must be positive, got {self.time_budget_s:g} s")
        if self.proxy_tokens < 64:
            raise SlimkitError(f"proxy tokens must be at least 64, got {self.proxy_tokens}")
        if not 0 <= self.tie_tolerance < 0.5:
            raise SlimkitError(f"tie tolerance must be a fraction in [0, 0.5), got {self.tie_tolerance:g}: e.g. 0.03 for 3%")

    def compiles(self, kind: str) -> bool:
        """Whether the PyTorch candidates are benchmarked through torch.compile."""
        if self.runtime not in ("torch", "auto"):
            return False
        if self.compile is not None:
            return self.compile
        return self.target == "latency" or (self.target == "throughput" and kind != CAUSAL_LM)


def parse_duration(text: str) -> float:
    """'10m', '90s', '1h', '600' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise SlimkitError(f"cannot read the duration '{text}': write e.g. 90s, 10m or 1h") from None


def parse_fraction(text: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise SlimkitError(f"cannot read '{text}' as a fraction: write e.g. 1% or 0.01") from None


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Plan:
    """One candidate to try: a recipe, optionally exported to a runtime, or a near miss to roll back."""

    name: str
    recipe: Recipe
    export: object | None = None  # an ExportConfig (--runtime other than torch), applied after the recipe's steps
    rollback: dict | None = None  # {"of", "method", "options", "high", "budget"}: fallback() arguments
    min_budget: float = 0.0  # tried only under a quality budget at least this wide


def auto_runtimes(kind: str) -> list[str]:
    """What `--runtime auto` searches: PyTorch, and for encoders and classifiers ONNX Runtime too
    where it is installed (its int8 MiniLM is 3.3x fp32 eager against 2.5x for torch.compile int8).
    Causal LMs stay on PyTorch: an onnxruntime-genai candidate is a model-builder export plus an
    evaluation through that runtime, minutes each on 2 cores, which the default 10-minute budget
    does not cover; ask for it with --runtime ort-genai."""
    runtimes = ["torch"]
    if kind != CAUSAL_LM:
        try:
            import onnxruntime  # noqa: F401

            runtimes.append("onnxruntime")
        except ImportError:
            pass
    return runtimes


def candidate_plans(kind: str, preset: str, runtime: str = "torch", seed: int = 0) -> list[Plan]:
    """The preset's candidates for this kind of model, in order (with `auto`: PyTorch's, then the exports')."""
    if runtime == "auto":
        plans = candidate_plans(kind, preset, "torch", seed)
        for other in auto_runtimes(kind)[1:]:
            plans += export_plans(other, preset, seed)
        return plans
    if runtime != "torch":
        return export_plans(runtime, preset, seed)
    entries = PRESETS[preset]
    if isinstance(entries, dict):
        entries = entries.get(kind, entries.get("*", []))
    available = {t.name for t in registry.techniques()}
    plans = []
    for entry in entries:
        steps, min_budget = entry if isinstance(entry, tuple) else (entry, 0.0)
        if all(m in available for m, _ in steps):
            recipe = Recipe.of(*steps, seed=seed)
            plans.append(Plan(recipe.label, recipe, min_budget=min_budget))
    return plans


def export_plans(runtime: str, preset: str, seed: int = 0) -> list[Plan]:
    """Exports to `runtime`: 'onnxruntime int8', or 'int4(zero_point=integer) -> ort-genai' where a recipe comes first."""
    from slimkit.exporters import ExportConfig

    if runtime == "ort-genai":
        entries = GENAI_PRESETS[preset]
    else:
        entries = [([], q) for q in (ORT_PRESETS if runtime == "onnxruntime" else TRT_PRESETS).get(preset, [])]
    plans = []
    for steps, quantize in entries:
        recipe = Recipe.of(*steps, seed=seed)
        name = f"{recipe.label} -> {runtime}" + (f" {quantize}" if quantize else "") if steps else f"{runtime} {quantize or 'fp32'}"
        plans.append(Plan(name, recipe, ExportConfig(runtime, quantize)))
    return plans


def check_installed(runtime: str) -> None:
    """Before any work: what `runtime` needs is here (for TensorRT, a CUDA GPU too); the error names the fix."""
    if runtime == "tensorrt":
        from slimkit.exporters.tensorrt import check

        check("--runtime")
    elif runtime in ("onnxruntime", "ort-genai"):
        package = "onnxruntime" if runtime == "onnxruntime" else "onnxruntime_genai"
        try:
            __import__(package)
        except ImportError:
            raise SlimkitError(f"--runtime {runtime} needs {package.replace('_', '-')}: pip install 'slimkit[onnx]'") from None


def check_runtime(kind: str, config: OptimizeConfig) -> None:
    """`config.runtime` serves this kind of model (whether it is installed: `check_installed`)."""
    if config.runtime == "ort-genai" and kind != CAUSAL_LM:
        raise SlimkitError(f"--runtime ort-genai serves causal LMs, not {kind}s: use --runtime onnxruntime")
    if config.runtime in ("onnxruntime", "tensorrt") and kind == CAUSAL_LM:
        raise SlimkitError(f"--runtime {config.runtime} is for encoders and classifiers here: for a causal LM use "
                           "--runtime ort-genai or torch")


# --------------------------------------------------------------------------- measuring


def quality(lm: LoadedModel, original: LoadedModel | None, tokens: int | None, passages: int, baseline: float | None = None) -> dict:
    """Quality value and drop vs the original (perplexity ratio, or 1 - cosine)."""
    from slimkit.measure.quality import EvalConfig, evaluate

    if lm.kind == CAUSAL_LM:
        r = evaluate(lm, None if baseline is not None else original, config=EvalConfig(max_tokens=tokens))
        base = baseline if baseline is not None else r.reference_perplexity
        return {"quality_value": r.perplexity, "quality_drop": r.perplexity / base - 1, "kl_divergence": r.kl_divergence,
                "top1_agreement": r.top1_agreement, "reference_quality": base, "tokens": r.tokens}
    r = evaluate(lm, original, config=EvalConfig(max_passages=passages))
    if lm.kind == ENCODER:
        return {"quality_value": r.cosine_to_reference, "quality_drop": 1 - r.cosine_to_reference,
                "retrieval_top10_overlap": r.retrieval_top10_overlap, "samples": r.samples}
    return {"quality_value": r.agreement_with_reference, "quality_drop": 1 - r.agreement_with_reference, "samples": r.samples}


def bench_in_subprocess(artifact: Path, threads: int | None, compile: bool = False) -> dict:
    """`slimkit bench ARTIFACT --json [--compile]` in a fresh process: honest peak memory.

    The same settings for the original and every candidate, so ratios compare
    like with like; `runtime` says what ran the timed work.
    """
    args = [sys.executable, "-m", "slimkit.cli", "bench", str(artifact), "--json", "--batch-sizes", "1,4", "--new-tokens", "32"]
    if threads:
        args += ["--threads", str(threads)]
    if compile:
        args.append("--compile")
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "SLIMKIT_QUIET": "1"})
    if proc.returncode != 0:
        raise SlimkitError(f"benchmarking {artifact} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    b = json.loads(proc.stdout)
    exported = _exported_runtime(artifact)
    return {
        "latency_ms_p50": b["latency_ms"]["p50"],
        "decode_tokens_per_s": b.get("decode_tokens_per_s"),
        "prefill_tokens_per_s": b.get("prefill_tokens_per_s"),
        "throughput_tokens_per_s": max(t["tokens_per_s"] for t in b["throughput"]),
        "peak_memory_mb": b["peak_memory_mb"],
        "size_on_disk_mb": b["size_on_disk_mb"],
        "runtime": exported or ("torch.compile" if compile else "eager"),
        "decode_runtime": b.get("decode_runtime"),
        "compile_seconds": b.get("compile_seconds"),
        "bench_seconds": round(time.perf_counter() - start, 1),
        "environment": b["environment"],
    }


def _exported_runtime(artifact: Path) -> str | None:
    from slimkit.io.model import MANIFEST

    try:
        runtime = json.loads((Path(artifact) / MANIFEST).read_text()).get("runtime", "torch")
    except (OSError, ValueError):
        return None
    return None if runtime == "torch" else runtime


def _bench(path: Path, config: OptimizeConfig, compiled: bool) -> dict:
    """Benchmark; where compiling fails (no C++ compiler, an op inductor lacks), measure eagerly and say why."""
    if not compiled:
        return bench_in_subprocess(path, config.threads)
    try:
        return bench_in_subprocess(path, config.threads, compile=True)
    except SlimkitError as exc:
        metrics = bench_in_subprocess(path, config.threads)
        metrics["compile_error"] = str(exc)
        return metrics


# --------------------------------------------------------------------------- search


def optimize(model: str | LoadedModel, config: OptimizeConfig, out: str | Path, overwrite: bool = False, on_progress=None,
             started: float | None = None) -> dict:
    """Run the search; write OUT/model, OUT/report.html, OUT/report.md, OUT/results.json.

    `started`: the `time.perf_counter()` at which the time budget began
    (default: now); the CLI passes its own start, model loading included.
    """
    from slimkit.io.artifacts import check_destination, replace_dir, save
    from slimkit.report import write_report

    started = time.perf_counter() if started is None else started
    deadline = started + config.time_budget_s
    out = check_destination(out, overwrite)
    check_installed(config.runtime)
    original = load(model)
    check_runtime(original.kind, config)
    target = target_for(config.target, original.kind)
    preset = config.preset or config.target
    compiled = config.compiles(original.kind)
    queue = candidate_plans(original.kind, preset, config.runtime, config.seed)
    notify = on_progress or (lambda **kw: None)

    work = Path(tempfile.mkdtemp(prefix=".slimkit-optimize-", dir=out.parent if out.parent.exists() else None))
    try:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        base_artifact = save(original, work / "original")
        t1 = time.perf_counter()
        proxy_base = _proxy_baseline(original, config)
        timings["proxy_s"] = time.perf_counter() - t1
        reserve = reserve_0 = timings["reserve_s"] = confirmation_seconds(original, timings["proxy_s"], config)
        search = _Search(original, config, target, work, proxy_base, compiled, base_artifact)
        name, kind = original.name, original.kind
        if kind == CAUSAL_LM:  # its proxy needs only the original's perplexity: hold one fp32 model at a time
            search.release()
        model = original = None  # a causal LM's search holds the original only when it needs it (the caller may still hold it)
        release_memory()  # before the benchmark process loads its own copy
        t2 = time.perf_counter()
        baseline = bench_in_subprocess(base_artifact, config.threads)
        timings["baseline_s"] = (t1 - t0) + (time.perf_counter() - t2)
        baseline.update(quality_value=proxy_base["quality_value"], quality_on="proxy")
        spent: list[float] = []  # seconds per tried candidate
        index = 0
        while queue:
            plan = queue.pop(0)
            # as long as the slowest so far (at first: what measuring the original took), twice that for a rollback
            expected = (2 if plan.rollback else 1) * (max(spent) if spent else timings["baseline_s"] + timings["proxy_s"])
            skip = search.beaten(plan)
            if skip is None and config.max_quality_drop < plan.min_budget:
                skip = (f"not tried: a combination for quality budgets of {100 * plan.min_budget:g}% or more, about what its "
                        f"one-shot pruning costs; raise --max-quality-drop to try it")
            left = deadline - time.perf_counter()
            if skip is None and expected + reserve > left:
                skip = (f"not tried: the time budget left ({max(0.0, left):.0f} s) would not cover it (about {expected:.0f} s) "
                        f"and the final confirmation (about {reserve:.0f} s): raise --time-budget")
            if skip is not None:
                search.candidates.append(_skipped(plan, skip))
                continue
            tried_at = time.perf_counter()
            best = ranked(search.candidates, target, config.tie_tolerance)
            notify(event="candidate", name=plan.name, index=index, total=index + 1 + len(queue), left=deadline - time.perf_counter(),
                   best=best[0]["name"] if best else None)
            follow_up = search.run(plan, index)
            if follow_up is not None:
                queue.append(follow_up)
            if kind == CAUSAL_LM:
                search.release()  # a rollback may have loaded the original again
            release_memory()  # the candidate's float weights, before the next one is built
            spent.append(time.perf_counter() - tried_at)
            search.candidates[-1]["seconds"] = round(spent[-1], 1)
            reserve = timings["reserve_s"] = max(reserve, rescaled_reserve(reserve_0, timings["proxy_s"], search.candidates))
            index += 1

        reference = None
        if compiled:
            t0 = time.perf_counter()
            reference = _compiled_reference(search.candidates, base_artifact, config, deadline - reserve, notify)
            timings["reference_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        order = ranked(search.candidates, target, config.tie_tolerance)
        if kind == CAUSAL_LM:  # one model at a time: the original's full perplexity first, then each candidate's
            reference_model, full_base = None, _full_baseline(search, config) if order else None
        else:
            reference_model, full_base = search.original, None
        winner = _confirm(order, reference_model, config, notify, full_base)
        timings["confirm_s"] = time.perf_counter() - t0
        if winner is not None:  # the original's quality on the same full split as the winner's
            baseline.update(quality_value=_full_baseline_quality(kind, winner), quality_on="full")
        results = {
            "model": name, "kind": kind, "target": config.target, "target_metric": target.metric,
            "target_label": target.label, "higher_is_better": target.higher_is_better,
            "quality_metric": "perplexity" if kind == CAUSAL_LM else "embedding cosine" if kind == ENCODER else "agreement",
            "quality_label": "perplexity" if kind == CAUSAL_LM else "1 - cosine" if kind == ENCODER else "1 - agreement",
            "max_quality_drop": config.max_quality_drop, "preset": preset, "runtime": config.runtime,
            "runtimes": auto_runtimes(kind) if config.runtime == "auto" else [config.runtime], "compiled": compiled,
            "config": asdict(config),
            "baseline": {k: v for k, v in baseline.items() if k != "environment"},
            "baseline_compiled": reference,
            "candidates": [{k: v for k, v in c.items() if k != "artifact"} for c in search.candidates],
            "winner": winner["name"] if winner else None,
            "environment": baseline.get("environment", {}),
            "timings": {"seconds": 0.0, "time_budget_s": config.time_budget_s, **{k: round(v, 1) for k, v in timings.items()}},
            "memory": {**peak_memory(), "fp32_model_mib": round(search.fp32_bytes / 2**20, 1)},
        }
        for c in results["candidates"]:
            c["metrics"].pop("environment", None)
        if reference:
            reference.pop("environment", None)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        shutil.copytree(winner["artifact"] if winner is not None else base_artifact, staging / "model")
        results["timings"]["seconds"] = round(time.perf_counter() - started, 1)  # the report's own few seconds aside
        write_report(results, staging)
        replace_dir(staging, out)  # a kill mid-way never leaves a half-deleted result in OUT
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _Search:
    """Builds, measures and records candidates; proposes rollbacks of near misses."""

    def __init__(self, original: LoadedModel, config: OptimizeConfig, target: Target, work: Path, proxy_base: dict, compiled: bool,
                 saved: Path):
        self._original, self.saved, self.config, self.target, self.work = original, saved, config, target, work
        self.name, self.kind, self._manifest = original.name, original.kind, original.manifest
        self.fp32_bytes = 4 * original.num_parameters()
        self.proxy_base, self.compiled = proxy_base, compiled
        self.candidates: list[dict] = []
        self._probe = None

    @property
    def original(self) -> LoadedModel:
        """The original, loaded again from its saved copy if `release` dropped it."""
        if self._original is None:
            self._original = self._load_saved()
        return self._original

    def release(self) -> None:
        """Drop the original (and the rollback probe's outputs); `original` loads it again when asked."""
        self._original = self._probe = None

    def _load_saved(self) -> LoadedModel:
        from slimkit.io.loader import load_dir

        lm = load_dir(self.saved, source=self.name)
        lm.manifest = copy.deepcopy(self._manifest)
        return lm

    def _source(self, plan: Plan) -> LoadedModel:
        """What `plan` is applied to: its own load of the original when the original is not held and the
        technique reads its input only to copy it, so it may change that load in place."""
        steps = plan.recipe.steps
        if self._original is None and len(steps) == 1 and steps[0].method in DONATABLE:
            lm = self._load_saved()
            lm.donated = True
            return lm
        return self.original

    def run(self, plan: Plan, index: int) -> Plan | None:
        """Try `plan`; return a rollback plan when it narrowly misses the budget."""
        from slimkit.io.artifacts import save

        config, budget = self.config, self.config.max_quality_drop
        cand = {"name": plan.name, "recipe": plan.recipe.to_dict(), "metrics": {}, "passed": False, "reason": "", "stage": "proxy"}
        if plan.export is not None:
            cand["export"] = {k: v for k, v in asdict(plan.export).items() if v is not None}
        self.candidates.append(cand)
        lm, follow_up = None, None
        try:
            lm, path = self._build(plan, cand, index)
            t0 = time.perf_counter()
            if self.kind == CAUSAL_LM:  # compared with the original's perplexity, a number: the original need not be loaded
                cand["metrics"].update(quality(lm, None, config.proxy_tokens, config.proxy_passages, baseline=self.proxy_base["quality_value"]))
            else:
                cand["metrics"].update(quality(lm, self.original, config.proxy_tokens, config.proxy_passages))
            drop = cand["metrics"]["proxy_quality_drop"] = cand["metrics"]["quality_drop"]
            cand["metrics"]["proxy_seconds"] = round(time.perf_counter() - t0, 2)
            if budget < drop <= NEAR_MISS * budget and config.rollback:
                follow_up = self._rollback_plan(plan, lm, drop, cand)
            if drop > BENCH_WITHIN * budget:
                cand["reason"] = f"proxy quality drop {100 * drop:+.2f}% is far over the {100 * budget:.1f}% budget"
                return follow_up
            if path is None:
                path = save(lm, self.work / f"cand-{index}", recipe=cand["recipe"])
            lm = None  # free it, and hand the heap back, before the benchmark process loads its own copy
            release_memory()
            cand["metrics"].update(_bench(path, config, self.compiled and plan.export is None))
            cand["artifact"] = str(path)
            cand["passed"] = drop <= budget
            cand["reason"] = "proxy within budget" if cand["passed"] else f"proxy quality drop {100 * drop:+.2f}% > {100 * budget:.1f}%"
            if "compile_error" in cand["metrics"]:
                cand["reason"] += "; measured eagerly: torch.compile failed"
        except SlimkitError as exc:
            cand["reason"] = f"failed: {exc}"
        return follow_up

    def beaten(self, plan: Plan) -> str | None:
        """Why a rollback cannot win: a passing candidate beats its source, which it can only match."""
        if plan.rollback is None:
            return None
        source = next(c for c in self.candidates if c["name"] == plan.rollback["of"])
        best = ranked(self.candidates, self.target, 0.0)
        value = source["metrics"].get(self.target.metric)
        if not best or value is None:
            return None
        lead = best[0]["metrics"][self.target.metric]
        if (lead >= value) if self.target.higher_is_better else (lead <= value):
            return f"not tried: {best[0]['name']} already beats {source['name']} on {self.target.label}, and a rollback is no faster or smaller than its source"
        return None

    def _build(self, plan: Plan, cand: dict, index: int) -> tuple[LoadedModel, Path | None]:
        """The candidate model (and its directory, where building wrote one)."""
        import torch

        if plan.export is not None:
            from slimkit.exporters import export

            path = export(plan.recipe.apply(self._source(plan)), self.work / f"cand-{index}", plan.export)
            return load(str(path)), path
        if plan.rollback is None:
            lm = plan.recipe.apply(self._source(plan))
            detach_from_files(lm.model)  # what an in-place build left in the loaded file keeps all of it resident
            release_memory()
            return lm, None
        from slimkit.quantization.mixed import fallback

        rb = plan.rollback
        torch.manual_seed(self.config.seed)
        lm, report = fallback(self.original, rb["method"], rb["options"], rb["high"], rb["budget"])
        step = lm.manifest["recipe"][-1]
        cand["recipe"] = Recipe.of(("mixed", {k: v for k, v in step.items() if k not in ("stage", "method")}), seed=self.config.seed).to_dict()
        units = report.sensitivity.units
        kept = sum(1 for u in units if set(u.layers) <= set(report.high_layers))
        cand["rollback"] = {"of": rb["of"], "high": rb["high"], "kept_high": f"{kept} of {len(units)} {report.sensitivity.granularity}s",
                            "probe_metric": report.metric, "probe_bound": report.budget, "probe_score": report.score,
                            "seconds": report.seconds}
        return lm, None

    def _rollback_plan(self, plan: Plan, lm: LoadedModel, drop: float, cand: dict) -> Plan | None:
        """A plan to roll `plan`'s near miss back, or None (the reason goes into `cand`)."""
        from slimkit.quantization.ranking import Probe

        if plan.export is not None:
            cand["rollback"] = {"skipped": f"no rollback: a {plan.export.format} export is not rolled back per block"}
            return None
        step = plan.recipe.steps[0] if len(plan.recipe.steps) == 1 else None
        high = ROLLBACK_HIGH.get(step.method) if step is not None and plan.rollback is None else None
        if high is None:
            cand["rollback"] = {"skipped": "no rollback: only a single method of " + ", ".join(ROLLBACK_HIGH) + " can be rolled back per block"}
            return None
        if self._probe is None:
            self._probe = Probe(self.original)
        score = self._probe.score(lm.model)
        if not score > 0:
            cand["rollback"] = {"skipped": "no rollback: the calibration probe sees no loss to win back"}
            return None
        bound = score * ROLLBACK_MARGIN * self.config.max_quality_drop / drop
        key = {"kl": "max_kl", "cosine": "max_cosine_drop"}[self._probe.metric]
        defaults = type(step.config)()
        options = {f.name: v for f in dataclasses.fields(step.config) if (v := getattr(step.config, f.name)) != getattr(defaults, f.name)}
        cand["rollback"] = {"planned": f"{plan.name} + rollback", "probe_score": score, "probe_bound": bound}
        rollback = {"of": plan.name, "method": step.method, "options": options, "high": high, "budget": {key: bound}}
        return Plan(f"{plan.name} + rollback", plan.recipe, rollback=rollback)


def ranked(candidates: list[dict], target: Target, tolerance: float) -> list[dict]:
    """Proxy-passing candidates, best first, in a repeatable order.

    The best remaining candidate on the target metric and every candidate
    within `tolerance` of it (for noisy targets) form a tie, ordered by the
    smaller quality drop, then by name; then the next best, and so on.
    """
    rest = [c for c in candidates if c["passed"] and c["metrics"].get(target.metric) is not None]
    sign = 1 if target.higher_is_better else -1
    rest.sort(key=lambda c: (-sign * c["metrics"][target.metric], c["name"]))
    tol = tolerance if target.noisy else 0.0
    out: list[dict] = []
    while rest:
        lead = rest[0]["metrics"][target.metric]
        edge = lead * (1 - tol) if target.higher_is_better else lead * (1 + tol)
        tie = [c for c in rest if sign * c["metrics"][target.metric] >= sign * edge]
        tie.sort(key=lambda c: (c["metrics"]["quality_drop"], c["name"]))
        out += tie
        rest = [c for c in rest if c not in tie]
    return out


def _compiled_reference(candidates: list[dict], base_artifact: Path, config: OptimizeConfig, until: float, notify) -> dict | None:
    """The original benchmarked through torch.compile, when the time left covers it: what compiling alone gives."""
    times = [c["metrics"]["bench_seconds"] for c in candidates if c["metrics"].get("runtime") == "torch.compile"]
    if not times or time.perf_counter() + max(times) > until:
        return None
    notify(event="reference", name="the original through torch.compile")
    try:
        return _bench(base_artifact, config, True)
    except SlimkitError:
        return None


REPORT_SECONDS = 15.0  # kept beyond the confirmation's evaluations: loading the winner, the report


def confirmation_seconds(original: LoadedModel, proxy_seconds: float, config: OptimizeConfig) -> float:
    """Time to keep for the end: the winner's full evaluation (model and original) and the report.

    Scaled from the original's proxy evaluation by the number of tokens read
    (windows overlap) or passages, and by the models run: a confirmation runs
    two, the proxy of a causal LM one (an encoder's proxy, two). Kept for one
    confirmation: if the first confirmed candidate fails, the next one's may
    run past the budget (the gate is never skipped).
    """
    if original.kind == CAUSAL_LM:
        from slimkit.core import data as D
        from slimkit.measure.quality import EvalConfig

        ec = EvalConfig()

        def read(tokens):
            return sum(len(ids) for ids, _ in D.lm_windows(original.tokenizer, D.TextSource.parse(None).texts(), ec.window, ec.stride, tokens))

        ratio = 2 * read(config.full_tokens) / max(1, read(config.proxy_tokens))
    else:
        ratio = 4.0  # the full check reads 4x the proxy's passages
    return proxy_seconds * ratio + REPORT_SECONDS


def _full_baseline(search: "_Search", config: OptimizeConfig) -> float:
    """A causal LM's perplexity on the full evaluation split, measured alone and then dropped,
    so the confirmation holds one model at a time (the gate compares perplexities; the KL to
    the original, which needs both models side by side, is left to `slimkit eval --reference`)."""
    value = _perplexity(search.original, config.full_tokens)
    search.release()
    release_memory()
    return value


def rescaled_reserve(reserve: float, original_proxy_s: float, candidates: list[dict]) -> float:
    """The confirmation's time, re-estimated once candidates are measured: it reads the
    original and the candidate, and a quantized model can be slower than the original in
    eager PyTorch (SmolLM2's int4 takes about 1.6x as long), so the candidate's half of
    `reserve` is scaled by the slowest proxy-passing candidate's proxy time."""
    times = [c["metrics"]["proxy_seconds"] for c in candidates if c.get("passed") and "proxy_seconds" in c["metrics"]]
    if not times or original_proxy_s <= 0:
        return reserve
    half = (reserve - REPORT_SECONDS) / 2
    return REPORT_SECONDS + half + half * max(times) / original_proxy_s


def _confirm(order: list[dict], original: LoadedModel | None, config: OptimizeConfig, notify,
             baseline: float | None = None) -> dict | None:
    """Full measurement of the proxy-passing candidates in `order` until one passes: against
    `original`, or for a causal LM against its full-split perplexity `baseline`."""
    for cand in order:
        notify(event="confirm", name=cand["name"])
        lm = load(cand["artifact"])
        full = quality(lm, original, config.full_tokens, 4 * config.proxy_passages, baseline)
        del lm
        cand["metrics"].update(full)
        cand["metrics"]["full_quality_drop"] = full["quality_drop"]
        cand["stage"] = "full"
        drop = full["quality_drop"]
        if drop <= config.max_quality_drop:
            cand["reason"] = f"confirmed on the full evaluation split: {100 * drop:+.2f}%"
            return cand
        cand["passed"] = False
        cand["reason"] = f"full evaluation: quality drop {100 * drop:+.2f}% > {100 * config.max_quality_drop:.1f}%"
    return None


def _full_baseline_quality(kind: str, winner: dict) -> float:
    """The original's quality on the winner's full evaluation."""
    return winner["metrics"]["reference_quality"] if kind == CAUSAL_LM else 1.0  # cosine / agreement with itself


def _proxy_baseline(original: LoadedModel, config: OptimizeConfig) -> dict:
    """The original's quality on the proxy slice; for a causal LM one pass (its perplexity), no reference needed."""
    if original.kind != CAUSAL_LM:
        return quality(original, original, config.proxy_tokens, config.proxy_passages)
    return {"quality_value": _perplexity(original, config.proxy_tokens)}


def _perplexity(lm: LoadedModel, tokens: int | None) -> float:
    """A causal LM's perplexity on the first `tokens` of the evaluation split (None: all of it), alone."""
    from slimkit.measure.quality import EvalConfig, evaluate

    return evaluate(lm, config=EvalConfig(max_tokens=tokens)).perplexity


def _skipped(plan: Plan, reason: str) -> dict:
    return {"name": plan.name, "recipe": plan.recipe.to_dict(), "metrics": {}, "passed": False, "reason": reason, "stage": "skipped"}
