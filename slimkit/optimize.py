"""`slimkit optimize`: search for the best compressed model under a quality budget.

1. Measure the original: quality on the evaluation split, speed in a separate
   process (so peak memory is the model's own).
2. For each candidate recipe of the preset (techniques that are registered and
   fit the model kind), while the time budget lasts (the budget is wall time
   for the whole run: a candidate is tried only if the time left covers it —
   as long as the slowest so far — and the final confirmation):
     build it -> a cheap quality proxy (perplexity or embedding cosine on a
     slice of the evaluation split, compared with the original on the same
     slice) -> if the proxy is within 3x the budget, save it as an artifact and
     benchmark it in a fresh process.
3. The candidate with the best target metric whose proxy passed is confirmed
   by a full measurement (the whole evaluation split, against the original);
   if it fails the budget the next one is tried. A candidate that misses the
   budget is never returned; if none passes, the original is.
4. Every measured candidate goes into results.json, the Pareto frontier
   (quality drop vs the target metric) and the report.

The winner is written to OUT/model (an artifact with its recipe), the report to
OUT/report.html and OUT/report.md, the measurements to OUT/results.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slimkit import registry
from slimkit.errors import SlimkitError
from slimkit.models import CAUSAL_LM, ENCODER, LoadedModel, load
from slimkit.recipe import Recipe


@dataclass(frozen=True)
class Target:
    name: str
    metric: str  # key in a candidate's metrics
    label: str
    higher_is_better: bool


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
        return Target(name, "size_on_disk_mb", "size on disk (MiB)", False)
    raise SlimkitError(f"unknown target '{name}': use one of {', '.join(TARGETS)}")


TARGETS = ("latency", "throughput", "memory", "size")

# Each preset is an ordered list of candidate recipes (as step lists). Methods
# that are not registered, or that do not fit the model kind, are skipped.
PRESETS: dict[str, list[list[tuple[str, dict]]]] = {
    "latency": [
        [("bf16", {})],
        [("int8-dynamic", {"smooth_alpha": 0.5})],
        [("int8-wo", {})],
        [("int8-wo", {"embeddings": False})],
        [("int4-wo", {"group_size": 32})],
    ],
    "throughput": [[("bf16", {})], [("int8-dynamic", {"smooth_alpha": 0.5})], [("int8-wo", {})]],
    "memory": [[("int4-wo", {"group_size": 32})], [("int8-wo", {})], [("nf4", {"double_quant": True})], [("bf16", {})]],
    "size": [[("int4-wo", {"group_size": 32})], [("nf4", {"double_quant": True})], [("int8-wo", {})], [("bf16", {})]],
    "edge": [[("int4-wo", {"group_size": 32})], [("int8-wo", {})], [("int8-dynamic", {"smooth_alpha": 0.5})]],
}


@dataclass(frozen=True)
class OptimizeConfig:
    target: str = "latency"
    max_quality_drop: float = 0.01
    preset: str | None = None  # default: the target's preset
    runtime: str = "torch"
    time_budget_s: float = 600.0
    proxy_tokens: int = 4096
    proxy_passages: int = 64
    full_tokens: int | None = None  # None: the whole evaluation split
    threads: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.target not in TARGETS:
            raise SlimkitError(f"unknown target '{self.target}': use one of {', '.join(TARGETS)}")
        if not 0 < self.max_quality_drop < 1:
            raise SlimkitError(f"max quality drop must be between 0 and 100%, got {100 * self.max_quality_drop:g}%")
        if self.preset is not None and self.preset not in PRESETS:
            raise SlimkitError(f"unknown preset '{self.preset}': use one of {', '.join(PRESETS)}")
        if self.runtime != "torch":
            raise SlimkitError(f"runtime '{self.runtime}' is not available for optimize yet: use --runtime torch")
        if self.time_budget_s <= 0:
            raise SlimkitError(f"time budget must be positive, got {self.time_budget_s:g} s")
        if self.proxy_tokens < 64:
            raise SlimkitError(f"proxy tokens must be at least 64, got {self.proxy_tokens}")


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


def candidate_recipes(kind: str, preset: str) -> list[Recipe]:
    available = {t.name for t in registry.techniques()}
    out = []
    for steps in PRESETS[preset]:
        if all(m in available for m, _ in steps):
            out.append(Recipe.of(*steps))
    return out


# --------------------------------------------------------------------------- measuring


def quality(lm: LoadedModel, original: LoadedModel, tokens: int | None, passages: int, baseline: float | None = None) -> dict:
    """Quality value and drop vs the original (perplexity ratio, or 1 - cosine)."""
    from slimkit.evaluate import EvalConfig, evaluate

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


def bench_in_subprocess(artifact: Path, threads: int | None) -> dict:
    """`slimkit bench ARTIFACT --json` in a fresh process: honest peak memory.

    The same settings for the original and every candidate, so ratios compare
    like with like.
    """
    args = [sys.executable, "-m", "slimkit.cli", "bench", str(artifact), "--json", "--batch-sizes", "1,4", "--new-tokens", "32"]
    if threads:
        args += ["--threads", str(threads)]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "SLIMKIT_QUIET": "1"})
    if proc.returncode != 0:
        raise SlimkitError(f"benchmarking {artifact} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    b = json.loads(proc.stdout)
    return {
        "latency_ms_p50": b["latency_ms"]["p50"],
        "decode_tokens_per_s": b.get("decode_tokens_per_s"),
        "prefill_tokens_per_s": b.get("prefill_tokens_per_s"),
        "throughput_tokens_per_s": max(t["tokens_per_s"] for t in b["throughput"]),
        "peak_memory_mb": b["peak_memory_mb"],
        "size_on_disk_mb": b["size_on_disk_mb"],
        "environment": b["environment"],
    }


# --------------------------------------------------------------------------- search


def optimize(model: str | LoadedModel, config: OptimizeConfig, out: str | Path, overwrite: bool = False, on_progress=None) -> dict:
    """Run the search; write OUT/model, OUT/report.html, OUT/report.md, OUT/results.json."""
    from slimkit.artifacts import check_destination, save
    from slimkit.report import write_report

    started = time.perf_counter()
    deadline = started + config.time_budget_s
    out = check_destination(out, overwrite)
    original = load(model)
    target = target_for(config.target, original.kind)
    preset = config.preset or config.target
    recipes = candidate_recipes(original.kind, preset)
    notify = on_progress or (lambda **kw: None)

    work = Path(tempfile.mkdtemp(prefix=".slimkit-optimize-", dir=out.parent if out.parent.exists() else None))
    try:
        base_artifact = save(original, work / "original")
        baseline = {**bench_in_subprocess(base_artifact, config.threads)}
        t0 = time.perf_counter()
        proxy_base = quality(original, original, config.proxy_tokens, config.proxy_passages)
        reserve = confirmation_seconds(original, time.perf_counter() - t0, config)
        baseline.update(quality_value=proxy_base["quality_value"])
        candidates: list[dict] = []
        spent: list[float] = []  # seconds per tried candidate
        for i, recipe in enumerate(recipes):
            name = recipe.label
            expected = max(spent) if spent else 0.0
            if time.perf_counter() + expected + reserve > deadline:
                candidates.append(_skipped(name, recipe, "not tried: the time budget left would not cover it and the final confirmation"))
                continue
            tried_at = time.perf_counter()
            notify(event="candidate", name=name, index=i, total=len(recipes), left=deadline - time.perf_counter(), best=_best(candidates, target))
            cand = {"name": name, "recipe": recipe.to_dict(), "metrics": {}, "passed": False, "reason": "", "stage": "proxy"}
            candidates.append(cand)
            try:
                lm = recipe.apply(original)
                base_value = proxy_base["quality_value"] if original.kind == CAUSAL_LM else None
                cand["metrics"].update(quality(lm, original, config.proxy_tokens, config.proxy_passages, baseline=base_value))
                drop = cand["metrics"]["quality_drop"]
                if drop > 3 * config.max_quality_drop:
                    cand["reason"] = f"proxy quality drop {100 * drop:+.2f}% is far over the {100 * config.max_quality_drop:.1f}% budget"
                    continue
                path = save(lm, work / f"cand-{i}", recipe=recipe.to_dict())
                cand["metrics"].update(bench_in_subprocess(path, config.threads))
                cand["artifact"] = str(path)
                cand["passed"] = drop <= config.max_quality_drop
                cand["reason"] = "proxy within budget" if cand["passed"] else f"proxy quality drop {100 * drop:+.2f}% > {100 * config.max_quality_drop:.1f}%"
            except SlimkitError as exc:
                cand["reason"] = f"failed: {exc}"
            finally:
                lm = None
                spent.append(time.perf_counter() - tried_at)

        winner = _confirm(candidates, original, target, config, notify)
        baseline["quality_value"] = _full_baseline_quality(original, winner, config)
        results = {
            "model": original.name, "kind": original.kind, "target": config.target, "target_metric": target.metric,
            "target_label": target.label, "higher_is_better": target.higher_is_better,
            "quality_metric": "perplexity" if original.kind == CAUSAL_LM else "embedding cosine" if original.kind == ENCODER else "agreement",
            "quality_label": "perplexity" if original.kind == CAUSAL_LM else "1 - cosine" if original.kind == ENCODER else "1 - agreement",
            "max_quality_drop": config.max_quality_drop, "preset": preset, "config": asdict(config),
            "baseline": {k: v for k, v in baseline.items() if k != "environment"},
            "candidates": [{k: v for k, v in c.items() if k != "artifact"} for c in candidates],
            "winner": winner["name"] if winner else None,
            "environment": baseline.get("environment", {}),
            "timings": {"seconds": round(time.perf_counter() - started, 1), "time_budget_s": config.time_budget_s},
        }
        for c in results["candidates"]:
            c["metrics"].pop("environment", None)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        if winner is not None:
            shutil.copytree(winner["artifact"], staging / "model")
        else:
            shutil.copytree(base_artifact, staging / "model")
        write_report(results, staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def confirmation_seconds(original: LoadedModel, proxy_seconds: float, config: OptimizeConfig) -> float:
    """Time to keep for the end: the winner's full evaluation (model and original) and the report.

    Scaled from the original's proxy evaluation (which, like a confirmation,
    runs two models) by the number of tokens read (windows overlap) or
    passages; doubled for the chance that the first confirmed candidate fails.
    """
    if original.kind == CAUSAL_LM:
        from slimkit import data as D
        from slimkit.evaluate import EvalConfig

        ec = EvalConfig()

        def read(tokens):
            return sum(len(ids) for ids, _ in D.lm_windows(original.tokenizer, D.TextSource.parse(None).texts(), ec.window, ec.stride, tokens))

        ratio = read(config.full_tokens) / max(1, read(config.proxy_tokens))
    else:
        ratio = 4.0  # the full check reads 4x the proxy's passages
    return 2 * proxy_seconds * ratio + 15.0


def _confirm(candidates: list[dict], original: LoadedModel, target: Target, config: OptimizeConfig, notify) -> dict | None:
    """Full measurement of the best proxy-passing candidates, best first, until one passes."""
    order = sorted((c for c in candidates if c["passed"]), key=lambda c: c["metrics"][target.metric], reverse=target.higher_is_better)
    for cand in order:
        notify(event="confirm", name=cand["name"])
        lm = load(cand["artifact"])
        full = quality(lm, original, config.full_tokens, 4 * config.proxy_passages)
        cand["metrics"].update(full)
        cand["stage"] = "full"
        drop = full["quality_drop"]
        if drop <= config.max_quality_drop:
            cand["reason"] = f"confirmed on the full evaluation split: {100 * drop:+.2f}%"
            return cand
        cand["passed"] = False
        cand["reason"] = f"full evaluation: quality drop {100 * drop:+.2f}% > {100 * config.max_quality_drop:.1f}%"
    return None


def _full_baseline_quality(original: LoadedModel, winner: dict | None, config: OptimizeConfig) -> float:
    """The original's quality on the full split (computed alongside the winner's when there is one)."""
    if original.kind != CAUSAL_LM:
        return 1.0  # cosine / agreement of the original with itself
    if winner is not None:
        return winner["metrics"]["reference_quality"]
    from slimkit.evaluate import EvalConfig, evaluate

    return evaluate(original, config=EvalConfig(max_tokens=config.full_tokens)).perplexity


def _best(candidates: list[dict], target: Target) -> str | None:
    ok = [c for c in candidates if c["passed"] and c["metrics"].get(target.metric) is not None]
    if not ok:
        return None
    pick = max if target.higher_is_better else min
    return pick(ok, key=lambda c: c["metrics"][target.metric])["name"]


def _skipped(name: str, recipe: Recipe, reason: str) -> dict:
    return {"name": name, "recipe": recipe.to_dict(), "metrics": {}, "passed": False, "reason": reason, "stage": "skipped"}
