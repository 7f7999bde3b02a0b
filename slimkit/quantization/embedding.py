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

Some embeddings multiply the rows they look up by a constant (Gemma 2 and 3:
sqrt(hidden_size), 8 at width 64). Dropping it shrinks the residual stream
against everything the blocks add to it (a tiny Gemma 2's int8-wo logits
moved 17% instead of 1.5%), so the quantized lookup keeps it
(`output_scale`, measured on the float embedding by `lookup_scale`, stored in
the module's spec; the codes stay the plain table a standard loader expects).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.selection import set_module
from slimkit.quantization.cuda_layout import int8_weight_matmul
from slimkit.quantization.modules import KERNEL_DTYPE, WeightOnlyLinear, int8_rows, weight_buffer

EMBEDDING_BITS = (8, 4)


class Int8Embedding(nn.Module):
    """int8 rows with one fp32 scale per row (per token); looked-up rows are dequantized.

    With a tied LM head, the same int8 matrix serves `TiedInt8Head`: the head's
    output channels are the embedding's rows, so one set of scales fits both.
    With `column_scale` (AWQ on the tied head), the stored matrix is E diag(s):
    the head reads it as is (1 / s is folded into the norm before the head)
    and looked-up rows are multiplied by `inv_column_scale` = 1 / s (D,).
    """

    fmt = "int8-embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, column_scale: bool = False,
                 output_scale: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.compute_dtype = torch.float32  # dtype of the looked-up rows (common.cast_unquantized sets it)
        self.output_scale = output_scale  # looked-up rows times this (Gemma: sqrt(hidden_size)); not the head's
        weight_buffer(self, "weight_q", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))
        self.register_buffer("inv_column_scale", torch.ones(embedding_dim) if column_scale else None)
        self._kernel: dict = {}

    @classmethod
    def from_float(cls, emb: nn.Embedding, column_scale: torch.Tensor | None = None) -> "Int8Embedding":
        """column_scale: (D,) AWQ factors s, or None."""
        module = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, column_scale is not None, lookup_scale(emb))
        if column_scale is not None:
            module.inv_column_scale.copy_(1 / column_scale)
        q, scale = int8_rows(emb.weight.detach(), column_scale)  # (V, D), (V,)
        module.weight_q.copy_(q)
        module.weight_scale.copy_(scale)
        return module

    @classmethod
    def from_spec(cls, spec: dict) -> "Int8Embedding":
        module = cls(spec["num_embeddings"], spec["embedding_dim"], spec.get("padding_idx"), spec.get("column_scale", False),
                     spec.get("output_scale", 1.0))
        module.compute_dtype = getattr(torch, spec.get("compute_dtype", "float32"))
        return module

    def spec(self) -> dict:
        spec = {"format": self.fmt, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx}
        if self.inv_column_scale is not None:
            spec["column_scale"] = True
        if self.output_scale != 1.0:
            spec["output_scale"] = self.output_scale
        if self.compute_dtype != torch.float32:
            spec["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
        return spec

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_q).float()  # (..., D)
        rows = rows * self.weight_scale[ids][..., None]
        rows = rows if self.inv_column_scale is None else rows * self.inv_column_scale
        rows = rows if self.output_scale == 1.0 else rows * self.output_scale
        return rows.to(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        self._kernel.clear()  # what it holds was built for the old device
        return super()._apply(fn, recurse)

    def head_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, D) @ dequantized(weight).T -> (M, V) through the int8 weight kernel."""
        if x.device.type == "cuda":
            if "cuda_s" not in self._kernel:
                self._kernel["cuda_s"] = self.weight_scale.float()
            return int8_weight_matmul(x, self.weight_q, self._kernel["cuda_s"])
        if x.device.type != "cpu":
            return F.linear(x.float(), self.weight_q.float() * self.weight_scale[:, None])
        if "s" not in self._kernel:
            self._kernel["s"] = self.weight_scale.to(KERNEL_DTYPE)
        return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.weight_q, self._kernel["s"])


class TiedInt8Head(nn.Module):
    """An LM head that shares an Int8Embedding's weights; it owns no tensors."""

    fmt = "tied-int8-head"

    def __init__(self, embedding: Int8Embedding, embedding_name: str):
        super().__init__()
        self._embedding = [embedding]  # a list: not a submodule, so nothing is saved twice
        self.embedding_name = embedding_name

    @property
    def embedding(self) -> Int8Embedding:
        return self._embedding[0]

    def spec(self) -> dict:
        return {"format": self.fmt, "tied_to": self.embedding_name}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._embedding[0].head_matmul(x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], -1).to(x.dtype)


class TiedEmbedding(nn.Module):
    """An input embedding that reads its rows from the tied LM head's codes; it owns no weight.

    The reverse of `TiedInt8Head`, for a head quantized like the other layers (4-bit,
    group-wise): the head, a `WeightOnlyLinear` with the vocabulary as its output
    channels, owns the codes and keeps its fast kernel; a lookup dequantizes only the
    rows it returns. With `column_scale` (AWQ on the tied head), the head stores
    E diag(s), 1 / s is folded into the norm before it, and looked-up rows are
    multiplied by `inv_column_scale` = 1 / s (D,).
    """

    fmt = "tied-embedding"

    def __init__(self, head: WeightOnlyLinear, head_name: str, padding_idx: int | None = None, column_scale: bool = False,
                 output_scale: float = 1.0):
        super().__init__()
        self._head = [head]  # a list: not a submodule, so nothing is saved twice
        self.head_name = head_name
        self.num_embeddings, self.embedding_dim, self.padding_idx = head.out_features, head.in_features, padding_idx
        self.compute_dtype = torch.float32  # dtype of the looked-up rows (common.cast_unquantized sets it)
        self.output_scale = output_scale  # looked-up rows times this (Gemma: sqrt(hidden_size))
        self.register_buffer("inv_column_scale", torch.ones(head.in_features) if column_scale else None)

    @property
    def head(self) -> WeightOnlyLinear:
        return self._head[0]

    @classmethod
    def from_spec(cls, spec: dict, head: WeightOnlyLinear) -> "TiedEmbedding":
        module = cls(head, spec["tied_to"], spec.get("padding_idx"), spec.get("column_scale", False), spec.get("output_scale", 1.0))
        module.compute_dtype = getattr(torch, spec.get("compute_dtype", "float32"))
        return module

    def spec(self) -> dict:
        spec = {"format": self.fmt, "tied_to": self.head_name, "padding_idx": self.padding_idx}
        if self.inv_column_scale is not None:
            spec["column_scale"] = True
        if self.output_scale != 1.0:
            spec["output_scale"] = self.output_scale
        if self.compute_dtype != torch.float32:
            spec["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
        return spec

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        rows = rows if self.inv_column_scale is None else rows * self.inv_column_scale
        rows = rows if self.output_scale == 1.0 else rows * self.output_scale
        return rows.to(self.compute_dtype)


TIED_FORMATS = (TiedInt8Head.fmt, TiedEmbedding.fmt)  # modules that own no weight: built after what they read



def check_embedding_bits(method: str, embedding_bits: int, bits: int) -> None:
    """embedding_bits=4 puts the embedding and its tied head on the layers' 4-bit grid."""
    if embedding_bits not in EMBEDDING_BITS:
        raise SlimkitError(f"embedding_bits={embedding_bits} is not supported by {method}: use 8 (int8 rows) or 4 (the layers' 4-bit grid)")
    if embedding_bits == 4 and bits != 4:
        raise SlimkitError(f"embedding_bits=4 quantizes the tied head on the layers' 4-bit grid, and {method} has bits={bits}: "
                           "use bits=4, or embedding_bits=8")


def module_name(root: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


@torch.no_grad()
def lookup_scale(emb: nn.Embedding) -> float:
    """The constant an embedding multiplies its looked-up rows by (1.0 for a plain lookup), measured on
    a few rows, so any subclass that scales its output (Gemma's) is read without naming it; an embedding
    whose output is not its rows times one constant is refused: its lookup cannot be replaced."""
    ids = torch.arange(min(emb.num_embeddings, 64), device=emb.weight.device)
    rows = F.embedding(ids, emb.weight).float()  # (n, D)
    out = emb(ids)
    dtype = out.dtype if out.is_floating_point() else torch.float32
    out = out.float()
    if torch.equal(out, rows):
        return 1.0
    # The most frequent ratio out / row, rounded to the output's dtype: the constant is multiplied in it
    # (Gemma: bf16(sqrt(2048)) = 45.25), and each output is it times the row, rounded once.
    nonzero = rows != 0
    ratio = (out.double()[nonzero] / rows.double()[nonzero]).to(dtype).float()
    scale = float(ratio.mode().values) if ratio.numel() else 1.0
    eps = torch.finfo(dtype).eps  # the output's own rounding
    if not torch.allclose(out, rows * scale, rtol=max(2 * eps, 1e-5), atol=1e-6 * float(out.abs().max())):
        raise SlimkitError(f"the input embedding {type(emb).__name__} does not return its rows times one constant, so it "
                           "cannot be quantized: pass embeddings=False")
    return scale


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
    q = Int8Embedding.from_float(emb, column_scale).to(emb.weight.device)  # where the model is
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
    q_head.to(emb.weight.device)  # where the model is
    lookup = TiedEmbedding(q_head, head_name, emb.padding_idx, column_scale is not None, lookup_scale(emb)).to(emb.weight.device)
    if column_scale is not None:
        lookup.inv_column_scale.copy_(1 / column_scale)
    set_module(model, head_name, q_head)
    set_module(model, name, lookup)
    model.config.tie_word_embeddings = False  # the tie now lives in TiedEmbedding
    return [name, head_name]
