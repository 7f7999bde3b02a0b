"""What every quantization method shares: option checks, the unquantized layers' dtype,
replacing the chosen linear layers, and the manifest's record of quantized modules.

Layers are chosen as everywhere in slimkit (`core.selection`): linear layers that
match `targets` and none of `ignore`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.selection import check_patterns, linear_weight, select_linears, set_module
from slimkit.io.artifacts import ModuleRecord, register_modules
from slimkit.io.model import LoadedModel
from slimkit.quantization.embedding import TIED_FORMATS, Int8Embedding, TiedEmbedding, TiedInt8Head, check_embedding_bits
from slimkit.quantization.formats import GROUP_SIZES, INT_BITS, check_scale_search, check_zero_point
from slimkit.quantization.modules import LINEAR_FORMATS

DEFAULT_IGNORE = ("lm_head",)

# What `compute_dtype` accepts: the dtype of everything left unquantized (norms,
# attention, the residual stream) and so of the activations between layers.
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_compute_dtype(name: str) -> None:
    if name not in COMPUTE_DTYPES:
        raise SlimkitError(f"compute_dtype={name!r} is not supported: use one of {', '.join(COMPUTE_DTYPES)}")


def check_calibration(calibration_samples: int, seq_len: int) -> None:
    if calibration_samples < 1 or seq_len < 8:
        raise SlimkitError(f"calibration needs calibration_samples >= 1 and seq_len >= 8, got {calibration_samples} and {seq_len}")


@dataclass(frozen=True)
class QuantizeOptions:
    """What a quantization method's config holds besides its own grid: the layers it quantizes
    (`targets` / `ignore`, see `core.selection`) and the dtype of everything it leaves in float
    (`compute_dtype`, see `cast_unquantized`)."""

    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    compute_dtype: str = "fp32"

    def __post_init__(self):
        check_patterns(self.targets, self.ignore)
        check_compute_dtype(self.compute_dtype)



@dataclass(frozen=True)
class CalibratedOptions(QuantizeOptions):
    """The grid and calibration of a post-training integer weight method that reads calibration
    data (gptq, awq): bits, groups, the zero point's storage, the calibration windows, and
    whether the embedding and its tied head are quantized too (`embedding_bits`, embedding.py)."""

    METHOD: ClassVar[str] = ""

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    zero_point: str = "float"  # or "integer": w = (u - z) * s, exportable to MatMulNBits exactly
    calibration_samples: int = 16
    seq_len: int = 512
    embeddings: bool = True
    embedding_bits: int = 8  # 4: the embedding and its tied head on the layers' 4-bit grid
    scale_search: bool = False  # symmetric: each group's scale searched for the least importance-weighted error (formats.search_scales)

    def __post_init__(self):
        check_int_format(self.METHOD, self.bits, self.group_size)
        check_zero_point(self.zero_point, self.symmetric)
        check_scale_search(self.scale_search, self.symmetric)
        check_embedding_bits(self.METHOD, self.embedding_bits, self.bits)
        check_calibration(self.calibration_samples, self.seq_len)
        super().__post_init__()

def check_int_format(method: str, bits: int, group_size: int | None) -> None:
    """Validate the integer grid of a calibrated weight method (gptq, awq, qat)."""
    if bits not in INT_BITS:
        raise SlimkitError(f"bits={bits} is not supported by {method}: use 4 or 8")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise SlimkitError(f"group_size={group_size} is not supported: use one of {', '.join(map(str, GROUP_SIZES))} or None (per channel)")


def cast_unquantized(model: nn.Module, compute_dtype: str) -> None:
    """Cast the float parameters of every module that is not quantized (in place: call on a copy);
    `model` may be one block.

    Quantized layers keep their own storage and scales; they take activations
    of any float dtype and return the dtype they were given. With bf16, the
    casts in and out of the int8/int4 kernels (which run on bf16) disappear,
    which on a CPU decoding one token at a time is a large share of the time.
    Computed buffers (rotary frequencies) stay fp32, as in the `bf16` cast.
    """
    dtype = COMPUTE_DTYPES[compute_dtype]
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "fmt"):
                if hasattr(module, "compute_dtype"):  # modules that produce activations (embeddings)
                    module.compute_dtype = dtype
                continue
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
    if hasattr(model, "config"):  # a whole model, not one block
        model.config.dtype = dtype


def replace_linears(lm: LoadedModel, config, make: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace every selected linear layer of `lm` (in place: call on a copy); each new module
    goes where the layer it replaces was (a model on a GPU stays there, whole)."""
    names = list(select_linears(lm.model, tuple(config.targets), tuple(config.ignore)))
    with torch.no_grad():
        for name in names:
            layer = lm.model.get_submodule(name)
            module = make(layer)
            device = linear_weight(layer).device
            set_module(lm.model, name, module if device.type == "cpu" else module.to(device))
    return names


def quantized_modules(model: nn.Module) -> dict[str, dict]:
    """name -> spec of every slimkit quantized module (what the manifest records)."""
    return {n: m.spec() for n, m in model.named_modules() if n and hasattr(m, "spec") and hasattr(m, "fmt")}


def rebuild_modules(model: nn.Module, specs: dict[str, dict]) -> None:
    """Swap empty quantized modules in where the manifest says, ready for a state dict."""
    tied = {n: s for n, s in specs.items() if s.get("format") in TIED_FORMATS}
    for name, spec in specs.items():
        fmt = spec.get("format")
        if name in tied:
            continue
        if fmt == Int8Embedding.fmt:
            module = Int8Embedding.from_spec(spec)
        elif fmt in LINEAR_FORMATS:
            module = LINEAR_FORMATS[fmt].from_spec(spec)
        else:
            raise SlimkitError(f"module {name} has unknown quantized format '{fmt}': upgrade slimkit to load this artifact")
        set_module(model, name, module)
    for name, spec in tied.items():
        owner = model.get_submodule(spec["tied_to"])
        tied_module = TiedInt8Head(owner, spec["tied_to"]) if spec["format"] == TiedInt8Head.fmt else TiedEmbedding.from_spec(spec, owner)
        set_module(model, name, tied_module)


register_modules(ModuleRecord("modules", quantized_modules, rebuild_modules, own_weights=True))
