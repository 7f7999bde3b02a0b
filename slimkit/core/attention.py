"""Attention implementations: switching one for a block of work, and the one to train with.

Attention maps need "eager"; so do ONNX Runtime encoder graphs. Training on a CPU
computes SDPA in float32 where that pays (`training_attention`).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def attention_implementation(model: nn.Module, name: str | None):
    """Within the block `model` computes attention with `name` ("eager", "sdpa"), then gets its own back.

    None leaves it as it is. Attention maps need "eager"; so do ONNX Runtime
    encoder graphs (see `export/onnxruntime.py`).
    """
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if name is None or before is None or before == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


FLOAT32_SDPA = "slimkit_sdpa_float32"  # transformers attention name: SDPA computed in float32 on CPU
# where float32 pays (bench_attention.py): heads of 32 at every length measured (1.15x at 256
# tokens, 2-4x shorter), or sequences up to 128 tokens; SmolLM2's 256 tokens x heads of 64: 0.88x
FLOAT32_SDPA_MAX_HEAD_DIM, FLOAT32_SDPA_MAX_LENGTH = 32, 128


def training_attention(model: nn.Module) -> str | None:
    """The attention implementation `model` should train with on this machine (None: its own).

    PyTorch's fused CPU attention is slow backwards in bfloat16 when a batch holds many
    short (sequence, head) problems. On an AMX Xeon at 2 threads, forward and backward of
    32 sequences x 12 heads of 32 took 64 ms at 90 tokens in bfloat16 and 27 ms in
    float32, casts included; a whole training step of the 3-layer MiniLM student was
    1.53x faster. At SmolLM2's 4 x 256 tokens with heads of 64, float32 attention was
    0.88x, so that shape keeps bf16. `benchmarks/bench_attention.py` measures it. So a model that
    uses SDPA trains with SDPA computed in float32 (`FLOAT32_SDPA`) on CPU tensors, for
    the shapes where that pays (heads of at most 32, or at most 128 tokens); everything
    around the attention stays in the autocast precision. Other shapes, tensors on other
    devices, and models with another implementation, train as they are."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa":
        return None
    _register_float32_sdpa()
    return FLOAT32_SDPA


@functools.cache
def _register_float32_sdpa() -> None:
    """Make `FLOAT32_SDPA` a transformers attention implementation (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLOAT32_SDPA, _float32_sdpa)
    AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)  # masks built as for SDPA


def _float32_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length, head_dim = query.shape[-2], query.shape[-1]
    worth_it = head_dim <= FLOAT32_SDPA_MAX_HEAD_DIM or length <= FLOAT32_SDPA_MAX_LENGTH
    if query.device.type != "cpu" or not worth_it or all(t.dtype == torch.float32 for t in (query, key, value)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(value.dtype), weights  # Llama's rotary embedding hands over float32 queries and keys, bf16 values
