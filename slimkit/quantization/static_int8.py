"""Static int8 (W8A8): int8 weights x int8 activations whose scale is fixed from calibration.

y = s_x s_w (X_q W_q^T - z rowsum(W_q)) + b, X_q = clamp(round(X / s_x) + z),
accumulated in int32 by `torch._int_mm`. Unlike int8-dynamic, s_x (and z)
are chosen once, before deployment: the forward pass needs no reduction over
each token to find its range, and the whole graph can run in integers on
runtimes that fuse requantization (ONNX Runtime QDQ, TensorRT). In eager
PyTorch on a CPU the saving is small: the quantize step is the same
elementwise work either way.

Calibration: forward pre-hooks on the selected linears stream the inputs of
`calibration_samples` windows of the calibration split (never evaluation) into one
observer per layer (observers.py: minmax, percentile, entropy, mse), which
keeps running statistics, never the activations. With `smooth_alpha` a first
pass collects per-input-channel ranges for SmoothQuant (smoothing.py) and a
second pass observes the smoothed inputs.

Trade-off: one scale per layer input (per tensor) must cover every token.
In LLMs a few tokens (the first one, delimiters) and a few hidden channels
carry values 10-100x the typical ones (massive activations); the range that
covers them leaves the rest a handful of levels, and a range that clips them
destroys exactly the values attention relies on. int8-dynamic gives each
token its own scale and avoids the first half of that problem, so static
per-tensor activations lose more than dynamic ones. Measured (2,048
evaluation tokens; 16 calibration windows of 512; fp32 perplexity 14.39):

  SmolLM2-135M   minmax      perplexity 32.2 (+124%), KL 0.88, top-1 0.54
                 percentile  perplexity 49.2 (+242%), KL 1.23, top-1 0.47
                 (int8-dynamic: 14.75, +2.5%, KL 0.026)
  MiniLM-L6      minmax      cosine 0.984, top-10 overlap 0.88
                 percentile  cosine 0.915, top-10 overlap 0.72
                 (int8-dynamic: cosine 0.998)

Clipping (percentile 99.99) is worse than no clipping on both: the values
it clips are rare but they matter. Hence the default `minmax`. Static int8
suits models without such outliers, or with `smooth_alpha` and `ignore` for
the layers whose inputs carry them; for these two models prefer
int8-dynamic or weight-only int8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimkit.core import data as D
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import track
from slimkit.core.registry import Context, register
from slimkit.core.selection import check_patterns, linear_weight, select_linears, set_module
from slimkit.io.model import copy_model, model_device
from slimkit.quantization.common import DEFAULT_IGNORE
from slimkit.quantization.modules import StaticInt8Linear
from slimkit.quantization.observers import OBSERVERS, Observer, check_observer
from slimkit.quantization.smoothing import require_batches, smooth_factors

GRANULARITIES = ("per_channel", "per_tensor")


@dataclass(frozen=True)
class Int8StaticConfig:
    observer: str = "minmax"  # one of OBSERVERS; minmax measured best on SmolLM2 and MiniLM
    percentile: float = 99.99  # percentile observer only
    weight_granularity: str = "per_channel"  # per_channel (one scale per output channel) or per_tensor
    symmetric_activations: bool = True  # False: [min, max] grid with an integer zero point
    smooth_alpha: float | None = None  # SmoothQuant migration strength; None: off
    calibration_samples: int = 16  # calibration windows
    seq_len: int = 512
    batch_size: int = 1
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def __post_init__(self):
        check_observer(self.observer, self.percentile)
        if self.weight_granularity not in GRANULARITIES:
            raise SlimkitError(f"weight_granularity='{self.weight_granularity}' is unknown: use one of {', '.join(GRANULARITIES)}")
        if self.smooth_alpha is not None and not 0 < self.smooth_alpha < 1:
            raise SlimkitError(f"smooth_alpha={self.smooth_alpha} is out of range: use a value in (0, 1) such as 0.5, or None to turn smoothing off")
        if self.calibration_samples < 1 or self.seq_len < 8 or self.batch_size < 1:
            raise SlimkitError(f"calibration needs calibration_samples >= 1, seq_len >= 8 and batch_size >= 1, got {self.calibration_samples}, {self.seq_len} and {self.batch_size}")
        check_patterns(self.targets, self.ignore)


def observe_inputs(model: torch.nn.Module, names: list[str], batches, causal: bool, make: Callable[[], Observer],
                   inv_smooth: dict[str, torch.Tensor] | None = None, what: str = "activation ranges") -> dict[str, Observer]:
    """name -> an Observer fed every input (tokens, K) of that layer over the calibration batches."""
    observers = {n: make() for n in names}
    inv_smooth = inv_smooth or {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, K)
            observers[name].update(x * inv_smooth[name] if name in inv_smooth else x)

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for ids in track(require_batches(batches), f"Calibrating {what}"):
                ids = ids.to(model_device(model))  # calibration runs where the model is
                model(input_ids=ids, use_cache=False) if causal else model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return observers


@register("int8-static", "quantize", Int8StaticConfig, f"int8 weights x int8 activations with calibrated fixed scales ({'/'.join(OBSERVERS)} observers, torch._int_mm)")
def apply(model, config: Int8StaticConfig = Int8StaticConfig(), ctx: Context = Context()):
    lm = copy_model(model, "int8-static")
    names = list(select_linears(lm.model, tuple(config.targets), tuple(config.ignore)))
    source = ctx.calibration()
    batches = lambda: D.calibration_batches(lm.tokenizer, source, config.seq_len, config.calibration_samples, config.batch_size)
    causal = lm.kind == CAUSAL_LM
    weights = {n: linear_weight(lm.model.get_submodule(n)).detach().float() for n in names}  # (N, K) each
    smooth: dict[str, torch.Tensor] = {}
    if config.smooth_alpha is not None:
        channels = observe_inputs(lm.model, names, batches(), causal, lambda: Observer("minmax", per_channel=True), what="channel ranges")
        for n, obs in channels.items():
            lo, hi = obs.range()
            smooth[n] = smooth_factors(torch.maximum(-lo, hi), weights[n], config.smooth_alpha)  # (K,)
    make = lambda: Observer(config.observer, config.symmetric_activations, config.percentile)
    observers = observe_inputs(lm.model, names, batches(), causal, make, {n: 1 / s for n, s in smooth.items()})
    with torch.no_grad():
        for name in track(names, "Quantizing (int8 static)"):
            layer = lm.model.get_submodule(name)
            module = StaticInt8Linear(weights[name].shape[1], weights[name].shape[0], getattr(layer, "bias", None) is not None,
                                      config.weight_granularity, config.symmetric_activations, smooth=name in smooth)
            module.set_weight(weights.pop(name), smooth.get(name))
            module.set_input_qparams(*observers.pop(name).qparams())
            if module.bias is not None:
                module.bias.copy_(layer.bias.float())
            set_module(lm.model, name, module)
    return lm.record("quantize", "int8-static", config)
