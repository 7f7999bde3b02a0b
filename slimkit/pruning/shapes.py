"""Shapes the config cannot express, for saving and reloading pruned models.

A uniformly pruned model is described by its config alone (fewer layers,
heads or channels) and loads with plain `from_pretrained`. After non-uniform
pruning (different sizes per layer, or BERT heads, whose head size the config
derives from the head count) some linear layers are smaller than the config
says. `pruned_shapes` finds them by comparing with a model built from the
config on the meta device (no memory, no init); the artifact manifest records
them (`io.artifacts.register_modules`), and `rebuild` puts modules of the recorded
sizes in place before the safetensors weights are loaded. No pickle anywhere.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.selection import is_conv1d, is_linear, linear_weight
from slimkit.io.artifacts import ModuleRecord, register_modules


def _spec(module: nn.Module) -> dict:
    out, inp = linear_weight(module).shape
    return {"type": "conv1d" if is_conv1d(module) else "linear", "in": int(inp), "out": int(out), "bias": module.bias is not None}


def pruned_shapes(model: nn.Module) -> dict[str, dict]:
    """name -> {type, in, out, bias} of every linear layer whose shape differs from the config's."""
    with torch.device("meta"):
        ref = type(model)(copy.deepcopy(model.config))
    ref_modules = dict(ref.named_modules())
    out = {}
    for name, mod in model.named_modules():
        other = ref_modules.get(name)
        if name and other is not None and is_linear(mod) and is_linear(other):
            if linear_weight(mod).shape != linear_weight(other).shape:
                out[name] = _spec(mod)
    return out


def _make(spec: dict, dtype) -> nn.Module:
    if spec["type"] == "conv1d":
        from transformers.pytorch_utils import Conv1D

        return Conv1D(spec["out"], spec["in"]).to(dtype)
    return nn.Linear(spec["in"], spec["out"], bias=spec["bias"], dtype=dtype)


def rebuild(model: nn.Module, shapes: dict[str, dict]) -> None:
    """Replace the named modules by empty ones of the recorded sizes (in place)."""
    dtype = next(model.parameters()).dtype
    for name, spec in shapes.items():
        parent, _, child = name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
            getattr(owner, child)
        except AttributeError:
            raise SlimkitError(f"the manifest's pruned shape for {name} names no module of this model: save the artifact again") from None
        setattr(owner, child, _make(spec, dtype))
        attn = owner if hasattr(owner, "attention_head_size") else None
        if attn is not None and child == "query":  # BERT bookkeeping
            attn.num_attention_heads = spec["out"] // attn.attention_head_size
            attn.all_head_size = spec["out"]


register_modules(ModuleRecord("pruned_shapes", pruned_shapes, rebuild))
