"""Short names for "the best method of this width": `bf16`, `int8`, `int4`.

`bf16` is the cast itself (cast.py). `int8` and `int4` point at the methods
that came closest to the issue's numbers on SmolLM2-135M (2,048 evaluation
tokens; benchmarks/RESULTS-quantize.md):
  int8 -> int8-wo: int8 per channel through `_weight_int8pack_mm`, embeddings
          and the tied head as int8 rows: +0.66% perplexity, KL 0.0065,
          about 0.26x fp32 on disk. (`embeddings=False`: +0.12% but 0.41x.)
  int4 -> int4-wo, asymmetric groups of 32: +0.37% perplexity, KL 0.0033.
          Caveat: the embedded SmolLM2 was shipped as Q4_1 (asymmetric
          groups of 32), and this grid re-finds those levels; on a model
          trained in float, expect larger losses and prefer `gptq`.
They take the same options as the method they name.
"""

from __future__ import annotations

from slimkit.quantize import weight_only
from slimkit.registry import register

register("int8", "quantize", weight_only.Int8WeightOnlyConfig, "recommended 8-bit method: same as int8-wo")(weight_only.apply_int8)
register("int4", "quantize", weight_only.Int4WeightOnlyConfig, "recommended 4-bit method: same as int4-wo (group 32, asymmetric)")(weight_only.apply_int4)
