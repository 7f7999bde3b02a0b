"""Models whose weights stay in their safetensors files until a block needs them.

A 7B checkpoint is 13.5 GB in bf16 and 27 GB in fp32: loading it whole does not
fit a 24 GiB machine, and a technique that changes one block at a time never
needs it whole. `open_lazy` builds the model with every parameter on the meta
device (no memory) and its computed buffers (rotary frequencies) real, and
returns the `Weights` index that reads any submodule's tensors from the files on
demand (`materialize`), in the checkpoint's own dtype or the one asked for.
`offload` puts a finished submodule back on the meta device: its memory goes, its
structure (the quantized modules' shapes and formats) stays for the manifest.

Each read opens the file, copies the tensors out and closes it again: a mapping
kept open would keep every page it ever read resident, and the process would
grow to the checkpoint's size as the blocks go by.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import SlimkitError, short_reason

INDEX = "model.safetensors.index.json"


class Weights:
    """Where each tensor of a safetensors checkpoint lives, and reading them on demand."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        index = path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SlimkitError(f"{index} is unreadable ({short_reason(exc)}): re-save the model with save_pretrained") from exc
            self.files = {name: path / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(path.glob("*.safetensors")):
                with safe_open(str(f), "pt") as fh:
                    self.files.update({name: f for name in fh.keys()})
        if not self.files:
            raise SlimkitError(f"no *.safetensors weights in {path}: pass a directory saved with save_pretrained(safe_serialization=True)")
        self.dtypes: dict[str, torch.dtype] = {}
        for f in sorted(set(self.files.values())):
            with safe_open(str(f), "pt") as fh:
                for name in fh.keys():
                    self.dtypes[name] = fh.get_slice(name).get_dtype()

    def float_dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's floating-point tensors are stored in."""
        from collections import Counter

        names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        counts = Counter(d for d in self.dtypes.values() if d in names)
        return names[counts.most_common(1)[0][0]] if counts else torch.float32

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, copied out of their files (each file opened once), floats cast to `dtype`."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise SlimkitError(f"{self.path} has no tensor {n}: the checkpoint is incomplete or of another architecture; re-save it with save_pretrained")
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, wanted in by_file.items():
            with safe_open(str(f), "pt") as fh:
                for n in wanted:
                    t = fh.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t.clone()
        return out


def open_lazy(path: Path, kind: str, config, dtype: torch.dtype | None = None, weights: Weights | None = None) -> tuple[nn.Module, Weights]:
    """The model of `config` with its parameters on the meta device, and the index of its weights.

    dtype: the dtype the model is built in (what `materialize` reads into); None
    takes the checkpoint's own."""
    from accelerate import init_empty_weights

    from slimkit.core.arch import auto_class

    weights = weights or Weights(path)
    dtype = dtype or weights.float_dtype()
    with init_empty_weights(include_buffers=False):
        model = auto_class(kind).from_config(config, dtype=dtype)
    model.tie_weights()  # an empty model is built untied: tie the head to the embedding as loading would
    return model.eval(), weights


def tensor_names(module: nn.Module, prefix: str) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Qualified name -> (owner module, attribute, tensor) of each parameter and persistent buffer still on the meta device."""
    out = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        full = f"{prefix}.{mod_name}" if prefix and mod_name else prefix or mod_name
        persistent = [(b, mod._buffers[b]) for b in mod._buffers if b not in mod._non_persistent_buffers_set]
        for attr, t in list(mod._parameters.items()) + persistent:
            if t is not None and t.is_meta:
                out[f"{full}.{attr}" if full else attr] = (mod, attr, t)
    return out


def materialize(module: nn.Module, prefix: str, weights: Weights, dtype: torch.dtype | None = None, skip: tuple[str, ...] = ()) -> None:
    """Read every meta tensor of `module` (its qualified names start with `prefix`) from the files, in place,
    except those under the submodules `skip` (qualified names: parts already done and written out).

    Names that share one parameter (a head tied to the embedding, stored once) get one tensor, read under
    whichever of their names the files hold."""
    wanted = {n: v for n, v in tensor_names(module, prefix).items() if not n.startswith(tuple(p + "." for p in skip))}
    if not wanted:
        return
    shared: dict[int, list[str]] = {}
    for name, (_, _, t) in wanted.items():
        shared.setdefault(id(t), []).append(name)
    stored = {key: next((n for n in names if n in weights.files), names[0]) for key, names in shared.items()}
    values = weights.read(sorted(set(stored.values())), dtype)
    made: dict[int, torch.Tensor] = {}
    for name, (owner, attr, t) in wanted.items():
        if id(t) not in made:
            value = values[stored[id(t)]]
            made[id(t)] = nn.Parameter(value, requires_grad=False) if attr in owner._parameters else value
        if attr in owner._parameters:
            owner._parameters[attr] = made[id(t)]
        else:
            owner._buffers[attr] = made[id(t)]


def offload(module: nn.Module) -> None:
    """Free a finished submodule's memory; its modules, shapes and dtypes stay (on the meta device),
    and so do the marks tensors carry (`_slimkit_weight`: how many weights a packed element holds)."""
    for mod in module.modules():
        for attr, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                mod._parameters[attr] = nn.Parameter(p.detach().to("meta"), requires_grad=False)
        for attr, b in mod._buffers.items():
            if b is not None and not b.is_meta:
                moved = b.to("meta")
                if hasattr(b, "_slimkit_weight"):
                    moved._slimkit_weight = b._slimkit_weight
                mod._buffers[attr] = moved


def unload(root: nn.Module, part: nn.Module) -> None:
    """Put `part`'s parameters back on the meta device, wherever in `root` they are held (a head tied
    to the embedding stays tied to it), to be read from the files again when next needed. Buffers stay:
    computed ones (rotary frequencies) are in no file."""
    new = {id(p): nn.Parameter(p.detach().to("meta"), requires_grad=False) for p in part.parameters() if not p.is_meta}
    for mod in root.modules():
        for attr, p in mod._parameters.items():
            if p is not None and id(p) in new:
                mod._parameters[attr] = new[id(p)]


def is_lazy(model: nn.Module) -> bool:
    """Whether any parameter of `model` still waits in its files (is on the meta device)."""
    return any(p.is_meta for p in model.parameters())
