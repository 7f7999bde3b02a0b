"""Per-layer sensitivity: which layers a quantization method hurts most.

Each unit (one linear layer, or the linears of one transformer block) is
quantized alone with the chosen method and options while everything else
stays in float, and the model's outputs on a few calibration batches are
compared with the float model's:

  causal LMs   KL(float || quantized) of the next-token distributions, mean
               nats per token, as in `core.metrics.next_token_stats`
               (metric="ppl": the relative perplexity increase instead);
  encoders     1 - cosine of the mean-pooled sentence embeddings;
  classifiers  KL of the class distributions.

The ranking (most sensitive first) says where a method's loss comes from and
which layers to keep at a higher precision (`mixed.py`).

How it stays cheap: the float model's outputs are computed once (a `Probe`).
For each unit the method itself quantizes only that unit — its own `targets`
option set to the unit's exact layer names, so every method with `targets`
works, calibrated ones included — and the unit's enclosing block is swapped
into one working copy of the model, measured, and the float block put back.
A unit thus costs one quantization of its layers (plus the method's own copy
of the model, and its calibration if it has one) and one forward pass over
the probe batches. With `granularity="block"` a 30-block model is 30 passes
instead of 210. The blocks are the architecture adapter's (`core.adapter`);
in a model it does not know, each layer is its own unit. Embeddings are never
quantized here (`embeddings=False`): the ranking is about the linear layers.

Trade-offs: a single-unit score ignores interactions (errors of two layers
can add up or cancel), so `mixed` measures the whole mixed model before it
accepts an assignment. A few hundred probe tokens make noisy absolute
numbers, but every unit is measured on the same tokens, so the order holds.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core import data as D
from slimkit.core import registry
from slimkit.core.adapter import find
from slimkit.core.arch import CAUSAL_LM, ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import resolve_device
from slimkit.core.metrics import next_token_stats
from slimkit.core.options import make_config
from slimkit.core.progress import track
from slimkit.core.registry import Context
from slimkit.core.selection import select_linears, set_module
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel, copy_model, model_device, on_device

METRICS = ("auto", "kl", "ppl", "cosine")
GRANULARITIES = ("block", "layer")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise SlimkitError(f"granularity '{granularity}' is unknown: use block (each transformer block) or layer (each linear)")


def check_probe(metric: str, calibration_samples: int, seq_len: int, batch_size: int) -> None:
    if metric not in METRICS:
        raise SlimkitError(f"metric '{metric}' is unknown: use one of {', '.join(METRICS)}")
    if calibration_samples < 1 or seq_len < 8 or batch_size < 1:
        raise SlimkitError(f"the probe needs calibration_samples >= 1, seq_len >= 8 and batch_size >= 1, got {calibration_samples}, {seq_len} and {batch_size}")


@dataclass(frozen=True)
class SensitivityConfig:
    method: str = "int4-wo"
    options: dict = field(default_factory=dict)  # the method's own options
    granularity: str = "block"
    metric: str = "auto"  # auto: kl for causal LMs and classifiers, cosine for encoders
    calibration_samples: int = 4  # probe: calibration windows of seq_len tokens
    seq_len: int = 256
    batch_size: int = 4

    def __post_init__(self):
        check_granularity(self.granularity)
        check_probe(self.metric, self.calibration_samples, self.seq_len, self.batch_size)
        if not isinstance(self.options, dict):
            raise SlimkitError(f"options must be a mapping of the method's options, got {self.options!r}: write e.g. {{'group_size': 64}}")
        method_config(self.method, self.options)


# --------------------------------------------------------------------------- choosing layers


def exact(name: str) -> str:
    """A `targets` pattern that matches this qualified name only (glob characters escaped)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def method_config(method: str, options: dict, layers: tuple[str, ...] | None = None, embeddings: bool | None = None):
    """`method`'s Config from `options`; with `layers`, restricted to exactly those linears.

    `embeddings` overrides the method's option of that name where it has one.
    """
    technique = registry.get(method, "quantize")
    names = {f.name for f in fields(technique.config_cls)}
    if "targets" not in names:
        able = sorted(t.name for t in registry.techniques("quantize") if "targets" in {f.name for f in fields(t.config_cls)})
        raise SlimkitError(f"method '{method}' has no targets option, so it cannot quantize chosen layers: use one of {', '.join(able)}")
    options = dict(options)
    if layers is not None:
        options.update(targets=tuple(exact(n) for n in layers), ignore=())
    if embeddings is not None and "embeddings" in names:
        options["embeddings"] = embeddings
    return make_config(method, options, "quantize")


@dataclass(frozen=True)
class Unit:
    name: str  # the block ("model.layers.3") or the layer
    layers: tuple[str, ...]  # its linear layers that the method quantizes
    root: str  # the module swapped in and out: the enclosing block


def units(model: nn.Module, layers: list[str], granularity: str) -> list[Unit]:
    """The units to measure: each layer, or the layers of each block (the architecture
    adapter's blocks; a layer outside them, or any layer of a model it does not know, is its own block)."""
    arch = find(model)

    def block_of(name: str) -> str:
        return (arch.block_of(name) if arch else None) or name

    if granularity == "layer":
        return [Unit(n, (n,), block_of(n)) for n in layers]
    groups: dict[str, list[str]] = {}
    for n in layers:
        groups.setdefault(block_of(n), []).append(n)
    return [Unit(block, tuple(names), block) for block, names in groups.items()]


# --------------------------------------------------------------------------- measuring


def resolve_metric(metric: str, kind: str) -> str:
    fits = {CAUSAL_LM: ("kl", "ppl"), ENCODER: ("cosine",)}.get(kind, ("kl",))
    if metric == "auto":
        return fits[0]
    if metric not in fits:
        raise SlimkitError(f"metric '{metric}' does not fit a {kind} model: use {' or '.join(fits)}")
    return metric


def loss_terms(kind: str, out: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> dict:
    """Sums over one batch that `finish` turns into a quality loss.

    causal LM: out, ref (B, T-1, V) logits, ids (B, T); encoder: out, ref (B, H)
    unit-norm embeddings; classifier: out, ref (B, C) logits.
    """
    if kind == CAUSAL_LM:
        v = out.shape[-1]
        return next_token_stats(out.reshape(-1, v), ids[:, 1:].reshape(-1).to(out.device), ref.reshape(-1, v))
    if kind == ENCODER:
        return {"cos_drop": (1 - (out * ref).sum(-1)).sum().item(), "n": out.shape[0]}
    return next_token_stats(out, ref.argmax(-1), ref)


def finish(metric: str, totals: dict) -> float:
    n = totals["n"]
    if metric == "kl":
        return totals["kl"] / n
    if metric == "ppl":
        return float(torch.tensor((totals["nll"] - totals["ref_nll"]) / n).exp()) - 1
    return totals["cos_drop"] / n


class Probe:
    """Calibration batches and the float model's outputs on them, computed once."""

    def __init__(self, lm: LoadedModel, metric: str = "auto", data: D.TextSource | None = None, calibration_samples: int = 4, seq_len: int = 256, batch_size: int = 4):
        check_probe(metric, calibration_samples, seq_len, batch_size)
        self.kind = lm.kind
        self.metric = resolve_metric(metric, lm.kind)
        source = data or D.TextSource.parse(None, "calibration")
        self.batches = list(D.calibration_batches(lm.tokenizer, source, seq_len, calibration_samples, batch_size))
        self.tokens = sum(ids.numel() for ids in self.batches)
        self.reference = [self.outputs(lm.model, ids) for ids in self.batches]

    def outputs(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        ids = ids.to(device)
        with torch.inference_mode():
            if self.kind == CAUSAL_LM:
                return model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            if self.kind == ENCODER:
                return F.normalize(out.last_hidden_state.float().mean(1), dim=-1)  # (B, H)
            return out.logits.float()  # (B, C)

    def check(self, metric: str) -> str:
        """`metric` if it fits this model's kind; raises otherwise."""
        return resolve_metric(metric, self.kind)

    def losses(self, model: nn.Module) -> dict:
        """Summed loss terms of `model` against the float model over the probe batches."""
        totals: dict[str, float] = {}
        for ids, ref in zip(self.batches, self.reference):
            for k, v in loss_terms(self.kind, self.outputs(model, ids), ref, ids).items():
                totals[k] = totals.get(k, 0) + v
        return totals

    def score(self, model: nn.Module) -> float:
        """Quality loss of `model` in this probe's metric (0: identical to the float model)."""
        return finish(self.metric, self.losses(model))


# --------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class UnitSensitivity:
    name: str
    layers: tuple[str, ...]
    score: float  # quality loss with this unit alone quantized

    def to_dict(self) -> dict:
        return {"name": self.name, "layers": list(self.layers), "score": self.score}


@dataclass
class SensitivityReport:
    model: str
    method: str
    options: dict
    granularity: str
    metric: str
    tokens: int
    seconds: float
    units: list[UnitSensitivity]  # most sensitive first

    def to_dict(self) -> dict:
        out = asdict(self)
        out["units"] = [u.to_dict() for u in self.units]
        return out

    def layers(self) -> list[str]:
        """Every ranked linear layer, most sensitive unit first."""
        return [n for u in self.units for n in u.layers]


def rank(lm: LoadedModel, config: SensitivityConfig, ctx: Context = Context(), probe: Probe | None = None) -> SensitivityReport:
    """Quantize each unit alone, measure it against the float model, rank (most sensitive first)."""
    start = time.perf_counter()
    technique = registry.get(config.method, "quantize")
    base = method_config(config.method, config.options)
    layers = list(select_linears(lm.model, tuple(base.targets), tuple(base.ignore)))
    probe = probe or Probe(lm, config.metric, ctx.data, config.calibration_samples, config.seq_len, config.batch_size)
    work = copy_model(lm, "sensitivity")
    chosen = units(work.model, layers, config.granularity)
    scores = []
    for unit in track(chosen, f"Sensitivity of {len(chosen)} {config.granularity}s to {config.method}", total=len(chosen)):
        quantized = technique.apply(lm, method_config(config.method, config.options, unit.layers, embeddings=False), ctx)
        swapped = quantized.model.get_submodule(unit.root).to(model_device(work.model))  # layers built on the CPU go where the model is
        del quantized
        float_root = work.model.get_submodule(unit.root)
        set_module(work.model, unit.root, swapped)
        try:
            scores.append(UnitSensitivity(unit.name, unit.layers, probe.score(work.model)))
        finally:
            set_module(work.model, unit.root, float_root)
    scores.sort(key=lambda u: u.score, reverse=True)
    return SensitivityReport(lm.name, config.method, dict(config.options), config.granularity, probe.metric, probe.tokens,
                             round(time.perf_counter() - start, 3), scores)


def sensitivity(model: LoadedModel | str, method: str = "int4-wo", options: dict | None = None, *, data=None, device: str | None = None,
                **settings) -> SensitivityReport:
    """Rank `model`'s layers (or blocks) by how much `method` hurts each alone.

        r = slimkit.sensitivity("smollm2-135m", "int4-wo", {"group_size": 64}, granularity="block")
        r.units[0].name, r.units[0].score   # the most sensitive block, its KL

    `settings` are SensitivityConfig's fields (granularity, metric, calibration_samples,
    seq_len, batch_size); `data` as `slimkit.quantize` takes it (its
    calibration split is used); `device` where the probes run ("cpu", "cuda",
    "auto"; None: where the model is).
    """
    known = {f.name for f in fields(SensitivityConfig)} - {"method", "options"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SlimkitError(f"unknown setting(s) {', '.join(unknown)} for sensitivity: use {', '.join(sorted(known))}; method options go in options")
    config = SensitivityConfig(method, dict(options or {}), **settings)
    device = resolve_device(device)
    lm = on_device(load(model), device)
    lm.donated = False  # rank copies it once, and quantizes each unit from it
    return rank(lm, config, Context(D.calibration_source(data), device=device))
