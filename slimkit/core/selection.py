"""Choosing modules: `targets` / `ignore` name patterns, and the linear layers they pick.

A pattern matches a module's qualified name (`model.layers.0.mlp.up_proj`) as a
glob, or any trailing part of it (`up_proj`, `mlp.*`). A layer is chosen when it
is linear (`nn.Linear`, or transformers' `Conv1D` as in GPT-2), matches one of
`targets` and none of `ignore`. Nothing matching is an error that names the
patterns, never a silent no-op. Every technique chooses its layers here.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimkit.core.errors import SlimkitError


def matches(name: str, patterns) -> bool:
    """A module name matches a pattern as a whole or as a suffix after a dot."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def check_patterns(targets, ignore) -> None:
    """Config-time validation of `targets` / `ignore`."""
    for field, value in (("targets", targets), ("ignore", ignore)):
        if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
            raise SlimkitError(f"{field} must be a list of non-empty name patterns, got {value!r}: write e.g. {field}=('q_proj', 'mlp.*')")
    if not targets:
        raise SlimkitError("targets is empty: give at least one name pattern, e.g. targets=('*',)")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of nn.Linear or Conv1D, a view (Conv1D stores it transposed)."""
    return layer.weight.T if is_conv1d(layer) else layer.weight


def select_linears(model: nn.Module, targets, ignore, what: str = "quantize") -> dict[str, nn.Module]:
    """name -> linear layer for every layer the patterns choose, in model order; raises when none match."""
    chosen = {n: m for n, m in model.named_modules() if n and is_linear(m) and matches(n, targets) and not matches(n, ignore)}
    if not chosen:
        raise SlimkitError(
            f"no linear layers to {what}: none matches targets {list(targets)} without matching ignore "
            f"{list(ignore)}; check the patterns against the model's module names"
        )
    return chosen


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the qualified `name` inside `root`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
