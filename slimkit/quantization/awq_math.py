"""AWQ's per-input-channel scale search, on tensors alone.

Rounding hurts a layer most on the input channels that carry large
activations: an error e in W[:, j] costs e * x_j in the output. AWQ
multiplies column j of W by s_j > 1 for such channels before rounding (its
relative rounding error shrinks) and divides the input by s_j, so the float
product is unchanged:

    y = x W^T = (x / s) (W diag(s))^T  ~  (x / s) Q(W diag(s))^T.

The scales come from one statistic, the mean magnitude m_j of input channel
j over calibration tokens: s = m^alpha, normalised so that
sqrt(max(s) min(s)) = 1. alpha = 0 gives s = 1 (plain round-to-nearest);
alpha = 1 scales fully with the activations. The best alpha is found by a
grid search that minimises the output error ||x W^T - (x / s) Q(W s)^T||^2
on cached calibration inputs; since alpha = 0 is on the grid, the result is
never worse than round-to-nearest on those inputs. Raising some columns
coarsens the step of the whole group they share, so too large an alpha hurts
the other channels: that is the trade-off the search settles.

Layers that read the same input (q/k/v, gate/up) share one s: their weights
are stacked (rows) and searched together, which quantizes exactly as each on
its own since the groups of a row never cross rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.quantization import formats as Q

MIN_MAGNITUDE = 1e-4  # floor of m_j: channels that never fire keep a finite scale
ROWS_PER_CHUNK = 4096  # output rows quantized and compared at a time


def awq_scales(x_mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """(K,) mean |x_j| -> (K,) scales m^alpha with sqrt(max * min) = 1."""
    s = x_mean_abs.float().clamp(min=MIN_MAGNITUDE).pow(alpha)  # (K,)
    return s / (s.max() * s.min()).sqrt()


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, zero_point: str = "float") -> torch.Tensor:
    """Round-to-nearest and back to float: (N, K) -> (N, K)."""
    return Q.quantize_int(w, bits, group_size, symmetric, zero_point).dequantize()


def scaled_error(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                 zero_point: str = "float", rows: int = ROWS_PER_CHUNK) -> float:
    """Mean squared output error of quantizing W diag(s) and feeding x / s: w (N, K), x (T, K), s (K,)."""
    return scaled_errors(w, x, [s], bits, group_size, symmetric, zero_point, rows)[0]


def scaled_errors(w: torch.Tensor, x: torch.Tensor, scales: list[torch.Tensor], bits: int, group_size: int | None, symmetric: bool,
                  zero_point: str = "float", rows: int = ROWS_PER_CHUNK) -> list[float]:
    """scaled_error for each s in `scales`, with the float output x W^T computed once per chunk.

    Output rows are taken `rows` at a time: a quantization group never spans
    two rows, so the chunks quantize exactly as the whole would, and a wide
    layer (a 49k-row LM head) costs a few MB of temporaries instead of several
    copies of itself. The reference product is the same for every s: computing
    it once per chunk rather than once per s halves the search's matmuls."""
    totals = [0.0] * len(scales)
    for lo in range(0, w.shape[0], rows):
        wc = w[lo : lo + rows]  # (n, K)
        ref = x @ wc.T  # (T, n)
        for i, s in enumerate(scales):
            approx = (x / s) @ fake_quantize(wc * s, bits, group_size, symmetric, zero_point).T  # (T, n)
            totals[i] += float((ref - approx).pow(2).sum())
    return [t / (x.shape[0] * w.shape[0]) for t in totals]


@dataclass(frozen=True)
class ScaleSearch:
    scale: torch.Tensor  # (K,) the chosen s
    alpha: float
    error: float  # output MSE with s
    rtn_error: float  # output MSE of plain round-to-nearest (alpha = 0)


def search_scale(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    grid: int = 20,
    x_mean_abs: torch.Tensor | None = None,
    zero_point: str = "float",
) -> ScaleSearch:
    """Best s = m^alpha over alpha in {0, 1/grid, ..., (grid-1)/grid}.

    w (N, K) the stacked weights of the layers reading x; x (T, K) cached
    inputs; x_mean_abs (K,) the statistic (default: from x itself).
    """
    w, x = w.float(), x.float()
    m = x.abs().mean(0) if x_mean_abs is None else x_mean_abs.float()  # (K,)
    scales = [awq_scales(m, i / grid) for i in range(grid)]
    errors = scaled_errors(w, x, scales, bits, group_size, symmetric, zero_point)
    best = min(range(grid), key=errors.__getitem__)  # the first of equal errors: the smallest alpha
    return ScaleSearch(scales[best], best / grid, errors[best], errors[0])
