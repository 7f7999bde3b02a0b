"""Decode tokens/s of fp32 and the quantized SmolLM2 models, taking turns in one process.

On a shared machine the load changes from minute to minute; timing the
models one after another (as bench_quantize.py does) then compares different
machines. Here every round times each model once, so a load change hits all
of them alike; the best round of each is reported, with its ratio to fp32.

    python benchmarks/decode_interleaved.py [--rounds 5] [--new-tokens 16] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

import slimkit
from slimkit.benchmark import _decode, sample_inputs

METHODS = ("bf16", "int8-dynamic", "int8", "int4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = slimkit.load("smollm2-135m")
    models = {"fp32": ref, **{m: slimkit.quantize(ref, m) for m in METHODS}}
    prompt = sample_inputs(ref, 128, "cpu")["input_ids"]
    seconds = {k: [] for k in models}
    with torch.inference_mode():
        for lm in models.values():
            _decode(lm, prompt, 2)  # warm-up
        for _ in range(args.rounds):
            for name, lm in models.items():
                seconds[name].append(_decode(lm, prompt, args.new_tokens) / args.new_tokens)
    base = min(seconds["fp32"])
    print("| method | decode tok/s (best round) | vs fp32 eager |\n|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {1 / min(s):.1f} | {base / min(s):.2f}x |")


if __name__ == "__main__":
    main()
