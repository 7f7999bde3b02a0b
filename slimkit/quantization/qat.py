"""QAT: quantization-aware training. Fake-quantize, fine-tune, convert to the real packed format.

Round-to-nearest (int4-wo) picks each weight's nearest level one at a time
and GPTQ corrects the rounding error layer by layer; QAT instead lets the
whole network adapt to its own rounding, by training against the loss it is
judged on. Three steps:

  prepare   every selected linear layer (nn.Linear, GPT-2's Conv1D) becomes a
            `FakeQuantLinear` (fake_quant.py): a float master weight that the
            forward pass rounds to the target grid (bits, group size,
            symmetric or not; scales in the dtype they are stored in) with a
            straight-through gradient. `activations="int8-dynamic"` rounds
            each token's inputs to int8 as well, as `Int8DynamicLinear` does.
  fine-tune on the calibration split (never evaluation): `loss="kd"` (the
            default) distils from the unquantized model, KL(float || quantized)
            of the next-token distributions (`core.losses.LogitKD`, alpha 1),
            or, for encoders, the cosine distance of mean-pooled sentence
            embeddings (`EmbeddingLoss`); `loss="ce"` trains on next-token
            cross-entropy alone (`LogitKD`, alpha 0; causal LMs). The shared
            training loop (`core.training`) runs it: AdamW in fp32, linear
            warmup then cosine decay, gradients clipped at norm 1, `steps`
            optimizer steps, fewer when `minutes` (training wall clock) cannot
            hold them: the loop plans the steps from timed probes and re-fits
            the plan at each quarter of the budget, so the schedule completes.
  convert   each FakeQuantLinear becomes the `WeightOnlyLinear` (or
            `Int8DynamicLinear`) that int4-wo / int8-wo / int8-dynamic build,
            holding the quantization of the trained master weight: the same
            kernels, the same artifact format, the same reload. Its weight
            equals the fake-quantized weight exactly; outputs differ only by
            the kernels' bf16 rounding. (No SmoothQuant factors: training
            adapts the weights to the per-token grid instead.)
            `embeddings=True` then stores the input embedding (and a tied
            head) as int8 rows, as the other methods do, after training, so
            training does not see that rounding.

What trains: the master weights and biases of the fake-quantized layers.
Embeddings, norms and every layer left in float (the LM head by default) are
frozen: they are not what the rounding damaged, the tied LM head shares the
embedding, and a few hundred steps on a small calibration set should move as
little as possible of what the model learned. Biases stay float in every
target format, so they are free to absorb the mean rounding error. The model
trains in eval mode (no dropout), so a step is a deterministic function of
the weights and the batch: with `steps` and no `minutes`, the result is
determined by the context's `seed` (which orders the calibration batches).

Trade-offs: it costs a training run (forward and backward through the
student, a forward through the float teacher, and the teacher's full logits
in memory), where RTN costs a second and GPTQ a minute; it recovers more of
the loss than either at low bits. It can overfit a small calibration set:
check quality on the evaluation split (`slimkit eval --reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimkit.core import data as D
from slimkit.core.arch import CAUSAL_LM, ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.core.losses import DistillLoss, EmbeddingLoss, LogitKD, Term
from slimkit.core.progress import note
from slimkit.core.registry import Context, register
from slimkit.core.selection import linear_weight, select_linears, set_module
from slimkit.core.training import Distiller, TrainConfig, all_but, train
from slimkit.io.model import LoadedModel, copy_model
from slimkit.quantization.common import QuantizeOptions, cast_unquantized, check_int_format
from slimkit.quantization.embedding import quantize_embeddings
from slimkit.quantization.fake_quant import FakeQuantLinear
from slimkit.quantization.formats import check_group
from slimkit.quantization.smoothing import require_batches

LOSSES = ("kd", "ce")
ACTIVATIONS = ("none", "int8-dynamic")
MIN_STEPS = 10  # below this a time budget is warned about: Adam's first steps move every weight by about lr


@dataclass(frozen=True)
class QATConfig(QuantizeOptions):
    bits: int = 4
    group_size: int | None = 32  # None: one scale per output channel
    symmetric: bool = False
    activations: str = "none"  # none: weight-only target; int8-dynamic: per-token int8 inputs too
    loss: str = "kd"  # kd: distil from the float model; ce: next-token cross-entropy
    steps: int = 200  # optimizer steps (0: convert without training, i.e. round to nearest)
    minutes: float | None = None  # training wall-clock budget; fewer steps are planned to fit it
    lr: float = 1e-4
    warmup: float = 0.1  # fraction of the steps
    seq_len: int = 256
    batch_size: int = 4
    calibration_samples: int = 128  # calibration windows of seq_len tokens, cycled over
    embeddings: bool = True

    def __post_init__(self):
        check_int_format("qat", self.bits, self.group_size)
        if self.activations not in ACTIVATIONS:
            raise SlimkitError(f"unknown activations '{self.activations}' for qat: use none (weight-only) or int8-dynamic")
        if self.activations == "int8-dynamic" and (self.bits, self.group_size, self.symmetric) != (8, None, True):
            raise SlimkitError("activations=int8-dynamic converts to int8-dynamic layers, whose weights are int8 symmetric per channel: set bits=8, group_size=None, symmetric=true")
        if self.loss not in LOSSES:
            raise SlimkitError(f"unknown loss '{self.loss}' for qat: use kd (distil from the float model) or ce (next-token cross-entropy)")
        if self.steps < 0:
            raise SlimkitError(f"steps={self.steps} is negative: use 0 (no training) or more, e.g. steps=200")
        if self.minutes is not None and not self.minutes > 0:
            raise SlimkitError(f"minutes={self.minutes} must be > 0: give a training budget such as minutes=4, or leave it unset")
        if not self.lr > 0:
            raise SlimkitError(f"lr={self.lr} must be > 0: use e.g. lr=1e-4")
        if not 0 <= self.warmup < 1:
            raise SlimkitError(f"warmup={self.warmup} must be a fraction in [0, 1), e.g. 0.1")
        if self.seq_len < 8 or self.batch_size < 1 or self.calibration_samples < 1:
            raise SlimkitError(f"training needs seq_len >= 8, batch_size >= 1 and calibration_samples >= 1, got {self.seq_len}, {self.batch_size} and {self.calibration_samples}")
        super().__post_init__()


# --------------------------------------------------------------------------- prepare / convert


def prepare(model: nn.Module, config: QATConfig) -> list[str]:
    """Replace the selected linear layers with FakeQuantLinear, in place; return their names."""
    names = list(select_linears(model, tuple(config.targets), tuple(config.ignore)))
    for name in names:  # a group size that does not fit fails before training, not after
        check_group(linear_weight(model.get_submodule(name)).shape[1], config.group_size)
    for name in names:
        layer = model.get_submodule(name)
        set_module(model, name, FakeQuantLinear.from_float(layer, config.bits, config.group_size, config.symmetric,
                                                           config.activations == "int8-dynamic"))
    return names


def convert(model: nn.Module) -> list[str]:
    """Replace every FakeQuantLinear with its real packed module, in place; return the names."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name in names:
        set_module(model, name, model.get_submodule(name).convert())
    return names


# --------------------------------------------------------------------------- fine-tuning


def loss_term(kind: str, loss: str) -> Term:
    """The training objective for a model kind: logit KD, cross-entropy, or the embedding loss."""
    if kind == CAUSAL_LM:
        return LogitKD(alpha=1.0 if loss == "kd" else 0.0)
    if loss == "ce":
        raise SlimkitError(f"loss=ce needs next-token labels, and a model of kind {kind} predicts none: use loss=kd")
    return EmbeddingLoss() if kind == ENCODER else LogitKD(alpha=1.0)


def finetune(lm: LoadedModel, teacher: nn.Module | None, batches: list[torch.Tensor], config: QATConfig, ctx: Context = Context()) -> dict:
    """Train `lm`'s FakeQuantLinear weights and biases in place (the rest frozen); return what happened."""
    trained = [p for m in lm.model.modules() if isinstance(m, FakeQuantLinear) for p in m.parameters()]
    distiller = Distiller(lm.model, DistillLoss([loss_term(lm.kind, config.loss)]), lm.kind)
    inputs = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in batches]  # (B, seq_len)
    cfg = TrainConfig(steps=config.steps, minutes=config.minutes, lr=config.lr, warmup=config.warmup, schedule="cosine",
                      batch_size=config.batch_size, seq_len=config.seq_len, mixed_precision="no", max_grad_norm=1.0)
    result = train(distiller, teacher, inputs, [], cfg, seed=ctx.seed, on_step=ctx.on_step, freeze=all_but(lm.model, trained),
                   eval_mode=True, device=ctx.device_for(lm.model), label="Training (QAT)")
    if config.minutes is not None and result.planned_steps < MIN_STEPS:
        note(f"qat: {config.minutes} minutes fit only {result.planned_steps} steps of {result.seconds / max(1, result.steps):.0f} s; "
             f"so few Adam steps can end worse than no training (steps=0): raise minutes, or lower batch_size / seq_len")
    return {
        "loss": config.loss, "steps": result.steps, "planned_steps": result.planned_steps, "stopped_by": result.stopped_by,
        "seconds": result.seconds, "trained_tensors": len(trained),
        "first_loss": result.mean_loss(5), "last_loss": result.mean_loss(5, last=True),
    }


@register("qat", "quantize", QATConfig, "quantization-aware training: fake-quantize, fine-tune on calibration text (KD from the float model), convert to int4/int8-wo or int8-dynamic")
def apply(model: LoadedModel, config: QATConfig = QATConfig(), ctx: Context = Context()) -> LoadedModel:
    lm = copy_model(model, "qat")
    if config.steps > 0:
        loss_term(lm.kind, config.loss)  # a loss the model cannot take fails before anything runs
    prepare(lm.model, config)
    if config.steps > 0:
        source = ctx.calibration()
        batches = require_batches(D.calibration_batches(lm.tokenizer, source, config.seq_len, config.calibration_samples, config.batch_size))
        lm.manifest["training"] = finetune(lm, model.model if config.loss == "kd" else None, batches, config, ctx)
    convert(lm.model)
    if config.embeddings:
        quantize_embeddings(lm.model)
    cast_unquantized(lm.model, config.compute_dtype)
    return lm.record("quantize", "qat", config)
