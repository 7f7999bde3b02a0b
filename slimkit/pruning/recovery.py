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
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import torch

from slimkit.core import data as D
from slimkit.core import losses as L
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.attention import attention_implementation, training_attention
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import bf16_native
from slimkit.core.progress import status
from slimkit.core.registry import Context
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
    batches = _training_batches(lm, config, ctx.calibration())
    rng = random.Random(ctx.seed)
    frozen = [] if config.train_embeddings else [
        p for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters() if p.requires_grad
    ]
    for p in frozen:  # no gradient at all: also skips the (tied) lm_head weight-gradient matmul
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16 and bf16_native(device))
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    modules = {n: model.get_submodule(n) for n in (masks or {})}
    was_training = model.training
    model.eval()  # no dropout
    deadline = time.monotonic() + config.minutes * 60
    start, losses, tokens, step = time.monotonic(), [], 0, 0
    with status(f"Recovery training for {config.minutes:g} min"), attention_implementation(model, training_attention(model)):
        for epoch in itertools.count():
            order = list(range(len(batches)))
            rng.shuffle(order)
            for i in order:
                if time.monotonic() >= deadline or (config.max_steps is not None and step >= config.max_steps):
                    break
                for group in opt.param_groups:
                    group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
                with autocast:
                    loss = _loss(lm, reference, batches[i], config.mode)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if masks:
                    apply_masks(modules, masks)
                losses.append(loss.item())
                tokens += int(batches[i].get("attention_mask", batches[i]["input_ids"]).numel())
                step += 1
            else:
                continue
            break
    opt.zero_grad(set_to_none=True)
    del opt
    model.train(was_training)
    for p in frozen:
        p.requires_grad_(True)
    return {"steps": step, "tokens": tokens, "seconds": round(time.monotonic() - start, 1),
            "loss_first": losses[0] if losses else None, "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None}


def _training_batches(lm: LoadedModel, config: RecoveryConfig, source: D.TextSource) -> list[dict]:
    return common.calibration_inputs(lm, source, 100_000, config.seq_len, config.batch_size)


def _loss(lm: LoadedModel, reference: LoadedModel, batch: dict, mode: str) -> torch.Tensor:
    if lm.kind == CAUSAL_LM:
        ids = batch["input_ids"]
        if mode == "finetune":
            return common.forward(lm, {"input_ids": ids, "labels": ids}, use_cache=False).loss
        student = common.forward(lm, batch, use_cache=False).logits  # (B, T, V)
        with torch.no_grad():
            teacher = common.forward(reference, batch, use_cache=False).logits
        return L.kd_loss(student, teacher)
    out = common.forward(lm, batch).last_hidden_state  # (B, T, H)
    with torch.no_grad():
        ref = common.forward(reference, batch).last_hidden_state
    mask = batch["attention_mask"].to(out.device)
    return L.embedding_loss(L.mean_pool(out, mask), L.mean_pool(ref, mask))
