"""Dynamic int8: int8 weights per output channel, activations quantized per token at run time.

y = (x_q @ W_q^T) * s_x * s_w, with x_q = round(x / s_x) computed on every
call (s_x = absmax of each token's row / 127) and the product accumulated in
int32 by `torch._int_mm` (VNNI instructions on x86).

Why the textbook `torch.ao.quantization.quantize_dynamic` loses quality
(SmolLM2-135M perplexity 15.3 -> 38, MiniLM cosine 0.94), and what this does instead:
  * reduce_range: fbgemm quantizes activations to 7 bits (0..127) to avoid an
    overflow in older AVX2 instructions; here activations use the full
    symmetric 8-bit range.
  * per-tensor activation scales: one scale for the whole (tokens x features)
    input lets one outlier token or channel set the step for every value;
    here each token has its own scale.
  * the LM head and embeddings: the head's logits feed a softmax over 49K
    tokens, where small errors move probability mass; it is left in float by
    default (`ignore=("lm_head",)`).
Remaining loss comes from outlier *channels* inside a token, which a per-token
scale cannot isolate: `smooth_alpha` turns on SmoothQuant (smoothing.py),
calibrated on the calibration split, which divides those channels down
before quantization and multiplies the weights' columns up to compensate.
The factors are kept in each layer (one extra multiply per call) rather than
folded into the preceding norm, so it works on any architecture. The ranges
are taken block by block on the float model's inputs to each block
(`blockwise.calibrate`), the same ranges as one whole-model pass gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core import data as D
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context, register
from slimkit.core.selection import linear_weight, select_linears, set_module
from slimkit.io.blockwise import calibrate, start
from slimkit.io.model import copy_model
from slimkit.quantization.common import QuantizeOptions, cast_unquantized, check_calibration
from slimkit.quantization.modules import Int8DynamicLinear
from slimkit.quantization.smoothing import InputAbsMax, require_batches, smooth_factors


@dataclass(frozen=True)
class Int8DynamicConfig(QuantizeOptions):
    smooth_alpha: float | None = None  # SmoothQuant migration strength; None: off
    calibration_samples: int = 16  # calibration windows (SmoothQuant only)
    seq_len: int = 512

    def __post_init__(self):
        if self.smooth_alpha is not None and not 0 < self.smooth_alpha < 1:
            raise SlimkitError(f"smooth_alpha={self.smooth_alpha} is out of range: use a value in (0, 1) such as 0.5, or None to turn smoothing off")
        check_calibration(self.calibration_samples, self.seq_len)
        super().__post_init__()


@register("int8-dynamic", "quantize", Int8DynamicConfig, "int8 weights per channel x int8 activations per token (torch._int_mm), optional SmoothQuant")
def apply(model, config: Int8DynamicConfig = Int8DynamicConfig(), ctx: Context = Context()):
    """Block by block (`blockwise.calibrate`): without smoothing each block is only rounded; with it, each block's
    channel ranges come from its float inputs first. A lazy model is read, and streaming written, a block at a time."""
    lm = copy_model(model, "int8-dynamic", lazy=True)
    walk = start(lm, ctx.stream)
    names = list(select_linears(lm.model, tuple(config.targets), tuple(config.ignore)))
    batches, passes = [], []
    if config.smooth_alpha is not None:
        batches = require_batches(D.calibration_batches(lm.tokenizer, ctx.calibration(), config.seq_len, config.calibration_samples, batch_size=1))
        passes = [lambda part, layers, _: InputAbsMax(part, layers)]

    def change(part, prefix, layers, ranges):
        _quantize_layers(part, layers, ranges, config.smooth_alpha)
        if prefix:  # a block; the rest is cast at the end
            cast_unquantized(part, config.compute_dtype)

    with torch.no_grad():
        calibrate(walk, names, batches, lm.kind == CAUSAL_LM, passes, change, "Quantizing (int8-dynamic)")
    cast_unquantized(walk.rest(), config.compute_dtype)
    return walk.close().record("quantize", "int8-dynamic", config)


def _quantize_layers(root, names: list[str], ranges: dict[str, torch.Tensor], alpha: float | None) -> None:
    """Replace each of `names` (inside `root`) by its int8 form, smoothed where its input ranges were measured."""
    for name in names:
        layer = root.get_submodule(name)
        w = linear_weight(layer).detach().float()
        module = Int8DynamicLinear(w.shape[1], w.shape[0], getattr(layer, "bias", None) is not None, smooth=name in ranges)
        module.set_weight(w, smooth_factors(ranges[name], w, alpha) if name in ranges else None)
        if module.bias is not None:
            module.bias.copy_(layer.bias.float())
        set_module(root, name, module)
