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

Masks are made permanent: the zeros are written into the weights, so the
model saves and loads like any other. Trade-off: zeroed weights without
sparse kernels are not faster (and a dense safetensors file is not smaller);
the result says so. Recovery (`recover_minutes`) fine-tunes the surviving
weights with the masks held fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context, register
from slimkit.core.selection import select_linears
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
    lm = copy_model(model, f"magnitude{config.sparsity:g}")
    modules = select_linears(lm.model, config.targets, config.ignore, what="prune")
    crit = importance.get(config.importance)
    scores = importance.module_scores(crit, lm, modules, common.calibration(lm, config, ctx))
    if config.scope == "global":
        masks = global_masks(scores, config.sparsity)
    else:
        masks = {n: layer_mask(s, config.sparsity) for n, s in scores.items()}
    return finish(model, lm, modules, masks, "magnitude", config, ctx)


@register("wanda", "prune", WandaConfig, "|W| x input-activation norm per output row (Wanda); no speed without sparse kernels")
def apply_wanda(model: LoadedModel, config: WandaConfig, ctx: Context = Context()) -> LoadedModel:
    lm = copy_model(model, f"wanda{config.sparsity:g}")
    modules = select_linears(lm.model, config.targets, config.ignore, what="prune")
    scores = importance.module_scores(importance.get("activation"), lm, modules, common.calibration(lm, config, ctx))
    masks = {n: row_mask(s, config.sparsity) for n, s in scores.items()}
    return finish(model, lm, modules, masks, "wanda", config, ctx)


def finish(original, lm, modules, masks, method, config, ctx, **facts) -> LoadedModel:
    """Make masks permanent, recover if asked, and record the report."""
    apply_masks(modules, masks)
    if config.recover_minutes > 0:
        recover(lm, original, RecoveryConfig(minutes=config.recover_minutes), ctx, masks={n: masks[n] for n in modules})
    report = common.sparsity_report(lm.model, modules)
    lm.manifest["prune_report"] = {"method": method, "sparsity": report, "speed": common.NO_SPEED}
    return lm.record("prune", method, config, achieved_sparsity=report["overall"], speed=common.NO_SPEED, **facts)
