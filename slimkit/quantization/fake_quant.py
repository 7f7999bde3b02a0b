"""Fake quantization for training: float tensors that hold exactly the values a real format stores.

`fake_quantize_weight(w, ...)` rounds a float master weight to the grid of
the target format (`formats.quantize_int`, with the scales rounded to the
dtype the packed module stores them in) and returns the dequantized values,
so a layer that multiplies by it computes what the converted `WeightOnlyLinear`
will compute, up to the kernel's bf16 rounding. `fake_quantize_tokens(x)` does
the same for the per-token int8 activations of `Int8DynamicLinear`.

Rounding has a zero gradient almost everywhere, so training through it would
never move a weight. The straight-through estimator (`straight_through`)
passes the gradient of the rounded value to the float value unchanged:
d round(w) / dw := 1. The master weight therefore drifts under the loss, and
a weight flips to a neighbouring level once the drift carries it past a
rounding boundary. The scales are recomputed from the master weight on every
call (absmax or min/max of each group) and get no gradient of their own: they
follow the weights, they are not learned (as in LSQ). These grids never clip
(the scale spans the group's range), so the plain STE needs no clipping mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.selection import linear_weight
from slimkit.quantization import formats as Q
from slimkit.quantization.modules import Int8DynamicLinear, WeightOnlyLinear


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        return rounded.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """The values of `rounded` (same shape as `x`), with the gradient of the identity in `x`."""
    return _StraightThrough.apply(x, rounded.detach())


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> Q.QuantizedInt:
    """Round-to-nearest of w (N, K), scales (and offsets) rounded to their stored dtype."""
    qt = Q.quantize_int(w, bits, group_size, symmetric)
    dtype = Q.scale_dtype(group_size)
    qt.scale = Q.stored_scales(qt.scale, dtype).float()
    qt.offset = None if qt.offset is None else Q.stored_scales(qt.offset, dtype).float()
    return qt


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """w (N, K) -> (N, K): the stored format's dequantized values, straight-through gradient."""
    return straight_through(w, quantize_weight(w, bits, group_size, symmetric).dequantize())


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, K) float32 on the per-token int8 grid of Int8DynamicLinear, straight-through."""
    q, scale = Q.quantize_tokens(x.detach())  # (M, K) int8, (M, 1)
    return straight_through(x.float(), q.float() * scale)


class FakeQuantLinear(nn.Module):
    """A linear layer (nn.Linear or GPT-2's Conv1D) that trains a float master weight
    through its quantized values; `convert()` returns the real packed module.

    weight: (N, K) fp32 master, laid out as nn.Linear's whatever the original was.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int | None,
                 symmetric: bool, int8_activations: bool = False):
        super().__init__()
        n, k = weight.shape
        Q.check_group(k, group_size)
        Q.qrange(bits)
        if int8_activations and (bits, group_size, symmetric) != (8, None, True):
            raise SlimkitError("int8 activations convert to Int8DynamicLinear, whose weights are int8 symmetric per channel: use bits=8, group_size=None, symmetric=True")
        self.in_features, self.out_features = k, n
        self.bits, self.group_size, self.symmetric, self.int8_activations = bits, group_size, symmetric, int8_activations
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None

    @classmethod
    def from_float(cls, layer: nn.Module, bits: int, group_size: int | None, symmetric: bool,
                   int8_activations: bool = False) -> "FakeQuantLinear":
        return cls(linear_weight(layer), getattr(layer, "bias", None), bits, group_size, symmetric, int8_activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize_weight(self.weight, self.bits, self.group_size, self.symmetric)  # (N, K)
        shape = x.shape
        h = x.reshape(-1, shape[-1]).float()  # (M, K)
        if self.int8_activations:
            h = fake_quantize_tokens(h)
        y = F.linear(h, w, self.bias)  # (M, N)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    @torch.no_grad()
    def convert(self) -> nn.Module:
        """The real module with this master weight's quantization (what the forward pass used)."""
        has_bias = self.bias is not None
        if self.int8_activations:
            module = Int8DynamicLinear(self.in_features, self.out_features, has_bias)
            module.set_weight(self.weight.float())
        else:
            module = WeightOnlyLinear(self.in_features, self.out_features, has_bias, self.bits, self.group_size, self.symmetric)
            module.set_quantized(Q.quantize_int(self.weight.float(), self.bits, self.group_size, self.symmetric))
        if has_bias:
            module.bias.copy_(self.bias)
        return module.to(self.weight.device)

    def extra_repr(self) -> str:
        act = ", int8 activations" if self.int8_activations else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}{act}"
