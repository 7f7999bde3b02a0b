"""Observers: stream over calibration activations, return a fixed int8 range.

Static quantization fixes an activation's scale before deployment, so it must
choose the range [lo, hi] from calibration data. Four criteria:

  minmax      the largest values seen. Exact, but one outlier sets the step
              for every value, so typical values get few levels.
  percentile  clip at the p-th percentile of |x| (99.99 by default): a few
              outliers are clipped so the bulk keeps its resolution.
  entropy     TensorRT-style KL calibration: for each candidate threshold t
              on the histogram of |x|, compare the distribution P (values
              above t folded into the last kept bin) with Q, the same bins
              merged into 128 levels and spread back; keep the t with the
              smallest KL(P || Q).
  mse         the t with the smallest expected squared error over the
              histogram: rounding error for values inside [-t, t] (exact
              for values spread evenly inside each bin), (|x| - t)^2 for
              the clipped ones.
entropy and mse score every 8th bin edge, then every edge within 8 bins of
the best (their costs vary smoothly at that scale): 10x fewer evaluations
of an O(bins) cost than trying all 2048.

Streaming, never all activations in memory: `minmax` keeps a running
min/max. The others also keep a histogram of magnitudes, one for positive
and one for negative values, `bins` bins over [0, R). R is always a power of
two above the largest |x| seen; when a batch exceeds it, R doubles and
neighbouring bins are summed in pairs. With R and `bins` powers of two,
bin(x) at 2R = bin(x) at R // 2 exactly, so the histogram after any chunking
equals the one-shot histogram (one pass, no re-binning approximation); the
price is that the data may fill only half of the bins (>= 1024 of 2048).

Granularity. Activations are quantized per tensor: one (scale, zero point)
per layer input, which is what an int8 x int8 -> int32 matmul allows (a
per-input-channel scale would sit inside the sum over K and cannot be
factored out). Per-channel statistics (`per_channel=True`, minmax only: one
range per input channel) serve SmoothQuant, which moves those channel ranges
into the weights before the per-tensor range is observed. Weights (see
`quantize_weight`) use one scale per output channel or one per tensor.

Asymmetric activations (`symmetric=False`) use [lo, hi] with an integer zero
point; histogram criteria then choose each side's threshold on that side's
histogram (an approximation: each side is treated as having 128 levels).
"""

from __future__ import annotations

import math

import torch

from slimkit.core.errors import SlimkitError

OBSERVERS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048
LEVELS = 128  # magnitudes 0..127 of a symmetric int8 grid


# --------------------------------------------------------------------------- quantization parameters


def qparams(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of an int8 grid covering [lo, hi] (0 always exact); any shape.

    Symmetric: q in [-127, 127], scale = max(|lo|, hi) / 127, zero point 0.
    Asymmetric: q in [-128, 127], scale = (hi - lo) / 255, x ~ (q - z) * scale.
    """
    lo, hi = torch.as_tensor(lo).float().clamp(max=0), torch.as_tensor(hi).float().clamp(min=0)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = (torch.maximum(-lo, hi) / 127).clamp(min=tiny)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / 255).clamp(min=tiny)
    zero = torch.round(-128 - lo / scale).clamp(-128, 127).to(torch.int32)
    return scale, zero


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """x (..., K) float -> int8 with a fixed scale and zero point."""
    if symmetric:
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return (torch.round(x / scale) + zero).clamp(-128, 127).to(torch.int8)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """What the int8 grid makes of x: quantize, then back to float."""
    return (quantize_activation(x, scale, zero, symmetric).float() - zero) * scale


def quantize_weight(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (int8 (N, K), scale (N,) per output channel or (1,) per tensor), symmetric."""
    absmax = w.abs().amax(1) if per_channel else w.abs().amax().reshape(1)  # (N,) or (1,)
    scale = (absmax.float() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


# --------------------------------------------------------------------------- streaming statistics


class Histogram:
    """Counts of |x| for positive and negative x, over [0, R) with R a power of two (see module doc)."""

    def __init__(self, bins: int = BINS):
        if bins < 2 * LEVELS or bins & (bins - 1):
            raise SlimkitError(f"bins={bins} must be a power of two >= {2 * LEVELS}, e.g. 2048")
        self.bins = bins
        self.limit: float | None = None  # R
        self.pos = torch.zeros(bins, dtype=torch.int64)
        self.neg = torch.zeros(bins, dtype=torch.int64)

    @property
    def width(self) -> float:
        return (self.limit or 1.0) / self.bins

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float()
        if not x.numel():
            return
        amax = float(x.abs().max())
        if not math.isfinite(amax):
            raise SlimkitError("calibration activations contain inf or NaN: check the model in float first")
        needed = 2.0 ** math.frexp(amax)[1] if amax > 0 else 1.0  # smallest power of two > amax
        if self.limit is None:
            self.limit = needed
        while needed > self.limit:  # double the range: bins merge in pairs, exactly
            self.pos = torch.cat([self.pos.reshape(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.int64)])
            self.neg = torch.cat([self.neg.reshape(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.int64)])
            self.limit *= 2
        idx = torch.floor(x.abs() * (self.bins / self.limit)).long()  # exact: scaling by a power of two
        negative = x < 0
        self.pos += torch.bincount(idx[~negative], minlength=self.bins)
        self.neg += torch.bincount(idx[negative], minlength=self.bins)


class Observer:
    """Running statistics of one layer's input; `range()` -> (lo, hi), `qparams()` -> (scale, zero).

    per_channel (minmax only): lo, hi are (K,) over the last dimension; else scalars.
    """

    def __init__(self, method: str = "minmax", symmetric: bool = True, percentile: float = 99.99, per_channel: bool = False, bins: int = BINS):
        check_observer(method, percentile)
        if per_channel and method != "minmax":
            raise SlimkitError(f"per-channel statistics are kept by the minmax observer only, not '{method}'")
        self.method, self.symmetric, self.percentile, self.per_channel = method, symmetric, percentile, per_channel
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.hist = Histogram(bins) if method != "minmax" else None

    def update(self, x: torch.Tensor) -> None:
        """x (..., K): one chunk of activations."""
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (M, K)
        if not x2.numel():
            return
        lo, hi = (x2.amin(0), x2.amax(0)) if self.per_channel else (x2.min(), x2.max())
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.hist is not None:
            self.hist.update(x2)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise SlimkitError("the observer saw no activations: the layer is not used in the forward pass; add it to ignore")
        lo, hi = self.lo.clamp(max=0), self.hi.clamp(min=0)
        if self.hist is None:
            return lo, hi
        h, w = self.hist, self.hist.width
        if self.symmetric:
            t = min(self._threshold(h.pos + h.neg, w), float(torch.maximum(-lo, hi)))
            return torch.tensor(-t), torch.tensor(t)
        return torch.tensor(-min(self._threshold(h.neg, w), float(-lo))), torch.tensor(min(self._threshold(h.pos, w), float(hi)))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams(*self.range(), self.symmetric)

    def _threshold(self, hist: torch.Tensor, width: float) -> float:
        if self.method == "percentile":
            return percentile_threshold(hist, width, self.percentile)
        if self.method == "entropy":
            return entropy_threshold(hist, width)
        return mse_threshold(hist, width)


def check_observer(method: str, percentile: float) -> None:
    if method not in OBSERVERS:
        raise SlimkitError(f"observer='{method}' is unknown: use one of {', '.join(OBSERVERS)}")
    if not 0 < percentile <= 100:
        raise SlimkitError(f"percentile={percentile} is out of range: use a value in (0, 100], such as 99.99")


# --------------------------------------------------------------------------- thresholds from a histogram of |x|


def percentile_threshold(hist: torch.Tensor, width: float, p: float) -> float:
    """|x| below which p percent of the counts lie, interpolated linearly inside its bin."""
    h = hist.double()
    total = float(h.sum())
    if total == 0:
        return 0.0
    cdf = h.cumsum(0)
    target = total * p / 100
    i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))[0].clamp(max=len(h) - 1))
    before = float(cdf[i - 1]) if i else 0.0
    frac = (target - before) / float(h[i]) if h[i] > 0 else 1.0
    return (i + min(max(frac, 0.0), 1.0)) * width


def _kept_bins(hist: torch.Tensor) -> int:
    nonzero = torch.nonzero(hist).reshape(-1)
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def _rounding_error_integral(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """G(x) = integral from -step/2 to x of (u - step * round(u / step))^2 du, for x >= 0.

    The error is a sawtooth: each whole period adds step^3 / 12; inside one,
    with y = x / step + 1/2 = n + f, the part is step^3 ((f - 1/2)^3 + 1/8) / 3.
    """
    y = x / step + 0.5
    n = torch.floor(y)
    return step**3 * (n / 12 + ((y - n - 0.5) ** 3 + 0.125) / 3)


def mse_threshold(hist: torch.Tensor, width: float, levels: int = LEVELS - 1) -> float:
    """t minimizing the expected squared error over the bin edges t = i * width.

    Values are taken as uniform inside each bin [a, b). Bins below t cost the
    mean rounding error of the grid with step t / levels over [a, b) (exact
    for that assumption, so a step wider than the data is judged right, not
    as step^2 / 12); bins at or above t cost the mean of (x - t)^2 (clipping).
    """
    n = _kept_bins(hist)
    if n == 0:
        return 0.0
    h = hist[:n].double()  # (n,)
    edges = torch.arange(n + 1, dtype=torch.float64) * width  # (n + 1,) bin j is [edges[j], edges[j + 1])
    a = edges[:-1]

    def cost(cand: torch.Tensor) -> torch.Tensor:  # (C,) bins kept -> (C,) expected error
        t = cand.double()[:, None] * width  # (C, 1)
        rounding = _rounding_error_integral(edges[None], t / levels).diff(dim=1) / width  # (C, n)
        clipping = (edges[None] - t).pow(3).diff(dim=1) / (3 * width)  # (C, n)
        return (torch.where(a[None] < t, rounding, clipping) * h).sum(1)

    return _search(cost, 1, n) * width


def entropy_threshold(hist: torch.Tensor, width: float, levels: int = LEVELS) -> float:
    """t = i * width minimizing KL(P_i || Q_i), i from `levels` to the last non-empty bin.

    P_i: bins 0..i-1, with all counts at or above bin i added to bin i-1 (clipped values).
    Q_i: bins 0..i-1 merged into `levels` equal groups; each group's count is
    spread evenly over its bins where P is non-zero (empty bins stay empty).
    """
    n = _kept_bins(hist)
    if n <= levels:
        return n * width  # fewer bins than levels: nothing to gain by clipping
    h = hist[:n].double()  # (n,)
    beyond = h.flip(0).cumsum(0).flip(0)  # (n,) counts at or above bin i
    j = torch.arange(n)

    def cost(cand: torch.Tensor) -> torch.Tensor:  # (C,) bins kept -> (C,) KL(P || Q)
        keep = j[None, :] < cand[:, None]  # (C, n)
        q_counts = torch.where(keep, h[None, :], 0.0)  # (C, n) kept bins, clipped values left out
        p = q_counts.clone()
        p[torch.arange(len(cand)), cand - 1] += torch.where(cand < n, beyond[cand.clamp(max=n - 1)], 0.0)
        group = torch.where(keep, j[None, :] * levels // cand[:, None], levels - 1)  # (C, n) in [0, levels)
        nz = (p > 0).double()
        totals = torch.zeros(len(cand), levels, dtype=torch.float64).scatter_add_(1, group, q_counts)  # (C, L)
        sizes = torch.zeros(len(cand), levels, dtype=torch.float64).scatter_add_(1, group, nz)  # (C, L)
        q = nz * totals.gather(1, group) / sizes.gather(1, group).clamp(min=1)  # (C, n)
        p = p / p.sum(1, keepdim=True)
        q = q / q.sum(1, keepdim=True).clamp(min=1e-300)
        return torch.where(p > 0, p * torch.log(p / q.clamp(min=1e-12)), 0.0).sum(1)

    return _search(cost, levels, n) * width


def _search(cost, first: int, last: int, stride: int = 8, chunk: int = 512) -> int:
    """argmin of cost over the integers first..last: every `stride`-th, then each one near the best."""

    def best_of(cands: torch.Tensor) -> tuple[int, float]:
        best = (last, float("inf"))
        for part in cands.split(chunk):
            c = cost(part)
            i = int(c.argmin())
            if float(c[i]) < best[1]:
                best = (int(part[i]), float(c[i]))
        return best

    coarse, _ = best_of(torch.cat([torch.arange(first, last + 1, stride), torch.tensor([last])]).unique())
    fine, _ = best_of(torch.arange(max(first, coarse - stride + 1), min(last, coarse + stride - 1) + 1))
    return fine
