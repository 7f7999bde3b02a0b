"""A candidate of the search, typed: what was tried, how it fared, and what was measured.

`Candidate.to_dict()` is its entry in results.json (and `slimkit optimize --json`), the keys the
README's "JSON interface" documents: name, recipe, metrics, passed, reason, stage, then export,
rollback and seconds where they apply. Its metrics serialise flat, in the order they were
measured: the quality (`quality_value`, `quality_drop` and the evaluation's own figures), the
proxy's drop and seconds, the benchmark's figures (`Speed`, filled from the `BenchResult` the
benchmark process hands back) and, once confirmed, the full split's drop. A figure not measured
is absent, as before; one measured as None (a KL divergence against a perplexity alone) is null.

`ranked` orders the proxy-passing candidates: by the target metric, where measured speeds (and
memory) within `tolerance` of the best count as a tie — minutes apart on a shared CPU they drift
by that much — and a tie goes to the smaller quality drop (exact and repeatable for one seed),
then to the name. Size on disk is exact: no tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from slimkit.core.recipe import Recipe
from slimkit.search.config import Target

if TYPE_CHECKING:
    from slimkit.exporters import ExportConfig
    from slimkit.measure.speed import BenchResult


@dataclass
class Quality:
    """Quality against the original: `value` (perplexity, embedding cosine or agreement) and `drop`
    (perplexity ratio - 1, or 1 - cosine / agreement), the fraction the quality budget bounds."""

    value: float
    drop: float

    @property
    def original_value(self) -> float:
        """The original's value on the same evaluation: cosine / agreement with itself."""
        return 1.0

    def to_dict(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in fields(self)[2:]}
        return {"quality_value": self.value, "quality_drop": self.drop, **own}


@dataclass
class CausalQuality(Quality):
    kl_divergence: float | None  # None where compared with the original's perplexity alone
    top1_agreement: float | None
    reference_quality: float  # the original's perplexity on the same tokens
    tokens: int

    @property
    def original_value(self) -> float:
        return self.reference_quality


@dataclass
class EncoderQuality(Quality):
    retrieval_top10_overlap: float | None
    samples: int


@dataclass
class ClassifierQuality(Quality):
    samples: int


@dataclass
class Speed:
    """What the search keeps of a benchmark, and which runtime ran the timed work."""

    latency_ms_p50: float
    decode_tokens_per_s: float | None
    prefill_tokens_per_s: float | None
    throughput_tokens_per_s: float  # the best over the batch sizes
    peak_memory_mb: float | None
    size_on_disk_mb: float | None
    runtime: str  # eager, torch.compile, or the export's runtime (onnxruntime, ort-genai, tensorrt)
    decode_runtime: str | None
    compile_seconds: float | None
    bench_seconds: float  # the benchmark process's wall time
    compile_error: str | None = None  # compiling failed, so this was measured eagerly (a key only then)
    environment: dict = field(default_factory=dict, repr=False)  # recorded once per run, never per candidate

    @classmethod
    def of(cls, result: BenchResult, runtime: str, seconds: float) -> Speed:
        return cls(latency_ms_p50=result.latency_ms.p50, decode_tokens_per_s=result.decode_tokens_per_s,
                   prefill_tokens_per_s=result.prefill_tokens_per_s, throughput_tokens_per_s=result.best_tokens_per_s,
                   peak_memory_mb=result.peak_memory_mb, size_on_disk_mb=result.size_on_disk_mb, runtime=runtime,
                   decode_runtime=result.decode_runtime, compile_seconds=result.compile_seconds, bench_seconds=seconds,
                   environment=result.environment)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("compile_error", "environment")}
        if self.compile_error is not None:
            out["compile_error"] = self.compile_error
        return out


@dataclass
class Metrics:
    quality: Quality | None = None  # the proxy's, then the full evaluation's once confirmed
    proxy_quality_drop: float | None = None
    proxy_seconds: float | None = None
    speed: Speed | None = None
    full_quality_drop: float | None = None

    def value(self, metric: str) -> float | None:
        """A benchmark figure by its name (a `Target.metric`); None where not measured."""
        return None if self.speed is None else getattr(self.speed, metric)

    def to_dict(self) -> dict:
        out = self.quality.to_dict() if self.quality is not None else {}
        if self.proxy_quality_drop is not None:
            out["proxy_quality_drop"] = self.proxy_quality_drop
        if self.proxy_seconds is not None:
            out["proxy_seconds"] = self.proxy_seconds
        if self.speed is not None:
            out.update(self.speed.to_dict())
        if self.full_quality_drop is not None:
            out["full_quality_drop"] = self.full_quality_drop
        return out


@dataclass
class RolledBack:
    """This candidate is a near miss rolled back: `high` kept on `kept_high` of its blocks."""

    of: str
    high: str
    kept_high: str  # "3 of 30 blocks"
    probe_metric: str
    probe_bound: float
    probe_score: float
    seconds: float


@dataclass
class RollbackPlanned:
    planned: str  # the rollback's candidate name
    probe_score: float  # this near miss's loss on the calibration probe
    probe_bound: float  # what the rollback may lose there


@dataclass
class RollbackSkipped:
    skipped: str  # why this near miss is not rolled back


@dataclass(eq=False)  # one trial, known by identity: two may measure alike
class Candidate:
    name: str
    recipe: Recipe
    export: ExportConfig | None = None  # applied after the recipe's steps
    passed: bool = False
    reason: str = ""
    stage: str = "proxy"  # proxy, full (measured on the whole evaluation split) or skipped (not tried)
    metrics: Metrics = field(default_factory=Metrics)
    rollback: RolledBack | RollbackPlanned | RollbackSkipped | None = None
    artifact: Path | None = None  # where it was saved for its benchmark: work space, not results
    seconds: float | None = None  # the wall time trying it took

    def to_dict(self) -> dict:
        out = {"name": self.name, "recipe": self.recipe.to_dict(), "metrics": self.metrics.to_dict(), "passed": self.passed,
               "reason": self.reason, "stage": self.stage}
        if self.export is not None:
            out["export"] = {k: v for k, v in asdict(self.export).items() if v is not None}
        if self.rollback is not None:
            out["rollback"] = asdict(self.rollback)
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out


@dataclass
class Baseline:
    """The original model's figures: its benchmark, and its quality on the slice the candidates' was measured on
    (its drop against itself is 0, in the same key as a candidate's)."""

    speed: Speed
    quality_value: float
    quality_on: str  # "proxy", or "full" once a winner is confirmed on the full split

    def to_dict(self) -> dict:
        return {**self.speed.to_dict(), "quality_value": self.quality_value, "quality_drop": 0.0, "quality_on": self.quality_on}


def ranked(candidates: list[Candidate], target: Target, tolerance: float) -> list[Candidate]:
    """Proxy-passing candidates, best first, in a repeatable order.

    The best remaining candidate on the target metric and every candidate
    within `tolerance` of it (for noisy targets) form a tie, ordered by the
    smaller quality drop, then by name; then the next best, and so on.
    """
    rest = [c for c in candidates if c.passed and c.metrics.value(target.metric) is not None]
    sign = 1 if target.higher_is_better else -1
    rest.sort(key=lambda c: (-sign * c.metrics.value(target.metric), c.name))
    tol = tolerance if target.noisy else 0.0
    out: list[Candidate] = []
    while rest:
        lead = rest[0].metrics.value(target.metric)
        edge = lead * (1 - tol) if target.higher_is_better else lead * (1 + tol)
        tie = [c for c in rest if sign * c.metrics.value(target.metric) >= sign * edge]
        tie.sort(key=lambda c: (c.metrics.quality.drop, c.name))
        out += tie
        rest = [c for c in rest if c not in tie]
    return out
