"""N:M semi-structured sparsity: in every group of M consecutive input weights
of a row, keep the N most important and zero the rest (2:4 keeps 2 of 4).

Why: NVIDIA GPUs from Ampere on have sparse tensor cores that multiply a 2:4
weight at up to twice the dense rate, and PyTorch exposes them through
`torch.sparse.to_sparse_semi_structured`. The pattern is rigid (exactly 50% at
2:4), so quality drops more than with free unstructured sparsity at the same
level; scoring by |W| x activation norm (Wanda, the default) limits the loss.

On CUDA with fp16/bf16 weights, `kernels=True` converts each pruned weight to
the semi-structured sparse format, so matmuls use the sparse kernels. Anywhere
else (CPU here) the zeros are stored densely and there is no speed without
sparse kernels; the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context, register
from slimkit.core.selection import linear_weight, select_linears
from slimkit.io.model import LoadedModel, copy_model
from slimkit.pruning import common, importance
from slimkit.pruning.masks import apply_masks
from slimkit.pruning.unstructured import finish

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly n kept in every group of m consecutive inputs. scores: (out, in), in % m == 0."""
    out, inp = scores.shape
    groups = scores.reshape(out, inp // m, m)  # (out, in/m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(out, inp)


@dataclass(frozen=True)
class SemiStructuredConfig(common.PruneOptions):
    n: int = 2
    m: int = 4
    importance: str = "activation"  # or magnitude-l1, magnitude-l2, taylor, fisher
    kernels: bool = True  # on CUDA fp16/bf16: convert to torch's semi-structured sparse tensors

    def __post_init__(self):
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m))
        if not ok or not 0 < self.n < self.m:
            raise SlimkitError(f"N:M sparsity needs 0 < N < M, got {self.n}:{self.m}: use e.g. 2:4")
        importance.get(self.importance)
        super().__post_init__()

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise SlimkitError(f"cannot read N:M pattern '{text}': write it as N:M, e.g. 2:4") from None
    return n, m


@register("2:4", "prune", SemiStructuredConfig, "N:M semi-structured (default 2:4); sparse kernels on CUDA, no speed on CPU")
def apply(model: LoadedModel, config: SemiStructuredConfig, ctx: Context = Context()) -> LoadedModel:
    lm = copy_model(model, f"{config.n}of{config.m}")
    modules = select_linears(lm.model, config.targets, config.ignore, what="prune")
    bad = [n for n, mod in modules.items() if linear_weight(mod).shape[1] % config.m]
    if bad:
        raise SlimkitError(f"{bad[0]} has {linear_weight(modules[bad[0]]).shape[1]} inputs, not a multiple of M={config.m}: add it to ignore")
    scores = importance.module_scores(importance.get(config.importance), lm, modules, common.calibration(lm, config, ctx))
    masks = {name: nm_mask(s, config.n, config.m) for name, s in scores.items()}
    if config.recover_minutes > 0 or not kernels_available(lm.model):
        return finish(model, lm, modules, masks, f"{config.n}:{config.m}", config, ctx)
    apply_masks(modules, masks)
    report = common.sparsity_report(lm.model, modules)
    converted = to_sparse_kernels(modules) if config.kernels else 0
    speed = f"semi-structured sparse kernels on {converted} layers" if converted else common.NO_SPEED
    lm.manifest["prune_report"] = {"method": "2:4", "sparsity": report, "speed": speed}
    return lm.record("prune", f"{config.n}:{config.m}", config, achieved_sparsity=report["overall"], speed=speed)


def kernels_available(model: nn.Module) -> bool:
    """CUDA weights in fp16/bf16, where torch's semi-structured kernels apply."""
    p = next(model.parameters())
    return p.is_cuda and p.dtype in SPARSE_DTYPES


def to_sparse_kernels(modules: dict) -> int:
    """Swap each 2:4 nn.Linear weight for a SparseSemiStructuredTensor; returns the count.

    Such a model runs and can be timed, but is not saved in this form: save
    before converting (the dense zeros reload exactly)."""
    from torch.sparse import to_sparse_semi_structured

    count = 0
    for mod in modules.values():
        if isinstance(mod, nn.Linear) and mod.weight.is_cuda and mod.weight.dtype in SPARSE_DTYPES:
            mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
            count += 1
    return count
