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
keeps running statistics, never the activations. It goes block by block
(`blockwise.calibrate`) on the float model's inputs to each block, so a lazy model
is read a block at a time. With `smooth_alpha` each block is run twice: first for
the per-input-channel ranges of SmoothQuant (smoothing.py), then the observers see
the smoothed inputs; smoothing does not change the block's float output, so both
passes fit in one walk where the whole-model path needed two.

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
from slimkit.core.registry import Context, register
from slimkit.core.selection import check_patterns, linear_weight, select_linears, set_module
from slimkit.io.blockwise import calibrate, start
from slimkit.io.model import copy_model
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


class ObserveInputs:
    """An Observer per hooked layer (names inside `root`), fed every input (tokens, K) of that layer while
    `root` runs its calibration windows (a `blockwise.calibrate` pass); with `smooth`, the smoothed input
    x / s that the quantized layer will read. `close()` -> name -> (its observer, its s or None)."""

    def __init__(self, root: torch.nn.Module, names: list[str], make: Callable[[], Observer], smooth: dict[str, torch.Tensor] | None = None):
        self.observers = {n: make() for n in names}
        self.smooth = smooth or {}
        self.inv = {n: 1 / s for n, s in self.smooth.items()}
        self.handles = [root.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, K)
            self.observers[name].update(x * self.inv[name] if name in self.inv else x)

        return fn

    def next_window(self) -> None:
        pass

    def close(self) -> dict[str, tuple[Observer, torch.Tensor | None]]:
        for h in self.handles:
            h.remove()
        return {n: (obs, self.smooth.get(n)) for n, obs in self.observers.items()}


@register("int8-static", "quantize", Int8StaticConfig, f"int8 weights x int8 activations with calibrated fixed scales ({'/'.join(OBSERVERS)} observers, torch._int_mm)")
def apply(model, config: Int8StaticConfig = Int8StaticConfig(), ctx: Context = Context()):
    lm = copy_model(model, "int8-static", lazy=True)
    walk = start(lm, ctx.stream)
    names = list(select_linears(lm.model, tuple(config.targets), tuple(config.ignore)))
    batches = require_batches(D.calibration_batches(lm.tokenizer, ctx.calibration(), config.seq_len, config.calibration_samples, config.batch_size))
    make = lambda: Observer(config.observer, config.symmetric_activations, config.percentile)  # noqa: E731
    observe = lambda part, layers, _: ObserveInputs(part, layers, make)  # noqa: E731
    passes = [observe]
    if config.smooth_alpha is not None:  # the channel ranges first, then the smoothed inputs: two runs of each block
        ranges = lambda part, layers, _: ObserveInputs(part, layers, lambda: Observer("minmax", per_channel=True))  # noqa: E731
        passes = [ranges, lambda part, layers, found: ObserveInputs(part, layers, make, _smoothing(part, found, config.smooth_alpha))]
    calibrate(walk, names, batches, lm.kind == CAUSAL_LM, passes, lambda part, _, layers, found: _quantize_layers(part, layers, found, config),
              "Quantizing (int8 static)")
    walk.rest()
    return walk.close().record("quantize", "int8-static", config)


def _smoothing(root: torch.nn.Module, channels: dict[str, tuple[Observer, None]], alpha: float) -> dict[str, torch.Tensor]:
    """name -> (K,) SmoothQuant factors of each layer from its per-channel input ranges and its weight."""
    smooth = {}
    for n, (obs, _) in channels.items():
        lo, hi = obs.range()
        smooth[n] = smooth_factors(torch.maximum(-lo, hi), linear_weight(root.get_submodule(n)).detach().float(), alpha)  # (K,)
    return smooth


def _quantize_layers(root: torch.nn.Module, names: list[str], found: dict[str, tuple[Observer, torch.Tensor | None]], config: Int8StaticConfig) -> None:
    """Replace each of `names` (inside `root`) by its static int8 form: its weight (smoothed), its input's fixed range."""
    with torch.no_grad():
        for name in names:
            layer = root.get_submodule(name)
            w = linear_weight(layer).detach().float()  # (N, K)
            observer, smooth = found[name]
            module = StaticInt8Linear(w.shape[1], w.shape[0], getattr(layer, "bias", None) is not None,
                                      config.weight_granularity, config.symmetric_activations, smooth=smooth is not None)
            module.set_weight(w, smooth)
            module.set_input_qparams(*observer.qparams())
            if module.bias is not None:
                module.bias.copy_(layer.bias.float())
            set_module(root, name, module)
