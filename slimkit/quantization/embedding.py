"""Quantized input embeddings, shared with a tied LM head.

Small models spend a large share of their weights on the embedding matrix
(SmolLM2-135M: 28M of 135M parameters), so weight quantization that leaves it
in fp32 cannot shrink the model below about 0.4x. Two layouts:

  * 8 bits (`embedding_bits=8`, the default): rows are quantized to int8 with
    one scale each; when the LM head is tied to the embedding (its output
    channels are the embedding's rows), the head reads the same int8 matrix
    through the int8 weight kernel (`TiedInt8Head`);
  * 4 bits (`embedding_bits=4`, a tied head only): the head is quantized on the
    layers' own 4-bit grid (group-wise) as a `WeightOnlyLinear`, and the
    embedding looks its rows up in the head's codes (`TiedEmbedding`). Decoding
    reads the whole head for every token (SmolLM2-135M: 28 MiB at 8 bits, 14 at
    4), so this is the faster layout where weight bytes bound the speed, at
    some cost in quality.
Either way the tie survives and nothing is stored twice.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.selection import set_module
from slimkit.quantization.modules import Int8Embedding, TiedEmbedding, TiedInt8Head, WeightOnlyLinear

EMBEDDING_BITS = (8, 4)


def check_embedding_bits(method: str, embedding_bits: int, bits: int) -> None:
    """embedding_bits=4 puts the embedding and its tied head on the layers' 4-bit grid."""
    if embedding_bits not in EMBEDDING_BITS:
        raise SlimkitError(f"embedding_bits={embedding_bits} is not supported by {method}: use 8 (int8 rows) or 4 (the layers' 4-bit grid)")
    if embedding_bits == 4 and bits != 4:
        raise SlimkitError(f"embedding_bits=4 quantizes the tied head on the layers' 4-bit grid, and {method} has bits={bits}: "
                           "use bits=4, or embedding_bits=8")


def module_name(root: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


def tied_head(model: nn.Module) -> str | None:
    """Name of the LM head when it shares the input embedding's weight, else None."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding) or head is None or getattr(head, "weight", None) is not emb.weight:
        return None
    return module_name(model, head)


def head_grid(config) -> dict | None:
    """The 4-bit head's WeightOnlyLinear options from a method's config (the layers' own grid), or None for int8 rows."""
    if getattr(config, "embedding_bits", 8) == 8:
        return None
    return dict(bits=4, group_size=config.group_size, symmetric=config.symmetric, zero_point=config.zero_point)


def quantize_embeddings(model: nn.Module, column_scale: torch.Tensor | None = None, grid: dict | None = None) -> list[str]:
    """Replace the input embedding (and a head tied to it) in place; return the names.

    column_scale: (D,) AWQ factors of the tied head (1 / s already folded into
    the norm before the head), or None. grid: None for int8 rows; or the
    `WeightOnlyLinear` options (bits, group_size, symmetric, zero_point) of a
    4-bit head that the embedding then reads (needs a tied head)."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    if column_scale is not None and not tied:
        raise ValueError("a column scale needs a head tied to the embedding")
    name = module_name(model, emb)
    if grid is not None:
        if not tied:
            raise SlimkitError("embedding_bits=4 shares 4-bit codes between the embedding and a tied LM head, and this "
                               "model's head is not tied to its embedding: use embedding_bits=8")
        return _tied_to_head(model, emb, name, module_name(model, head), head, column_scale, grid)
    q = Int8Embedding.from_float(emb, column_scale)
    set_module(model, name, q)
    names = [name]
    if tied:
        head_name = module_name(model, head)
        set_module(model, head_name, TiedInt8Head(q, name))
        model.config.tie_word_embeddings = False  # the tie now lives in TiedInt8Head
        names.append(head_name)
    return names


def _tied_to_head(model, emb: nn.Embedding, name: str, head_name: str, head: nn.Module, column_scale, grid: dict) -> list[str]:
    w = emb.weight.detach().float()  # (V, D): the head's (out, in) weight
    if column_scale is not None:
        w = w * column_scale[None, :]
    bias = getattr(head, "bias", None)
    q_head = WeightOnlyLinear(w.shape[1], w.shape[0], bias is not None, **grid)
    q_head.set_weight(w)
    if bias is not None:
        q_head.bias.copy_(bias.detach().float())
    lookup = TiedEmbedding(q_head, head_name, emb.padding_idx, column_scale is not None)
    if column_scale is not None:
        lookup.inv_column_scale.copy_(1 / column_scale)
    set_module(model, head_name, q_head)
    set_module(model, name, lookup)
    model.config.tie_word_embeddings = False  # the tie now lives in TiedEmbedding
    return [name, head_name]
