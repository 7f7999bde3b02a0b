"""GPTQ's error-compensating rounding, on tensors alone.

Round-to-nearest quantizes each weight on its own. GPTQ quantizes the columns
(input channels) of a layer one at a time and, after each, moves the rounding
error onto the columns not yet quantized, weighted by how the layer's inputs
correlate: it minimises ||W X - Q X||^2 over calibration inputs X rather than
||W - Q||^2. The statistics it needs are H = 2 X X^T / n (K x K). Using the
Cholesky factor U of H^-1 (upper), the update after column i is

    err = (w_i - q_i) / U[i, i];   W[:, j] -= err * U[i, j]   for j > i,

applied lazily in blocks of columns so most of the work is one matmul per
block. Group-wise scales are chosen when the sweep reaches a group, from the
already-updated weights of that group. A damping term (a fraction of H's mean
diagonal) keeps H invertible; input channels that never fire are zeroed.
"""

from __future__ import annotations

import torch

from slimkit.quantization import formats as Q


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 64,
    symmetric: bool = False,
    damp: float = 0.01,
    block: int = 128,
    zero_point: str = "float",
    scale_search: bool = False,
) -> Q.QuantizedInt:
    """Quantize w (N, K) with GPTQ against hessian (K, K); returns the same format as quantize_int.

    scale_search (symmetric grids): each group's scale is searched (`formats.search_scales`) on
    its updated weights, weighted by H's diagonal (the mean square of each input channel, what
    an error on that column costs alone), and the columns are rounded with the scale as stored."""
    n, k = w.shape
    g = Q.check_group(k, group_size)
    Q.qrange(bits)
    Q.check_zero_point(zero_point, symmetric)
    Q.check_scale_search(scale_search, symmetric)
    integer = zero_point == "integer"
    W = w.detach().float().clone()  # (N, K), updated in place as errors are pushed right
    H = hessian.detach().float().clone()  # (K, K)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (K, K)

    q = torch.zeros(n, k, dtype=torch.int8)
    scale = torch.zeros(n, k // g)
    offset = None if symmetric or integer else torch.zeros(n, k // g)
    zeros = torch.zeros(n, k // g) if integer else None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        errs = torch.zeros(n, b1 - b0)  # (N, block) scaled errors of this block
        for i in range(b0, b1):
            if i % g == 0:  # a new group: its grid from the updated weights
                if scale_search:
                    cols = Q.search_scales(W[:, None, i : i + g], bits, H.diagonal()[i : i + g], Q.scale_dtype(group_size))
                    scale[:, i // g] = cols[:, 0]
                else:
                    grid = Q.quantize_int(W[:, i : i + g], bits, None, symmetric, zero_point)
                    scale[:, i // g] = grid.scale[:, 0]
                if offset is not None:
                    offset[:, i // g] = grid.offset[:, 0]
                if zeros is not None:
                    zeros[:, i // g] = grid.zero_point[:, 0].float()
            col = W[:, i]  # (N,)
            m = None if offset is None else offset[:, i // g]
            z = None if zeros is None else zeros[:, i // g]
            qi, deq = Q.round_to_grid(col, scale[:, i // g], m, z, bits)
            if scale_search:
                qi = qi.clamp(*Q.search_levels(bits))
                deq = qi * scale[:, i // g]
            q[:, i] = qi.to(torch.int8)
            err = (col - deq) / U[i, i]  # (N,)
            W[:, i + 1 : b1] -= err[:, None] * U[i, i + 1 : b1][None, :]
            errs[:, i - b0] = err
        W[:, b1:] -= errs @ U[b0:b1, b1:]  # the block's errors onto every later column
    return Q.QuantizedInt(q, scale, offset, bits, g, None if zeros is None else zeros.to(torch.uint8))


def layer_loss(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W~) H (W - W~)^T): the output error GPTQ minimises, up to a constant."""
    d = (w - w_hat).float()
    return float(torch.einsum("nk,kl,nl->", d, hessian.float(), d))
