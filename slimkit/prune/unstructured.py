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

import torch

from slimkit.errors import SlimkitError
from slimkit.models import LoadedModel
from slimkit.prune import common, importance
from slimkit.registry import register

SCOPES = ("layer", "global")


# --------------------------------------------------------------------------- masks (pure)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (True = keep) zeroing exactly round(sparsity * numel) lowest scores."""
    k = int(round(sparsity * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        mask[scores.flatten().argsort()[:k]] = False
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask zeroing the round(sparsity * in) lowest scores of each output row. scores: (out, in)."""
    k = int(round(sparsity * scores.shape[1]))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    return mask


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks under one threshold across all tensors: the k-th lowest score overall."""
    total = sum(s.numel() for s in scores.values())
    k = int(round(sparsity * total))
    if k == 0:
        return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])  # (total,)
    threshold = flat.kthvalue(k).values
    return {n: s > threshold for n, s in scores.items()}


def apply_masks(modules: dict, masks: dict[str, torch.Tensor]) -> None:
    """Write the zeros into the weights (in place)."""
    with torch.no_grad():
        for n, m in modules.items():
            w = common.weight_2d(m)  # (out, in) view
            w.mul_(masks[n].to(w.device, w.dtype))


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class MagnitudeConfig:
    sparsity: float = 0.5
    scope: str = "layer"  # "layer": each layer alike; "global": one threshold across layers
    importance: str = "magnitude-l1"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = common.DEFAULT_IGNORE
    calibration_samples: int = 32  # used only by criteria that need data
    seq_len: int = 256
    batch_size: int = 4
    recover_minutes: float = 0.0

    def __post_init__(self):
        common.check_sparsity(self.sparsity)
        if self.scope not in SCOPES:
            raise SlimkitError(f"unknown scope '{self.scope}': use 'layer' (each layer alike) or 'global' (one threshold)")
        importance.get(self.importance)
        common.check_patterns(self.targets, self.ignore)
        common.check_calibration(self.calibration_samples, self.seq_len, self.batch_size)
        check_minutes(self.recover_minutes)


@dataclass(frozen=True)
class WandaConfig:
    sparsity: float = 0.5
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = common.DEFAULT_IGNORE
    calibration_samples: int = 32
    seq_len: int = 256
    batch_size: int = 4
    recover_minutes: float = 0.0

    def __post_init__(self):
        common.check_sparsity(self.sparsity)
        common.check_patterns(self.targets, self.ignore)
        common.check_calibration(self.calibration_samples, self.seq_len, self.batch_size)
        check_minutes(self.recover_minutes)


def check_minutes(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise SlimkitError(f"recover_minutes must be a number of minutes >= 0, got {value!r}")


# --------------------------------------------------------------------------- apply


@register("magnitude", "prune", MagnitudeConfig, "zero the smallest weights (per layer or global); no speed without sparse kernels")
def apply_magnitude(model: LoadedModel, config: MagnitudeConfig, **context) -> LoadedModel:
    lm = common.copy_model(model, f"magnitude{config.sparsity:g}")
    modules = common.select_linears(lm.model, config.targets, config.ignore)
    crit = importance.get(config.importance)
    scores = importance.module_scores(crit, lm, modules, lambda: _batches(lm, config))
    if config.scope == "global":
        masks = global_masks(scores, config.sparsity)
    else:
        masks = {n: layer_mask(s, config.sparsity) for n, s in scores.items()}
    return _finish(model, lm, modules, masks, "magnitude", config)


@register("wanda", "prune", WandaConfig, "|W| x input-activation norm per output row (Wanda); no speed without sparse kernels")
def apply_wanda(model: LoadedModel, config: WandaConfig, **context) -> LoadedModel:
    lm = common.copy_model(model, f"wanda{config.sparsity:g}")
    modules = common.select_linears(lm.model, config.targets, config.ignore)
    scores = importance.module_scores(importance.get("activation"), lm, modules, lambda: _batches(lm, config))
    masks = {n: row_mask(s, config.sparsity) for n, s in scores.items()}
    return _finish(model, lm, modules, masks, "wanda", config)


def _batches(lm, config):
    return common.calibration_inputs(lm, config.calibration_samples, config.seq_len, config.batch_size)


def _finish(original, lm, modules, masks, method, config, **facts) -> LoadedModel:
    """Make masks permanent, recover if asked, and record the report."""
    apply_masks(modules, masks)
    if config.recover_minutes > 0:
        from slimkit.prune.schedule import RecoveryConfig, recover

        recover(lm, original, RecoveryConfig(minutes=config.recover_minutes), masks={n: masks[n] for n in modules})
    report = common.sparsity_report(lm.model, modules)
    lm.manifest["prune_report"] = {"method": method, "sparsity": report, "speed": common.NO_SPEED}
    return common.record(lm, method, config, achieved_sparsity=report["overall"], speed=common.NO_SPEED, **facts)
