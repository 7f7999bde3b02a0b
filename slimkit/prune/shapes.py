"""Shapes the config cannot express, for saving and reloading pruned models.

A uniformly pruned model is described by its config alone (fewer layers,
heads or channels) and loads with plain `from_pretrained`. After non-uniform
pruning (different sizes per layer, or BERT heads, whose head size the config
derives from the head count) some linear layers are smaller than the config
says. `pruned_shapes` finds them by comparing with a model built from the
config on the meta device (no memory, no init); the artifact manifest records
them, and `build_pruned` rebuilds those modules at their recorded sizes
before the safetensors weights are loaded. No pickle anywhere.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from slimkit.errors import SlimkitError
from slimkit.prune.common import is_conv1d, is_linear, weight_2d


def _spec(module: nn.Module) -> dict:
    out, inp = weight_2d(module).shape
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
            if weight_2d(mod).shape != weight_2d(other).shape:
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


def build_pruned(path: Path, kind: str, config, shapes: dict, dtype) -> nn.Module:
    """Build from `config`, shrink the recorded modules, then load the safetensors weights."""
    from safetensors.torch import load_file

    from slimkit.models import auto_class, check_safetensors

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SlimkitError(f"no *.safetensors weights in {path}: the artifact is incomplete; save it again")
    state = {}
    for f in files:
        check_safetensors(f)
        state.update(load_file(f))
    if dtype in (None, "auto"):
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model = auto_class(kind).from_config(config, dtype=dtype)
    rebuild(model, shapes)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise SlimkitError(f"the weights in {path} do not fit the recorded pruned shapes: save the artifact again") from exc
    model.tie_weights()
    loaded = {t.data_ptr() for n, t in model.state_dict().items() if n in state}
    untied = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise SlimkitError(f"the weights in {path} do not match the model (e.g. {(untied or result.unexpected_keys)[0]}): save the artifact again")
    return model.eval()
