"""Physical removal: slicing a linear layer's outputs or inputs, and refitting
what loses inputs, for structured pruning (`structured.py` decides what goes).

A Linear / Conv1D keeps chosen output rows (`keep_outputs`) or input columns
(`keep_inputs`), and its in_features / out_features follow, so the smaller
model really runs smaller matrices. The layer that loses inputs (an MLP's
output projection, o when heads go) can instead be refitted by ridge least
squares on its calibration inputs (`refit_inputs`), so the kept features stand
in for the removed ones; `obs_keep` chooses which features to keep for that
refit (Optimal Brain Surgeon over whole features). What each costs in quality
is measured in `structured.py`'s docstring.

Which rows belong to a block's MLP channel or kv head group comes from the
architecture adapter (`core.adapter`); nothing here reads module names.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.core.adapter import Adapter, Block
from slimkit.core.selection import is_conv1d, linear_weight

REFIT_DAMPING = 0.01  # ridge, as a fraction of the mean input energy (GPTQ damps its Hessian alike)


def keep_outputs(module: nn.Module, idx: torch.Tensor) -> None:
    """Keep only output units `idx` of a Linear/Conv1D (in place)."""
    with torch.no_grad():
        if is_conv1d(module):
            module.weight = nn.Parameter(module.weight[:, idx].clone())  # (in, out')
            module.nf = len(idx)
        else:
            module.weight = nn.Parameter(module.weight[idx].clone())  # (out', in)
            module.out_features = len(idx)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias[idx].clone())


def keep_inputs(module: nn.Module, idx: torch.Tensor) -> None:
    """Keep only input features `idx` of a Linear/Conv1D (in place)."""
    with torch.no_grad():
        if is_conv1d(module):
            module.weight = nn.Parameter(module.weight[idx].clone())  # (in', out)
            module.nx = len(idx)
        else:
            module.weight = nn.Parameter(module.weight[:, idx].clone())  # (out, in')
            module.in_features = len(idx)


def _augmented(module: nn.Module, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weight with the bias as a last column, (out, in [+ 1]); the Gram over the same
    features; in_features), in float64: the bias is the weight of the constant feature."""
    w = linear_weight(module).detach().double()  # (out, in)
    n_in = w.shape[1]
    if module.bias is None:
        return w, gram[:n_in, :n_in], n_in
    return torch.cat([w, module.bias.detach().double()[:, None]], 1), gram, n_in


def refit_inputs(module: nn.Module, idx: torch.Tensor, gram: torch.Tensor, damping: float = REFIT_DAMPING) -> None:
    """Keep input features `idx` of a Linear/Conv1D and refit its weight (and bias)
    so its outputs on the calibration inputs change as little as possible.

    Ridge least squares on the input Gram matrix `gram` ((in + 1)^2, last row
    and column the constant feature, from `common.input_grams`): with W the
    original weight, S the kept features and G the Gram,
        W' = W G[:, S] (G[S, S] + lambda I)^-1,   lambda = damping * mean(diag G[S, S]),
    where a bias joins the solve as the weight of the constant feature, so it
    absorbs the removed features' mean contribution. When the removed features
    carried nothing on the calibration data (all zero), this is a plain slice.
    """
    n_in = linear_weight(module).shape[1]
    removed = torch.ones(n_in, dtype=torch.bool)
    removed[idx] = False
    if gram[:n_in, :n_in].diagonal()[removed].sum() == 0:
        keep_inputs(module, idx)
        return
    with torch.no_grad():
        w_aug, g, _ = _augmented(module, gram)
        has_bias = module.bias is not None
        cols = torch.cat([idx, torch.tensor([n_in])]) if has_bias else idx
        a = g[cols][:, cols].clone()
        lam = damping * a.diagonal()[: len(idx)].mean().clamp(min=1e-12)
        a.diagonal()[: len(idx)] += lam
        sol = torch.linalg.solve(a, (w_aug @ g[:, cols]).T).T  # (out, kept [+ 1])
        keep_inputs(module, idx)
        new_w = sol[:, : len(idx)].to(module.weight.dtype)
        module.weight.copy_(new_w.T if is_conv1d(module) else new_w)
        if has_bias:
            module.bias.copy_(sol[:, -1].to(module.bias.dtype))


def obs_keep(module: nn.Module, gram: torch.Tensor, n_remove: int, damping: float = REFIT_DAMPING) -> torch.Tensor:
    """Input features of a Linear/Conv1D to keep when `n_remove` must go.

    Optimal Brain Surgeon over whole input features (as ZipLM and SlimGPT prune
    structured units): one at a time, remove the feature whose loss the refit of
    the others compensates best, error_j = ||w_j||^2 / [H^-1]_jj with H the
    damped input Gram matrix, then update the weights and H^-1 as if refitted.
    The error is measured where it matters, at the module's output, so a channel
    whose work its neighbours can take over goes before one that is merely small.

    H^-1 is never updated whole: after t removals it is A - C R, with A the
    first inverse, C (n, t) the columns taken out and R (t, n) the rows, each
    divided by its pivot; a step computes only the column and the row it needs,
    O(n t) instead of O(n^2) (on MiniLM's MLPs: the same features kept, 4-5x faster).
    """
    w, g, n_in = _augmented(module, gram)
    h = g.clone()
    h.diagonal()[:n_in] += damping * h.diagonal()[:n_in].mean().clamp(min=1e-12)
    a = torch.linalg.inv(h)  # (n, n), n = in [+ 1]
    cols = torch.zeros(len(a), n_remove, dtype=a.dtype)  # C
    rows = torch.zeros(n_remove, len(a), dtype=a.dtype)  # R
    diag = a.diagonal().clone()  # (n,) the diagonal of A - C R
    alive = torch.ones(n_in, dtype=torch.bool)
    for t in range(n_remove):
        error = w[:, :n_in].pow(2).sum(0) / diag[:n_in]
        error[~alive] = float("inf")
        j = int(error.argmin())  # ties: the lowest index
        col = a[:, j] - cols[:, :t] @ rows[:t, j]  # (n,) column j of H^-1
        row = (a[j] - cols[j, :t] @ rows[:t]) / col[j]  # (n,) row j of H^-1, over H^-1[j, j]
        w -= torch.outer(w[:, j], row)
        diag -= col * row
        cols[:, t], rows[t] = col, row
        alive[j] = False
    return torch.nonzero(alive).flatten()


def cut_inputs(module: nn.Module, idx: torch.Tensor, gram: torch.Tensor | None) -> None:
    """Keep input features `idx`: refitted on `gram` when given, else sliced."""
    if gram is None:
        keep_inputs(module, idx)
    else:
        refit_inputs(module, idx, gram)


def remove_mlp_channels(arch: Adapter, b: Block, keep: torch.Tensor, gram: torch.Tensor | None = None) -> None:
    """Keep MLP channels `keep` (their rows in each input, in every stacked part of a fused
    gate_up); with the output projection's input `gram`, refit it."""
    model = arch.model
    for n in b.mlp_in:
        keep_outputs(model.get_submodule(n), arch.mlp_rows(b, n, keep))
    cut_inputs(model.get_submodule(b.mlp_out), keep, gram)


def remove_head_groups(arch: Adapter, b: Block, keep_groups: list[int], gram: torch.Tensor | None = None) -> None:
    """Keep kv groups `keep_groups` with their query heads; o keeps the matching columns.
    A stacked fused qkv keeps the same rows of its q, k and v parts, in that order."""
    model = arch.model
    n_kv, per = arch.kv_groups(b)
    parts = arch.qkv_rows(b)
    q_keep = torch.cat([torch.arange(n_kv * per * b.head_dim)[b.group_rows(g, per)[0]] for g in keep_groups])
    kv_keep = torch.cat([torch.arange(n_kv * b.head_dim)[b.group_rows(g, per)[1]] for g in keep_groups])
    rows: dict[str, list[torch.Tensor]] = {}
    for part, keep in (("q", q_keep), ("k", kv_keep), ("v", kv_keep)):
        layer, part_rows = parts[part]
        rows.setdefault(layer, []).append(part_rows[keep])
    for layer, kept in rows.items():
        keep_outputs(model.get_submodule(layer), torch.cat(kept))
    cut_inputs(model.get_submodule(b.o), q_keep, gram)
    arch.resize_heads_(b, len(keep_groups) * per, len(keep_groups))
