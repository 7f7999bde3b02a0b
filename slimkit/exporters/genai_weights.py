"""slimkit's quantized weights carried into an onnxruntime-genai graph, exactly.

onnxruntime-genai's model builder quantizes with its own round-to-nearest, so
handing it a slimkit int4 model (or its dequantized weights) serves the
builder's weights, not slimkit's. Instead, the export builds the graph in fp32
from a *float twin* of the model, every quantized layer dequantized in fp32,
then turns each MatMul whose weight is a quantized layer (or several layers
the builder fused: q/k/v, gate/up) into a MatMulNBits node (the ONNX Runtime
contrib op genai's int4 graphs use) holding that layer's own integers:

    MatMulNBits     w[n, k] = (u[n, k] - z[n, k // b]) * s[n, k // b],   u, z in [0, 2^bits)

slimkit's grids map onto it with u = q - lo (q the signed value stored):
    symmetric                    z = 2^(bits-1)       (w = q * s)
    zero_point="integer"         z as stored          (w = (u - z) * s)
    float offset m (the default) not expressible: m is not a whole number of steps
A group larger than the kernel's blocks (per channel, or 512 columns) is cut
into blocks that repeat its scale and zero point, which is exact. The int8
embedding becomes the fp32 Gather table it dequantizes to (q * s per row); its
tied head, int8 rows with one scale each, a MatMulNBits with 8 bits (z = 128).
A 4-bit tied head (`embedding_bits=4`) is a MatMulNBits like any 4-bit layer, and
the embedding that reads it (`TiedEmbedding`) the table of the head's rows.

Which layers a MatMul holds is found by content, not by node names: the twin's
dequantized weights are what the builder wrote, bit for bit, so the columns of
each MatMul weight are matched, block by block, against them (`genai_graph.py`
rewrites the graph). A layout the builder changed (weights it scaled or split)
matches nothing and fails loudly.

What cannot be carried exactly (float offsets, NF4, int8 activations, an AWQ
input scale left unfolded) is refused with the fix, or with `--quantize int4`
re-quantized from its dequantized weight by slimkit's own int4 round-to-nearest
with integer zero points, and reported as such.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from slimkit.core.selection import set_module
from slimkit.quantization import formats as Q
from slimkit.quantization.embedding import Int8Embedding, TiedEmbedding, TiedInt8Head
from slimkit.quantization.modules import LINEAR_FORMATS, Int8DynamicLinear, NF4Linear, StaticInt8Linear, WeightOnlyLinear

BLOCKS = (256, 128, 64, 32, 16)  # MatMulNBits block sizes, largest first


@dataclass
class Codes:
    """One layer's integer weight in MatMulNBits' terms: w = (u - z) * s, group-wise.

    u (N, K) uint8 in [0, 2^bits); scale (N, K // group) fp32; zero (N, K // group) uint8."""

    u: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.u.shape
        w = (self.u.float().reshape(n, k // self.group, self.group) - self.zero.float()[..., None]) * self.scale[..., None]
        return w.reshape(n, k)


@dataclass(frozen=True)
class Refusal:
    """Why a layer's weight cannot be carried exactly, and how to quantize it so that it can."""

    reason: str
    fix: str


IZP = "quantize with -o zero_point=integer (int4, int4-wo, awq, gptq)"


def layer_codes(module: nn.Module) -> Codes | Refusal:
    """The codes of a quantized linear layer, or why MatMulNBits cannot hold them exactly."""
    if isinstance(module, TiedInt8Head):
        emb = module._embedding[0]
        n = emb.weight_q.shape[0]
        return Codes((emb.weight_q.to(torch.int16) + 128).to(torch.uint8), emb.weight_scale.float()[:, None],
                     torch.full((n, 1), 128, dtype=torch.uint8), 8, emb.weight_q.shape[1])
    if isinstance(module, WeightOnlyLinear):
        if module.inv_input_scale is not None:
            return Refusal("its AWQ input scale could not be folded into the layer before it", "quantize it with gptq or int4 instead")
        if module.offset is not None:
            return Refusal("its asymmetric grid has float offsets, not whole steps", IZP)
        lo = Q.qrange(module.bits)[0]
        u = (module.q_values().to(torch.int16) - lo).to(torch.uint8)  # (N, K)
        group = Q.check_group(module.in_features, module.group_size)
        if module.zero_point is not None:
            zero = module.zero_point
        else:
            zero = torch.full(module.scale.shape, -lo, dtype=torch.uint8)  # symmetric: w = q s = (u + lo) s
        return Codes(u, module.scale.float(), zero, module.bits, group)
    if isinstance(module, NF4Linear):
        return Refusal("NF4 is a code book, not an integer grid", "quantize with int4 -o zero_point=integer instead of nf4")
    if isinstance(module, (Int8DynamicLinear, StaticInt8Linear)):
        return Refusal("it quantizes activations too, which MatMulNBits does not", "quantize with int8-wo or int4 -o zero_point=integer")
    return Refusal(f"{type(module).__name__} has no MatMulNBits form", IZP)


def block_size(group: int, k: int) -> int | None:
    """The largest MatMulNBits block that tiles `group` (and K), or None."""
    return next((b for b in BLOCKS if group % b == 0 and k % b == 0), None)


# --------------------------------------------------------------------------- MatMulNBits tensors


def nbits_tensors(codes: Codes, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' B (N, K // block, block * bits // 8) uint8, scales (N, K // block) fp32 and
    zero_points (N, ceil(K // block * bits / 8)) uint8, from codes whose group is a multiple of `block`.

    4-bit values are packed two per byte, the even index in the low nibble, in B and zero_points alike."""
    n, k = codes.u.shape
    if codes.group % block or k % block:
        raise ValueError(f"block {block} does not tile groups of {codes.group} in K = {k}")
    repeat = codes.group // block
    scale = codes.scale.repeat_interleave(repeat, dim=1).contiguous()  # (N, K // block)
    zero = codes.zero.repeat_interleave(repeat, dim=1)  # (N, K // block)
    if codes.bits == 4:
        b = Q.pack_int4(codes.u).reshape(n, k // block, block // 2)
        if zero.shape[1] % 2:
            zero = torch.cat([zero, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
        zero = Q.pack_int4(zero)
    else:
        b = codes.u.reshape(n, k // block, block)
    return b.contiguous().numpy(), scale.numpy().astype(np.float32), zero.contiguous().numpy()


def default_zero(codes: Codes) -> bool:
    """Whether every zero point is the one MatMulNBits and GatherBlockQuantized assume when none is given
    (2^(bits-1): symmetric grids). The input is then left out, which is exact and takes the kernels' faster path."""
    return bool((codes.zero == 1 << (codes.bits - 1)).all())


def nbits_dequantize(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, k: int) -> torch.Tensor:
    """What a MatMulNBits node computes with: its (N, K) weight, for checking a written graph (no zero points: 2^(bits-1))."""
    n, blocks = scales.shape[0], b.shape[1]
    b = torch.from_numpy(np.array(b)).reshape(n, -1)
    if zero_points is None:
        zp = torch.full((n, blocks), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zp = torch.from_numpy(np.array(zero_points)).reshape(n, -1)
        zp = Q.unpack_int4(zp) if bits == 4 else zp
    if bits == 4:
        b = Q.unpack_int4(b)
    u = b[:, :k].float().reshape(n, blocks, k // blocks)
    s = torch.from_numpy(np.array(scales, dtype=np.float32)).reshape(n, blocks)
    return ((u - zp[:, :blocks].float()[..., None]) * s[..., None]).reshape(n, k)


# --------------------------------------------------------------------------- the float twin


@dataclass
class Plan:
    """What the export carries: per quantized layer, its codes (or why not) and its twin weight."""

    codes: dict[str, Codes]  # layers carried exactly
    refused: dict[str, Refusal]  # layer -> why its codes cannot be carried
    weights: dict[str, torch.Tensor]  # layer -> (N, K) fp32 weight the twin holds
    tables: dict[str, "Table"] = field(default_factory=dict)  # int8 embeddings


@dataclass
class Table:
    """A quantized embedding: its rows as codes (int8, one group per row; or a 4-bit tied head's) and what a lookup returns."""

    codes: Codes | None  # None: a head whose codes are not carried exactly; the table stays fp32
    weight: torch.Tensor  # (V, D) fp32, the twin's table: the rows Int8Embedding.forward returns
    inv_column_scale: torch.Tensor | None  # (D,) AWQ's 1 / s, applied after the lookup
    head: str | None  # the tied head that reads the same codes


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> every slimkit module that stands for a linear layer (the head included)."""
    kinds = tuple(LINEAR_FORMATS.values()) + (TiedInt8Head,)
    return {n: m for n, m in model.named_modules() if n and isinstance(m, kinds)}


def float_twin(model: nn.Module) -> tuple[nn.Module, Plan]:
    """An fp32 copy of `model` with every quantized module replaced by the float module it stands for.

    Exact layers hold their codes' dequantized weight (what MatMulNBits computes with); the
    embedding holds the rows Int8Embedding returns; other layers their best float weight."""
    plan = Plan({}, {}, {})
    for name, module in quantized_layers(model).items():
        codes = layer_codes(module)
        if isinstance(codes, Codes):
            plan.codes[name], plan.weights[name] = codes, codes.dequantize()
        else:  # a Refusal
            plan.refused[name], plan.weights[name] = codes, _float_weight(module)
    heads = {m.embedding_name: n for n, m in quantized_layers(model).items() if isinstance(m, TiedInt8Head)}
    for name, module in model.named_modules():
        if isinstance(module, Int8Embedding):
            v, d = module.weight_q.shape
            codes = Codes((module.weight_q.to(torch.int16) + 128).to(torch.uint8), module.weight_scale.float()[:, None],
                          torch.full((v, 1), 128, dtype=torch.uint8), 8, d)
            table = module.weight_q.float() * module.weight_scale[:, None]  # (V, D), as forward() computes rows
            inv = module.inv_column_scale
            plan.tables[name] = Table(codes, table if inv is None else table * inv, inv, heads.get(name))
        elif isinstance(module, TiedEmbedding):  # a 4-bit head's rows: looked up in its codes when they are carried
            table, inv = plan.weights[module.head_name], module.inv_column_scale
            codes = plan.codes.get(module.head_name)
            plan.tables[name] = Table(codes, table if inv is None else table * inv, inv, module.head_name if codes else None)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in list(twin.named_modules()):
            if isinstance(module, (Int8Embedding, TiedEmbedding)):
                emb = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx)
                emb.weight.copy_(plan.tables[name].weight)
                set_module(twin, name, emb)
            elif name in plan.weights:
                w = plan.weights[name]
                bias = getattr(module, "bias", None)
                linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
                linear.weight.copy_(w)
                if bias is not None:
                    linear.bias.copy_(bias.float())
                set_module(twin, name, linear)
    twin = twin.float()
    twin.config.dtype = torch.float32
    return twin, plan


def _float_weight(module: nn.Module) -> torch.Tensor:
    """(N, K) fp32: the weight a layer that cannot be carried exactly multiplies its input by."""
    if isinstance(module, WeightOnlyLinear):
        w = module.dequantize(torch.float32)
        return w if module.inv_input_scale is None else w * module.inv_input_scale[None, :]
    if isinstance(module, NF4Linear):
        return module.dequantize(torch.float32)
    w = module.weight_q.float() * module.weight_scale.float().reshape(-1, 1)  # int8 x int8 layers
    return w if module.inv_smooth is None else w * module.inv_smooth[None, :]


def requantize(w: torch.Tensor, block: int) -> Codes:
    """slimkit's int4 round-to-nearest with integer zero points, for a layer whose codes do not fit."""
    qt = Q.quantize_int(w, 4, block, symmetric=False, zero_point="integer")
    return Codes((qt.q.to(torch.int16) + 8).to(torch.uint8), qt.scale, qt.zero_point, 4, block)
