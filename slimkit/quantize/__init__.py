"""Quantization: make weights (and activations) smaller numbers, and measure the loss.

One module per method, each a frozen `Config` + `apply(model, config)` that
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
                      budget (mixed.py; the ranking in sensitivity.py)

Methods that calibrate or train (gptq, awq, qat, int8-static, int8-dynamic
with smooth_alpha) read the calibration split of `data` (default: the
embedded corpus), never evaluation.

The number formats are pure tensor math in formats.py; the modules that hold
packed weights and call the CPU kernels are in modules.py.
"""

from __future__ import annotations

from dataclasses import fields

from slimkit.errors import SlimkitError
from slimkit.models import LoadedModel, load


def quantize(model: LoadedModel | str, method: str, *, data=None, **options) -> LoadedModel:
    """Quantize `model` with the registered `method`; options are its Config's fields.

        q = slimkit.quantize("smollm2-135m", "int4-wo", group_size=64)
        q = slimkit.quantize("smollm2-135m", "gptq", data="my_corpus.txt", n_samples=32)

    `data` (a TextSource or a string as `slimkit eval --data` takes) feeds the
    methods that calibrate; its calibration split is used, never evaluation.
    """
    from slimkit import registry
    from slimkit.data import TextSource

    technique = registry.get(method, "quantize")
    config = make_config(method, options)
    source = data if isinstance(data, TextSource) or data is None else TextSource.parse(data, "calibration")
    return technique.apply(load(model), config, data=source)


def make_config(method: str, options: dict):
    """The validated Config of quantize `method` from keyword options (lists become tuples)."""
    from slimkit import registry

    technique = registry.get(method, "quantize")
    known = {f.name for f in fields(technique.config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SlimkitError(
            f"unknown option(s) {', '.join(unknown)} for quantize method '{method}': "
            f"its options are {', '.join(sorted(known)) or 'none'}"
        )
    return technique.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def parse_options(method: str, pairs: list[str]) -> dict:
    """CLI `-o KEY=VALUE` pairs -> typed options of `method`'s Config.

    Values are read by the type of the field's default: true/false for
    booleans, integers (or `none`), comma-separated lists for name patterns.
    A method that takes other methods (`mixed`: fields `low` and
    `low_options`) takes their options as `-o low.group_size=64`, read by
    the types of the method named in `-o low=...` (or its default).
    """
    from slimkit import registry

    config_fields = fields(registry.get(method, "quantize").config_cls)
    defaults = {f.name: f.default for f in config_fields}
    types = {f.name: str(f.type) for f in config_fields}
    options: dict = {}
    nested = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SlimkitError(f"option '{pair}' is not KEY=VALUE: write e.g. -o group_size=64")
        outer, dot, inner = key.partition(".")
        if dot and f"{outer}_options" in defaults:
            nested.append((outer, inner, value.strip()))
            continue
        if key not in defaults:
            raise SlimkitError(f"unknown option '{key}' for quantize method '{method}': its options are {', '.join(sorted(defaults)) or 'none'}")
        if types[key].startswith("dict"):
            raise SlimkitError(f"option {key} takes the options of another method: write -o {key.removesuffix('_options')}.OPTION=VALUE, e.g. -o {key.removesuffix('_options')}.group_size=64")
        options[key] = _parse_value(key, value.strip(), defaults[key], types[key])
    for outer, inner, value in nested:
        sub_method = options.get(outer, defaults[outer])
        if sub_method == "none":
            raise SlimkitError(f"option {outer}.{inner}: {outer}=none takes no options")
        options.setdefault(f"{outer}_options", {}).update(parse_options(sub_method, [f"{inner}={value}"]))
    return options


def _parse_value(key: str, value: str, default, type_name: str):
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise SlimkitError(f"option {key} takes true or false, got '{value}'")
        return value.lower() in ("true", "1", "yes")
    if isinstance(default, tuple) or type_name.startswith("tuple"):
        if default is None and value.lower() == "none":
            return None
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if "float" in type_name:
        if "None" in type_name and value.lower() == "none":
            return None
        try:
            return float(value)
        except ValueError:
            raise SlimkitError(f"option {key} takes a number, got '{value}'") from None
    if isinstance(default, int) or default is None:
        optional = default is None or "None" in type_name  # e.g. group_size: int | None = 64
        if optional and value.lower() == "none":
            return None
        try:
            return int(value)
        except ValueError:
            raise SlimkitError(f"option {key} takes an integer{' or none' if optional else ''}, got '{value}'") from None
    return value
