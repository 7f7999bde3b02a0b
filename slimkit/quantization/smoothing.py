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


def require_batches(batches) -> list:
    """The calibration batches as a list; none is an error that names the fix."""
    out = list(batches)
    if not out:
        raise SlimkitError("the calibration data has no window of seq_len tokens: pass more text with --data or lower seq_len (-o seq_len=128)")
    return out


class InputAbsMax:
    """(K,) max |x| per input channel of each hooked layer (names inside `root`), while `root` runs
    its calibration windows (a `blockwise.calibrate` pass)."""

    def __init__(self, root: torch.nn.Module, names: list[str]):
        self.found: dict[str, torch.Tensor] = {}
        self.handles = [root.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(module, args):
            amax = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()  # (K,)
            self.found[name] = torch.maximum(self.found[name], amax) if name in self.found else amax

        return fn

    def next_window(self) -> None:
        pass

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return self.found


def smooth_factors(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """(K,) SmoothQuant factors from activation ranges (K,) and the weight (N, K)."""
    w_absmax = w.abs().amax(0).float().clamp(min=1e-5)  # (K,)
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-5)
