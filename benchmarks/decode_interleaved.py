"""Decode tokens/s of fp32 and the quantized SmolLM2 models, eager and compiled, taking turns in one process.

The machine's speed drifts from minute to minute (a shared host); timing the
models one after another compares different machines. Here every round times
each model once, so a drift hits all of them alike; the median round of each
is reported, with its ratio to fp32 eager (the issue's baseline: Hugging
Face's eager decoding of the fp32 model).

Runtimes: `eager` is the model's own forward with a dynamic KV cache;
`compiled` is slimkit.compiled.CompiledDecoder (static KV cache, the one-token
step compiled by torch.compile/inductor). Compilation happens before timing
and is reported separately.

    python benchmarks/decode_interleaved.py [--rounds 7] [--new-tokens 32] [--threads 2] [--json out.json]

With `--original DIR --artifacts DIR...` it times saved models instead: the original
checkpoint in its own dtype (a bf16 checkpoint stays bf16, eager and compiled) against
each artifact as `slimkit.load` gives it, e.g. the 1.1B shape of `big_models.py`:

    python benchmarks/decode_interleaved.py --original /tmp/big/tinyllama-1.1b \
        --artifacts /tmp/big/tinyllama-1.1b-int4 --rounds 3 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import slimkit
from slimkit.core.hardware import environment
from slimkit.measure.decoding import CompiledDecoder
from slimkit.measure.speed import _decode, _decode_compiled, sample_inputs

METHODS = {  # label -> (method, options)
    "bf16": ("bf16", {}),
    "int8-dynamic smooth_alpha=0.5": ("int8-dynamic", {"smooth_alpha": 0.5}),
    "int8 (awq 8-bit)": ("int8", {}),
    "int8-wo": ("int8-wo", {}),
    "int4 (int4-wo g32)": ("int4", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--original", default=None, help="a checkpoint directory, loaded in its own dtype (default: SmolLM2 in fp32)")
    ap.add_argument("--artifacts", nargs="*", default=[], help="saved models to time against --original (default: quantize SmolLM2 here)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    if args.original:
        ref = slimkit.load(args.original, dtype=_own_dtype(args.original))
        base_label = f"original ({str(next(ref.model.parameters()).dtype).replace('torch.', '')})"
        models = {base_label: ref, **{Path(a).name: slimkit.load(a) for a in args.artifacts}}
    else:
        ref = slimkit.load("smollm2-135m")
        base_label = "fp32"
        models = {"fp32": ref, **{label: slimkit.quantize(ref, m, **o) for label, (m, o) in METHODS.items()}}
    prompt = sample_inputs(ref, 128, "cpu")["input_ids"]
    runners, compile_s = {}, {}
    with torch.inference_mode():
        for label, lm in models.items():
            runners[(label, "eager")] = lambda n, lm=lm: _decode(lm, prompt, n)
            dec = CompiledDecoder(lm, 128 + args.new_tokens + 1)
            _decode_compiled(dec, prompt, 2)  # compiles
            compile_s[label] = dec.compile_seconds
            runners[(label, "compiled")] = lambda n, dec=dec: _decode_compiled(dec, prompt, n)
        for run in runners.values():
            run(2)  # warm-up
        seconds = {k: [] for k in runners}
        for _ in range(args.rounds):
            for key, run in runners.items():
                seconds[key].append(run(args.new_tokens) / args.new_tokens)
    base = statistics.median(seconds[(base_label, "eager")])
    compiled_base = statistics.median(seconds[(base_label, "compiled")])
    rows = []
    print(f"| method | runtime | decode tok/s (median round) | vs {base_label} eager | vs {base_label} compiled | compile s |\n|---|---|---|---|---|---|")
    for (label, runtime), s in seconds.items():
        med = statistics.median(s)
        rows.append({"method": label, "runtime": runtime, "tokens_per_s": 1 / med, "vs_base_eager": base / med,
                     "vs_base_compiled": compiled_base / med, "compile_seconds": compile_s[label] if runtime == "compiled" else None})
        cs = f"{compile_s[label]:.0f}" if runtime == "compiled" else "-"
        print(f"| {label} | {runtime} | {1 / med:.1f} | {base / med:.2f}x | {compiled_base / med:.2f}x | {cs} |")
    env = environment(args.threads)
    print(f"\nEnvironment: {json.dumps(env)}\n{args.rounds} rounds of {args.new_tokens} tokens after a 128-token prompt; "
          f"wall time {time.time() - started:.0f} s.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "environment": env}, fh, indent=1)


def _own_dtype(path: str) -> torch.dtype:
    """The dtype a checkpoint's config declares (bf16 for most published LLMs), fp32 if none."""
    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name)


if __name__ == "__main__":
    main()
