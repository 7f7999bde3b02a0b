"""Casts to 16-bit floats: `bf16` and `fp16`.

The whole model is cast, which halves memory and disk. bf16 keeps fp32's
exponent range (no overflow) with an 8-bit mantissa; fp16 has a finer mantissa
but overflows above 65504, which large activations of some models reach.
Where precision matters, the layers already compute in fp32 internally:
Llama's RMSNorm upcasts to fp32 before normalising, PyTorch's LayerNorm,
softmax and scaled-dot-product attention accumulate bf16/fp16 inputs in fp32
on CPU, and slimkit's evaluation takes log-softmax of the logits in fp32. So
no weight is kept in fp32 here (computed buffers such as rotary
frequencies are: they are not weights, and in 16 bits they would blur
positions far into the sequence); keeping one would mix dtypes between layers
and cost a cast per call. On CPUs with AVX-512 BF16 or AMX, bf16 matmuls run
on native instructions; fp16 on CPUs without fp16 arithmetic is emulated and
slow: choose bf16 on CPU and fp16 on GPUs without bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core.registry import Context, register
from slimkit.io.model import copy_model


@dataclass(frozen=True)
class CastConfig:
    """No options: the dtype is the method's name."""


def _cast(model, dtype: torch.dtype, name: str):
    """Parameters only: computed buffers such as rotary frequencies stay fp32,
    as they are when the same model is loaded in 16 bits, so a reload is exact."""
    lm = copy_model(model, name)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    lm.model.config.dtype = dtype
    return lm.record("quantize", name, CastConfig())


@register("bf16", "quantize", CastConfig, "cast weights and compute to bfloat16 (2x smaller; fast on AVX-512 BF16/AMX CPUs and GPUs)")
def apply_bf16(model, config: CastConfig = CastConfig(), ctx: Context = Context()):
    return _cast(model, torch.bfloat16, "bf16")


@register("fp16", "quantize", CastConfig, "cast weights and compute to float16 (2x smaller; for GPUs; slow on most CPUs)")
def apply_fp16(model, config: CastConfig = CastConfig(), ctx: Context = Context()):
    return _cast(model, torch.float16, "fp16")
