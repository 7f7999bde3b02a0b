"""GGUF's block formats, and slimkit's integer grids carried into them exactly.

llama.cpp stores a quantized row as blocks of 32 consecutive weights, each with
an fp16 scale d (and, for Q4_1, an fp16 minimum m):

    Q8_0   w = q * d              q int8        34 bytes: d, q[32]
    Q4_0   w = (n - 8) * d        n in [0, 15]  18 bytes: d, 16 bytes of nibbles
    Q4_1   w = n * d + m          n in [0, 15]  20 bytes: d, m, 16 bytes of nibbles

Nibble byte j of a 4-bit block holds weight j in its low half and weight j + 16
in its high half (not the even/odd packing of slimkit's `pack_int4`).

A slimkit weight-only layer on groups of 32 is one of these grids, code for code:

    int8 symmetric                     Q8_0   q as stored
    int4 symmetric  (w = q s)          Q4_0   n = q + 8
    int4 float offset (w = (q + 8) s + m)   Q4_1   n = q + 8, m the offset
    int4 integer zero point z          Q4_0 when every z is 8; Q4_1 with m = -z s when -z s is an fp16 number

Grouped slimkit scales and offsets are stored as fp16 already (`scale_dtype`),
so d and m are the same numbers and the dequantized weight is bit for bit the
slimkit layer's. A grid that is none of these (other group sizes, NF4, int8
activations, an AWQ input scale left unfolded) is quantized again from the
layer's float weight, and the reason is reported.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from slimkit.quantization.modules import WeightOnlyLinear

BLOCK = 32  # weights per block in Q8_0, Q4_0 and Q4_1
BITS = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4}


def pack_blocks(q: np.ndarray, d: np.ndarray, m: np.ndarray | None, qtype: T) -> np.ndarray:
    """GGUF rows of blocks from codes: q (N, K) stored values (int8 for Q8_0, nibbles in [0, 15] for
    Q4_0 / Q4_1), d and m (N, K // 32) fp16 -> (N, K // 32 * bytes per block) uint8."""
    n, k = q.shape
    blocks = k // BLOCK
    parts = [np.ascontiguousarray(d.astype(np.float16)).view(np.uint8).reshape(n, blocks, 2)]
    if qtype == T.Q4_1:
        parts.append(np.ascontiguousarray(m.astype(np.float16)).view(np.uint8).reshape(n, blocks, 2))
    q = q.reshape(n, blocks, BLOCK)
    if qtype == T.Q8_0:
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        u = q.astype(np.uint8)
        parts.append(u[..., :16] | (u[..., 16:] << 4))  # (N, blocks, 16)
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def carried_blocks(module: nn.Module, qtype: T) -> tuple[np.ndarray | None, str]:
    """A quantized layer's own codes as `qtype` rows (N, bytes), or None and why they are not that grid."""
    if not isinstance(module, WeightOnlyLinear):
        return None, f"{type(module).__name__} is not an integer weight-only grid"
    if module.inv_input_scale is not None:
        return None, "its AWQ input scale is not folded into the layer before it"
    if module.group_size != BLOCK:
        return None, f"its groups are {module.group_size or 'whole rows'}, GGUF blocks are {BLOCK} weights"
    if module.bits != BITS[qtype]:
        return None, f"it is int{module.bits}, {qtype.name} holds {BITS[qtype]}-bit codes"
    q = module.q_values().numpy()  # (N, K) int8 grid values
    d = module.scale.numpy()  # (N, K // 32) fp16
    zero = None if module.zero_point is None else module.zero_point.numpy().astype(np.float32)
    if qtype == T.Q8_0:
        if module.offset is not None or (zero is not None and not (zero == 128).all()):
            return None, "its int8 grid is asymmetric, Q8_0 is symmetric"
        return pack_blocks(q, d, None, qtype), ""
    nibbles = q.astype(np.int16) + 8  # u = q - lo, in [0, 15]
    if qtype == T.Q4_0:
        if module.offset is not None or (zero is not None and not (zero == 8).all()):
            return None, "its int4 grid is asymmetric, Q4_0 is symmetric: use q4_1"
        return pack_blocks(nibbles, d, None, qtype), ""
    if module.offset is not None:  # Q4_1: w = n d + m
        return pack_blocks(nibbles, d, module.offset.numpy(), qtype), ""
    if zero is None:
        return None, "its int4 grid is symmetric: use q4_0"
    m = -zero * d.astype(np.float32)  # (u - z) s = u s - z s
    if not (m.astype(np.float16).astype(np.float32) == m).all():
        return None, "its zero points times scales are not fp16 numbers, as Q4_1's minimum is"
    return pack_blocks(nibbles, d, m, qtype), ""


def unpack_codes(rows: np.ndarray, qtype: T, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored codes (N, K) and fp16 scales (N, K // 32) of `qtype` rows, for checking a written file."""
    n = rows.shape[0]
    blocks = rows.reshape(n, k // BLOCK, -1)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    qs = blocks[..., 4:] if qtype == T.Q4_1 else blocks[..., 2:]
    if qtype == T.Q8_0:
        return np.ascontiguousarray(qs).view(np.int8).reshape(n, k), d
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k), d


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection in llama.cpp's rotary order (whole rows move, so blocks stay intact).

    Hugging Face Llama rotates the two halves of each head, llama.cpp rotates adjacent pairs:
    within each head, row i of the first half goes to 2i and row i of the second half to 2i + 1."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
