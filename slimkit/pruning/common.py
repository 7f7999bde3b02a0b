"""What every pruning method shares: option checks, calibration inputs, statistics
hooks and the sparsity report.

Weights are chosen as everywhere in slimkit (`core.selection`): linear layers that
match `targets` and none of `ignore`.

Calibration data is always the calibration split: token windows for causal
LMs, padded passages for encoders. Evaluation text is never seen here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.core import data as D
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.selection import check_patterns, is_conv1d, linear_weight
from slimkit.io.model import LoadedModel

DEFAULT_IGNORE = ("lm_head", "score", "classifier", "pooler.*")
NO_SPEED = "no speed without sparse kernels: zeroed weights are stored and multiplied like any others on this runtime"


# --------------------------------------------------------------------------- validation


def check_sparsity(value, name: str = "sparsity") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise SlimkitError(f"{name} must be a fraction in [0, 1), got {value!r}: e.g. --sparsity 0.5 removes half")


def check_calibration(samples: int, seq_len: int, batch_size: int) -> None:
    for name, v in (("calibration_samples", samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SlimkitError(f"{name} must be a positive integer, got {v!r}")


def check_minutes(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise SlimkitError(f"recover_minutes must be a number of minutes >= 0, got {value!r}")


@dataclass(frozen=True)
class PruneOptions:
    """What every pruning method's config holds besides its own amounts: the layers it may
    touch, the calibration text its criteria read (those that need data), and the recovery
    training that follows (`recovery.py`)."""

    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    calibration_samples: int = 32  # used only by criteria that need data
    seq_len: int = 256
    batch_size: int = 4
    recover_minutes: float = 0.0

    def __post_init__(self):
        check_patterns(self.targets, self.ignore)
        check_calibration(self.calibration_samples, self.seq_len, self.batch_size)
        check_minutes(self.recover_minutes)


# --------------------------------------------------------------------------- calibration


def calibration_inputs(lm: LoadedModel, source: D.TextSource, samples: int, seq_len: int, batch_size: int) -> list[dict]:
    """Model inputs from `source` (a calibration split): (B, seq_len) windows for causal
    LMs, padded passages (B, <=seq_len) with an attention mask for encoders."""
    if lm.kind == CAUSAL_LM:
        batches = [{"input_ids": ids} for ids in D.calibration_batches(lm.tokenizer, source, seq_len, samples, batch_size)]
    else:
        texts = D.passages(source.texts(), limit=samples)
        batches = [
            dict(lm.tokenizer(b, padding=True, truncation=True, max_length=seq_len, return_tensors="pt"))
            for b in D.batched(texts, batch_size)
        ]
    if not batches:
        raise SlimkitError(f"the calibration split gave no sequences of {seq_len} tokens: lower seq_len")
    return batches


def forward(lm: LoadedModel, batch: dict, **kw):
    device = next(lm.model.parameters()).device
    return lm.model(**{k: v.to(device) for k, v in batch.items()}, **kw)


class InputSqNorms:
    """name -> sum over calibration tokens of x_j^2 for each input feature j: (in_features,), of each
    hooked layer (names inside `root`) while `root` runs its calibration windows (a `blockwise.calibrate`
    pass, or the whole model). sqrt of it is the input-activation L2 norm that Wanda and the activation
    criterion weigh weights by. Padding tokens are skipped: `masks` holds each window's attention mask
    (None where it has none), in the order the windows run."""

    def __init__(self, root: nn.Module, names: list[str], masks: list[torch.Tensor | None]):
        self.masks, self.window = masks, -1
        self.sums = {n: torch.zeros(linear_weight(root.get_submodule(n)).shape[1], dtype=torch.float64) for n in names}
        self.handles = [root.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(module, args):
            x = args[0].detach().float()  # (B, T, in)
            mask = self.masks[self.window]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x * mask.to(x.device).float()[..., None]
            self.sums[name] += x.pow(2).reshape(-1, x.shape[-1]).sum(0).double().cpu()

        return fn

    def next_window(self) -> None:
        self.window += 1

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {n: s.float() for n, s in self.sums.items()}


def input_sq_norms(lm: LoadedModel, modules: dict[str, nn.Module], batches: list[dict]) -> dict[str, torch.Tensor]:
    """`InputSqNorms` of `modules` over one pass of the whole model."""
    norms = InputSqNorms(lm.model, list(modules), [b.get("attention_mask") for b in batches])
    try:
        with torch.inference_mode():
            for batch in batches:
                norms.next_window()
                forward(lm, batch, **({"use_cache": False} if lm.kind == CAUSAL_LM else {}))
    finally:
        found = norms.close()
    return found


def input_grams(lm: LoadedModel, modules: dict[str, nn.Module], batches: list[dict]) -> dict[str, torch.Tensor]:
    """name -> Gram matrix of the module's inputs over calibration tokens, with a
    trailing constant feature: [[X^T X, X^T 1], [1^T X, n]], (in + 1, in + 1).

    What a least-squares refit of the module needs (`removal.refit_inputs`).
    Accumulated in float32 per batch and summed in float64; padding tokens of
    encoder batches are skipped.
    """
    grams = {n: torch.zeros(linear_weight(m).shape[1] + 1, linear_weight(m).shape[1] + 1, dtype=torch.float64) for n, m in modules.items()}
    mask: dict[str, torch.Tensor | None] = {"m": None}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float()  # (B, T, in)
            if mask["m"] is not None and x.dim() == 3 and x.shape[:2] == mask["m"].shape:
                x = x[mask["m"].to(x.device).bool()]  # (tokens, in)
            x = x.reshape(-1, x.shape[-1])
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
            grams[name] += (x.T @ x).double().cpu()

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                mask["m"] = batch.get("attention_mask")
                forward(lm, batch, **({"use_cache": False} if lm.kind == CAUSAL_LM else {}))
    finally:
        for h in handles:
            h.remove()
    return grams


def gradient_stats(lm: LoadedModel, modules: dict[str, nn.Module], batches: list[dict]) -> tuple[dict, dict]:
    """name -> (mean gradient, mean squared per-batch gradient) of the weight, both
    (out, in), from the next-token loss on calibration batches (causal LMs only)."""
    if lm.kind != CAUSAL_LM:
        raise SlimkitError(
            f"gradient criteria (taylor, fisher) need a loss, which a {lm.kind} has not here: "
            "use importance='magnitude-l1', 'magnitude-l2' or 'activation'"
        )
    model = lm.model
    params = {n: m.weight for n, m in modules.items()}
    grad = {n: torch.zeros(linear_weight(m).shape) for n, m in modules.items()}
    grad_sq = {n: torch.zeros(linear_weight(m).shape) for n, m in modules.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            ids = batch["input_ids"]
            loss = forward(lm, {"input_ids": ids, "labels": ids}, use_cache=False).loss
            loss.backward()
            for n, p in params.items():
                g = p.grad.detach().float().cpu()
                g = g.T if is_conv1d(modules[n]) else g
                grad[n] += g / len(batches)
                grad_sq[n] += g.pow(2) / len(batches)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return grad, grad_sq


# --------------------------------------------------------------------------- report


def zero_counts(model: nn.Module, names) -> dict[str, tuple[int, int]]:
    """name -> (exact zeros, weights) of each selected weight."""
    return {n: (int((model.get_submodule(n).weight == 0).sum()), model.get_submodule(n).weight.numel()) for n in names}


def sparsity_report(model: nn.Module, names) -> dict:
    """Fraction of exact zeros per selected weight, and overall."""
    return report_of(zero_counts(model, names))


def report_of(counts: dict[str, tuple[int, int]]) -> dict:
    """`sparsity_report` from `zero_counts` (counted block by block as a walk goes)."""
    zeros, total = sum(z for z, _ in counts.values()), sum(t for _, t in counts.values())
    return {"overall": round(zeros / max(total, 1), 6), "layers": {n: round(z / t, 6) for n, (z, t) in counts.items()}}


def calibration(lm: LoadedModel, config, ctx) -> Callable[[], list[dict]]:
    """The calibration inputs a pruning `config` asks for (`calibration_samples`, `seq_len`, `batch_size`)
    from the context's text, made only when first needed (criteria without data never need them)."""
    made: list = []

    def get() -> list[dict]:
        if not made:
            made.append(calibration_inputs(lm, ctx.calibration(), config.calibration_samples, config.seq_len, config.batch_size))
        return made[0]

    return get
