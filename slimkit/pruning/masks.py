"""Keep-masks from importance scores, and writing their zeros into weights: pure tensor math.

A mask is True where a weight is kept. `layer_mask` zeros the lowest fraction of one
tensor, `row_mask` of each output row (Wanda), `global_masks` under one threshold
across tensors; `apply_masks` writes the zeros in, so the model saves like any other.
"""

from __future__ import annotations

import torch

from slimkit.core.selection import linear_weight


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (True = keep) zeroing exactly round(sparsity * numel) lowest scores."""
    k = int(round(sparsity * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        mask[scores.flatten().argsort()[:k]] = False
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask zeroing the round(sparsity * in) lowest scores of each output row. scores: (out, in)."""
    k = int(round(sparsity * scores.shape[1]))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    return mask


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks under one threshold across all tensors: the k-th lowest score overall."""
    total = sum(s.numel() for s in scores.values())
    k = int(round(sparsity * total))
    if k == 0:
        return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])  # (total,)
    threshold = flat.kthvalue(k).values
    return {n: s > threshold for n, s in scores.items()}


def apply_masks(modules: dict, masks: dict[str, torch.Tensor]) -> None:
    """Write the zeros into the weights (in place)."""
    with torch.no_grad():
        for n, m in modules.items():
            w = linear_weight(m)  # (out, in) view
            w.mul_(masks[n].to(w.device, w.dtype))
