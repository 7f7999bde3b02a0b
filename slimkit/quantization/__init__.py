"""Quantization: make weights (and activations) smaller numbers, and measure the loss.

One module per method, each a frozen `Config` + `apply(model, config, ctx)` that
returns a new model, registered by name (see `slimkit quantize --list`):

  bf16, fp16          casts (cast.py)
  int8-dynamic        int8 weights x per-token int8 activations, optional
                      SmoothQuant (dynamic_int8.py, smoothing.py)
  int8-static         int8 weights x int8 activations with scales fixed from
                      calibration by an observer: minmax, percentile, entropy
                      (KL), mse (static_int8.py, observers.py)
  int8-wo, int4-wo    weight-only integers, group-wise, packed (weight_only.py);
                      asymmetric grids take a float offset or, with
                      zero_point=integer (also awq, gptq), an integer zero
                      point, which the ort-genai export carries exactly
  nf4                 4-bit NormalFloat code book, double quant (weight_only.py)
  gptq                weight-only int4/int8 with Hessian error compensation
                      (gptq.py; the math in gptq_math.py)
  awq                 weight-only int4/int8 with activation-aware per-channel
                      scales folded into norms where exact; with embeddings,
                      the tied head too (awq.py; the search in awq_math.py)
  qat                 quantization-aware training: fake-quantize, fine-tune
                      on calibration text (KD from the float model), convert
                      to the int4-wo / int8-wo / int8-dynamic modules
                      (qat.py; the fake-quant math in fake_quant.py)
  int8, int4          the recommended method of that width (aliases.py)
  mixed               a low method (int4-wo, ...) on most layers, a high one
                      (int8-wo, or float) on the most sensitive, to a quality
                      budget (mixed.py; the ranking in ranking.py)

Methods that calibrate or train (gptq, awq, qat, int8-static, int8-dynamic
with smooth_alpha) read the calibration split of `data` (default: the
embedded corpus), never evaluation.

The number formats are pure tensor math in formats.py; the modules that hold
packed weights and call the CPU kernels are in modules.py.
"""

from __future__ import annotations

from slimkit.core.data import TextSource, calibration_source
from slimkit.core.hardware import resolve_device
from slimkit.core.options import apply, make_config
from slimkit.core.registry import Context
from slimkit.io.blockwise import read_whole
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel, on_device
from slimkit.quantization import aliases, awq, cast, checkpoint, dynamic_int8, gptq, mixed, qat, static_int8, weight_only  # noqa: F401  (they register)


def quantize(model: LoadedModel | str, method: str, *, data: TextSource | str | None = None, seed: int = 0,
             device: str | None = None, on_step=None, tokenizer=None, stream: bool | str = False, **options) -> LoadedModel:
    """Quantize `model` with the registered `method`; options are its Config's fields.

        q = slimkit.quantize("smollm2-135m", "int4-wo", group_size=64)
        q = slimkit.quantize("smollm2-135m", "gptq", data="my_corpus.txt", calibration_samples=32)

    `data` (a TextSource or a string as `slimkit eval --data` takes) feeds the
    methods that calibrate; its calibration split is used, never evaluation.
    `seed`, `device` and `on_step` go to the method's `Context`. `model` may
    be a transformers model object, with `tokenizer=` for the methods that
    calibrate; it is copied, never changed. With a lazy model
    (`load(path, lazy=True)`) and `stream=True`, the methods that go block by
    block (int4-wo, int8-wo, nf4, gptq, awq, int8-dynamic, int8-static, and mixed of int4-wo / int8-wo / nf4 / none)
    write each finished block to disk, and
    the result is only for `slimkit.save` (which takes those files as they are):
    memory then holds one block, never the model.

    `device` ("cpu", "cuda", "auto"; None: where the model is) is where calibration
    and training run and where the result lies; on CUDA its quantized layers run
    torch's CUDA kernels (modules.py). The caller's model stays where it was. A lazy
    model is read block by block on the CPU; on a GPU it is read whole first.
    """
    device = resolve_device(device)
    ctx = Context(calibration_source(data), seed, device, on_step, stream)
    make_config(method, options, "quantize")  # a bad option fails before the model is copied to the device
    lm = load(model, tokenizer=tokenizer)
    if method != "mixed" or (device is not None and device != "cpu"):  # mixed reads a lazy model itself: block by block where it can
        lm = read_whole(lm, method, device)
    q = apply(on_device(lm, device), method, options, ctx, "quantize")
    if device is not None and q.staged is None:
        q.model.to(device)  # layers a method built on the CPU join the rest; quantized ones repack for the device's kernels
    return q
