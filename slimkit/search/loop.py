"""`slimkit optimize`: search for the best compressed model under a quality budget.

1. Measure the original: quality on the evaluation split, speed in a separate
   process (so peak memory is the model's own), in eager PyTorch. Every
   speed ratio is against this fp32 eager baseline.
2. For each candidate of the preset (`plan`; kept short: a candidate costs its
   build, a quality proxy and a benchmark in a fresh process), while the time
   budget lasts (`budget`: wall time for the whole run; a candidate is tried
   only if the time left covers it and one final confirmation):
     build it -> a cheap quality proxy -> if the proxy is within 3x the budget,
     save it as an artifact and benchmark it in the runtime that would serve it
     (`trial`): through torch.compile for the latency target (and throughput on
     encoders), or through the export's runtime (ONNX Runtime, onnxruntime-genai,
     TensorRT) with another `--runtime`; `auto` (the default) searches PyTorch's
     candidates and then, for encoders and classifiers, ONNX Runtime's, so the
     fastest runtime present wins. Each candidate records the runtime that
     measured it and the compile time.
3. Rollback: a candidate whose proxy misses the budget by at most 2x, built by
   one method that `mixed` can apply per layer, is tried again later as
   "<name> + rollback", its most sensitive blocks kept at a higher precision
   (`trial`).
4. The winner is chosen in a fixed order (`candidate.ranked`): proxy-passing
   candidates by the target metric, speeds and memory within `tie_tolerance`
   (3%) of the best counting as a tie, which goes to the smaller proxy quality
   drop, then to the name. The first in that order is confirmed by a full
   measurement (the whole evaluation split, against the original); if it fails
   the budget the next one is. A candidate that misses the budget is never
   returned; if none passes, the original is.
5. Where candidates were compiled and time is left, the original is also
   benchmarked through torch.compile, so the report shows what compiling
   alone gives. Every measured candidate goes into results.json, the Pareto
   frontier (quality drop vs the target metric) and the report, with its
   proxy and full quality drops side by side.

The winner is written to OUT/model (an artifact with its recipe, which the
report also prints as YAML for `slimkit run`), the report to OUT/report.html
and OUT/report.md, the measurements to OUT/results.json, all at once: they are
written to a temporary sibling of OUT that replaces it only when complete
(`io.artifacts.staging`), so a kill mid-way never leaves a half-written result.
An exported winner's export is no recipe step: the candidate records it apart
(`export`, the ExportConfig's fields), its manifest lists it after the recipe's
steps, and the report reproduces it as `slimkit run` on the recipe (where it has
steps), then `slimkit export` with the same format and options.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from slimkit.core.arch import CAUSAL_LM, ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.core.memory import peak_memory, release_memory
from slimkit.io.artifacts import check_destination, save, staging
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel
from slimkit.io.serving import how_to_serve
from slimkit.report import write_report
from slimkit.search.budget import TimeBudget, confirmation_seconds
from slimkit.search.candidate import Baseline, Candidate, Speed, ranked
from slimkit.search.config import OptimizeConfig, Target, target_for
from slimkit.search.measurements import assess, benchmarked, perplexity, proxy_baseline
from slimkit.search.plan import (
    Plan,
    auto_runtimes,
    candidate_plans,
    check_installed,
    check_runtime,
)
from slimkit.search.trial import Trials


def optimize(model: str | LoadedModel, config: OptimizeConfig, out: str | Path, overwrite: bool = False, on_progress=None,
             started: float | None = None) -> dict:
    """Run the search; write OUT/model, OUT/report.html, OUT/report.md, OUT/results.json; return the results.

    `started`: the `time.perf_counter()` at which the time budget began
    (default: now); the CLI passes its own start, model loading included.
    """
    started = time.perf_counter() if started is None else started
    out = check_destination(out, overwrite)
    check_installed(config.runtime)
    original = load(model)
    check_runtime(original.kind, config)
    target = target_for(config.target, original.kind)
    compiled = config.compiles(original.kind)
    queue = candidate_plans(original.kind, config.preset or config.target, config.runtime, config.seed)
    notify = on_progress or (lambda **kw: None)

    work = Path(tempfile.mkdtemp(prefix=".slimkit-optimize-", dir=out.parent if out.parent.exists() else None))
    try:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        base_artifact = save(original, work / "original")
        t1 = time.perf_counter()
        proxy_base = proxy_baseline(original, config)
        timings["proxy_s"] = time.perf_counter() - t1
        timings["reserve_s"] = confirmation_seconds(original, timings["proxy_s"], config)
        trials = Trials(original, config, target, work, proxy_base, compiled, base_artifact)
        kind = original.kind
        if kind == CAUSAL_LM:  # its proxy needs only the original's perplexity: hold one fp32 model at a time
            trials.release()
        model = original = None  # a causal LM's search holds the original only when it needs it (the caller may still hold it)
        release_memory()  # before the benchmark process loads its own copy
        t2 = time.perf_counter()
        baseline = Baseline(benchmarked(base_artifact, config.threads, device=config.device), proxy_base, "proxy")
        timings["baseline_s"] = (t1 - t0) + (time.perf_counter() - t2)
        budget = TimeBudget(started + config.time_budget_s, first=timings["baseline_s"] + timings["proxy_s"],
                            reserve=timings["reserve_s"], original_proxy_s=timings["proxy_s"])
        _try_candidates(trials, queue, budget, notify)
        timings["reserve_s"] = budget.reserve

        reference = None
        if compiled:
            t0 = time.perf_counter()
            reference = _compiled_reference(trials.candidates, base_artifact, config, budget, notify)
            timings["reference_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        order = ranked(trials.candidates, target, config.tie_tolerance)
        if kind == CAUSAL_LM:  # one model at a time: the original's full perplexity first, then each candidate's
            reference_model, full_base = None, _full_baseline(trials, config) if order else None
        else:
            reference_model, full_base = trials.original, None
        winner = _confirm(order, reference_model, config, notify, full_base)
        timings["confirm_s"] = time.perf_counter() - t0
        if winner is not None:  # the original's quality on the same full split as the winner's
            baseline.quality_value, baseline.quality_on = winner.metrics.quality.original_value, "full"
        results = _results(trials, config, target, compiled, baseline, reference, winner, timings)
        with staging(out, overwrite, "the search's model and report") as staged:
            shutil.copytree(winner.artifact if winner is not None else base_artifact, staged / "model")
            results["serve"] = [w.to_dict() for w in how_to_serve(staged / "model", out / "model")]  # as it will be named
            results["timings"]["seconds"] = round(time.perf_counter() - started, 1)  # the report's own few seconds aside
            write_report(results, staged)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _try_candidates(trials: Trials, queue: list[Plan], budget: TimeBudget, notify) -> None:
    """Try the plans in order (rollbacks join the queue's end) while the time budget covers them."""
    config, target = trials.config, trials.target
    index = 0
    while queue:
        plan = queue.pop(0)
        skip = trials.beaten(plan)
        if skip is None and config.max_quality_drop < plan.min_budget:
            skip = (f"not tried: a combination for quality budgets of {100 * plan.min_budget:g}% or more, about what its "
                    f"one-shot pruning costs; raise --max-quality-drop to try it")
        if skip is None:
            skip = budget.refusal(plan.rollback is not None, time.perf_counter())
        if skip is not None:
            trials.skip(plan, skip)
            continue
        tried_at = time.perf_counter()
        best = ranked(trials.candidates, target, config.tie_tolerance)
        notify(event="candidate", name=plan.name, index=index, total=index + 1 + len(queue), left=budget.deadline - time.perf_counter(),
               best=best[0].name if best else None)
        follow_up = trials.run(plan, index)
        if follow_up is not None:
            queue.append(follow_up)
        if trials.kind == CAUSAL_LM:
            trials.release()  # a rollback may have loaded the original again
        release_memory()  # the candidate's float weights, before the next one is built
        seconds = time.perf_counter() - tried_at
        trials.candidates[-1].seconds = round(seconds, 1)
        budget.record(seconds, [c.metrics.proxy_seconds for c in trials.candidates if c.passed and c.metrics.proxy_seconds is not None])
        index += 1


def _compiled_reference(candidates: list[Candidate], base_artifact: Path, config: OptimizeConfig, budget: TimeBudget, notify) -> Speed | None:
    """The original benchmarked through torch.compile, when the time left covers it: what compiling alone gives."""
    times = [c.metrics.speed.bench_seconds for c in candidates if c.metrics.speed is not None and c.metrics.speed.runtime == "torch.compile"]
    if not times or not budget.covers(max(times), time.perf_counter()):
        return None
    notify(event="reference", name="the original through torch.compile")
    try:
        return benchmarked(base_artifact, config.threads, True, config.device)
    except SlimkitError:
        return None


def _full_baseline(trials: Trials, config: OptimizeConfig) -> float:
    """A causal LM's perplexity on the full evaluation split, measured alone and then dropped,
    so the confirmation holds one model at a time (the gate compares perplexities; the KL to
    the original, which needs both models side by side, is left to `slimkit eval --reference`)."""
    value = perplexity(trials.original, config.full_tokens, config.device)
    trials.release()
    release_memory()
    return value


def _confirm(order: list[Candidate], original: LoadedModel | None, config: OptimizeConfig, notify,
             baseline: float | None = None) -> Candidate | None:
    """Full measurement of the proxy-passing candidates in `order` until one passes: against
    `original`, or for a causal LM against its full-split perplexity `baseline`."""
    for cand in order:
        notify(event="confirm", name=cand.name)
        lm = load(str(cand.artifact))
        full = assess(lm, original, config.full_tokens, 4 * config.proxy_passages, baseline, config.device)
        del lm
        cand.metrics.quality, cand.metrics.full_quality_drop = full, full.drop
        cand.stage = "full"
        if full.drop <= config.max_quality_drop:
            cand.reason = f"confirmed on the full evaluation split: {100 * full.drop:+.2f}%"
            return cand
        cand.passed = False
        cand.reason = f"full evaluation: quality drop {100 * full.drop:+.2f}% > {100 * config.max_quality_drop:.1f}%"
    return None


def _results(trials: Trials, config: OptimizeConfig, target: Target, compiled: bool, baseline: Baseline, reference: Speed | None,
             winner: Candidate | None, timings: dict[str, float]) -> dict:
    """The run's results: results.json, what `slimkit optimize --json` prints and `slimkit.report` reads."""
    kind = trials.kind
    return {
        "model": trials.name, "source_format": trials.source_format, "kind": kind, "target": config.target, "target_metric": target.metric,
        "target_label": target.label, "higher_is_better": target.higher_is_better,
        "quality_metric": "perplexity" if kind == CAUSAL_LM else "embedding cosine" if kind == ENCODER else "agreement",
        "quality_label": "perplexity" if kind == CAUSAL_LM else "1 - cosine" if kind == ENCODER else "1 - agreement",
        "max_quality_drop": config.max_quality_drop, "preset": config.preset or config.target, "runtime": config.runtime,
        "runtimes": auto_runtimes(kind) if config.runtime == "auto" else [config.runtime], "compiled": compiled,
        "config": asdict(config),
        "baseline": baseline.to_dict(),
        "baseline_compiled": reference.to_dict() if reference is not None else None,
        "candidates": [c.to_dict() for c in trials.candidates],
        "winner": winner.name if winner is not None else None,
        "environment": baseline.speed.environment,
        "timings": {"seconds": 0.0, "time_budget_s": config.time_budget_s, **{k: round(v, 1) for k, v in timings.items()}},
        "memory": {**peak_memory(), "fp32_model_mib": round(trials.fp32_bytes / 2**20, 1)},
    }
