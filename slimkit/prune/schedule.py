"""Gradual pruning and recovery training.

Cubic schedule (Zhu & Gupta 2017, "To prune, or not to prune"): over n steps
the sparsity rises from s_i to s_f as

    s_t = s_f + (s_i - s_f) * (1 - t / n)^3,   t = 0..n

so it climbs fast while many redundant weights remain and slowly near the
end, when each removal hurts more. Between steps the surviving weights are
trained with the masks held fixed, so the network adapts before it loses more.

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
fp32 (`models.training_attention`: the fused CPU kernel is slow backwards in bf16).
Dropout stays off (the model is kept in eval mode) so runs repeat.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import torch

from slimkit import data as D
from slimkit.benchmark import bf16_native
from slimkit.distill import losses as L
from slimkit.errors import SlimkitError
from slimkit.models import CAUSAL_LM, LoadedModel, attention_implementation, training_attention
from slimkit.progress import status
from slimkit.prune import common, importance
from slimkit.prune.unstructured import SCOPES, apply_masks, check_minutes, global_masks, layer_mask
from slimkit.registry import register


def cubic_sparsity(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Sparsity after `step` of `steps` under the cubic schedule."""
    if not 0 <= step <= steps:
        raise ValueError(f"step {step} outside 0..{steps}")
    return final + (initial - final) * (1 - step / steps) ** 3


# --------------------------------------------------------------------------- recovery


@dataclass(frozen=True)
class RecoveryConfig:
    minutes: float = 5.0
    max_steps: int | None = None  # stop earlier after this many optimizer steps
    mode: str = "finetune"  # causal LMs: finetune | distill; encoders always match the original's embeddings
    lr: float = 5e-5
    warmup_steps: int = 10
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    train_embeddings: bool = False  # the (often tied) embedding matrix stays frozen: cheaper, less drift
    bf16: bool = True  # bf16 autocast for matmuls (fp32 master weights), on CPUs with bf16 support and CUDA

    def __post_init__(self):
        check_minutes(self.minutes)
        if self.mode not in ("finetune", "distill"):
            raise SlimkitError(f"unknown recovery mode '{self.mode}': use 'finetune' or 'distill'")
        if not self.lr > 0:
            raise SlimkitError(f"learning rate must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SlimkitError(f"max_steps must be at least 1, got {self.max_steps}")


def recover(lm: LoadedModel, reference: LoadedModel, config: RecoveryConfig, masks: dict | None = None) -> dict:
    """Train `lm` in place for `config.minutes` (masks, name -> keep-mask, stay applied); return stats."""
    model = lm.model
    batches = _training_batches(lm, config)
    rng = random.Random(config.seed)
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


def _training_batches(lm: LoadedModel, config: RecoveryConfig) -> list[dict]:
    if lm.kind == CAUSAL_LM:
        return [{"input_ids": ids} for ids in D.calibration_batches(lm.tokenizer, None, config.seq_len, 100_000, config.batch_size)]
    return common.calibration_inputs(lm, 100_000, config.seq_len, config.batch_size)


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
        check_minutes(self.recover_minutes)
        RecoveryConfig(mode=self.recovery)
        common.check_patterns(self.targets, self.ignore)
        common.check_calibration(self.calibration_samples, self.seq_len, self.batch_size)


@register("gradual", "prune", GradualConfig, "cubic sparsity schedule with recovery training between steps (Zhu & Gupta)")
def apply_gradual(model: LoadedModel, config: GradualConfig, **context) -> LoadedModel:
    lm = common.copy_model(model, f"gradual{config.sparsity:g}")
    modules = common.select_linears(lm.model, config.targets, config.ignore)
    crit = importance.get(config.importance)
    schedule, history = [], []
    for t in range(1, config.steps + 1):
        s = cubic_sparsity(t, config.steps, config.sparsity, config.initial_sparsity)
        batches = lambda: common.calibration_inputs(lm, config.calibration_samples, config.seq_len, config.batch_size)  # noqa: E731
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
            history.append(recover(lm, model, rc, masks=masks))
    report = common.sparsity_report(lm.model, modules)
    lm.manifest["prune_report"] = {"method": "gradual", "schedule": schedule, "recovery": history, "sparsity": report, "speed": common.NO_SPEED}
    return common.record(lm, "gradual", config, schedule=schedule, achieved_sparsity=report["overall"], speed=common.NO_SPEED)
