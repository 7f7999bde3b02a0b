"""Knowledge distillation: a smaller student learns to reproduce a teacher.

    import slimkit
    student = slimkit.distill("smollm2-135m", student_layers=15, minutes=25)
    slimkit.save(student, "out/smollm2-15l", recipe=student.manifest["recipe"])

Modules: `student` (layer-dropped students initialised from the teacher) and
`method` (the registered `distill` technique and progressive distillation). The
losses and the training loop they run are shared with QAT and pruning's recovery
training, so they live in `slimkit.core` (`losses`, `training`).
"""

from __future__ import annotations

from slimkit.core.data import TextSource, calibration_source
from slimkit.core.hardware import training_device
from slimkit.core.options import apply
from slimkit.core.registry import Context
from slimkit.distillation.method import DistillConfig, progressive
from slimkit.distillation.student import make_student, select_layers
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel

__all__ = ["DistillConfig", "distill", "make_student", "progressive", "select_layers"]


def distill(teacher: LoadedModel | str, *, data: TextSource | str | None = None, seed: int = 0, device: str | None = None,
            on_step=None, tokenizer=None, **options) -> LoadedModel:
    """Distil `teacher` into a smaller student; `options` are DistillConfig fields, `data` the text
    to train on (its calibration split; evaluation is the same source's evaluation split).
    `teacher` may be a transformers model object with its `tokenizer=`; it is never changed.
    `device`: "cpu", "cuda" or "auto" (None, as "auto": Accelerate's choice, a GPU where there is
    one; under `accelerate launch` each process its own)."""
    ctx = Context(calibration_source(data), seed, training_device(device), on_step)
    return apply(load(teacher, tokenizer=tokenizer), "distill", options, ctx, "distill")
