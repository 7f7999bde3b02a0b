"""The learning-rate schedule, and the number of steps a wall-clock budget holds.

Schedule. The rate is a function of the optimizer step: linear warmup (a
fraction of the planned steps, or `warmup_steps`), then cosine or linear decay
to zero at the last planned step, or constant.

Budget. With `minutes`, the schedule must end when the budget does, so the
number of steps is planned: timed probes (forward + backward without an update,
on the batch of median size; RNG restored, so nothing changes) and one
evaluation are timed first, steps are scaled from the probe by the batches'
mean size, and a cached teacher's first pass is counted once (`plan_steps`).
At a quarter, half and three quarters of the budget the plan is re-fitted to
the pace the steps actually kept (`replan`): probes time a few micro-batches,
while the run meets all of them, loads the teacher cache, steps the optimizer
and shares the machine with whatever else runs, so a plan left alone would
stop on the clock with the learning rate still high, or leave the budget
unused. `steps`, when also given, caps every plan.

A constant rate after a warmup counted in steps does not depend on the run's
length: such a run needs no plan and no probes, and trains until the clock
(or `steps`) stops it, as recovery training after pruning does.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from slimkit.core.training.checkpoint import rng_state, set_rng_state
from slimkit.core.training.config import TrainConfig
from slimkit.core.training.teacher_cache import TeacherCache

REPLAN_AT = (0.25, 0.5, 0.75)  # budget fractions where a time-budgeted plan is re-fitted to the measured pace


def lr_factor(step: int, total: int | None, warmup: float, schedule: str, warmup_steps: int | None = None) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based) of `total`.

    The first w steps ramp up as (step + 1) / (w + 1), w being `warmup_steps` or
    `warmup` x `total`; `total` may be None only when nothing after the warmup needs it
    (a constant schedule)."""
    w = warmup_steps if warmup_steps is not None else int(round(warmup * total))
    if step < w:
        return (step + 1) / (w + 1)
    if schedule == "constant" or total <= w:
        return 1.0
    progress = min(1.0, (step - w) / max(1, total - w))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def needs_plan(cfg: TrainConfig) -> bool:
    """Whether a time budget must plan the steps: the schedule reads the run's length."""
    return cfg.minutes is not None and not (cfg.schedule == "constant" and cfg.warmup_steps is not None)


def capped(cfg: TrainConfig, steps: int) -> int:
    return min(steps, cfg.steps) if cfg.steps is not None else steps


def least(acc, steps: int) -> int:
    """The smallest of every process's `steps` (they must plan alike)."""
    if acc.num_processes == 1:
        return steps
    return int(acc.gather(torch.tensor([float(steps)], device=acc.device)).min().item())


def anywhere(acc, flag: bool) -> bool:
    """True on every process when it is true on any (they must stop together)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.gather(torch.tensor([float(flag)], device=acc.device)).max() > 0)


def plan_steps(acc, probe: Callable[[int], float], eval_s: float, cfg: TrainConfig, budget: float, start: float,
               sizes: list[int], cache: TeacherCache) -> int:
    """Steps that fit the remaining budget, from timed probes and the evaluation's `eval_s`.

    Training batches differ in size (cut by length, a passage batch holds 20 to 256
    tokens a row), so a probe times the batch of median size and the plan scales it by
    the mean size, per token. With a teacher cache the first pass over the batches also
    runs the teacher, later passes read it from disk: the probe is timed twice on one
    uncached batch, and the difference is what each uncached batch costs once."""
    rng = rng_state()
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    chosen = order[len(order) // 2]
    probe(order[0])  # warm-up: first-call allocations and kernel choices are not a step's cost
    caching = cache.root is not None
    cold = caching and not cache.has(chosen)
    first, steady = probe(chosen), probe(chosen)
    set_rng_state(rng)
    scale = statistics.fmean(sizes) / sizes[chosen]
    step_s = steady * scale * cfg.grad_accum + (eval_s / cfg.eval_every if cfg.eval_every else 0.0)
    teacher_s = max(0.0, first - steady) * scale if cold else 0.0
    uncached = sum(not cache.has(i) for i in range(len(sizes))) if caching else 0
    remaining = budget - (time.perf_counter() - start) - eval_s  # the final evaluation
    return least(acc, capped(cfg, fit_steps(remaining * 0.97, step_s, teacher_s, uncached, cfg.grad_accum)))


def replan(acc, state: dict, budget: float, cfg: TrainConfig) -> None:
    """Re-fit the planned steps to the pace measured since the last plan (`REPLAN_AT`)."""
    state["planned"] = least(acc, capped(cfg, refit_steps(state["step"], state["elapsed"], state["mark"], budget, state["eval_s"])))
    state["replans"] += 1
    state["mark"] = [state["step"], state["elapsed"]]


def refit_steps(step: int, elapsed: float, mark: Sequence[float], budget: float, final_eval_s: float) -> int:
    """The new plan's last step: `step` plus the steps that fit what is left of
    `budget` (less the final evaluation) at the pace kept since `mark` = (step, elapsed)."""
    pace = (elapsed - mark[1]) / max(1, step - mark[0])
    left = (budget - elapsed - final_eval_s) * 0.98
    return step + max(1, int(left / pace)) if pace > 0 else step + 1


def fit_steps(seconds: float, step_s: float, teacher_s: float, uncached: int, accum: int) -> int:
    """Optimizer steps that fit `seconds`: each costs `step_s`, and the `uncached`
    micro-batches (met once each in the first pass) cost `teacher_s` more."""
    first_pass = uncached / accum
    slow = step_s + accum * teacher_s
    if seconds <= first_pass * slow:
        return max(1, int(seconds / slow))
    return max(1, int(first_pass + (seconds - first_pass * slow) / step_s))
