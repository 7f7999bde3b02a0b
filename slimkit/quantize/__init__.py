"""Quantization: make weights (and activations) smaller numbers, and measure the loss.

One module per method, each a frozen `Config` + `apply(model, config)` that
returns a new model, registered by name (see `slimkit quantize --list`):

  bf16, fp16          casts (cast.py)
  int8-dynamic        int8 weights x per-token int8 activations (dynamic_int8.py)
  int8-wo, int4-wo    weight-only integers, group-wise, packed (weight_only.py)
  nf4                 4-bit NormalFloat code book, double quant (weight_only.py)
  int8, int4          the recommended method of that width (aliases.py)

The number formats are pure tensor math in formats.py; the modules that hold
packed weights and call the CPU kernels are in modules.py.
"""

from __future__ import annotations

from dataclasses import fields

from slimkit.errors import SlimkitError
from slimkit.models import LoadedModel, load


def quantize(model: LoadedModel | str, method: str, **options) -> LoadedModel:
    """Quantize `model` with the registered `method`; options are its Config's fields.

        q = slimkit.quantize("smollm2-135m", "int4-wo", group_size=64)
    """
    from slimkit import registry

    technique = registry.get(method, "quantize")
    known = {f.name for f in fields(technique.config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SlimkitError(
            f"unknown option(s) {', '.join(unknown)} for quantize method '{method}': "
            f"its options are {', '.join(sorted(known)) or 'none'}"
        )
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return technique.apply(load(model), technique.config_cls(**options))
