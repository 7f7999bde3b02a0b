"""GPTQ: weight-only int4/int8 with Hessian-based error compensation (see gptq_math.py).

Calibration: `calibration_samples` windows of `seq_len` tokens from the calibration
split (never evaluation) run through the float model once; a forward hook on
every selected layer accumulates H = 2 X X^T / n of its inputs. Layers that
read the same input (q/k/v, gate/up) share one accumulation. Every layer is
then quantized against the Hessian of the *float* model's inputs; the
original algorithm re-collects each block's inputs after quantizing the
blocks before it, which is slightly more accurate and much slower here.

The result is the same packed `WeightOnlyLinear` as int4-wo / int8-wo (same
kernels, same artifact format): GPTQ changes which integers are stored, not
how they are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimkit.core import data as D
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import track
from slimkit.core.registry import Context, register
from slimkit.core.selection import linear_weight, select_linears, set_module
from slimkit.io.model import copy_model
from slimkit.quantization.common import CalibratedOptions, cast_unquantized
from slimkit.quantization.embedding import head_grid, quantize_embeddings
from slimkit.quantization.formats import check_group
from slimkit.quantization.gptq_math import gptq_quantize
from slimkit.quantization.modules import WeightOnlyLinear
from slimkit.quantization.smoothing import require_batches


@dataclass(frozen=True)
class GPTQConfig(CalibratedOptions):
    """embedding_bits=4 rounds the embedding and its tied head to nearest (no Hessian)."""

    METHOD: ClassVar[str] = "gptq"

    damp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise SlimkitError(f"damp={self.damp} is out of range: use a fraction such as 0.01")


def collect_hessians(model: torch.nn.Module, names: list[str], batches, causal: bool) -> dict[str, torch.Tensor]:
    """H = 2 X X^T / n per layer input (K, K), accumulated over calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}  # layer -> the layer whose accumulation it shares
    seen: dict[int, tuple] = {}  # id of an input tensor -> (it, the first layer that read it), this batch

    def hook(name):
        def fn(module, args):
            x = args[0]
            owner = seen.setdefault(id(x), (x, name))[1]  # the tensor is kept so its id is not reused
            if owner != name:  # the same input as another layer (q/k/v, gate/up)
                alias[name] = owner
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, K)
            if name not in sums:
                sums[name], counts[name] = torch.zeros(x2.shape[1], x2.shape[1]), 0
            sums[name].addmm_(x2.T, x2)
            counts[name] += x2.shape[0]

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for ids in track(require_batches(batches), "Calibrating (GPTQ)"):
                seen.clear()
                model(input_ids=ids, use_cache=False) if causal else model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        owner = alias.get(n, n)
        if owner not in sums:
            raise SlimkitError(f"layer {n} saw no calibration input: it is not used in the forward pass; add it to ignore")
        out[n] = sums[owner] * (2 / counts[owner])
    return out


@register("gptq", "quantize", GPTQConfig, "GPTQ: int4/int8 weight-only with Hessian error compensation, calibrated (same kernels as int4-wo)")
def apply(model, config: GPTQConfig = GPTQConfig(), ctx: Context = Context()):
    lm = copy_model(model, "gptq")
    names = list(select_linears(lm.model, tuple(config.targets), tuple(config.ignore)))
    for name in names:  # a group size that does not fit fails before calibrating, not after
        check_group(linear_weight(lm.model.get_submodule(name)).shape[1], config.group_size)
    source = ctx.calibration()
    batches = D.calibration_batches(lm.tokenizer, source, config.seq_len, config.calibration_samples, batch_size=1)
    hessians = collect_hessians(lm.model, names, batches, lm.kind == CAUSAL_LM)
    with torch.no_grad():
        for name in track(names, "Quantizing (GPTQ)"):
            layer = lm.model.get_submodule(name)
            w = linear_weight(layer).float()
            module = WeightOnlyLinear(w.shape[1], w.shape[0], getattr(layer, "bias", None) is not None, config.bits, config.group_size,
                                      config.symmetric, zero_point=config.zero_point)
            module.set_quantized(gptq_quantize(w, hessians.pop(name), config.bits, config.group_size, config.symmetric, config.damp,
                                               zero_point=config.zero_point, scale_search=config.scale_search))
            if module.bias is not None:
                module.bias.copy_(layer.bias.float())
            set_module(lm.model, name, module)
    if config.embeddings:
        quantize_embeddings(lm.model, grid=head_grid(config))
    cast_unquantized(lm.model, config.compute_dtype)
    return lm.record("quantize", "gptq", config)
