"""The time budget of a search: wall time for the whole run, model loading included.

A candidate is tried only if the time left covers it and the final confirmation. Its cost is
estimated as the slowest candidate's so far (the first: as long as measuring the original
took), twice that for a rollback (a sensitivity ranking and a search over kept blocks before
the usual build, proxy and benchmark). The confirmation (`confirmation_seconds`) is scaled from
the original's proxy evaluation, and rescaled once candidates pass (`rescaled_reserve`): a
quantized model can be slower than the original in eager PyTorch. These are estimates, so a
machine that slows down mid-run, or a calibrated method much slower than the candidates before
it, overruns. The same test decides whether the original is also benchmarked through
torch.compile at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimkit.core import data as D
from slimkit.core.arch import CAUSAL_LM
from slimkit.io.model import LoadedModel
from slimkit.measure.quality import EvalConfig
from slimkit.search.config import OptimizeConfig

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
        ec = EvalConfig()

        def read(tokens):
            return sum(len(ids) for ids, _ in D.lm_windows(original.tokenizer, D.TextSource.parse(None).texts(), ec.window, ec.stride, tokens))

        ratio = 2 * read(config.full_tokens) / max(1, read(config.proxy_tokens))
    else:
        ratio = 4.0  # the full check reads 4x the proxy's passages
    return proxy_seconds * ratio + REPORT_SECONDS


def rescaled_reserve(reserve: float, original_proxy_s: float, passing_proxy_s: list[float]) -> float:
    """The confirmation's time, re-estimated once candidates are measured: it reads the
    original and the candidate, and a quantized model can be slower than the original in
    eager PyTorch (SmolLM2's int4 takes about 1.6x as long), so the candidate's half of
    `reserve` is scaled by the slowest proxy time of the candidates that passed the proxy
    (`passing_proxy_s`; one that failed is never confirmed)."""
    if not passing_proxy_s or original_proxy_s <= 0:
        return reserve
    half = (reserve - REPORT_SECONDS) / 2
    return REPORT_SECONDS + half + half * max(passing_proxy_s) / original_proxy_s


@dataclass
class TimeBudget:
    """What is left of the run's wall time (`time.perf_counter()` seconds), and what it must cover."""

    deadline: float
    first: float  # a candidate's cost before any was tried: what measuring the original took
    reserve: float  # kept for the confirmation and the report (`confirmation_seconds`)
    original_proxy_s: float  # the original's proxy evaluation, which `reserve` was scaled from
    spent: list[float] = field(default_factory=list)  # seconds per tried candidate
    initial_reserve: float = field(init=False)

    def __post_init__(self):
        self.initial_reserve = self.reserve

    def expected(self, rollback: bool) -> float:
        """A candidate's estimated cost: the slowest so far, twice that for a rollback."""
        return (2 if rollback else 1) * (max(self.spent) if self.spent else self.first)

    def covers(self, seconds: float, now: float) -> bool:
        """Whether `seconds` of work from `now` leave the reserve for the end."""
        return seconds + self.reserve <= self.deadline - now

    def refusal(self, rollback: bool, now: float) -> str | None:
        """Why a candidate is not tried at `now` for want of time, or None where it fits."""
        expected = self.expected(rollback)
        if self.covers(expected, now):
            return None
        return (f"not tried: the time budget left ({max(0.0, self.deadline - now):.0f} s) would not cover it (about {expected:.0f} s) "
                f"and the final confirmation (about {self.reserve:.0f} s): raise --time-budget")

    def record(self, seconds: float, passing_proxy_s: list[float]) -> None:
        """A candidate took `seconds`; the reserve grows with the slowest passing proxy (never shrinks)."""
        self.spent.append(seconds)
        self.reserve = max(self.reserve, rescaled_reserve(self.initial_reserve, self.original_proxy_s, passing_proxy_s))
