"""Gradual pruning: a cubic sparsity schedule with recovery training between steps.

Cubic schedule (Zhu & Gupta 2017, "To prune, or not to prune"): over n steps
the sparsity rises from s_i to s_f as

    s_t = s_f + (s_i - s_f) * (1 - t / n)^3,   t = 0..n

so it climbs fast while many redundant weights remain and slowly near the
end, when each removal hurts more. Between steps the surviving weights are
trained with the masks held fixed, so the network adapts before it loses more.

Recovery training (`recovery.py`) runs between the steps, on the context's text.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context, register
from slimkit.core.selection import check_patterns, select_linears
from slimkit.io.model import LoadedModel, copy_model
from slimkit.pruning import common, importance
from slimkit.pruning.masks import apply_masks, global_masks, layer_mask
from slimkit.pruning.recovery import RecoveryConfig, recover
from slimkit.pruning.unstructured import SCOPES


def cubic_sparsity(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Sparsity after `step` of `steps` under the cubic schedule."""
    if not 0 <= step <= steps:
        raise ValueError(f"step {step} outside 0..{steps}")
    return final + (initial - final) * (1 - step / steps) ** 3


# --------------------------------------------------------------------------- gradual pruning


@dataclass(frozen=True)
class GradualConfig:
    sparsity: float = 0.5  # final sparsity
    steps: int = 4
    initial_sparsity: float = 0.0
    importance: str = "magnitude-l1"
    scope: str = "layer"
    recover_minutes: float = 4.0  # in all, split evenly between steps
    recovery: str = "finetune"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = common.DEFAULT_IGNORE
    calibration_samples: int = 32
    seq_len: int = 256
    batch_size: int = 4
    max_steps_per_round: int | None = None  # cap recovery steps per round (tests)

    def __post_init__(self):
        common.check_sparsity(self.sparsity)
        common.check_sparsity(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise SlimkitError(f"initial_sparsity {self.initial_sparsity} exceeds the final sparsity {self.sparsity}: swap them")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SlimkitError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if self.scope not in SCOPES:
            raise SlimkitError(f"unknown scope '{self.scope}': use 'layer' or 'global'")
        importance.get(self.importance)
        common.check_minutes(self.recover_minutes)
        RecoveryConfig(mode=self.recovery)
        check_patterns(self.targets, self.ignore)
        common.check_calibration(self.calibration_samples, self.seq_len, self.batch_size)


@register("gradual", "prune", GradualConfig, "cubic sparsity schedule with recovery training between steps (Zhu & Gupta)")
def apply_gradual(model: LoadedModel, config: GradualConfig, ctx: Context = Context()) -> LoadedModel:
    lm = copy_model(model, f"gradual{config.sparsity:g}")
    modules = select_linears(lm.model, config.targets, config.ignore, what="prune")
    crit = importance.get(config.importance)
    schedule, history = [], []
    batches = common.calibration(lm, config, ctx)
    for t in range(1, config.steps + 1):
        s = cubic_sparsity(t, config.steps, config.sparsity, config.initial_sparsity)
        scores = importance.module_scores(crit, lm, modules, batches)
        if config.scope == "global":
            masks = global_masks(scores, s)
        else:
            masks = {n: layer_mask(sc, s) for n, sc in scores.items()}
        apply_masks(modules, masks)
        schedule.append(round(s, 6))
        if config.recover_minutes > 0:
            rc = RecoveryConfig(minutes=config.recover_minutes / config.steps, mode=config.recovery,
                                max_steps=config.max_steps_per_round, seq_len=config.seq_len, batch_size=config.batch_size)
            history.append(recover(lm, model, rc, ctx, masks=masks))
    report = common.sparsity_report(lm.model, modules)
    lm.manifest["prune_report"] = {"method": "gradual", "schedule": schedule, "recovery": history, "sparsity": report, "speed": common.NO_SPEED}
    return lm.record("prune", "gradual", config, schedule=schedule, achieved_sparsity=report["overall"], speed=common.NO_SPEED)
