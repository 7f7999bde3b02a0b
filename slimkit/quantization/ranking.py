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

On a lazy model (`io.lazy`, a 7B that does not fit in memory whole) a pass of
the whole model per unit does not scale, and the default is metric="block-mse":
the relative error of the unit's own block's output, every block read from the
files once (block_local.py, where its agreement with KL is measured).

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

import contextlib
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
from slimkit.io.blockwise import read_whole
from slimkit.io.blockwise import start as start_walk
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel, copy_model, model_device, on_device
from slimkit.quantization.block_local import BLOCK_MSE, can_round, rounded, unit_errors
from slimkit.quantization.weight_only import rounder

METRICS = ("auto", "kl", "ppl", "cosine", BLOCK_MSE)
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
    metric: str = "auto"  # auto: kl for causal LMs and classifiers, cosine for encoders; block-mse on a lazy model
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
    if metric == BLOCK_MSE:
        return metric  # any model's blocks have outputs
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
        # a lazy model cannot run whole: its outputs come from a block-by-block pass (block_local)
        self.reference = None if lm.weights is not None else [self.outputs(lm.model, ids) for ids in self.batches]

    def outputs(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        ids = ids.to(device)
        with torch.inference_mode():
            if self.kind == CAUSAL_LM:
                return self.form(model(input_ids=ids, use_cache=False).logits)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            return self.form(out.last_hidden_state if self.kind == ENCODER else out.logits)

    def form(self, out: torch.Tensor) -> torch.Tensor:
        """The model's output (logits, or an encoder's last hidden state) as the probe compares it."""
        if self.kind == CAUSAL_LM:
            return out[:, :-1].float()  # (B, T-1, V)
        if self.kind == ENCODER:
            return F.normalize(out.float().mean(1), dim=-1)  # (B, H)
        return out.float()  # (B, C)

    def check(self, metric: str) -> str:
        """`metric` if it fits this model's kind; raises otherwise."""
        return resolve_metric(metric, self.kind)

    def losses(self, model: nn.Module) -> dict:
        """Summed loss terms of `model` against the float model over the probe batches."""
        return self.compare(self.outputs(model, ids) for ids in self.batches)

    def compare(self, outputs) -> dict:
        """Summed loss terms of outputs (one per probe batch, in `form`) against the float model's."""
        totals: dict[str, float] = {}
        for ids, ref, out in zip(self.batches, self.reference, outputs):
            for k, v in loss_terms(self.kind, out, ref, ids).items():
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
    """Quantize each unit alone, measure it against the float model, rank (most sensitive first).

    metric "auto" on a lazy model is block-mse (block_local.py), read block by block, where the method
    rounds to nearest; anything else on a lazy model reads it whole first."""
    start = time.perf_counter()
    base = method_config(config.method, config.options)
    block_by_block = lm.weights is not None and config.metric in ("auto", BLOCK_MSE) and can_round(base) and find(lm.model) is not None
    if lm.weights is not None and not block_by_block:
        lm = read_whole(lm, "")
        lm.donated = False  # each unit is quantized from it
    if block_by_block or config.metric == BLOCK_MSE:
        return _rank_blocks(lm, config, ctx, probe, start)
    technique = registry.get(config.method, "quantize")
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


def _rank_blocks(lm: LoadedModel, config: SensitivityConfig, ctx: Context, probe: Probe | None, start: float) -> SensitivityReport:
    """block-mse of each unit in one block-by-block pass (block_local.py). A lazy model's blocks are read
    from the files one at a time and the unit's layers rounded in them; in memory the method itself
    quantizes each unit alone, as for the other metrics. A lazy model's probe gets its reference outputs."""
    base = method_config(config.method, config.options)
    probe = probe or Probe(lm, "auto", ctx.data, config.calibration_samples, config.seq_len, config.batch_size)
    work = copy_model(lm, "sensitivity", lazy=True)
    if find(work.model) is None:
        raise SlimkitError(f"metric {BLOCK_MSE} needs a model whose transformer blocks slimkit knows, and {type(work.model).__name__} is not one: use metric auto")
    chosen = units(work.model, list(select_linears(work.model, tuple(base.targets), tuple(base.ignore))), config.granularity)
    groups: dict[str, list] = {}
    for u in chosen:
        groups.setdefault(u.root, []).append((u.name, u.layers))
    walk = start_walk(work, stream=False)
    walk.dtype = torch.float32  # blocks are measured in fp32, whatever the checkpoint holds
    if work.weights is not None:
        make = rounder(base)
        quantized = lambda prefix, root, layers: rounded(make, prefix, root, layers)  # noqa: E731
    else:
        quantized = _by_method(lm, config, ctx, model_device(work.model))
    label = f"Sensitivity of {len(chosen)} {config.granularity}s to {config.method} ({BLOCK_MSE})"
    found, outputs = unit_errors(walk, probe.batches, lm.kind == CAUSAL_LM, groups, quantized, label)
    if probe.reference is None:
        probe.reference = [probe.form(out) for out in outputs]
    scores = sorted((UnitSensitivity(u.name, u.layers, found.get(u.name, 0.0)) for u in chosen), key=lambda u: u.score, reverse=True)
    return SensitivityReport(lm.name, config.method, dict(config.options), config.granularity, BLOCK_MSE, probe.tokens,
                             round(time.perf_counter() - start, 3), scores)


def _by_method(lm: LoadedModel, config: SensitivityConfig, ctx: Context, device):
    """A unit's quantizer for block-mse in memory: the method quantizes the unit alone, its root is run."""
    technique = registry.get(config.method, "quantize")

    @contextlib.contextmanager
    def quantized(prefix: str, root: nn.Module, layers: tuple[str, ...]):
        q = technique.apply(lm, method_config(config.method, config.options, layers, embeddings=False), ctx)
        yield q.model.get_submodule(prefix).to(device)  # layers built on the CPU go where the model is

    return quantized


def sensitivity(model: LoadedModel | str, method: str = "int4-wo", options: dict | None = None, *, data=None, device: str | None = None,
                **settings) -> SensitivityReport:
    """Rank `model`'s layers (or blocks) by how much `method` hurts each alone.

        r = slimkit.sensitivity("smollm2-135m", "int4-wo", {"group_size": 64}, granularity="block")
        r.units[0].name, r.units[0].score   # the most sensitive block, its KL

    `settings` are SensitivityConfig's fields (granularity, metric, calibration_samples,
    seq_len, batch_size); metric="block-mse" scores each unit on its block's output
    (block_local.py), the default on a lazy model (`load(path, lazy=True)`), which is
    then read one block at a time; `data` as `slimkit.quantize` takes it (its
    calibration split is used); `device` where the probes run ("cpu", "cuda",
    "auto"; None: where the model is).
    """
    known = {f.name for f in fields(SensitivityConfig)} - {"method", "options"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SlimkitError(f"unknown setting(s) {', '.join(unknown)} for sensitivity: use {', '.join(sorted(known))}; method options go in options")
    config = SensitivityConfig(method, dict(options or {}), **settings)
    device = resolve_device(device)
    lm = on_device(read_whole(load(model), method, device), device)  # a lazy model stays lazy on the CPU (block-mse)
    lm.donated = False  # rank copies it once, and quantizes each unit from it
    return rank(lm, config, Context(D.calibration_source(data), device=device))
