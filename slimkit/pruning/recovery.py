"""Recovery training: fine-tune a pruned model within a wall-clock budget, masks held fixed.

Recovery training runs inside a wall-clock budget (`minutes`) on the
calibration split, never the evaluation split:
  causal LM, finetune   next-token cross-entropy;
  causal LM, distill    KL(teacher || student) of next-token distributions, the
                        teacher being the unpruned model (logit distillation:
                        it pulls the model back towards the original rather
                        than towards the calibration text);
  encoder               1 - cosine of mean-pooled embeddings to the unpruned
                        model's (pooled in fp32: under bf16 autocast the loss,
                        a few hundredths, would drown in rounding).
On this CPU a 135M model trains at roughly 100-150 tokens/s, so 20 minutes
is about 150k tokens: enough to heal structured pruning a good deal, not to
retrain. To get more steps from it, embeddings (tied to the LM head in
SmolLM2) stay frozen and matmuls run under bf16 autocast where the CPU has
bf16 instructions (fp32 master weights and optimizer), with attention computed in
fp32 (`core.attention.training_attention`: the fused CPU kernel is slow backwards in bf16).
Dropout stays off (the model is kept in eval mode) so runs repeat.

The shared loop (`core.training`) runs it, with what recovery asks for: the
losses above as `core.losses` terms (`LogitKD` with alpha 0 is the plain
cross-entropy, alpha 1 the KD; `EmbeddingLoss` for encoders), the pruning masks
re-applied after every optimizer step (so unstructured and gradual pruning keep
their zeros), no gradient clipping, and a linear warmup over `warmup_steps`
followed by a constant rate. A constant rate needs no step plan, so the budget
is spent training until the clock (or `max_steps`) stops it, with no timing probes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core import data as D
from slimkit.core import losses as L
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context
from slimkit.core.training import Distiller, TrainConfig, train
from slimkit.io.model import LoadedModel
from slimkit.pruning import common
from slimkit.pruning.masks import apply_masks


@dataclass(frozen=True)
class RecoveryConfig:
    minutes: float = 5.0
    max_steps: int | None = None  # stop earlier after this many optimizer steps
    mode: str = "finetune"  # causal LMs: finetune | distill; encoders always match the original's embeddings
    lr: float = 5e-5
    warmup_steps: int = 10
    seq_len: int = 256
    batch_size: int = 4
    train_embeddings: bool = False  # the (often tied) embedding matrix stays frozen: cheaper, less drift
    bf16: bool = True  # bf16 autocast for matmuls (fp32 master weights), on CPUs with bf16 support and CUDA

    def __post_init__(self):
        common.check_minutes(self.minutes)
        if self.mode not in ("finetune", "distill"):
            raise SlimkitError(f"unknown recovery mode '{self.mode}': use 'finetune' or 'distill'")
        if not self.lr > 0:
            raise SlimkitError(f"learning rate must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SlimkitError(f"max_steps must be at least 1, got {self.max_steps}")


def recover(lm: LoadedModel, reference: LoadedModel, config: RecoveryConfig, ctx: Context = Context(), masks: dict | None = None) -> dict:
    """Train `lm` in place for `config.minutes` on `ctx`'s text (masks, name -> keep-mask, stay applied); return stats."""
    model = lm.model
    if config.minutes == 0:
        return {"steps": 0, "tokens": 0, "seconds": 0.0, "loss_first": None, "loss_last": None}
    batches = _training_batches(lm, config, ctx.calibration())
    term = L.EmbeddingLoss() if lm.kind != CAUSAL_LM else L.LogitKD(alpha=1.0 if config.mode == "distill" else 0.0)
    frozen = [] if config.train_embeddings else [  # no gradient at all: also skips the (tied) lm_head weight-gradient matmul
        p for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    ]
    modules = {n: model.get_submodule(n) for n in (masks or {})}
    result = train(Distiller(model, L.DistillLoss([term]), lm.kind), reference.model if term.uses_teacher else None, batches, [],
                   train_config(config), seed=ctx.seed, on_step=ctx.on_step, freeze=frozen,
                   after_step=(lambda: apply_masks(modules, masks)) if masks else None, eval_mode=True,
                   device=ctx.device_for(model), label=f"Recovery training ({config.minutes:g} min)")
    return {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 1),
            "loss_first": result.mean_loss(1), "loss_last": result.mean_loss(10, last=True)}


def train_config(config: RecoveryConfig) -> TrainConfig:
    """The loop's settings for recovery: until the clock (or max_steps), no gradient clipping, bf16 where native,
    a linear warmup to the full rate at step `warmup_steps` (the loop counts the steps below it), then constant."""
    return TrainConfig(steps=config.max_steps, minutes=config.minutes, lr=config.lr, warmup_steps=max(0, config.warmup_steps - 1),
                       schedule="constant", batch_size=config.batch_size, seq_len=config.seq_len,
                       mixed_precision="auto" if config.bf16 else "no", max_grad_norm=0.0)


def _training_batches(lm: LoadedModel, config: RecoveryConfig, source: D.TextSource) -> list[dict]:
    batches = common.calibration_inputs(lm, source, 100_000, config.seq_len, config.batch_size)
    if lm.kind == CAUSAL_LM:  # next-token targets; no attention mask, so KD averages over every position
        batches = [{**b, "labels": b["input_ids"]} for b in batches]
    return batches
