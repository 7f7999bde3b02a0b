"""NF4 (QLoRA's "normal float") is a fixed 16-entry code book whose levels are
quantiles of a standard normal distribution, scaled per block by the block's
absmax: trained weights are roughly normal, so equal-probability levels give
lower error than the evenly spaced int4 grid at the same 4 bits. Double
quantization stores those per-block fp32 absmax scales themselves as int8
(blocks of 256 scales, each with one fp32 scale, around their mean), which
saves about 0.37 bit per weight at block size 64. Edge cases (NaN, overflowing
double-quantized scales) are formats.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core.errors import SlimkitError
from slimkit.quantization.formats import check_finite, check_group, fit_scale, pack_int4, unpack_int4

DQ_BLOCK = 256  # scales per second-level block in double quantization


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], ascending, with 0 exact.

    Quantiles of N(0, 1) at evenly spaced probabilities: 8 levels on the
    positive side and 7 on the negative (plus 0), so that the grid is
    asymmetric by one level like int4 but holds both -1 and 1; the outermost
    probability is the mean of 1 - 1/32 and 1 - 1/30, as QLoRA describes.
    """
    edge = 0.5 * (1 - 1 / 32 + 1 - 1 / 30)
    pos = torch.special.ndtri(torch.linspace(0.5, edge, 9, dtype=torch.float64)[1:])  # 8 levels > 0
    neg = -torch.special.ndtri(torch.linspace(0.5, edge, 8, dtype=torch.float64)[1:])  # 7 levels < 0
    code = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    return (code / code.abs().max()).sort().values.float()


@dataclass
class QuantizedNF4:
    """NF4 weight: codes (N, K // 2) uint8 packed indices into nf4_code(); per-block absmax.

    absmax is (N, K // block) fp32, or, double quantized, `absmax_q` int8 with
    `absmax_scale` (ceil(n_blocks / 256),) fp32 and `absmax_mean` () fp32.
    """

    codes: torch.Tensor
    shape: tuple[int, int]
    block_size: int
    absmax: torch.Tensor | None = None
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_mean: torch.Tensor | None = None

    def scales(self) -> torch.Tensor:
        if self.absmax is not None:
            return self.absmax
        return dequantize_scales(self.absmax_q, self.absmax_scale, self.absmax_mean)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.codes, self.scales(), self.block_size, dtype)


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> QuantizedNF4:
    """Nearest NF4 level of w / block absmax, per block of `block_size` input channels."""
    if w.dim() != 2:
        raise SlimkitError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    b = check_group(k, block_size)
    code = nf4_code()  # (16,)
    wb = w.detach().float().reshape(n, k // b, b)  # (N, B, b)
    absmax = wb.abs().amax(-1)  # (N, B)
    check_finite(absmax)
    absmax = absmax.clamp(min=torch.finfo(torch.float32).tiny)
    normed = wb / absmax[..., None]  # in [-1, 1]
    mids = (code[1:] + code[:-1]) / 2  # (15,) decision boundaries between levels
    idx = torch.bucketize(normed.contiguous(), mids)  # (N, B, b) in [0, 15]
    out = QuantizedNF4(pack_int4(idx.reshape(n, k)), (n, k), b)
    if double_quant:
        out.absmax_q, out.absmax_scale, out.absmax_mean = quantize_scales(absmax)
        if not torch.isfinite(out.scales()).all():
            raise SlimkitError("this weight's block scales are too close to float32's maximum (3.4e38) to be "
                               "double quantized: quantize it with double_quant=false")
    else:
        out.absmax = absmax
    return out


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, block_size: int, dtype=torch.float32) -> torch.Tensor:
    """codes (N, K // 2) uint8, absmax (N, K // block) -> (N, K)."""
    idx = unpack_int4(codes).long()  # (N, K)
    n, k = idx.shape
    w = nf4_code()[idx].reshape(n, k // block_size, block_size) * absmax.float()[..., None]
    return w.reshape(n, k).to(dtype)


def quantize_scales(scales: torch.Tensor, block: int = DQ_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: fp32 scales (any shape) -> (int8 same shape, fp32 per 256, fp32 mean)."""
    flat = scales.float().reshape(-1)
    mean = flat.double().mean().float()  # a float32 sum of scales near 3.4e38 would overflow
    centred = flat - mean
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, block)  # (nb, 256)
    s2 = fit_scale((blocks.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny), 127)  # (nb,)
    q = torch.round(blocks / s2[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1)[: flat.numel()].reshape(scales.shape), s2, mean


def dequantize_scales(q: torch.Tensor, s2: torch.Tensor, mean: torch.Tensor, block: int = DQ_BLOCK) -> torch.Tensor:
    flat = q.reshape(-1).float()
    per = s2.repeat_interleave(block)[: flat.numel()]
    return (flat * per + mean).reshape(q.shape)
