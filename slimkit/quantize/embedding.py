"""int8 input embeddings, shared with a tied LM head.

Small models spend a large share of their weights on the embedding matrix
(SmolLM2-135M: 28M of 135M parameters), so weight quantization that leaves it
in fp32 cannot shrink the model below about 0.4x. Rows are quantized to int8
with one scale each; when the LM head is tied to the embedding (its output
channels are the embedding's rows), the head reads the same int8 matrix
through the int8 weight kernel, so the tie survives and nothing is stored twice.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.quantize.common import set_module
from slimkit.quantize.modules import Int8Embedding, TiedInt8Head


def module_name(root: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


def tied_head(model: nn.Module) -> str | None:
    """Name of the LM head when it shares the input embedding's weight, else None."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding) or head is None or getattr(head, "weight", None) is not emb.weight:
        return None
    return module_name(model, head)


def quantize_embeddings(model: nn.Module, column_scale: torch.Tensor | None = None) -> list[str]:
    """Replace the input embedding (and a head tied to it) in place; return the names.

    column_scale: (D,) AWQ factors of the tied head (1 / s already folded into
    the norm before the head), or None."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    if column_scale is not None and not tied:
        raise ValueError("a column scale needs a head tied to the embedding")
    name = module_name(model, emb)
    q = Int8Embedding.from_float(emb, column_scale)
    set_module(model, name, q)
    names = [name]
    if tied:
        head_name = module_name(model, head)
        set_module(model, head_name, TiedInt8Head(q, name))
        model.config.tie_word_embeddings = False  # the tie now lives in TiedInt8Head
        names.append(head_name)
    return names
