"""What the search measures, and how: quality against the original in this process, speed in a fresh one.

Quality (`assess`) is a perplexity ratio for causal LMs (compared with the original's perplexity,
a number, so the original need not be held), 1 - embedding cosine for encoders, 1 - agreement for
classifiers. Speed (`benchmarked`) is `slimkit bench ARTIFACT --json` in a fresh process, so peak
memory is the model's own; its output is a `BenchResult` (`from_dict`), and the candidate keeps
its figures as a typed `Speed`. The original and every candidate are benchmarked with the same
settings, so ratios compare like with like; `Speed.runtime` says what ran the timed work. Where
compiling fails (no C++ compiler, an op inductor lacks), the candidate is measured eagerly and
`compile_error` says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from slimkit.core.arch import CAUSAL_LM, ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.io.model import MANIFEST, LoadedModel
from slimkit.measure.quality import EvalConfig, evaluate
from slimkit.measure.speed import BenchResult
from slimkit.search.candidate import (
    CausalQuality,
    ClassifierQuality,
    EncoderQuality,
    Quality,
    Speed,
)
from slimkit.search.config import OptimizeConfig


def assess(lm: LoadedModel, original: LoadedModel | None, tokens: int | None, passages: int, baseline: float | None = None,
           device: str | None = None) -> Quality:
    """Quality value and drop vs the original (perplexity ratio, or 1 - cosine); for a causal LM
    against the original's perplexity `baseline` where given, without running the original.
    `device`: where both run (None: where they are)."""
    if lm.kind == CAUSAL_LM:
        r = evaluate(lm, None if baseline is not None else original, config=EvalConfig(max_tokens=tokens), device=device)
        base = baseline if baseline is not None else r.reference_perplexity
        return CausalQuality(r.perplexity, r.perplexity / base - 1, kl_divergence=r.kl_divergence, top1_agreement=r.top1_agreement,
                             reference_quality=base, tokens=r.tokens)
    r = evaluate(lm, original, config=EvalConfig(max_passages=passages), device=device)
    if lm.kind == ENCODER:
        return EncoderQuality(r.cosine_to_reference, 1 - r.cosine_to_reference, retrieval_top10_overlap=r.retrieval_top10_overlap,
                              samples=r.samples)
    return ClassifierQuality(r.agreement_with_reference, 1 - r.agreement_with_reference, samples=r.samples)


def perplexity(lm: LoadedModel, tokens: int | None, device: str | None = None) -> float:
    """A causal LM's perplexity on the first `tokens` of the evaluation split (None: all of it), alone."""
    return evaluate(lm, config=EvalConfig(max_tokens=tokens), device=device).perplexity


def proxy_baseline(original: LoadedModel, config: OptimizeConfig) -> float:
    """The original's quality value on the proxy slice; for a causal LM one pass (its perplexity), no reference needed."""
    if original.kind != CAUSAL_LM:
        return assess(original, original, config.proxy_tokens, config.proxy_passages, device=config.device).value
    return perplexity(original, config.proxy_tokens, config.device)


def bench_in_subprocess(artifact: Path, threads: int | None, compile: bool = False, device: str = "cpu") -> BenchResult:
    """`slimkit bench ARTIFACT --json [--compile] --device DEVICE` in a fresh process: honest peak memory."""
    args = [sys.executable, "-m", "slimkit.cli", "bench", str(artifact), "--json", "--batch-sizes", "1,4", "--new-tokens", "32", "--device", device]
    if threads:
        args += ["--threads", str(threads)]
    if compile:
        args.append("--compile")
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "SLIMKIT_QUIET": "1"}, check=False)
    if proc.returncode != 0:
        raise SlimkitError(f"benchmarking {artifact} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return BenchResult.from_dict(json.loads(proc.stdout))


def benchmarked(artifact: Path, threads: int | None, compiled: bool = False, device: str = "cpu") -> Speed:
    """The artifact's speed on `device`, through torch.compile where `compiled` (falling back to eager where compiling fails)."""
    if not compiled:
        return _timed_bench(artifact, threads, False, device)
    try:
        return _timed_bench(artifact, threads, True, device)
    except SlimkitError as exc:
        speed = _timed_bench(artifact, threads, False, device)
        speed.compile_error = str(exc)
        return speed


def _timed_bench(artifact: Path, threads: int | None, compile: bool, device: str = "cpu") -> Speed:
    start = time.perf_counter()
    result = bench_in_subprocess(artifact, threads, compile, device)
    runtime = exported_runtime(artifact) or ("torch.compile" if compile else "eager")
    return Speed.of(result, runtime, round(time.perf_counter() - start, 1))


def exported_runtime(artifact: Path) -> str | None:
    """The runtime an exported artifact is served by (its manifest's); None for a PyTorch one."""
    try:
        runtime = json.loads((Path(artifact) / MANIFEST).read_text()).get("runtime", "torch")
    except (OSError, ValueError):
        return None
    return None if runtime == "torch" else runtime
