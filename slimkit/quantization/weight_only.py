"""Weight-only quantization: int8, int4 (group-wise, symmetric or asymmetric) and NF4.

Only the weights are quantized; activations stay in floating point, so the
loss is the weights' rounding error alone. On a CPU running one token at a
time, decoding is limited by reading the weights from memory, so smaller
weights are faster when a kernel reads them directly: int8 per channel
(`_weight_int8pack_mm`) and int4 with groups of 32..256
(`_weight_int4pack_mm_for_cpu`). NF4, grouped int8 and per-channel int4 have
no CPU kernel and dequantize on each call: smaller, not faster.

Trade-offs: int8 per channel is close to lossless. int4 needs groups (32 or
64 for small models) and gains from an asymmetric grid, whose offset is a
float by default or, with `zero_point="integer"`, a whole number of steps
(the form ONNX Runtime's MatMulNBits stores, so the export carries it exactly); NF4 fits normally
distributed weights better than the even int4 grid at the same size, and
double quantization trims its scales from 0.5 to about 0.13 bit per weight.
With `embeddings=True` the input embedding (and a head tied to it) is stored
as int8 rows too, or, with int4's `embedding_bits=4`, a tied head on the
layers' 4-bit grid that the embedding reads (see `embedding.py`). `compute_dtype="bf16"` runs everything
left unquantized (norms, attention, the residual stream) in bf16: the kernels
take bf16 activations anyway, so this removes two casts per layer per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context, register
from slimkit.core.selection import select_linears, set_module
from slimkit.io.blockwise import calibrate, start
from slimkit.io.model import copy_model
from slimkit.quantization.common import QuantizeOptions, cast_unquantized
from slimkit.quantization.embedding import check_embedding_bits, head_grid, quantize_embeddings
from slimkit.quantization.formats import GROUP_SIZES, check_zero_point
from slimkit.quantization.modules import NF4Linear, WeightOnlyLinear


def _check_group(group_size, allow_none: bool) -> None:
    if group_size is None and allow_none:
        return
    if group_size not in GROUP_SIZES:
        choices = ", ".join(map(str, GROUP_SIZES)) + (" or None (per channel)" if allow_none else "")
        raise SlimkitError(f"group_size={group_size} is not supported: use one of {choices}")


@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantizeOptions):
    group_size: int | None = None
    symmetric: bool = True
    embeddings: bool = True

    def __post_init__(self):
        _check_group(self.group_size, allow_none=True)
        super().__post_init__()


@dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantizeOptions):
    group_size: int = 32
    symmetric: bool = False
    zero_point: str = "float"  # or "integer": w = (u - z) * s, exportable to MatMulNBits exactly
    embeddings: bool = True
    embedding_bits: int = 8  # 4: the embedding and its tied head on this 4-bit grid (embedding.py)

    def __post_init__(self):
        _check_group(self.group_size, allow_none=False)
        check_zero_point(self.zero_point, self.symmetric)
        check_embedding_bits("int4-wo", self.embedding_bits, 4)
        super().__post_init__()


@dataclass(frozen=True)
class NF4Config(QuantizeOptions):
    block_size: int = 64
    double_quant: bool = False
    embeddings: bool = True

    def __post_init__(self):
        if self.block_size not in GROUP_SIZES:
            raise SlimkitError(f"block_size={self.block_size} is not supported: use one of {', '.join(map(str, GROUP_SIZES))}")
        super().__post_init__()


ROUNDING = ("int4-wo", "int8-wo", "nf4", "int4")  # the methods `rounder` serves (int4 names int4-wo)


def rounder(config) -> Callable[[nn.Module], nn.Module] | None:
    """What `config`'s method makes of one float linear layer (a new module; the layer is left as it is),
    or None for a config of another method. Rounding to nearest needs nothing but the layer, so
    whoever holds one block (block-local sensitivity, mixed precision on a lazy model) can call it."""
    if isinstance(config, Int8WeightOnlyConfig):
        return lambda layer: WeightOnlyLinear.from_float(layer, bits=8, group_size=config.group_size, symmetric=config.symmetric)
    if isinstance(config, Int4WeightOnlyConfig):
        return lambda layer: WeightOnlyLinear.from_float(layer, bits=4, group_size=config.group_size, symmetric=config.symmetric,
                                                         zero_point=config.zero_point)
    if isinstance(config, NF4Config):
        return lambda layer: NF4Linear.from_float(layer, block_size=config.block_size, double_quant=config.double_quant)
    return None


def _apply(model, config, name: str, make, ctx: Context):
    """Round to nearest, block by block (`blockwise.calibrate`, with nothing to calibrate): a lazy model is read and,
    streaming, written one block at a time."""
    lm = copy_model(model, name, lazy=True)
    walk = start(lm, ctx.stream)
    walk.dtype = None  # rounding reads each layer in fp32 itself: blocks stay in the checkpoint's dtype meanwhile
    names = list(select_linears(lm.model, tuple(config.targets), tuple(config.ignore)))

    def change(part, prefix, layers, _):
        for layer in layers:
            set_module(part, layer, make(part.get_submodule(layer)))
        if prefix:  # a block; the rest is cast once its embeddings are done
            cast_unquantized(part, config.compute_dtype)

    with torch.no_grad():
        calibrate(walk, names, [], False, (), change, f"Quantizing ({name})")
    rest = walk.rest()
    if config.embeddings:
        quantize_embeddings(rest, grid=head_grid(config))
    cast_unquantized(rest, config.compute_dtype)
    return walk.close().record("quantize", name, config)


@register("int8-wo", "quantize", Int8WeightOnlyConfig, "int8 weights per channel (or group), float activations (_weight_int8pack_mm)")
def apply_int8(model, config: Int8WeightOnlyConfig = Int8WeightOnlyConfig(), ctx: Context = Context()):
    return _apply(model, config, "int8-wo", rounder(config), ctx)


@register("int4-wo", "quantize", Int4WeightOnlyConfig, "int4 weights in groups of 32-256, sym/asym, packed 2 per byte (_weight_int4pack_mm)")
def apply_int4(model, config: Int4WeightOnlyConfig = Int4WeightOnlyConfig(), ctx: Context = Context()):
    return _apply(model, config, "int4-wo", rounder(config), ctx)


@register("nf4", "quantize", NF4Config, "4-bit NormalFloat code book per block, optional double-quantized scales (dequantized per call)")
def apply_nf4(model, config: NF4Config = NF4Config(), ctx: Context = Context()):
    return _apply(model, config, "nf4", rounder(config), ctx)
