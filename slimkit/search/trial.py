"""Trying one candidate: build it, a cheap quality proxy, a benchmark; and rolling near misses back.

A candidate is built from the original (for a causal LM, on its own load of the saved original
where the technique only copies its input: the search then holds one fp32 model at a time), its
quality proxy measured (perplexity or embedding cosine on a slice of the evaluation split,
compared with the original on the same slice), and, if the proxy is within BENCH_WITHIN (3x) the
budget, saved as an artifact and benchmarked in a fresh process, in the runtime that would serve it
(through torch.compile for the compiled targets: eager PyTorch on a CPU is bound by per-op
overhead and hides what quantized weights gain).

Rollback: a candidate whose proxy misses the budget by at most NEAR_MISS (2x), built by one method
that `mixed` can apply per layer (ROLLBACK_HIGH), is tried again later as "<name> + rollback":
`quantize.mixed.fallback` keeps its most sensitive blocks at a higher precision (int8-wo for 4-bit
methods, float for 8-bit ones). The mixed search measures on calibration text (a few windows), not
on the evaluation text the gate reads, and the two see the same model differently (on a tiny model,
a 4x different loss); what carries over is the relative reduction. So its bound is the near miss's
own loss on the calibration probe (KL, or 1 - cosine), scaled by budget / proxy drop, with a margin
(ROLLBACK_MARGIN). The rolled-back model is then measured like any candidate.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.memory import detach_from_files, release_memory
from slimkit.core.recipe import Recipe
from slimkit.exporters import export
from slimkit.io.artifacts import save
from slimkit.io.loader import load, load_dir
from slimkit.io.model import LoadedModel
from slimkit.quantization.mixed import fallback
from slimkit.quantization.ranking import Probe
from slimkit.search.candidate import (
    Candidate,
    RollbackPlanned,
    RollbackSkipped,
    RolledBack,
    ranked,
)
from slimkit.search.config import OptimizeConfig, Target
from slimkit.search.measurements import assess, benchmarked
from slimkit.search.plan import Fallback, Plan
from slimkit.search.presets import (
    BENCH_WITHIN,
    DONATABLE,
    NEAR_MISS,
    ROLLBACK_HIGH,
    ROLLBACK_MARGIN,
)


class Trials:
    """Builds, measures and records candidates; proposes rollbacks of near misses."""

    def __init__(self, original: LoadedModel, config: OptimizeConfig, target: Target, work: Path, proxy_base: float, compiled: bool,
                 saved: Path):
        self._original, self.saved, self.config, self.target, self.work = original, saved, config, target, work
        self.name, self.kind, self._manifest = original.name, original.kind, original.manifest
        self.source_format = original.manifest.get("source_format")  # a GGUF source's storage type: 4-bit results on Q4_1 are optimistic
        self.fp32_bytes = 4 * original.num_parameters()
        self.proxy_base, self.compiled = proxy_base, compiled  # the original's quality value on the proxy slice
        self.candidates: list[Candidate] = []
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

    def skip(self, plan: Plan, reason: str) -> None:
        """Record `plan` as not tried, and why."""
        self.candidates.append(Candidate(plan.name, plan.recipe, passed=False, reason=reason, stage="skipped"))

    def run(self, plan: Plan, index: int) -> Plan | None:
        """Try `plan`; return a rollback plan when it narrowly misses the budget."""
        config, budget = self.config, self.config.max_quality_drop
        cand = Candidate(plan.name, plan.recipe, export=plan.export)
        self.candidates.append(cand)
        lm, follow_up = None, None
        try:
            lm, path = self._build(plan, cand, index)
            t0 = time.perf_counter()
            if self.kind == CAUSAL_LM:  # compared with the original's perplexity, a number: the original need not be loaded
                quality = assess(lm, None, config.proxy_tokens, config.proxy_passages, baseline=self.proxy_base, device=config.device)
            else:
                quality = assess(lm, self.original, config.proxy_tokens, config.proxy_passages, device=config.device)
            m = cand.metrics
            m.quality, m.proxy_quality_drop, m.proxy_seconds = quality, quality.drop, round(time.perf_counter() - t0, 2)
            drop = quality.drop
            if budget < drop <= NEAR_MISS * budget and config.rollback:
                follow_up = self._rollback_plan(plan, lm, drop, cand)
            if drop > BENCH_WITHIN * budget:
                cand.reason = f"proxy quality drop {100 * drop:+.2f}% is far over the {100 * budget:.1f}% budget"
                return follow_up
            if path is None:
                path = save(lm, self.work / f"cand-{index}", recipe=cand.recipe.to_dict())
            lm = None  # free it, and hand the heap back, before the benchmark process loads its own copy
            release_memory()
            m.speed = benchmarked(path, config.threads, self.compiled and plan.export is None, config.device)
            cand.artifact = Path(path)
            cand.passed = drop <= budget
            cand.reason = "proxy within budget" if cand.passed else f"proxy quality drop {100 * drop:+.2f}% > {100 * budget:.1f}%"
            if m.speed.compile_error is not None:
                cand.reason += "; measured eagerly: torch.compile failed"
        except SlimkitError as exc:
            cand.reason = f"failed: {exc}"
        return follow_up

    def beaten(self, plan: Plan) -> str | None:
        """Why a rollback cannot win: a passing candidate beats its source, which it can only match."""
        if plan.rollback is None:
            return None
        metric = self.target.metric
        source = next(c for c in self.candidates if c.name == plan.rollback.of)
        best = ranked(self.candidates, self.target, 0.0)
        value = source.metrics.value(metric)
        if not best or value is None:
            return None
        lead = best[0].metrics.value(metric)
        if (lead >= value) if self.target.higher_is_better else (lead <= value):
            return f"not tried: {best[0].name} already beats {source.name} on {self.target.label}, and a rollback is no faster or smaller than its source"
        return None

    def _build(self, plan: Plan, cand: Candidate, index: int) -> tuple[LoadedModel, Path | None]:
        """The candidate model (and its directory, where building wrote one)."""
        import torch

        if plan.export is not None:
            path = export(plan.recipe.apply(self._source(plan)), self.work / f"cand-{index}", plan.export)
            return load(str(path)), path
        if plan.rollback is None:
            lm = plan.recipe.apply(self._source(plan))
            detach_from_files(lm.model)  # what an in-place build left in the loaded file keeps all of it resident
            release_memory()
            return lm, None

        rb = plan.rollback
        torch.manual_seed(self.config.seed)
        lm, report = fallback(self.original, rb.method, rb.options, rb.high, rb.budget)
        step = lm.manifest["recipe"][-1]
        cand.recipe = Recipe.of(("mixed", {k: v for k, v in step.items() if k not in ("stage", "method")}), seed=self.config.seed)
        units = report.sensitivity.units
        kept = sum(1 for u in units if set(u.layers) <= set(report.high_layers))
        cand.rollback = RolledBack(of=rb.of, high=rb.high, kept_high=f"{kept} of {len(units)} {report.sensitivity.granularity}s",
                                   probe_metric=report.metric, probe_bound=report.budget, probe_score=report.score, seconds=report.seconds)
        return lm, None

    def _rollback_plan(self, plan: Plan, lm: LoadedModel, drop: float, cand: Candidate) -> Plan | None:
        """A plan to roll `plan`'s near miss back, or None (the reason goes into `cand`)."""
        if plan.export is not None:
            cand.rollback = RollbackSkipped(f"no rollback: a {plan.export.format} export is not rolled back per block")
            return None
        step = plan.recipe.steps[0] if len(plan.recipe.steps) == 1 else None
        high = ROLLBACK_HIGH.get(step.method) if step is not None and plan.rollback is None else None
        if high is None:
            cand.rollback = RollbackSkipped("no rollback: only a single method of " + ", ".join(ROLLBACK_HIGH) + " can be rolled back per block")
            return None
        if self._probe is None:
            self._probe = Probe(self.original)
        score = self._probe.score(lm.model)
        if not score > 0:
            cand.rollback = RollbackSkipped("no rollback: the calibration probe sees no loss to win back")
            return None
        bound = score * ROLLBACK_MARGIN * self.config.max_quality_drop / drop
        key = {"kl": "max_kl", "cosine": "max_cosine_drop"}[self._probe.metric]
        defaults = type(step.config)()
        options = {f.name: v for f in dataclasses.fields(step.config) if (v := getattr(step.config, f.name)) != getattr(defaults, f.name)}
        name = f"{plan.name} + rollback"
        cand.rollback = RollbackPlanned(planned=name, probe_score=score, probe_bound=bound)
        return Plan(name, plan.recipe, rollback=Fallback(of=plan.name, method=step.method, options=options, high=high, budget={key: bound}))
