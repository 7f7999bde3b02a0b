"""Results a quantized source flatters: a model shipped at some width re-finds its own grid there.

A GGUF file's weights are already quantized (the embedded SmolLM2 ships as Q4_1: asymmetric
groups of 32 with float offsets). slimkit dequantizes it to fp32, and a method of the same width
then finds the same levels again: on SmolLM2, int4 at groups of 32 costs +0.3% perplexity while
round-to-nearest int4 at groups of 64 costs +32.7% (benchmarks/RESULTS-quantize.md). So a
candidate stored at the source's width is marked, and its quality figure read as optimistic.
The loader records the source's storage (`source_format` in the manifest and in results.json).
"""

from __future__ import annotations

import re

_WIDTH = re.compile(r"^(?:int|nf|bf|fp|q|f)(\d+)")  # int4, int8-wo, nf4, bf16, q4_1, f16: slimkit's names carry the width


def weight_bits(candidate: dict) -> int | None:
    """The narrowest weight width a candidate stores, from its recipe's steps and its export (None: none known)."""
    widths = []
    for step in candidate.get("recipe", {}).get("steps", []):
        if step.get("method") == "mixed":  # its low method, on the layers it does not keep high
            step = {"method": step.get("low", ""), **(step.get("low_options") or {})}
        widths.append(step.get("bits") or _named_width(step.get("method", "")))
    widths.append(_named_width((candidate.get("export") or {}).get("quantize") or ""))
    return min((w for w in widths if w), default=None)


def _named_width(name: str) -> int | None:
    match = _WIDTH.match(name.lower())
    return int(match.group(1)) if match else None


def _quantized_source(results: dict) -> tuple[str, int] | None:
    """("Q4_1 GGUF", 4) for a source stored quantized (8 bits or fewer); None for a float one."""
    source = results.get("source_format") or {}
    bits = source.get("bits")
    if not bits or bits > 8:
        return None
    return f"{source.get('weights', '')} {source.get('format', '').upper()}".strip(), bits


def source_caveat(results: dict, candidate: dict) -> str:
    """A note for a candidate stored at its quantized source's width ('' for any other)."""
    source = _quantized_source(results)
    if source is None or weight_bits(candidate) != source[1]:
        return ""
    return f"source was {source[0]}: {source[1]}-bit results on it are optimistic"


def winner_caveat(results: dict, winner: dict) -> str:
    """The recommendation's sentence on a winner its source flatters ('' for any other)."""
    if not source_caveat(results, winner):
        return ""
    name, bits = _quantized_source(results)
    return (f" The source was a {name} file, {bits}-bit already: a {bits}-bit method finds its grid again, so this quality is "
            f"optimistic; on a model trained in float, expect a larger loss.")


def source_line(results: dict) -> str:
    """What a quantized source was stored as, for the report's header ('' for a float source)."""
    source = _quantized_source(results)
    return f"Source: a {source[0]} file ({source[1]}-bit weights, dequantized to fp32 to start)." if source else ""
