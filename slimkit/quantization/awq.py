"""AWQ: activation-aware weight-only int4/int8 (the search is in awq_math.py).

Each group of layers that reads one input (q/k/v, gate/up, o_proj, down_proj,
GPT-2's c_attn, ...) gets per-input-channel scales s (K,) from calibration
activations: the layers store Q(W diag(s)) and read x / s. Where the 1 / s
goes decides the cost at run time:

  * folded into the layer that produces x, for free: an elementwise norm whose
    output feeds only this group (its weight, and bias, divided by s), v_proj's
    output rows into o_proj (with grouped-query attention, s is shared by the
    query heads that read one value head, so the fold stays exact), up_proj's
    rows into down_proj;
  * otherwise kept in the quantized layer (`WeightOnlyLinear.inv_input_scale`,
    one multiply per call), so any architecture works.
The candidate producer comes from the architecture adapter (`core.adapter`):
the norm whose output the group reads, v for o, up for down. Whether its fold
is exact is not assumed: each candidate fold is made on the float model and
kept only if a probe batch gives the same output (to float rounding);
otherwise it is undone and the scale stays explicit. (A post-norm BERT
LayerNorm also feeds the residual, so it fails the check.) One probe pass
checks `FOLD_BATCH` folds at once; a batch that moves the output is restored
from copies and checked fold by fold, so the same folds are kept as when each
is checked alone (a fold that is not exact moves the output far past rounding,
with or without its batch-mates), for 16 passes instead of 121 on SmolLM2.
A model the adapter does not know keeps every scale explicit.

With `embeddings=True` and a head tied to the input embedding, the head is a
group too: the final norm's output feeds it, so 1 / s folds into that norm,
the head's rows store E diag(s), and the embedding lookup multiplies the rows
it returns by 1 / s (`inv_column_scale`). The head is searched on the grid it
gets: int8 rows (`embedding_bits=8`, the int8 weight kernel) or the layers'
4-bit grid (`embedding_bits=4`, see embedding.py).

Calibration goes block by block (`blockwise`) on `calibration_samples` windows of
the calibration split (never evaluation): each block's groups are searched against
the block's float inputs (a subsample of `SEARCH_TOKENS` tokens; the mean magnitudes
use all tokens), its folds are checked on the block's own output for the first
window, the folded float block (folds are exact) makes the next block's inputs, and
then its layers are quantized. So the search sees the float model's activations, as
a whole-model pass would (measured on SmolLM2: the float inputs score better than
the quantized blocks' outputs). The head comes last, on the final hidden states.
Memory holds one block and its activations, and a lazy model is read from its
files a block at a time. Cost: `grid` quantizations of
each group. A model the adapter does not know is calibrated whole, in one pass.

`scale_search` (symmetric grids): the layers' group scales are then searched
(`formats.search_scales`) on W diag(s), weighted by the mean square of each
channel of x / s over all calibration tokens; alpha itself is searched on the
absmax grid, which costs one fortieth as much per candidate and, on SmolLM2's
Q4_0, already gives the perplexity measured in BENCHMARKS.md.

`rounding="gptq"` rounds the scaled weights W diag(s) with GPTQ (gptq_math.py)
instead of to nearest: its Hessians are collected while the folded float block
makes the next block's inputs (the same pass), so each layer's is that of the
inputs x / s its stored weight reads (an explicit scale's layer reads x: its
Hessian is divided by s s^T). AWQ evens out the channels' ranges, GPTQ then
compensates each rounding error on the columns not yet rounded.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimkit.core import data as D
from slimkit.core.adapter import Adapter, find
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.memory import release_memory
from slimkit.core.progress import track
from slimkit.core.registry import Context, register
from slimkit.core.selection import linear_weight, select_linears, set_module
from slimkit.io.blockwise import after_blocks, first_inputs, start
from slimkit.io.model import copy_model
from slimkit.quantization.awq_math import search_scale
from slimkit.quantization.common import CalibratedOptions, cast_unquantized
from slimkit.quantization.embedding import head_grid, quantize_embeddings, tied_head
from slimkit.quantization.formats import check_group, sqnr_db
from slimkit.quantization.gptq import Hessians
from slimkit.quantization.gptq_math import gptq_quantize
from slimkit.quantization.modules import WeightOnlyLinear
from slimkit.quantization.smoothing import require_batches

SEARCH_TOKENS = 512  # cached input rows per group for the search
PROBE_TOKENS = 32  # tokens of the batch that checks each fold
FOLD_SQNR_DB = 90.0  # float rounding only; a wrong fold changes outputs far more
FOLD_BATCH = 8  # folds checked by one probe pass (about two Llama blocks' weights copied meanwhile)
HEAD = "<head>"  # the group of the tied LM head
ROUNDINGS = ("nearest", "gptq")
GPTQ_DAMP = 0.01  # rounding="gptq": GPTQ's default damping


@dataclass(frozen=True)
class AWQConfig(CalibratedOptions):
    """int8 with the fast kernel: group_size=None, symmetric=True."""

    METHOD: ClassVar[str] = "awq"

    grid: int = 20
    rounding: str = "nearest"  # or "gptq": GPTQ's error-compensating rounding of the scaled weights

    def __post_init__(self):
        super().__post_init__()
        if self.group_size is None and self.bits == 4:
            raise SlimkitError("awq int4 needs groups: use group_size 32, 64, 128 or 256")
        if not 2 <= self.grid <= 100:
            raise SlimkitError(f"grid={self.grid} is out of range: use 2..100 alpha points, e.g. 20")
        if self.rounding not in ROUNDINGS:
            raise SlimkitError(f"rounding={self.rounding!r} is not supported: use 'nearest' (each weight of W diag(s) rounded alone) "
                               "or 'gptq' (GPTQ's error compensation on W diag(s))")


@dataclass
class Group:
    members: list[str]  # layers that read this input (HEAD for the tied head)
    abs_sum: torch.Tensor  # (K,) sum |x| over all tokens
    count: int
    rows: list[torch.Tensor]  # subsampled inputs, each (t, K)
    square_sum: torch.Tensor | None = None  # (K,) sum x^2 over all tokens: the importance a scale search weighs by

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.rows)[:SEARCH_TOKENS]  # (T, K)


def _forward(model, ids, causal: bool):
    ids = ids.to(model.device)
    out = model(input_ids=ids, use_cache=False) if causal else model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def calibrate(model: nn.Module, names: list[str], head: str | None, windows: list[Callable[[], object]], label: str | None = None) -> dict[str, Group]:
    """owner layer -> Group: who reads the input and its statistics, in the order the forward pass reads them.

    windows: one call per calibration window that runs it through the part of `model` holding the layers."""
    groups: dict[str, Group] = {}
    # A weak reference: holding every layer's input for the whole batch would cost hundreds of MB;
    # an entry whose tensor has died does not match a new tensor that reuses its id.
    seen: dict[int, tuple] = {}  # id(input) -> (weakref to it, owner), this batch
    per_batch = math.ceil(SEARCH_TOKENS / len(windows))
    gen = torch.Generator().manual_seed(0)

    def pre_hook(name):
        def fn(module, args):
            x = args[0]
            entry = seen.get(id(x))
            if entry is None or entry[0]() is not x:
                entry = seen[id(x)] = (weakref.ref(x), name)
            owner = entry[1]
            if owner != name:
                if name not in groups[owner].members:
                    groups[owner].members.append(name)
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, K)
            pick = x2[torch.randperm(x2.shape[0], generator=gen)[:per_batch]]
            if name not in groups:
                groups[name] = Group([HEAD if name == head else name], torch.zeros(x2.shape[1], device=x2.device), 0, [],
                                     torch.zeros(x2.shape[1], device=x2.device))
            g = groups[name]
            g.abs_sum += x2.abs().sum(0)
            g.square_sum += x2.square().sum(0)
            g.count += x2.shape[0]
            g.rows.append(pick)

        return fn

    hooked = names + ([head] if head else [])
    handles = [model.get_submodule(n).register_forward_pre_hook(pre_hook(n)) for n in hooked]
    try:
        with torch.inference_mode():
            for window in (track(windows, label) if label else windows):
                seen.clear()
                window()
                seen.clear()  # every layer's input was held for the batch: hand those pages back
        release_memory()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if not any(n in g.members for g in groups.values())]
    if missing:
        raise SlimkitError(f"layer {missing[0]} saw no calibration input: it is not used in the forward pass; add it to ignore")
    return groups


def _producer(arch: Adapter | None, model: nn.Module, owner: str, group: Group) -> tuple[str | None, torch.Tensor | None]:
    """Where a group's 1 / s may fold: (the norm whose output it reads, None), or (the linear
    whose output rows feed it, the (K,) row behind each input channel), or (None, None)."""
    if arch is None:
        return None, None
    norm = arch.norm_feeding(owner)
    if norm is not None and isinstance(getattr(model.get_submodule(norm), "weight", None), torch.Tensor):
        return norm, None
    source = arch.row_source(owner) if len(group.members) == 1 else None
    if source is not None and isinstance(model.get_submodule(source[0]), nn.Linear):
        return source
    return None, None


def _tie(stat: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """Average a (K,) statistic over the channels that share a producer row; back to (K,)."""
    index = index.to(stat.device)
    sums = torch.zeros(rows, device=stat.device).index_add_(0, index, stat)
    counts = torch.zeros(rows, device=stat.device).index_add_(0, index, torch.ones_like(stat))
    return (sums / counts)[index]


def _scale_columns_(layer: nn.Module, s: torch.Tensor) -> None:
    """W[:, j] *= s_j for nn.Linear (out, in) or Conv1D (in, out)."""
    if isinstance(layer, nn.Linear):
        layer.weight.mul_(s[None, :])
    else:
        layer.weight.mul_(s[:, None])


def _fold(model: nn.Module, producer: str, rows: torch.Tensor | None, members: list[str], s: torch.Tensor, inv: bool = False) -> None:
    """Divide `producer`'s output by s (per channel or via `rows`) and scale members' columns by s."""
    p = model.get_submodule(producer)
    if rows is None:  # a norm: output channel j = weight_j * (...) + bias_j
        d = 1 / s
    else:  # a linear: output row r feeds the consumer channels index r
        d = torch.ones(p.weight.shape[0], device=s.device).index_copy_(0, rows.to(s.device), 1 / s)
    d = 1 / d if inv else d
    p.weight.mul_(d[:, None] if p.weight.dim() == 2 else d)
    if getattr(p, "bias", None) is not None:
        p.bias.mul_(d)
    for m in members:
        _scale_columns_(model.get_submodule(m), 1 / s if inv else s)


def scale_stage_(model: nn.Module, arch: Adapter | None, names: list[str], head: str | None, windows: list[Callable[[], object]],
                 probe: Callable[[], torch.Tensor], config: AWQConfig, inside: str = "", label: str | None = None,
                 importance: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Search the scales of the groups that `names` (and the tied `head`) form and fold what folds exactly,
    in place on `model`'s float weights. `windows` run the calibration windows through the part that
    holds them (a block, or the whole model), `probe()` is that part's output on a probe input: a fold
    is kept only if it leaves the probe output unchanged. Only producers under `inside` (a block's
    name; "" for anywhere) take a fold: the blocks before it are quantized and gone already.

    Returns (layer -> s for the layers that must keep an explicit input scale, s of the tied head or None).
    `importance`, when given, is filled with layer -> (K,) the mean square of each input channel of the
    scaled layer (x / s), for `scale_search`."""
    groups = calibrate(model, names, head, windows, label)
    explicit: dict[str, torch.Tensor] = {}
    head_scale = None
    with torch.no_grad():
        reference = probe()
        folds = _Folds(model, probe, reference)
        for owner, g in groups.items():
            is_head = g.members == [HEAD]
            members = [head] if is_head else g.members
            stat = g.abs_sum / g.count  # (K,)
            producer, rows = _producer(arch, model, owner, g)
            if producer is not None and inside and not producer.startswith(inside + "."):
                producer, rows = None, None
            if rows is not None:
                stat = _tie(stat, rows, model.get_submodule(producer).weight.shape[0])
            ws = [linear_weight(model.get_submodule(m)).float() for m in members]
            w = ws[0] if len(ws) == 1 else torch.cat(ws)  # (sum N, K); a lone layer (the 49k-row head) is not copied
            int8_rows = is_head and config.embedding_bits == 8
            bits, group, sym, zp = (8, None, True, "float") if int8_rows else (config.bits, config.group_size, config.symmetric, config.zero_point)
            s = search_scale(w, g.inputs(), bits, group, sym, config.grid, stat, zp).scale
            if importance is not None and not is_head:  # per channel, untied: s is shared, the importance is not
                importance.update({m: (g.square_sum / g.count) / s.square() for m in members})
            if is_head:
                explicit.update(folds.settle())  # the head's check starts from checked folds
                if producer is not None and _try_head_fold(model, producer, head, s, probe, reference):
                    head_scale = s
                continue
            if producer is not None:
                explicit.update(folds.add(producer, rows, members, s))
                continue
            explicit.update({m: s for m in members})
        explicit.update(folds.settle())
    return explicit, head_scale


def scale_whole_(model: nn.Module, arch: Adapter | None, names: list[str], head: str | None, batches: list, causal: bool,
                 config: AWQConfig, importance: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """`scale_stage_` on the whole float model in one pass: for a model the adapter does not know (arch
    None: every scale explicit), and to check that folding alone leaves a float model's outputs unchanged."""
    batches = require_batches(batches)
    windows = [lambda ids=ids: _forward(model, ids, causal) for ids in batches]
    probe = lambda: _forward(model, batches[0][:, :PROBE_TOKENS], causal)  # noqa: E731
    return scale_stage_(model, arch, names, head, windows, probe, config, label="Calibrating (AWQ)", importance=importance)


class _Folds:
    """Folds made on the float model and checked against its output on `probe`, FOLD_BATCH at a time."""

    def __init__(self, model: nn.Module, probe: Callable[[], torch.Tensor], reference: torch.Tensor):
        self.model, self.probe, self.reference = model, probe, reference
        self.pending: list[tuple] = []  # (producer, rows, members, s, [(tensor, its copy before the fold)])

    def add(self, producer: str, rows: torch.Tensor | None, members: list[str], s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fold s; once the batch is full, settle it. Returns layer -> s for the layers whose fold was refused."""
        p = self.model.get_submodule(producer)
        touched = [p.weight, getattr(p, "bias", None), *(self.model.get_submodule(m).weight for m in members)]
        self.pending.append((producer, rows, members, s, [(t, t.clone()) for t in touched if t is not None]))
        _fold(self.model, producer, rows, members, s)
        return self.settle() if len(self.pending) == FOLD_BATCH else {}

    def settle(self) -> dict[str, torch.Tensor]:
        """Check the pending folds in one pass; if the output moved, restore them and check each alone."""
        pending, self.pending = self.pending, []
        if not pending or sqnr_db(self.reference, self.probe()) >= FOLD_SQNR_DB:
            return {}
        for *_, copies in reversed(pending):  # the weights before the batch, bit for bit
            for t, before in copies:
                t.copy_(before)
        refused = {}
        for producer, rows, members, s, _ in pending:
            if not _try_fold(self.model, producer, rows, members, s, self.probe, self.reference):
                refused.update({m: s for m in members})
        return refused


def _try_fold(model, producer, rows, members, s, probe, reference) -> bool:
    _fold(model, producer, rows, members, s)
    if sqnr_db(reference, probe()) >= FOLD_SQNR_DB:
        return True
    _fold(model, producer, rows, members, s, inv=True)  # undo: the producer's output feeds more than the group
    return False


def _try_head_fold(model, norm, head, s, probe, reference) -> bool:
    """The head's weight is the embedding's: check the fold with an untied copy of the head."""
    tied = model.get_submodule(head)
    untied = nn.Linear(tied.in_features, tied.out_features, bias=tied.bias is not None)
    untied.weight = nn.Parameter(tied.weight.detach() * s[None, :], requires_grad=False)
    if tied.bias is not None:
        untied.bias = tied.bias
    set_module(model, head, untied)
    try:
        _fold(model, norm, None, [], s)
        if sqnr_db(reference, probe()) >= FOLD_SQNR_DB:
            return True
        _fold(model, norm, None, [], s, inv=True)
        return False
    finally:
        set_module(model, head, tied)


@register("awq", "quantize", AWQConfig, "AWQ: int4/int8 weight-only with activation-aware per-channel scales, calibrated block by block (same kernels as int4-wo)")
def apply(model, config: AWQConfig = AWQConfig(), ctx: Context = Context()):
    lm = copy_model(model, "awq", lazy=True)
    walk = start(lm, ctx.stream)
    names = list(select_linears(lm.model, tuple(config.targets), tuple(config.ignore)))
    for name in names:  # a group size that does not fit fails before calibrating
        check_group(linear_weight(lm.model.get_submodule(name)).shape[1], config.group_size)
    head = tied_head(lm.model) if config.embeddings else None
    batches = require_batches(D.calibration_batches(lm.tokenizer, ctx.calibration(), config.seq_len, config.calibration_samples, batch_size=1))
    causal = lm.kind == CAUSAL_LM
    arch = find(lm.model)
    importance: dict[str, torch.Tensor] = {}
    if arch is None:  # no blocks known: the whole float model at once, every scale explicit
        model = walk.rest(torch.float32)
        explicit, head_scale = scale_whole_(model, None, names, head, batches, causal, config, importance)
        hessians = Hessians(model, names if config.rounding == "gptq" else []).over([lambda ids=ids: _forward(model, ids, causal) for ids in batches])
        _quantize_layers(model, names, explicit, config, importance, hessians)
        return _finish(walk, head_scale, config)
    inputs = first_inputs(walk, batches, causal)
    walk.dtype = torch.float32  # blocks are calibrated in fp32, whatever the checkpoint holds
    for i, (prefix, block) in enumerate(walk.blocks("Quantizing (AWQ)")):
        inside = [n for n in names if n.startswith(prefix + ".")]
        explicit: dict[str, torch.Tensor] = {}
        if inside:
            windows = [lambda w=w: inputs.call(block, i, w) for w in range(len(inputs.hidden))]
            probe = lambda: inputs.call(block, i, 0).float()  # noqa: E731
            explicit, _ = scale_stage_(lm.model, arch, inside, None, windows, probe, config, inside=prefix, importance=importance)
        hessians = Hessians(lm.model, inside if config.rounding == "gptq" else [])
        inputs.run(block, i, hessians.next_window)  # the float block (folds are exact) makes the next inputs, as in the whole-model search
        if inside:
            _quantize_layers(lm.model, inside, explicit, config, importance, hessians.close())
        cast_unquantized(block, config.compute_dtype)
    outside = walk.outside(names)
    if not (outside or head):  # nothing after the blocks is calibrated: the activations go before the rest is read
        inputs.hidden.clear()
    rest = walk.rest(torch.float32)
    head_scale = None
    if outside or head:  # the head (and any layer after the blocks) reads what the last block makes
        windows = after_blocks(rest, inputs, batches, causal)
        probe = windows[0]
        explicit, head_scale = scale_stage_(rest, arch, outside, head, windows, probe, config, importance=importance)
        hessians = Hessians(rest, outside if config.rounding == "gptq" else []).over(windows)
        _quantize_layers(rest, outside, explicit, config, importance, hessians)
    inputs.hidden.clear()  # the calibration activations go before the embeddings are quantized
    return _finish(walk, head_scale, config)


def _quantize_layers(model: nn.Module, names: list[str], explicit: dict[str, torch.Tensor], config: AWQConfig,
                     importance: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor]) -> None:
    """Replace each of `names` (qualified) by its quantized form, with its explicit input scale if it has one:
    rounded to nearest (with `scale_search`, weighted by `importance`), or by GPTQ on `hessians`."""
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            w = linear_weight(layer).float()  # (N, K)
            s = explicit.get(name)
            module = WeightOnlyLinear(w.shape[1], w.shape[0], getattr(layer, "bias", None) is not None, config.bits, config.group_size,
                                      config.symmetric, input_scale=s is not None, zero_point=config.zero_point)
            if s is not None:
                w = w * s[None, :]
                module.inv_input_scale.copy_(1 / s)
            if name not in hessians:
                module.set_weight(w, config.scale_search, importance.get(name))
            else:
                h = hessians.pop(name)  # (K, K) of the inputs the float layer reads
                if s is not None:  # the stored weight W diag(s) reads x / s
                    h = h / (s[:, None] * s[None, :])
                module.set_quantized(gptq_quantize(w, h, config.bits, config.group_size, config.symmetric, GPTQ_DAMP,
                                                   zero_point=config.zero_point, scale_search=config.scale_search))
            if module.bias is not None:
                module.bias.copy_(layer.bias.float())
            set_module(model, name, module.to(w.device))


def _finish(walk, head_scale: torch.Tensor | None, config: AWQConfig):
    rest = walk.rest()
    if config.embeddings:
        quantize_embeddings(rest, head_scale, head_grid(config))
    cast_unquantized(rest, config.compute_dtype)
    return walk.close().record("quantize", "awq", config)
