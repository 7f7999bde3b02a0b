"""Importance criteria: how much each weight matters, one class per criterion.

Every criterion maps a weight W (out, in) and, where it needs them,
calibration statistics to a score of the same shape; higher means keep.
Structured pruning sums these scores over the weights of a unit (a head
group, an MLP channel, a layer). The statistics come from the calibration
split only (see `common.input_sq_norms`, `common.gradient_stats`).

  magnitude-l1   |W|                    no data; cheap; blind to which inputs are large
  magnitude-l2   W^2                    as above, favours removing many small weights
  taylor         |W * dL/dW|            first-order estimate of the loss change when a weight
                                        is set to zero (Molchanov et al. 2019); needs a loss
  fisher         1/2 * E[g^2] * W^2     second-order (diagonal empirical Fisher, as in OBD):
                                        the expected loss increase; needs a loss
  activation     |W| * ||x_j||_2        the weight times the L2 norm of its input feature over
                                        calibration tokens (Wanda, Sun et al. 2023): a small
                                        weight on a large-activation channel still matters

Gradient criteria need a causal LM (the next-token loss); encoders get
magnitude or activation.
"""

from __future__ import annotations

import difflib

import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.selection import linear_weight
from slimkit.pruning import common


class Criterion:
    name = ""
    needs: frozenset[str] = frozenset()  # "grad" and/or "act"

    def scores(self, weight: torch.Tensor, *, grad=None, grad_sq=None, act_sq=None) -> torch.Tensor:
        raise NotImplementedError

    def _require(self, **stats) -> None:
        for key, value in stats.items():
            if value is None:
                raise ValueError(f"criterion {self.name} needs {key}")


class Magnitude(Criterion):
    def __init__(self, p: int = 1):
        if p not in (1, 2):
            raise SlimkitError(f"magnitude norm must be 1 or 2, got {p!r}")
        self.p = p
        self.name = f"magnitude-l{p}"

    def scores(self, weight, **_):
        w = weight.detach().float()  # (out, in)
        return w.abs() if self.p == 1 else w.pow(2)


class Taylor(Criterion):
    name = "taylor"
    needs = frozenset({"grad"})

    def scores(self, weight, *, grad=None, **_):
        self._require(grad=grad)
        return (weight.detach().float() * grad.float()).abs()  # (out, in)


class Fisher(Criterion):
    name = "fisher"
    needs = frozenset({"grad"})

    def scores(self, weight, *, grad_sq=None, **_):
        self._require(grad_sq=grad_sq)
        return 0.5 * grad_sq.float() * weight.detach().float().pow(2)  # (out, in)


class Activation(Criterion):
    name = "activation"
    needs = frozenset({"act"})

    def scores(self, weight, *, act_sq=None, **_):
        self._require(act_sq=act_sq)
        norm = act_sq.float().clamp(min=0).sqrt()  # (in,)
        return weight.detach().float().abs() * norm[None, :]  # (out, in)


CRITERIA: dict[str, Criterion] = {
    c.name: c for c in (Magnitude(1), Magnitude(2), Taylor(), Fisher(), Activation())
}


def get(name: str) -> Criterion:
    if name not in CRITERIA:
        close = difflib.get_close_matches(name, list(CRITERIA), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SlimkitError(f"unknown importance criterion '{name}'{hint}: choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name]


def module_scores(criterion: Criterion, lm, modules: dict, batches_fn) -> dict[str, torch.Tensor]:
    """name -> (out, in) scores for each module, gathering only the statistics
    the criterion needs (`batches_fn()` gives the calibration batches)."""
    grad = grad_sq = act = None
    if criterion.needs:
        batches = batches_fn()
        if "grad" in criterion.needs:
            grad, grad_sq = common.gradient_stats(lm, modules, batches)
        if "act" in criterion.needs:
            act = common.input_sq_norms(lm, modules, batches)
    return {
        n: criterion.scores(
            linear_weight(m),
            grad=grad[n] if grad else None,
            grad_sq=grad_sq[n] if grad_sq else None,
            act_sq=act[n] if act else None,
        )
        for n, m in modules.items()
    }
