"""Short names for "the best method of this width": `bf16`, `int8`, `int4`.

`bf16` is the cast itself (cast.py). `int8` and `int4` point at the methods
that meet the project's numbers on SmolLM2-135M (benchmarks/RESULTS-quantize.md):
  int8 -> awq with 8 bits, one scale per output channel, symmetric, and the
          embedding with its tied head as int8 rows: the head is what loses
          quality in plain int8 (+0.66% perplexity on 2,048 tokens; the
          embedding lookup alone costs +0.1%), and AWQ's activation-aware
          column scales, folded into the final norm, take it back to about
          fp32's perplexity (KL 0.0045 vs 0.0065), at 0.26x fp32 on disk and
          the same `_weight_int8pack_mm` kernel. Calibration: ~2 minutes.
  int4 -> int4-wo, asymmetric groups of 32: +0.37% perplexity, KL 0.0033.
          Caveat: the embedded SmolLM2 was shipped as Q4_1 (asymmetric
          groups of 32), and this grid re-finds those levels; on a model
          trained in float, expect larger losses and prefer `awq` or `gptq`.
They take the same options as the method they name; only the defaults differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.core.registry import register
from slimkit.quantization import awq, weight_only


@dataclass(frozen=True)
class Int8Config(awq.AWQConfig):
    bits: int = 8
    group_size: int | None = None  # per channel: the int8 weight kernel
    symmetric: bool = True


register("int8", "quantize", Int8Config, "recommended 8-bit method: awq, 8 bits per channel, int8 embeddings and tied head")(awq.apply)
register("int4", "quantize", weight_only.Int4WeightOnlyConfig, "recommended 4-bit method: same as int4-wo (group 32, asymmetric)")(weight_only.apply_int4)
