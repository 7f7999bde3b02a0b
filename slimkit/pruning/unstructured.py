"""Unstructured pruning: zero individual weights, keep every shape.

magnitude  Rank weights by an importance criterion (default |W|) and zero the
           lowest `sparsity` fraction, either in every layer alike
           (scope="layer") or under one threshold across all selected layers
           (scope="global", which lets robust layers lose more and fragile
           ones less). No data needed for |W|.
wanda      Score |W_ij| * ||x_j||_2 with input-activation norms from the
           calibration split, and prune the lowest fraction within each output
           row (Sun et al. 2023, "A Simple and Effective Pruning Approach for
           LLMs"). One forward pass, no weight update, and far better than
           magnitude on LLMs, whose few large-activation input channels make
           small weights on them important.

Both go block by block (`blockwise.calibrate`) when every layer's mask comes from
that layer alone: Wanda's input norms are taken on each block's float inputs, so
a lazy model is read, and streaming written, one block at a time, and the masks
are those of a whole-model pass. One threshold across layers (scope="global"),
the gradient criteria (taylor, fisher) and recovery training (`recover_minutes`)
need the whole model: it is then read whole.

Masks are made permanent: the zeros are written into the weights, so the
model saves and loads like any other. Trade-off: zeroed weights without
sparse kernels are not faster (and a dense safetensors file is not smaller);
the result says so. Recovery (`recover_minutes`) fine-tunes the surviving
weights with the masks held fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context, register
from slimkit.core.selection import linear_weight, select_linears
from slimkit.io.blockwise import calibrate, start
from slimkit.io.model import LoadedModel, copy_model
from slimkit.pruning import common, importance
from slimkit.pruning.masks import apply_masks, global_masks, layer_mask, row_mask
from slimkit.pruning.recovery import RecoveryConfig, recover

SCOPES = ("layer", "global")


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class MagnitudeConfig(common.PruneOptions):
    sparsity: float = 0.5
    scope: str = "layer"  # "layer": each layer alike; "global": one threshold across layers
    importance: str = "magnitude-l1"

    def __post_init__(self):
        common.check_sparsity(self.sparsity)
        if self.scope not in SCOPES:
            raise SlimkitError(f"unknown scope '{self.scope}': use 'layer' (each layer alike) or 'global' (one threshold)")
        importance.get(self.importance)
        super().__post_init__()


@dataclass(frozen=True)
class WandaConfig(common.PruneOptions):
    sparsity: float = 0.5

    def __post_init__(self):
        common.check_sparsity(self.sparsity)
        super().__post_init__()


# --------------------------------------------------------------------------- apply


@register("magnitude", "prune", MagnitudeConfig, "zero the smallest weights (per layer or global); no speed without sparse kernels")
def apply_magnitude(model: LoadedModel, config: MagnitudeConfig, ctx: Context = Context()) -> LoadedModel:
    crit = importance.get(config.importance)
    if by_block(config):
        return _by_block(model, f"magnitude{config.sparsity:g}", crit, lambda s: layer_mask(s, config.sparsity), "magnitude", config, ctx)
    lm = copy_model(model, f"magnitude{config.sparsity:g}")  # one threshold across layers, gradients, training: the whole model
    modules = select_linears(lm.model, config.targets, config.ignore, what="prune")
    scores = importance.module_scores(crit, lm, modules, common.calibration(lm, config, ctx))
    if config.scope == "global":
        masks = global_masks(scores, config.sparsity)
    else:
        masks = {n: layer_mask(s, config.sparsity) for n, s in scores.items()}
    return finish(model, lm, modules, masks, "magnitude", config, ctx)


@register("wanda", "prune", WandaConfig, "|W| x input-activation norm per output row (Wanda); no speed without sparse kernels")
def apply_wanda(model: LoadedModel, config: WandaConfig, ctx: Context = Context()) -> LoadedModel:
    crit = importance.get("activation")
    if by_block(config):
        return _by_block(model, f"wanda{config.sparsity:g}", crit, lambda s: row_mask(s, config.sparsity), "wanda", config, ctx)
    lm = copy_model(model, f"wanda{config.sparsity:g}")  # recovery trains the whole model
    modules = select_linears(lm.model, config.targets, config.ignore, what="prune")
    scores = importance.module_scores(crit, lm, modules, common.calibration(lm, config, ctx))
    masks = {n: row_mask(s, config.sparsity) for n, s in scores.items()}
    return finish(model, lm, modules, masks, "wanda", config, ctx)


def by_block(config: MagnitudeConfig | WandaConfig) -> bool:
    """Whether this pruning goes block by block: each layer's masks from its own statistics, and no training.
    One threshold across layers, gradient criteria and recovery need the whole model, which is then read whole."""
    crit = importance.get(getattr(config, "importance", "activation"))
    return getattr(config, "scope", "layer") == "layer" and not crit.needs - {"act"} and not config.recover_minutes


def calibrates(config: MagnitudeConfig | WandaConfig) -> bool:
    """Whether its criterion reads calibration data (the activation criterion: Wanda's)."""
    return "act" in importance.get(getattr(config, "importance", "activation")).needs


def _by_block(model: LoadedModel, suffix: str, crit, mask_of, method: str, config, ctx: Context) -> LoadedModel:
    """Masks layer by layer, block by block (`blockwise.calibrate`): each layer's scores from its weight and,
    for the activation criterion, its input norms on the block's float inputs, so a lazy model is read, and
    streaming written, one block at a time. Blocks run in the model's dtype (float32 for a lazy model
    loaded without one, as loading it whole gives), so the statistics are those of a whole-model pass."""
    lm = copy_model(model, suffix, lazy=True)
    walk = start(lm, ctx.stream)
    dtype = lm.dtype or torch.float32
    if lm.weights is not None:
        walk.dtype = lm.model.config.dtype = dtype
    names = list(select_linears(lm.model, config.targets, config.ignore, what="prune"))
    batches, passes = [], []
    if calibrates(config):
        batches = common.calibration(lm, config, ctx)()
        passes = [lambda part, layers, _: common.InputSqNorms(part, layers, [b.get("attention_mask") for b in batches])]
    counts: dict[str, tuple[int, int]] = {}

    def change(part, prefix, layers, act):
        modules = {n: part.get_submodule(n) for n in layers}
        apply_masks(modules, {n: mask_of(crit.scores(linear_weight(m), act_sq=act.get(n))) for n, m in modules.items()})
        counts.update({f"{prefix}.{n}" if prefix else n: c for n, c in common.zero_counts(part, layers).items()})

    calibrate(walk, names, batches, lm.kind == CAUSAL_LM, passes, change, f"Pruning ({method})", dtype)
    walk.rest()
    report = common.report_of({n: counts[n] for n in names})
    lm = walk.close()
    lm.manifest["prune_report"] = {"method": method, "sparsity": report, "speed": common.NO_SPEED}
    return lm.record("prune", method, config, achieved_sparsity=report["overall"], speed=common.NO_SPEED)


def finish(original, lm, modules, masks, method, config, ctx, **facts) -> LoadedModel:
    """Make masks permanent, recover if asked, and record the report."""
    apply_masks(modules, masks)
    if config.recover_minutes > 0:
        reference = original if original.weights is None else copy_model(original, "")  # a lazy original is read: the teacher runs
        recover(lm, reference, RecoveryConfig(minutes=config.recover_minutes), ctx, masks={n: masks[n] for n in modules})
    report = common.sparsity_report(lm.model, modules)
    lm.manifest["prune_report"] = {"method": method, "sparsity": report, "speed": common.NO_SPEED}
    return lm.record("prune", method, config, achieved_sparsity=report["overall"], speed=common.NO_SPEED, **facts)
