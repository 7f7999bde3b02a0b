"""Calibration statistics shared by activation-aware methods: per-channel input ranges.

SmoothQuant's factor for input channel j of a layer is

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

where max|X_j| is the largest magnitude channel j takes over calibration
inputs and max|W_j| the largest weight reading it. alpha = 0.5 splits the
difficulty evenly between activations and weights; larger alpha moves more
of it to the weights.
"""

from __future__ import annotations

import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.progress import track
from slimkit.io.model import model_device


def require_batches(batches) -> list:
    """The calibration batches as a list; none is an error that names the fix."""
    out = list(batches)
    if not out:
        raise SlimkitError("the calibration data has no window of seq_len tokens: pass more text with --data or lower seq_len (-o seq_len=128)")
    return out


def input_absmax(model: torch.nn.Module, names: list[str], batches, causal: bool) -> dict[str, torch.Tensor]:
    """name -> (K,) max |x| per input channel over the calibration batches."""
    out: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            amax = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()  # (K,)
            out[name] = torch.maximum(out[name], amax) if name in out else amax

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for ids in track(require_batches(batches), "Calibrating activation ranges"):
                ids = ids.to(model_device(model))  # calibration runs where the model is
                model(input_ids=ids, use_cache=False) if causal else model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return out


def smooth_factors(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """(K,) SmoothQuant factors from activation ranges (K,) and the weight (N, K)."""
    w_absmax = w.abs().amax(0).float().clamp(min=1e-5)  # (K,)
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-5)
