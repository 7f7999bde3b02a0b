"""Knowledge distillation: a smaller student learns to reproduce a teacher.

    import slimkit
    student = slimkit.distill("smollm2-135m", student_layers=15, minutes=25)
    slimkit.save(student, "out/smollm2-15l", recipe=student.manifest["recipe"])

Modules: `student` (layer-dropped students initialised from the teacher),
`losses` (logit KD, hidden-state, attention and embedding losses as pure
functions and weighted terms), `trainer` (the Accelerate training loop with
exact resume), `method` (the registered `distill` technique and progressive
distillation).
"""

from __future__ import annotations

import dataclasses
import sys
import types

from slimkit.distill.losses import AttentionLoss, DistillLoss, EmbeddingLoss, HiddenStateLoss, LogitKD
from slimkit.distill.method import DistillConfig, apply, progressive
from slimkit.distill.student import make_student, select_layers
from slimkit.distill.trainer import TrainConfig, TrainResult, train
from slimkit.errors import SlimkitError
from slimkit.models import LoadedModel

__all__ = [
    "AttentionLoss", "DistillConfig", "DistillLoss", "EmbeddingLoss", "HiddenStateLoss", "LogitKD",
    "TrainConfig", "TrainResult", "apply", "distill", "make_student", "progressive", "select_layers", "train",
]


def distill(teacher: LoadedModel | str, *, on_step=None, **options) -> LoadedModel:
    """Distil `teacher` into a smaller student; `options` are DistillConfig fields."""
    valid = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise SlimkitError(f"unknown distill option '{unknown[0]}': valid options are {', '.join(sorted(valid))}")
    return apply(teacher, DistillConfig(**options), on_step=on_step)


class _CallablePackage(types.ModuleType):
    """`slimkit.distill(...)` calls `distill`, while `slimkit.distill` stays this
    package, so `import slimkit.distill.losses` keeps working."""

    def __call__(self, teacher: LoadedModel | str, **options) -> LoadedModel:
        return distill(teacher, **options)


sys.modules[__name__].__class__ = _CallablePackage
