"""Mixed precision: a low-precision method where it is harmless, a higher one where it hurts.

A model rarely suffers evenly: a few layers (often the first and last blocks,
or the MLP down-projections that carry outlier features) account for most of
int4's loss. `mixed` ranks the layers the low method would quantize by
sensitivity (`ranking.py`: each unit quantized alone, measured against
the float model), then keeps the most sensitive units at the high precision
(`high`: another method such as int8-wo, or `none` to leave them in float)
until a quality budget holds on the calibration batches:

  max_kl            KL(float || mixed) of next-token distributions, nats/token
  max_ppl_increase  relative perplexity increase, a fraction (0.01 = +1%)
  max_cosine_drop   encoders: 1 - cosine of sentence embeddings

The search is greedy in sensitivity order and measures the whole mixed model,
not a sum of single-unit scores, since errors interact. It measures all-low
first (done if that fits), then all-high (if even that misses, every unit
stays high and the report says the budget was not met), then bisects on the
number of units kept high: about log2(units) + 2 measurements, 7 for a
30-block model. Bisection assumes that keeping more units high does not
hurt; where noise breaks that, the answer still meets the budget (only
measured assignments are accepted) but may keep a unit more than needed.

The recorded recipe holds the outcome in `high_layers` (exact layer names), and
a config with `high_layers` set skips the search, so a recipe reproduces the
same model without measuring anything. Embeddings follow the low method's
`embeddings` option; the high method never touches them.

A lazy model (`load(path, lazy=True)`, one too big to hold whole) goes block by
block where both methods round each layer alone (int4-wo, int8-wo, nf4, or high
`none`): the ranking is block-mse (each unit scored on its own block's output,
block_local.py) rather than KL, every measurement of an assignment is one pass
that reads each block from the files, quantizes it as assigned and runs the probe
through it, still scored on the whole model's output against the float one, and
the chosen model is built and streamed the same way. With calibrated methods a
lazy model is read whole.

Options of the two methods nest, the same in Python, YAML and on the CLI:

    slimkit.quantize(lm, "mixed", low="int4-wo", low_options={"group_size": 64}, high="int8-wo", max_kl=0.02)
    - {method: mixed, low: int4-wo, low_options: {group_size: 64}, high: int8-wo, max_kl: 0.02}
    slimkit quantize M --method mixed -o low=int4-wo -o low.group_size=64 -o high=int8-wo -o max_kl=0.02
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from slimkit.core import data as D
from slimkit.core import registry
from slimkit.core.adapter import find
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import note
from slimkit.core.registry import Context, register
from slimkit.core.selection import select_linears
from slimkit.io.blockwise import read_whole, start
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel, copy_model
from slimkit.quantization.block_local import Assignment, Side, can_round, mixed_pass
from slimkit.quantization.embedding import head_grid, quantize_embeddings
from slimkit.quantization.ranking import Probe, SensitivityConfig, SensitivityReport, check_granularity, check_probe, finish, method_config, rank

NONE = "none"  # high precision = keep the layers in float
BUDGETS = {"max_kl": "kl", "max_ppl_increase": "ppl", "max_cosine_drop": "cosine"}
_CHOSEN_BY_MIXED = ("targets", "ignore", "embeddings")


@dataclass(frozen=True)
class MixedConfig:
    low: str = "int4-wo"
    high: str = "int8-wo"  # or "none": keep the sensitive layers in float
    low_options: dict = field(default_factory=dict)  # the low method's options; its targets/ignore choose the layers
    high_options: dict = field(default_factory=dict)
    max_kl: float | None = None
    max_ppl_increase: float | None = None
    max_cosine_drop: float | None = None
    granularity: str = "block"  # rank and keep whole blocks, or single layers
    calibration_samples: int = 4  # probe: calibration windows of seq_len tokens
    seq_len: int = 256
    batch_size: int = 4
    high_layers: tuple[str, ...] | None = None  # the outcome; when set, no search

    def __post_init__(self):
        for side in ("low", "high"):
            options = getattr(self, f"{side}_options")
            if not isinstance(options, dict):
                raise SlimkitError(f"{side}_options must be a mapping, got {options!r}: write e.g. {side}_options={{'group_size': 64}}")
            object.__setattr__(self, f"{side}_options", {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()})
        self._check_methods()
        self._check_budget()
        check_granularity(self.granularity)
        check_probe("auto", self.calibration_samples, self.seq_len, self.batch_size)
        if self.high_layers is not None and (isinstance(self.high_layers, str) or not all(isinstance(n, str) and n for n in self.high_layers)):
            raise SlimkitError(f"high_layers must be a list of layer names, got {self.high_layers!r}")

    def _check_methods(self) -> None:
        if self.low in (NONE, "mixed"):
            raise SlimkitError(f"low='{self.low}' cannot be the low precision: name a quantize method such as int4-wo, nf4 or gptq")
        if self.high == "mixed":
            raise SlimkitError("high='mixed' cannot nest: name a quantize method such as int8-wo, or none to keep float")
        _side_config("low", self.low, self.low_options)
        if self.high == NONE:
            if self.high_options:
                raise SlimkitError("high='none' keeps the layers in float and takes no options: remove high_options")
            return
        taken = sorted(set(self.high_options) & set(_CHOSEN_BY_MIXED))
        if taken:
            raise SlimkitError(f"high_options cannot set {', '.join(taken)}: mixed chooses the high layers, and the low method's options decide targets, ignore and embeddings")
        _side_config("high", self.high, self.high_options)
        if self.high == self.low and self.high_options == self.low_options:
            raise SlimkitError(f"low and high are both {self.low} with the same options: choose a higher precision, e.g. high=int8-wo or high=none")

    def _check_budget(self) -> None:
        given = {k: getattr(self, k) for k in BUDGETS if getattr(self, k) is not None}
        if len(given) > 1:
            raise SlimkitError(f"mixed takes one quality budget, got {' and '.join(given)}: keep one")
        if not given and self.high_layers is None:
            raise SlimkitError("mixed needs a quality budget: set max_kl (e.g. 0.02), max_ppl_increase (a fraction, e.g. 0.01) or max_cosine_drop (encoders, e.g. 0.001)")
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise SlimkitError(f"{key}={value!r} is out of range: use a positive number, e.g. {key}=0.01")
            if key != "max_kl" and value >= 1:
                raise SlimkitError(f"{key}={value} is out of range: it is a fraction below 1, e.g. {key}=0.01 for 1%")

    @property
    def budget(self) -> tuple[str, float] | None:
        """(metric, bound) of the quality budget, or None."""
        return next(((m, getattr(self, k)) for k, m in BUDGETS.items() if getattr(self, k) is not None), None)


def _side_config(side: str, method: str, options: dict):
    try:
        return method_config(method, options)
    except SlimkitError as exc:
        raise SlimkitError(f"{side}={method}: {exc}") from None


# --------------------------------------------------------------------------- building


def candidate_layers(lm: LoadedModel, config: MixedConfig) -> list[str]:
    """The linear layers the low method would quantize (its targets / ignore)."""
    low = method_config(config.low, config.low_options)
    return list(select_linears(lm.model, tuple(low.targets), tuple(low.ignore)))


def _split(lm: LoadedModel, config: MixedConfig, high_layers) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The candidate layers kept high and those made low, in the model's order."""
    layers = candidate_layers(lm, config)
    unknown = sorted(set(high_layers) - set(layers))
    if unknown:
        raise SlimkitError(f"high_layers names {unknown[0]}, which the low method does not quantize here: check the names against the model (or low_options targets/ignore)")
    high = tuple(n for n in layers if n in set(high_layers))
    return high, tuple(n for n in layers if n not in set(high))


def block_by_block(lm: LoadedModel, config: MixedConfig) -> bool:
    """Whether `lm` is lazy and both methods round each layer alone, so mixed goes block by block (block_local.py)."""
    rounds = can_round(method_config(config.low, config.low_options)) and (config.high == NONE or can_round(method_config(config.high, config.high_options)))
    return lm.weights is not None and rounds and find(lm.model) is not None


def _whole(lm: LoadedModel) -> LoadedModel:
    """A lazy model read whole from its files, for methods that cannot go block by block; each
    assignment is quantized from it, so it is not given away."""
    lm = read_whole(lm, "")
    lm.donated = False
    return lm


def plan(lm: LoadedModel, config: MixedConfig, high_layers) -> Assignment:
    """`assemble`'s steps as data, for a block-by-block pass."""
    high, low = _split(lm, config, high_layers)
    low_config = method_config(config.low, config.low_options, low) if low else None
    return Assignment(Side(method_config(config.high, config.high_options, high, embeddings=False), frozenset(high)) if high and config.high != NONE else None,
                      Side(low_config, frozenset(low)) if low else None, bool(getattr(method_config(config.low, config.low_options), "embeddings", False)),
                      head_grid(low_config) if low_config is not None else None)


def assemble(lm: LoadedModel, config: MixedConfig, high_layers, ctx: Context = Context()) -> LoadedModel:
    """The mixed model: `high_layers` at the high precision, the other candidates at the low one.
    A lazy model is built block by block (and streamed, with `ctx.stream`) where both methods can."""
    if block_by_block(lm, config):
        q = copy_model(lm, "mixed", lazy=True)
        walk = start(q, ctx.stream)
        mixed_pass(walk, plan(lm, config, high_layers))
        return walk.close()
    if lm.weights is not None:
        lm = _whole(lm)
    high, low = _split(lm, config, high_layers)
    q = lm
    if high and config.high != NONE:
        q = registry.get(config.high, "quantize").apply(q, method_config(config.high, config.high_options, high, embeddings=False), ctx)
    low_config = method_config(config.low, config.low_options, low) if low else None
    if low_config is not None:
        q = registry.get(config.low, "quantize").apply(q, low_config, ctx)
    if q is lm:
        q = copy_model(lm, "mixed")
    if low_config is None and getattr(method_config(config.low, config.low_options), "embeddings", False):
        quantize_embeddings(q.model)  # every layer high: the embeddings still follow the low method
    q.source = f"{lm.source}+mixed"
    q.manifest["recipe"] = list(lm.manifest.get("recipe", []))  # the sub-methods' steps are not the recipe
    return q


# --------------------------------------------------------------------------- searching


@dataclass
class MixedReport:
    metric: str
    budget: float
    met: bool
    score: float  # the chosen model's loss on the probe batches
    high_layers: list[str]
    low_layers: list[str]
    tried: list[dict]  # {"high_units", "high_layers", "score"} in the order measured
    sensitivity: SensitivityReport
    seconds: float

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sensitivity"] = self.sensitivity.to_dict()
        return out


def choose(lm: LoadedModel, config: MixedConfig, ctx: Context = Context(), ranking: SensitivityReport | None = None) -> tuple[LoadedModel, MixedReport]:
    """Rank, then keep the fewest most-sensitive units high that meet the budget."""
    if config.budget is None:
        raise SlimkitError("mixed needs a quality budget to search: set max_kl, max_ppl_increase or max_cosine_drop")
    began = time.perf_counter()
    metric, bound = config.budget
    lazy = block_by_block(lm, config)
    if lm.weights is not None and not lazy:
        lm = _whole(lm)
    probe = Probe(lm, "auto", ctx.data, config.calibration_samples, config.seq_len, config.batch_size)
    probe.check(metric)
    if ranking is None:  # on a lazy model: block-mse, and the pass gives the probe its reference
        sens = SensitivityConfig(config.low, config.low_options, config.granularity, "auto", config.calibration_samples, config.seq_len, config.batch_size)
        ranking = rank(lm, sens, ctx, probe)
    if probe.reference is None:
        probe.reference = [probe.form(out) for out in _outputs(lm, None, probe)]
    order = ranking.units
    tried: list[dict] = []

    def measure(k: int) -> tuple[LoadedModel | None, float]:
        high = [n for u in order[:k] for n in u.layers]
        if lazy:  # one block-by-block pass; only the chosen assignment is built, at the end
            model, totals = None, probe.compare(probe.form(out) for out in _outputs(lm, plan(lm, config, high), probe))
        else:
            model = assemble(lm, config, high, ctx)
            totals = probe.losses(model.model)
        score = finish(metric, totals)
        tried.append({"high_units": k, "high_layers": len(high), "score": score})
        return model, score

    best, score = measure(0)
    k = 0
    if score > bound:
        best, score = measure(len(order))
        k = len(order)
        if score <= bound:  # invariant: lo misses the budget, hi meets it
            lo = 0
            while k - lo > 1:
                mid = (lo + k) // 2
                model, s = measure(mid)
                if s <= bound:
                    best, score, k = model, s, mid
                else:
                    lo = mid
    high = [n for u in order[:k] for n in u.layers]
    if best is None:
        best = assemble(lm, config, high, ctx)
    report = MixedReport(metric, bound, score <= bound, score, high, [n for n in ranking.layers() if n not in set(high)], tried, ranking,
                         round(time.perf_counter() - began, 3))
    verdict = "meets" if report.met else "misses (even with every unit high)"
    note(f"mixed: {k} of {len(order)} {ranking.granularity}s kept at {config.high}; {metric} {score:.4g} {verdict} the budget {bound:g}")
    return best, report


def _outputs(lm: LoadedModel, assignment: Assignment | None, probe: Probe) -> list:
    """The outputs of `lm` with `assignment` built (None: the float model) on the probe's batches, in one
    block-by-block pass over a fresh lazy copy: one block in memory at a time, nothing kept."""
    walk = start(copy_model(lm, "mixed", lazy=True), stream=False)
    walk.dtype = torch.float32  # measured in fp32, whatever the checkpoint holds
    return mixed_pass(walk, assignment or Assignment(None, None, False, None), probe.batches, lm.kind == CAUSAL_LM, "Measuring (mixed)")


def fallback(lm: LoadedModel | str, method: str, options: dict | None = None, high: str = "int8-wo", budget: dict | None = None,
             data=None, *, high_options: dict | None = None, granularity: str = "block", ranking: SensitivityReport | None = None) -> tuple[LoadedModel, MixedReport]:
    """Roll the layers that `method` hurts most back to `high` until `budget` holds.

        q, report = fallback(lm_float, "int4-wo", {"group_size": 64}, "int8-wo", {"max_ppl_increase": 0.01})

    For a search (`slimkit optimize`) whose candidate narrowly misses its
    quality budget. `budget` is one of {"max_kl": x}, {"max_ppl_increase": x},
    {"max_cosine_drop": x}; a `ranking` from an earlier `rank` call with the
    same method and options is reused. The model's recipe records the outcome.
    """
    unknown = sorted(set(budget or {}) - set(BUDGETS))
    if unknown or not budget:
        raise SlimkitError(f"budget must be one of {', '.join(BUDGETS)} with a value, got {budget!r}: e.g. {{'max_kl': 0.02}}")
    config = MixedConfig(low=method, low_options=dict(options or {}), high=high, high_options=dict(high_options or {}), granularity=granularity, **budget)
    q, report = choose(load(lm), config, Context(D.calibration_source(data)), ranking)
    return q.record("quantize", "mixed", replace(config, high_layers=tuple(report.high_layers))), report


@register("mixed", "quantize", MixedConfig, "mixed precision: low method where harmless, high (int8-wo / none) on the most sensitive layers, to a quality budget")
def apply(model, config: MixedConfig, ctx: Context = Context()):
    if config.high_layers is not None:
        return assemble(model, config, config.high_layers, ctx).record("quantize", "mixed", config)
    q, report = choose(model, config, ctx)
    return q.record("quantize", "mixed", replace(config, high_layers=tuple(report.high_layers)))
