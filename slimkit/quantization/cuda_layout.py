"""The layouts torch's CUDA weight-only kernels read, built from slimkit's stored (CPU) layout.

slimkit saves one layout whatever the device: int4 codes u = q + 8 in [0, 15],
two per byte with element 2i in the low nibble, (N, K // 2) uint8, and scales
(N, G). On a CUDA device the quantized modules repack it once, when they move
there, for the kernels that read it:

  int4  `torch._weight_int4pack_mm` (the "tinygemm" kernel of gpt-fast and
        torchao; compute capability 8.0+). Its packer,
        `_convert_weight_to_int4pack` on CUDA, takes (N, K // 2) uint8 with
        element 2i in the HIGH nibble (the opposite of ours) and returns int32
        (N / 8, K / (16 * inner_k_tiles), 32, inner_k_tiles / 2): each of 32
        lanes holds the 8 values one m16n8k16 tensor-core B tile gives it. The
        kernel computes w = (u - 8) * scale + zero with (G, N, 2) bf16 scales
        and zeros, the same convention as the CPU kernel, so `scales_and_zeros`
        serves both. Groups of 32, 64, 128 or 256; N a multiple of 8.
  int8  `torch._weight_int8pack_mm` reads our (N, K) int8 rows and (N,) scales
        as they are: nothing to repack.

`tinygemm_layout` is a pure-torch copy of the CUDA packer's index arithmetic
(for NVIDIA GPUs; ROCm tiles differently), and `tinygemm_codes` its inverse.
They are what the tests check on a CPU, and on a GPU against torch's own packer,
so a change of layout in a later torch shows up as a failed test, not as wrong
numbers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

TINYGEMM_GROUPS = (32, 64, 128, 256)
TILE_K = 16  # k values per tensor-core tile (m16n8k16)
TILE_N = 8  # n values per tile


def high_nibble_first(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 with element 2i low -> the same codes with element 2i high (CUDA's order)."""
    return (packed << 4) | (packed >> 4)


def inner_k_tiles(k: int) -> int | None:
    """How many 16-wide k tiles the CUDA kernel loads at once: the largest of 8, 4, 2 that divides
    K / 16 (8 gives 16-byte loads); None when K is not a multiple of 32."""
    for tiles in (8, 4, 2):
        if k % (tiles * TILE_K) == 0:
            return tiles
    return None


def tinygemm_supported(out_features: int, in_features: int, group_size: int | None) -> bool:
    """Whether `_weight_int4pack_mm` takes a weight of this shape and grid."""
    return group_size in TINYGEMM_GROUPS and out_features % TILE_N == 0 and in_features % group_size == 0 and inner_k_tiles(in_features) is not None


def scales_and_zeros(scale: torch.Tensor, offset: torch.Tensor | None, zero_point: torch.Tensor | None) -> torch.Tensor:
    """(N, G) scales and their offset or integer zero point -> (G, N, 2) fp32 (scale, b) such that
    w = (u - 8) * scale + b for the stored codes u = q + 8 in [0, 15].

    Symmetric: w = q * s = (u - 8) * s, so b = 0. Float offset m (formats.py's
    asymmetric grid): w = (q + 8) * s + m = (u - 8) * s + (m + 8 s), so b = m + 8 s.
    Integer zero point z: w = (u - z) * s, so b = (8 - z) * s.
    """
    scale = scale.float()
    if zero_point is not None:
        b = (8 - zero_point.float()) * scale
    elif offset is not None:
        b = offset.float() + 8 * scale
    else:
        b = torch.zeros_like(scale)
    return torch.stack([scale, b], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)


def tinygemm_layout(packed: torch.Tensor, tiles: int) -> torch.Tensor:
    """What `_convert_weight_to_int4pack(packed, tiles)` returns on an NVIDIA GPU, in pure torch.

    packed: (N, K // 2) uint8, element 2i in the high nibble (`high_nibble_first`).
    Returns (N / 8, K / (16 tiles), 32, tiles / 2) int32. Lane t of a tile pair reads
    row n = 8 n_tile + t // 4 and, from the pair's 16 bytes, bytes t % 4 + {0, 4, 8, 12};
    the word holds their four high nibbles in bits 0..15 and their four low nibbles
    in bits 16..31.
    """
    n, half_k = packed.shape
    k = half_k * 2
    if n % TILE_N or k % (tiles * TILE_K) or tiles not in (2, 4, 8):
        raise ValueError(f"tinygemm needs N % 8 == 0 and K % {tiles * TILE_K} == 0, got N={n}, K={k}")
    # bytes as (n_tile, t // 4, k_outer, pair, which byte of 4, t % 4)
    b = packed.reshape(n // TILE_N, TILE_N, k // (tiles * TILE_K), tiles // 2, 4, 4).to(torch.int64)
    b = b.permute(0, 2, 1, 5, 3, 4)  # (n_tile, k_outer, t // 4, t % 4, pair, byte)
    shifts = 4 * torch.arange(4)
    high = ((b >> 4) << shifts).sum(-1)  # (..., pair) bits 0..15
    low = ((b & 0xF) << (shifts + 16)).sum(-1)  # bits 16..31
    words = high | low
    words = torch.where(words >= 2**31, words - 2**32, words)  # as int32 bits
    return words.reshape(n // TILE_N, k // (tiles * TILE_K), 32, tiles // 2).to(torch.int32).contiguous()


def tinygemm_codes(layout: torch.Tensor) -> torch.Tensor:
    """The inverse of `tinygemm_layout`: (N / 8, K / (16 tiles), 32, tiles / 2) int32 -> (N, K) uint8 codes in [0, 15]."""
    n_tiles, k_outer, lanes, pairs = layout.shape
    words = layout.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(4)
    high = (words[..., None] >> shifts) & 0xF  # (n_tile, k_outer, 32, pair, byte)
    low = (words[..., None] >> (shifts + 16)) & 0xF
    b = (high << 4) | low  # the bytes, high nibble first
    b = b.reshape(n_tiles, k_outer, TILE_N, 4, pairs, 4).permute(0, 2, 1, 4, 5, 3)  # (n_tile, t // 4, k_outer, pair, byte, t % 4)
    b = b.reshape(n_tiles * TILE_N, k_outer * pairs * 16)  # (N, K // 2), high nibble first
    return torch.stack([b >> 4, b & 0xF], dim=-1).reshape(b.shape[0], -1).to(torch.uint8)  # (N, K)


# On CUDA, `_weight_int8pack_mm` serves inputs of at most this many rows (decode at small batch
# sizes); more rows take a bf16 cuBLAS matmul of the cast weight (see the module docstring).
CUDA_INT8_KERNEL_MAX_ROWS = 4


def int8_weight_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float @ (q (N, K) int8 * scale (N,)).T -> (M, N) on a CUDA device.

    `scale` is fp32 on x's device. Few rows: `_weight_int8pack_mm` reads the int8
    weight directly, in fp32. More rows: the weight cast to bf16 feeds a tensor-core
    matmul and the scale multiplies the (M, N) output, not the (N, K) weight.
    """
    if x.shape[0] <= CUDA_INT8_KERNEL_MAX_ROWS:  # the CUDA kernel computes in fp32 from any float dtype; the CPU one wants x's
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale if x.device.type == "cuda" else scale.to(x.dtype))
    return F.linear(x.to(torch.bfloat16), q.to(torch.bfloat16)).float() * scale


@functools.cache
def _tinygemm_gpu(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 0)


def tinygemm_device(device: torch.device) -> bool:
    """Whether `_weight_int4pack_mm` runs on `device`: an NVIDIA GPU of compute capability 8.0+ (Ampere, Hopper, ...)."""
    return device.type == "cuda" and _tinygemm_gpu(device.index if device.index is not None else torch.cuda.current_device())
