"""Number formats for quantized weights: pure tensor math, no modules, no models.

Integer formats (int8, int4) map a real weight `w` to an integer `q` with a
scale `s` (and, asymmetric, an offset `m`, the group's minimum):

    symmetric   q = clamp(round(w / s), lo, hi),        s = absmax / hi,           w ~ q * s
    asymmetric  q = round((w - m) / s) + lo,            s = (max - min) / (hi - lo), w ~ (q - lo) * s + m

with lo, hi = -2^(b-1), 2^(b-1) - 1: both grids are stored as signed int8. The
asymmetric grid spans exactly [min, max] of its group (the offset is a float,
as in GGUF's Q4_1 and the CPU int4 kernel, not an integer zero point), so no
level is wasted on a range the group does not use.

Integer zero point (`zero_point="integer"`): the asymmetric grid with its
offset constrained to -z * s, z an integer in [0, 2^b - 1], so that

    integer     u = q - lo in [0, 2^b - 1],  w ~ (u - z) * s

the convention of GPTQ and AutoAWQ checkpoints and of ONNX Runtime's
MatMulNBits kernel (whose float zero points take a slow path). Such a grid
cannot start exactly at the group's minimum: its levels are multiples of s
shifted by a whole number of steps, so 0 is always a level. Each group takes
the (scale, zero point) pair with the least squared error among a few: the
smallest scales whose grid covers [min, max] for the two zero points next to
-min / s0 (s0 = (max - min) / (2^b - 1), the range stretched to include 0),
and s0 shrunk by up to 20%, which clips the extremes a little to step finer
everywhere else. On random normal weights this is about as accurate as the
float offset (22.3 vs 22.1 dB SQNR, group 32); on weights shipped in a
float-offset format (SmolLM2's Q4_1, which the float offset re-finds
exactly) it is a real loss, measured in benchmarks/RESULTS-export.md.

The scale is shared by a *group* of consecutive input channels of one output
row: `group_size=None` means one scale per output channel (the whole row),
`group_size=g` means K / g scales per row. Smaller groups follow the weights'
local range more closely (less error) at the cost of more scales to store:
an fp16 scale per 32 weights adds 0.5 bit per weight, per 128 only 0.125.
Symmetric grids waste one level and fit skewed rows worse; asymmetric grids
cost an offset per group but fit rows whose range is not centred on 0.

Searched symmetric scales (`scale_search`, `search_scales`): the same stored
grid, q in [lo, hi] and w ~ q * s, but each group's scale, of either sign, is
the one with the least squared error weighted per input column by an
importance (the mean square of that input channel over calibration tokens:
an error on column j costs about c_j times its square in the output). A
negative scale lets the group's largest weight take the level lo = -2^(b-1),
which absmax / hi never uses, and a scale below absmax / hi clips that weight
to step finer everywhere else. This is how llama.cpp quantizes Q4_0 with an
importance matrix. On 16 of SmolLM2's layers (groups of 32, 4 bits) it cut the
output error of absmax rounding on held-out calibration tokens to 0.41x on
average (0.77x unweighted); BENCHMARKS.md's GGUF section has the perplexity.

Two 4-bit values are packed per byte (`pack_int4`), low nibble first, so the
stored tensor is really half the size of int8. NF4 is in nf4.py.

Edges. A weight holding NaN or Inf is refused (SlimkitError): no grid can
represent it, and a silent NaN would poison every later measurement. Every
finite weight quantizes, dequantizes to finite values, and lies within half
a step (scale / 2) of its dequantized value, with two exceptions near
float32's maximum (3.4e38), both refused with an error that names the fix:
an asymmetric group whose range max - min overflows float32, and double
quantized NF4 scales that would dequantize past it. An all-zero group gets
the smallest positive scale and stays exactly zero. A double-quantized scale
is off by up to half its second-level step (1/254 of the scales' spread
around their mean), so a block far below the mean can come back with a tiny
scale of either sign, and one within 0.4% of fp16's largest value (65504)
can dequantize to Inf in fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.core.errors import SlimkitError

GROUP_SIZES = (32, 64, 128, 256)
INT_BITS = (4, 8)


def qrange(bits: int) -> tuple[int, int]:
    """Smallest and largest integer of a signed `bits`-wide grid."""
    if bits not in INT_BITS:
        raise SlimkitError(f"bits={bits} is not supported: use one of {', '.join(map(str, INT_BITS))}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check_group(in_features: int, group_size: int | None) -> int:
    """The effective group size (the whole row when None); errors name the fix."""
    if group_size is None:
        return in_features
    if group_size not in GROUP_SIZES:
        raise SlimkitError(f"group_size={group_size} is not supported: use one of {', '.join(map(str, GROUP_SIZES))} or None (per channel)")
    if in_features % group_size:
        raise SlimkitError(f"group_size={group_size} does not divide the input dimension {in_features}: choose a group size that divides it or ignore this layer")
    return group_size


@dataclass
class QuantizedInt:
    """An integer-quantized 2-D weight.

    q: (N, K) int8 holding values of the grid (unpacked); scale, offset: (N, K // group)
    zero_point: (N, K // group) uint8 integer zero points z (then offset is None)
    """

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    bits: int
    group_size: int
    zero_point: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int(self.q, self.scale, self.offset, self.group_size, self.bits, dtype, self.zero_point)


ZERO_POINTS = ("float", "integer")
SPAN_TOO_WIDE = ("a group of this weight spans more than float32 can hold (max - min over 3.4e38): "
                 "quantize it with a symmetric grid (symmetric=true)")


def check_zero_point(zero_point: str, symmetric: bool) -> None:
    """Validate a config's zero_point option; errors name the fix."""
    if zero_point not in ZERO_POINTS:
        raise SlimkitError(f"zero_point={zero_point!r} is not supported: use 'float' (offset m, w = u * s + m) "
                           "or 'integer' (w = (u - z) * s, as MatMulNBits and GPTQ checkpoints store it)")
    if zero_point == "integer" and symmetric:
        raise SlimkitError("zero_point='integer' shapes the asymmetric grid: set symmetric=false with it "
                           "(a symmetric grid needs no zero point)")


ROWS_PER_CHUNK = 4096  # rows quantized at a time: a 49k-row embedding costs a few MB of temporaries, not 4 copies


def check_scale_search(scale_search: bool, symmetric: bool) -> None:
    """Validate a config's scale_search option; errors name the fix."""
    if scale_search and not symmetric:
        raise SlimkitError("scale_search chooses the scales of the symmetric grid: set symmetric=true with it "
                           "(the asymmetric grid already spans each group's [min, max])")


def quantize_int(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                 zero_point: str = "float", scale_search: bool = False, importance: torch.Tensor | None = None) -> QuantizedInt:
    """Round-to-nearest integer quantization of `w` (N, K) with per-group scales.

    zero_point: 'float' or 'integer', the asymmetric grid's offset (see the module docstring).
    scale_search: symmetric grids only, each group's scale from `search_scales` instead of
    absmax / hi, minimising the squared error weighted by `importance` (K,) per input column
    (None: unweighted), e.g. the mean square of each input channel over calibration tokens.
    Every group lies within one row, so rows are quantized `ROWS_PER_CHUNK` at a time and
    joined: the same result as all at once, without full-size float temporaries."""
    check_zero_point(zero_point, symmetric)
    check_scale_search(scale_search, symmetric)
    if w.dim() != 2:
        raise SlimkitError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    g = check_group(k, group_size)
    if importance is not None and importance.shape != (k,):
        raise ValueError(f"importance holds one value per input column ({k}), got shape {tuple(importance.shape)}")
    args = (bits, g, symmetric, zero_point, scale_search, importance, scale_dtype(group_size))
    if n <= ROWS_PER_CHUNK:
        return _quantize_rows(w, *args)
    parts = [_quantize_rows(w[i : i + ROWS_PER_CHUNK], *args) for i in range(0, n, ROWS_PER_CHUNK)]
    join = lambda field: None if getattr(parts[0], field) is None else torch.cat([getattr(p, field) for p in parts])  # noqa: E731
    return QuantizedInt(join("q"), join("scale"), join("offset"), bits, g, join("zero_point"))


def _quantize_rows(w: torch.Tensor, bits: int, g: int, symmetric: bool, zero_point: str, scale_search: bool = False,
                   importance: torch.Tensor | None = None, stored: torch.dtype = torch.float32) -> QuantizedInt:
    n, k = w.shape
    lo, hi = qrange(bits)
    wg = w.detach().float().reshape(n, k // g, g)  # (N, G, g)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        absmax = wg.abs().amax(-1)  # (N, G)
        check_finite(absmax)
        if scale_search:
            weight = None if importance is None else importance.detach().float().reshape(1, k // g, g)
            scale = search_scales(wg, bits, weight, stored)  # (N, G)
        else:
            scale = fit_scale((absmax / hi).clamp(min=tiny), hi)  # (N, G)
        q, _ = round_to_grid(wg, scale[..., None], bits=bits)
        if scale_search:
            q = q.clamp(*search_levels(bits))
        offset = None
    else:
        offset, top = wg.amin(-1), wg.amax(-1)  # (N, G)
        check_finite(offset, top)
        scale = ((top - offset) / (hi - lo)).clamp(min=tiny)  # (N, G)
        if not torch.isfinite((hi - lo) * scale + offset).all():  # the grid's top level, by monotonicity every level
            raise SlimkitError(SPAN_TOO_WIDE)
        if zero_point == "integer":
            scale, z = integer_grid(wg, offset, top, bits)  # (N, G) each
            q, _ = round_to_grid(wg, scale[..., None], None, z[..., None], bits)
            return QuantizedInt(q.reshape(n, k).to(torch.int8), scale, None, bits, g, z.to(torch.uint8))
        q, _ = round_to_grid(wg, scale[..., None], offset[..., None], bits=bits)
    return QuantizedInt(q.reshape(n, k).to(torch.int8), scale, offset, bits, g)


SHRINK = torch.linspace(0.8, 1.0, 11).tolist()  # scale factors the integer grid tries below the full range


def integer_grid(wg: torch.Tensor, low: torch.Tensor, top: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of each group, the pair with the least squared error.

    wg (N, G, g); low/top (N, G) the groups' min and max. Candidates: for each
    of the two zero points next to the ideal (floor, ceil), the smallest scale
    whose grid covers [low, top]; and scales s0 * f, f in SHRINK, which clip
    the extremes a little to step finer everywhere else.
    Returns (scale (N, G) fp32, z (N, G) float holding integers in [0, 2^b - 1])."""
    levels = 2**bits - 1
    tiny = torch.finfo(torch.float32).tiny
    low, top = low.clamp(max=0), top.clamp(min=0)  # 0 must be a level: z is an integer
    if not torch.isfinite(top - low).all():
        raise SlimkitError(SPAN_TOO_WIDE)
    s0 = ((top - low) / levels).clamp(min=tiny)  # (N, G)
    candidates = []
    for z in ((-low / s0).floor(), (-low / s0).ceil()):
        z = z.clamp(0, levels)
        below = torch.where(z > 0, -low / z.clamp(min=1), torch.where(low < 0, torch.inf, 0.0))
        above = torch.where(z < levels, top / (levels - z).clamp(min=1), torch.where(top > 0, torch.inf, 0.0))
        candidates.append((torch.maximum(below, above).clamp(min=tiny), z))  # inf where z cannot cover
    for f in SHRINK:
        s = s0 * f
        candidates += [(s, (-low / s).floor().clamp(0, levels)), (s, (-low / s).ceil().clamp(0, levels))]
    best_err = best_scale = best_z = None
    for scale, z in candidates:
        _, deq = round_to_grid(wg, scale[..., None], None, z[..., None], bits)
        err = torch.where(torch.isfinite(scale), (wg - deq).pow(2).sum(-1), torch.inf)  # (N, G)
        if best_err is None:
            best_err, best_scale, best_z = err, scale, z
            continue
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        best_scale, best_z = torch.where(take, scale, best_scale), torch.where(take, z, best_z)
    return fit_scale(best_scale, levels), best_z


SEARCH_STEPS = torch.linspace(-1.0, 1.0, 21).tolist()  # levels around the end of the grid the largest weight is tried at


def search_levels(bits: int) -> tuple[int, int]:
    """The levels a searched scale may use: all of [lo, hi] for 4 bits; +-hi for 8, since llama.cpp's
    Q8_0 dot products take |q| with a sign trick that turns -128 into -128 (see gguf_blocks.py)."""
    lo, hi = qrange(bits)
    return (lo, hi) if bits == 4 else (-hi, hi)


def search_scales(wg: torch.Tensor, bits: int, weight: torch.Tensor | None = None,
                  stored: torch.dtype = torch.float32) -> torch.Tensor:
    """Each group's symmetric scale, signed, with the least weighted squared error sum_j c_j (w_j - q_j s)^2.

    wg (N, G, g); weight c (broadcasts against wg; None: all 1) -> scale (N, G).
    The absmax grid (s = absmax / hi) never uses the level lo = -hi - 1 and always
    steps wide enough for the largest weight. Here the largest weight m (signed) is
    tried at levels t near either end of the grid, s = m / t with t in hi + d and
    lo - d (d in SEARCH_STEPS; a negative s puts m on the side with the extra level,
    and |t| past the end clips m to step finer everywhere else). For each candidate
    the codes are rounded and the scale refitted to them by weighted least squares,
    s = sum c w q / sum c q^2; the pair with the least error wins. The absmax grid's
    own pair is a candidate too, so the result is never worse than it under c.
    Scales are rounded to `stored` (fp16 for grouped layers) before the error is
    measured, so the error is that of the weight the layer will hold."""
    lo, hi = search_levels(bits)
    tiny = torch.finfo(torch.float32).tiny
    c = torch.ones_like(wg) if weight is None else weight.expand_as(wg)
    cw = c * wg  # (N, G, g)
    at = wg.abs().argmax(-1, keepdim=True)  # (N, G, 1)
    top = wg.gather(-1, at)[..., 0]  # (N, G) the largest weight, signed
    floor = torch.finfo(stored).tiny
    best_err = best_scale = None
    targets = [hi] + [t for d in SEARCH_STEPS for t in (hi + d, lo - d)]
    for i, t in enumerate(targets):
        s = top / t if i else top.abs() / hi  # the first: the absmax grid
        s = torch.where(s.abs() < tiny, torch.full_like(s, tiny), s)
        q = wg.div(s[..., None]).round_().clamp_(lo, hi)  # (N, G, g)
        num, den = (cw * q).sum(-1), (c * q.square_()).sum(-1)  # (N, G)
        fit = torch.where(den > 0, num / den.clamp(min=tiny), s)
        fit = torch.where(torch.isfinite(fit) & (fit.abs() >= floor), fit, s)
        fit = fit.to(stored).float()
        fit = torch.where(torch.isfinite(fit) & (fit != 0), fit, s)  # past the stored dtype's range: keep s
        err = fit * (fit * den - 2 * num)  # (N, G): sum c (w - q s)^2 less sum c w^2, the same for every candidate
        if best_err is None:
            best_err, best_scale = err, fit
            continue
        take = err < best_err
        best_err, best_scale = torch.where(take, err, best_err), torch.where(take, fit, best_scale)
    return best_scale


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
                  zero_point: torch.Tensor | None = None, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest level of one grid for each entry of x: (q as stored, in [lo, hi], float; its dequantized value).

    scale, offset, zero_point broadcast against x; neither offset nor zero_point: symmetric."""
    lo, hi = qrange(bits)
    if zero_point is not None:
        q = (torch.round(x / scale) + zero_point + lo).clamp(lo, hi)
        return q, (q - lo - zero_point) * scale
    if offset is None:
        q = torch.round(x / scale).clamp(lo, hi)
        return q, q * scale
    q = (torch.round((x - offset) / scale) + lo).clamp(lo, hi)
    return q, (q - lo) * scale + offset


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int, bits: int,
                   dtype=torch.float32, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """q * scale (symmetric), (q - lo) * scale + offset, or (q - lo - zero_point) * scale, group-wise:
    q (N, K), scale/offset/zero_point (N, K // group) -> (N, K)."""
    n, k = q.shape
    qg = q.float().reshape(n, k // group_size, group_size)
    if zero_point is not None:
        w = (qg - qrange(bits)[0] - zero_point.float()[..., None]) * scale.float()[..., None]
    elif offset is None:
        w = qg * scale.float()[..., None]
    else:
        w = (qg - qrange(bits)[0]) * scale.float()[..., None] + offset.float()[..., None]
    return w.reshape(n, k).to(dtype)


def check_finite(*stats: torch.Tensor) -> None:
    """Refuse NaN / Inf, seen in per-group statistics (amax and amin propagate both), so no extra pass over w."""
    if not all(torch.isfinite(t).all() for t in stats):
        raise SlimkitError("cannot quantize a weight that holds NaN or Inf: the weights are corrupt or training diverged; "
                           "check the model (slimkit refuses such checkpoints at load)")


def fit_scale(scale: torch.Tensor, levels: int) -> torch.Tensor:
    """`scale`, one float step smaller where `levels * scale` rounds past float32's maximum.

    Only scales of groups within about an ulp of 3.4e38 change (127 * (3.4e38 / 127)
    rounds up to Inf); their weights still round to the top level.
    """
    over = torch.isinf(scale * levels)
    return torch.where(over, torch.nextafter(scale, torch.zeros_like(scale)), scale)


def stored_scales(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales or offsets cast to the dtype a module stores them in; refuses values that dtype cannot hold."""
    out = t.to(dtype)
    if not torch.isfinite(out).all():
        raise SlimkitError(f"this weight's group scales or offsets (up to {t.abs().max().item():.3g}) overflow {str(dtype).replace('torch.', '')}, "
                           "which stores them: quantize it per channel (group_size=None keeps fp32 scales)")
    return out


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8 activations, one symmetric scale per token (row), full range +-127:
    x (M, K) float -> (q (M, K) int8, scale (M, 1) fp32); x ~ q * scale."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)  # (M, 1)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def scale_dtype(group_size: int | None) -> torch.dtype:
    """How weight-only scales are stored: fp32 per channel, fp16 per group (4 bytes a row vs 2 a group)."""
    return torch.float32 if group_size is None else torch.float16


# --------------------------------------------------------------------------- packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 15] -> (N, K // 2) uint8, element 2i in the low nibble."""
    if q.shape[-1] % 2:
        raise SlimkitError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    u = q.to(torch.uint8)
    if u.numel() and int(u.max()) > 15:
        raise ValueError("pack_int4 takes values in [0, 15]; offset signed values by 8 first")
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 in [0, 15]; the inverse of pack_int4."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - x~|^2)."""
    ref = reference.detach().float()
    noise = (ref - approx.detach().float()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
