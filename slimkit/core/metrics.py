"""Quality metrics as pure tensor math: next-token statistics against a reference,
nearest-neighbour overlap of two embeddings, macro F1. `measure.quality` reads them over
the evaluation split; sensitivity ranking reads them over calibration probes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_stats(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None = None) -> dict:
    """Sums over positions: NLL of `targets`, and against a reference the KL
    divergence KL(ref || model) and the count of equal argmaxes.

    logits, ref_logits: (N, V); targets: (N,)
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    out = {"nll": -logp.gather(-1, targets[:, None]).sum().item(), "n": targets.numel()}
    if ref_logits is not None:
        ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
        out["ref_nll"] = -ref_logp.gather(-1, targets[:, None]).sum().item()
        out["kl"] = F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
        out["agree"] = (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
    return out


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean overlap of each row's k nearest other rows under embeddings a and b (N, H)."""
    k = min(k, a.shape[0] - 1)

    def neighbours(e):
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.topk(k, dim=-1).indices

    na, nb = neighbours(a), neighbours(b)
    hits = (na[:, :, None] == nb[:, None, :]).any(-1).sum(-1).float()
    return (hits / k).mean().item()


def f1_macro(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = ((pred == c) & (gold == c)).sum().item()
        fp = ((pred == c) & (gold != c)).sum().item()
        fn = ((pred != c) & (gold == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0
