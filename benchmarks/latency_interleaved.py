"""all-MiniLM-L6-v2 latency at batch 1, sequence 128: fp32 and the quantized models, eager and compiled, taking turns.

As in decode_interleaved.py, each round times every model once, so a drift
in the machine's speed hits all of them alike; the median round of each is
reported with its ratio to fp32 eager. `compiled` runs the same model's
forward through torch.compile (`slimkit bench --compile`), compiled before
timing. Quality is the mean embedding cosine to fp32 and the top-10 retrieval
overlap on the evaluation passages (eager; compiling does not change the math).

    python benchmarks/latency_interleaved.py [--rounds 15] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import slimkit
from slimkit.core.hardware import environment
from slimkit.measure.quality import evaluate
from slimkit.measure.speed import _forward, compiled_forward, sample_inputs

METHODS = {  # label -> (method, options)
    "bf16": ("bf16", {}),
    "int8-dynamic": ("int8-dynamic", {}),
    "int8-static": ("int8-static", {}),
    "int8-wo": ("int8-wo", {}),
    "int8 (awq 8-bit)": ("int8", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    ref = slimkit.load(args.model)
    models = {"fp32": ref, **{label: slimkit.quantize(ref, m, **o) for label, (m, o) in METHODS.items()}}
    quality = {label: evaluate(lm, ref) for label, lm in models.items() if lm is not ref}
    sample = sample_inputs(ref, 128, "cpu")
    runners = {}
    for label, lm in models.items():
        runners[(label, "eager")] = lm
        runners[(label, "compiled")] = compiled_forward(lm)
    seconds = {k: [] for k in runners}
    with torch.inference_mode():
        for lm in runners.values():
            for _ in range(3):
                _forward(lm, sample)  # warm-up (and compilation)
        for _ in range(args.rounds):
            for key, lm in runners.items():
                start = time.perf_counter()
                for _ in range(5):
                    _forward(lm, sample)
                seconds[key].append((time.perf_counter() - start) / 5)
    base = statistics.median(seconds[("fp32", "eager")])
    rows = []
    print("| method | runtime | cosine vs fp32 | top-10 overlap | p50 ms (median round) | vs fp32 eager |\n|---|---|---|---|---|---|")
    for (label, runtime), s in seconds.items():
        med = statistics.median(s)
        q = quality.get(label)
        cos, top = (q.cosine_to_reference, q.retrieval_top10_overlap) if q else (1.0, 1.0)
        rows.append({"method": label, "runtime": runtime, "cosine": cos, "top10_overlap": top, "ms": med * 1000, "speedup": base / med})
        print(f"| {label} | {runtime} | {cos:.4f} | {top:.3f} | {med * 1000:.1f} | {base / med:.2f}x |")
    env = environment(args.threads)
    print(f"\nEnvironment: {json.dumps(env)}\n{args.rounds} rounds of 5 forwards (batch 1, 128 tokens) each; "
          f"quality on {next(iter(quality.values())).samples} evaluation passages; wall time {time.time() - started:.0f} s.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "environment": env}, fh, indent=1)


if __name__ == "__main__":
    main()
