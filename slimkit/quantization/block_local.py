"""Sensitivity and mixed precision on a model read block by block, so a lazy 7B is never whole in memory.

Sensitivity (`unit_errors`): scoring each unit on the whole model's output takes a
full pass of the model per unit (224 for a 7B Llama's layers), each reading every
block from the files. So each block is
read once from the files, the probe windows' float inputs (`blockwise.first_inputs`)
run through it, and each of its units (the block, or one of its layers) is
quantized alone and scored by the relative error of the block's output, token by token,

    block-mse = mean over the probe's tokens t of ||y_q[t] - y[t]||^2 / ||y[t]||^2,

y the float block's output (H per token), y_q the output with the unit quantized. The float
block's outputs are then the next block's inputs, and after the last block the
float model's outputs on the probe come out of the same pass (the reference the
mixed search measures against). A layer outside the blocks (a head, a pooler) is
scored on its own output.

How far it agrees with the whole-model ranking (KL of the output, a full pass per
unit), on SmolLM2-135M, int4-wo with groups of 64, its 30 blocks, the same 4 windows
of 256 tokens (benchmarks/sensitivity_agreement.py): Spearman 0.53. The ratio of
sums, sum ||y_q - y||^2 / sum ||y||^2, scored Spearman -0.04 on the same probe:
tokens whose hidden states are far larger than the rest make most of its
denominator, so it mostly measured the error on those tokens. Either way the order
is a cheap guide, not the whole-model one; `mixed` still accepts an assignment only by
measuring the whole model's output.

Mixed (`mixed_pass`): a candidate assignment of layers to the low and high method
is measured in one block-by-block pass: the embeddings and what lies outside the
blocks are quantized first, as `mixed.assemble` would, then each block is read,
its layers rounded low or high, the probe windows run through it, and the block
goes back to the meta device; after the last block the model's output comes out
(`blockwise.after_blocks`). Blocks are measured in fp32. The same function builds
the chosen model, without probe windows, streaming each block to the artifact.

Only the methods that round each layer to nearest (int4-wo, int8-wo, nf4: a layer
needs nothing but its own weight) quantize a unit here; calibrated ones need their
own calibration windows through the quantized blocks, and read the model whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.core.adapter import find
from slimkit.core.memory import release_memory
from slimkit.core.selection import set_module
from slimkit.io.blockwise import Walk, after_blocks, first_inputs
from slimkit.io.lazy import offload
from slimkit.quantization.common import COMPUTE_DTYPES, cast_unquantized
from slimkit.quantization.embedding import quantize_embeddings
from slimkit.quantization.weight_only import rounder

BLOCK_MSE = "block-mse"

# what a unit's quantizer gets: the root's qualified name, the root module, the unit's layers;
# it is a context manager that yields the module to run in the root's place
Quantized = Callable[[str, nn.Module, tuple[str, ...]], contextlib.AbstractContextManager]


def relative_error(pairs) -> float:
    """The mean over tokens of ||y_q[t] - y[t]||^2 / ||y[t]||^2, over (y_q, y) pairs of (..., H) outputs; 0 for none."""
    total, count = 0.0, 0
    for y_q, y in pairs:
        err = (y_q.double() - y.double()).pow(2).sum(-1)  # (B, T)
        ref = y.double().pow(2).sum(-1)
        total += (err / ref.clamp_min(torch.finfo(torch.float64).tiny)).sum().item()
        count += err.numel()
    return total / count if count else 0.0


def _local(prefix: str, name: str) -> str:
    return name[len(prefix) + 1:] if prefix else name


@contextlib.contextmanager
def rounded(make, prefix: str, root: nn.Module, layers: tuple[str, ...]):
    """`root` (qualified name `prefix`) with `layers` rounded by `make`, the float layers put back after.
    A root that is itself the one layer yields the rounded layer."""
    if layers == (prefix,):
        with torch.no_grad():
            yield make(root)
        return
    swapped = []
    try:
        with torch.no_grad():
            for name in layers:
                layer = root.get_submodule(_local(prefix, name))
                set_module(root, _local(prefix, name), make(layer))
                swapped.append((_local(prefix, name), layer))
        yield root
    finally:
        for local, layer in swapped:
            set_module(root, local, layer)


def _drop(walk: Walk, block: nn.Module) -> None:
    """A block measured and no longer needed: back to the meta device when it came from the files."""
    if walk.lazy and walk.stream is None:
        offload(block)
        release_memory()


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def unit_errors(walk: Walk, batches: list[torch.Tensor], causal: bool, groups: dict[str, list[tuple[str, tuple[str, ...]]]],
                quantized: Quantized, label: str) -> tuple[dict[str, float], list[torch.Tensor]]:
    """block-mse of each unit, and the float model's outputs on `batches` from the same pass.

    groups: root (a block, or a layer outside the blocks) -> [(unit name, its layers)]."""
    scores: dict[str, float] = {}
    inputs = first_inputs(walk, batches, causal)
    windows = range(len(inputs.hidden))
    with torch.no_grad():
        for i, (prefix, block) in enumerate(walk.blocks(label)):
            floats = [inputs.call(block, i, w) for w in windows]  # (B, T, H) each
            for name, layers in groups.get(prefix, []):
                with quantized(prefix, block, layers) as q:
                    scores[name] = relative_error((inputs.call(q, i, w), floats[w]) for w in windows)
            inputs.hidden[:] = floats
            _drop(walk, block)
        model = walk.rest(torch.float32)
        outside = [r for r in groups if r not in walk.done]
        calls: dict[str, list] = {r: [] for r in outside}
        hooks = [model.get_submodule(r).register_forward_hook(lambda m, args, kwargs, out, r=r: calls[r].append((args, kwargs, _output(out))),
                                                              with_kwargs=True) for r in outside]
        try:
            outputs = [window() for window in after_blocks(model, inputs, batches, causal)]
        finally:
            for h in hooks:
                h.remove()
        inputs.hidden.clear()
        for root in outside:
            for name, layers in groups[root]:
                with quantized(root, model.get_submodule(root), layers) as q:
                    scores[name] = relative_error((_output(q(*args, **kwargs)), out) for args, kwargs, out in calls[root])
    return scores, outputs


# --------------------------------------------------------------------------- mixed


@dataclass(frozen=True)
class Side:
    """One method of a mixed assignment: its config (restricted to `layers`) and how it rounds a layer."""

    config: object
    layers: frozenset[str]

    @property
    def make(self):
        return rounder(self.config)


@dataclass(frozen=True)
class Assignment:
    """What `mixed.assemble` does, as data: the high side (None: no layer high, or high kept in float),
    the low side (None: every layer high), whether the low method quantizes the embeddings, and its head grid."""

    high: Side | None
    low: Side | None
    embeddings: bool
    grid: dict | None


def can_round(config) -> bool:
    return rounder(config) is not None


def _round(root: nn.Module, prefix: str, names, make) -> None:
    for name in sorted(names):
        if not prefix or name.startswith(prefix + "."):
            set_module(root, _local(prefix, name), make(root.get_submodule(_local(prefix, name))))


def mixed_pass(walk: Walk, plan: Assignment, batches: list[torch.Tensor] | None = None, causal: bool = True,
               label: str = "Quantizing (mixed)") -> list[torch.Tensor] | None:
    """Build `plan` on the walked model, block by block, in the order `mixed.assemble` applies it (so the
    same tensors); with `batches`, also run them through and return the model's outputs (fp32), each
    block dropped once it ran (a measurement: nothing is kept)."""
    model = walk.rest(blocks=False)
    arch = find(model)
    outside = lambda names: {n for n in names if arch is None or arch.block_of(n) is None}  # noqa: E731
    sides = [s for s in (plan.high, plan.low) if s is not None]
    with torch.no_grad():
        for side in sides:  # what lies outside the blocks first: the probe's inputs come out of the embeddings
            _round(model, "", outside(side.layers), side.make)
            if side is plan.low and plan.embeddings:
                quantize_embeddings(model, grid=plan.grid)
            cast_unquantized(model, side.config.compute_dtype)
        if plan.low is None and plan.embeddings:
            quantize_embeddings(model)  # every layer high: the embeddings still follow the low method
    inputs = None
    if batches is not None:
        inputs = first_inputs(walk, batches, causal)
        if sides:  # the activations between blocks are in the compute dtype, as the built model's are
            inputs.hidden[:] = [h.to(COMPUTE_DTYPES[sides[-1].config.compute_dtype]) for h in inputs.hidden]
    for i, (prefix, block) in enumerate(walk.blocks(label)):
        with torch.no_grad():
            for side in sides:
                _round(block, prefix, side.layers, side.make)
                cast_unquantized(block, side.config.compute_dtype)
        if inputs is not None:
            inputs.run(block, i)
            _drop(walk, block)
    if inputs is None:
        return None
    with torch.inference_mode():
        outputs = [window() for window in after_blocks(model, inputs, batches, causal)]
    inputs.hidden.clear()
    return outputs
