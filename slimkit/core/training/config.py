"""What a training run is asked to do (`TrainConfig`) and what it did (`TrainResult`).

`TrainConfig` holds what a user chooses: the length (steps, a wall-clock
budget, or both: the budget plans the steps, never more than `steps`), the
optimizer and schedule, batches, evaluation, checkpoints, logging and mixed
precision. What a technique decides for its own reasons (which parameters
train, dropout or none, a hook after each step) is passed to `train` itself.
Distillation's `DistillConfig` extends this class, so every field is also a
distillation option.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from slimkit.core.errors import SlimkitError

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None  # optimizer steps; with minutes, the most a plan may take
    minutes: float | None = None  # wall-clock budget, evaluation included
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps
    warmup_steps: int | None = None  # or this many steps below the full rate (replaces the fraction)
    schedule: str = "cosine"
    batch_size: int = 4  # sequences per micro-batch, all processes together
    grad_accum: int = 1
    seq_len: int = 256
    max_samples: int | None = None  # cap on training sequences (None: the whole split)
    eval_every: int = 0  # steps; 0: evaluate only before and after training
    eval_batches: int = 4
    patience: int = 0  # evaluations without improvement before stopping; 0: never
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    log_dir: str | None = None
    cache_teacher: str | None = None
    mixed_precision: str = "auto"
    max_grad_norm: float = 1.0  # 0: no clipping

    def __post_init__(self):
        def fail(what: str):
            raise SlimkitError(what)

        if self.steps is None and self.minutes is None:
            fail("give a training length: steps (--steps) or a wall-clock budget (--minutes)")
        if self.steps is not None and self.steps < 1:
            fail(f"steps must be at least 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            fail(f"minutes must be > 0, got {self.minutes}")
        if not self.lr > 0:
            fail(f"learning rate must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            fail(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            fail(f"warmup_steps must be a whole number >= 0, got {self.warmup_steps!r}: or leave it unset to warm up over the warmup fraction")
        if self.schedule not in SCHEDULES:
            fail(f"unknown schedule '{self.schedule}': use one of {', '.join(SCHEDULES)}")
        if self.mixed_precision not in PRECISIONS:
            fail(f"unknown mixed precision '{self.mixed_precision}': use one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                fail(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.checkpoint_every and not self.checkpoint_dir:
            fail("checkpoint_every needs a checkpoint_dir: say where checkpoints go")
        if self.resume and not self.checkpoint_dir:
            fail("resume needs a checkpoint_dir: point it at the interrupted run's checkpoints")
        if self.patience and not self.eval_every:
            fail("early stopping (patience) needs periodic evaluation: set eval_every")
        if self.max_samples is not None and self.max_samples < 1:
            fail(f"max_samples must be at least 1, got {self.max_samples}")
        if self.max_grad_norm < 0:
            fail(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")


@dataclass
class TrainResult:
    steps: int = 0
    planned_steps: int | None = 0  # None: no plan was needed, the run went on until the clock
    seconds: float = 0.0
    stopped_by: str = "steps"  # steps | time | early-stopping
    train_loss: float | None = None
    eval_metric: str = ""
    initial_eval: float | None = None
    final_eval: float | None = None
    best_eval: float | None = None
    resumed_from: int | None = None
    processes: int = 1
    tokens: int = 0  # token positions trained on (padding included), all processes together
    history: list = field(default_factory=list)  # the evaluations: step and metric
    losses: list = field(default_factory=list)  # the training loss of each step this run took (not in to_dict)

    def to_dict(self) -> dict:
        """The summary a manifest records: everything but the per-step losses."""
        out = asdict(self)
        del out["losses"]
        return out

    def mean_loss(self, k: int, last: bool = False) -> float | None:
        """Mean training loss of the first (or last) `k` steps; None without steps."""
        window = self.losses[-k:] if last else self.losses[:k]
        return sum(window) / len(window) if window else None
