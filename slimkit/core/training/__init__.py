"""The one training loop: distillation, QAT and recovery after pruning all train through it.

Each technique says what differs for it and nothing else: the model and its loss
terms (a `Distiller`: `core.losses` terms, `LogitKD(alpha=0)` being plain
cross-entropy), the teacher or none, the batches, the parameters that stay
frozen, dropout or eval mode, a hook after each step, and a `TrainConfig`
(length, optimizer, schedule, precision). The loop owns the rest, the same for all:
the time budget and its plan (`budget.py`), exact resume (`checkpoint.py`),
freezing and restoring `requires_grad` (`freezing.py`), train/eval mode, mixed
precision, the float32-attention policy, the seed's batch order (`loop.py`), the
teacher-output cache (`teacher_cache.py`), evaluation and early stopping
(`outputs.py`), and metrics (`runlog.py`).

Who asks for what:
  distillation   train mode with the model's dropout (or a rate it sets), mixed
                 precision `auto`, warmup as a fraction then cosine, evaluation,
                 checkpoints, caches, several processes;
  QAT            eval mode, fp32 (`mixed_precision="no"`), only the fake-quantized
                 layers train, cosine, gradients clipped at 1, `steps` capping what
                 `minutes` plans;
  recovery       eval mode, bf16 where native (`auto`), embeddings frozen, masks
                 re-applied after each step, a warmup counted in steps then a
                 constant rate, so a time budget needs no plan: it trains until the clock.

Several processes. One loop runs on one CPU, one GPU, or many processes
(`accelerate launch --num_processes N`, on GPUs or `--cpu`): Accelerate wraps the
trained module for data parallelism and mixed precision; the frozen teacher runs
beside it in each process, unwrapped:

    torchrun --nproc_per_node 2 train.py                 # CPU: Accelerate sees the torchrun
                                                         # environment and uses gloo
    accelerate launch --num_processes 8 train.py         # GPUs (or --multi_gpu, configs, nodes)
    torchrun --nproc_per_node 2 -m slimkit.cli distill smollm2-135m --student-layers 15 --steps 100 --out s

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI
is set up, so use torchrun on CPU. The global batch (`batch_size`) is split
across processes (rows rank::world) and gradients are averaged, so N processes
train the same model as one process with the same batch size
(`tests/test_distill.py::test_two_processes_on_cpu_match_one`). Only the main
process writes logs, checkpoints and the artifact.
"""

from slimkit.core.training.budget import REPLAN_AT, fit_steps, lr_factor, refit_steps
from slimkit.core.training.config import PRECISIONS, SCHEDULES, TrainConfig, TrainResult
from slimkit.core.training.freezing import all_but, frozen
from slimkit.core.training.loop import train
from slimkit.core.training.outputs import Distiller, model_outputs
from slimkit.core.training.teacher_cache import TeacherCache

__all__ = ["PRECISIONS", "REPLAN_AT", "SCHEDULES", "Distiller", "TeacherCache", "TrainConfig", "TrainResult", "all_but",
           "fit_steps", "frozen", "lr_factor", "model_outputs", "refit_steps", "train"]
