"""Short names for "the best method of this width": `bf16`, `int8`, `int4`.

`bf16` is the cast itself (cast.py). `int8` and `int4` point at the method
that met the numbers measured by benchmarks/bench_quantize.py on SmolLM2-135M
(see benchmarks/RESULTS-quantize.md): weight-only int8 per channel (lossless
within noise, and faster than fp32 through the int8 weight kernel), and
weight-only int4 in asymmetric groups of 32 (int4 kernel). They take the same
options as the method they name.
"""

from __future__ import annotations

from slimkit.quantize import weight_only
from slimkit.registry import register

register("int8", "quantize", weight_only.Int8WeightOnlyConfig, "recommended 8-bit method: same as int8-wo")(weight_only.apply_int8)
register("int4", "quantize", weight_only.Int4WeightOnlyConfig, "recommended 4-bit method: same as int4-wo (group 32, asymmetric)")(weight_only.apply_int4)
