"""Every quantization method side by side in one run, as ratios to fp32 eager.

SmolLM2-135M: perplexity on the evaluation split, KL and top-1 agreement
against fp32 on the same tokens, decode tokens/s, p50 prefill latency (128
tokens), size on disk. all-MiniLM-L6-v2: embedding cosine and retrieval
overlap against fp32, p50 latency at batch 1 / sequence 128, size on disk.
The textbook `torch.ao.quantization.quantize_dynamic` is a baseline row.

    python benchmarks/bench_quantize.py [--max-tokens 2048] [--threads 2] [--json out.json]

prints a markdown table and the environment (CPU, threads, versions, load).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import slimkit
from slimkit.measure.quality import EvalConfig, evaluate
from slimkit.measure.speed import BenchConfig, benchmark

# Every method family; the options are the ones the rows are named by.
LM_METHODS = [
    ("bf16", {}),
    ("int8-dynamic", {"smooth_alpha": 0.5}),
    ("int8-static", {}),
    ("int8-wo", {}),
    ("int8", {}),
    ("int4", {}),
    ("int4-wo", {"group_size": 64}),
    ("awq", {"bits": 4, "group_size": 64}),
    ("gptq", {"group_size": 64}),
    ("qat", {"bits": 4, "group_size": 64, "minutes": 4}),
    ("mixed", {"low_options": {"group_size": 64}, "max_ppl_increase": 0.03}),
    ("nf4", {"double_quant": True}),
]
ENCODER_METHODS = [
    ("bf16", {}),
    ("int8-dynamic", {}),
    ("int8-dynamic", {"compute_dtype": "bf16"}),
    ("int8-static", {}),
    ("int8-wo", {}),
    ("int8", {}),
]


def textbook(lm):
    """torch.ao.quantization.quantize_dynamic on every nn.Linear: the baseline."""
    from torch.ao.quantization import quantize_dynamic

    model = quantize_dynamic(copy.deepcopy(lm.model), {torch.nn.Linear}, dtype=torch.qint8)
    return slimkit.LoadedModel(model=model, tokenizer=lm.tokenizer, kind=lm.kind, source=f"{lm.source}+quantize_dynamic")


def measure(lm, ref, eval_config, bench_config, label):
    print(f"measuring {label} ...", file=sys.stderr, flush=True)
    quality = evaluate(lm, ref, config=eval_config)
    if label.startswith("textbook"):  # its packed params are not safetensors-serialisable: no size on disk
        bench_config = BenchConfig(**{**bench_config.__dict__, "measure_size": False})
    speed = benchmark(lm, bench_config)
    return {"method": label, "eval": quality.to_dict(), "bench": speed.to_dict()}


def run_model(name, methods, eval_config, bench_config, only=None, checkpoint=lambda rows: None):
    ref = slimkit.load(name)
    rows = [measure(ref, None, eval_config, bench_config, "fp32")]
    todo = [("textbook quantize_dynamic", lambda: textbook(ref))]
    for method, options in methods:
        if only and method not in only:
            continue
        label = method + "".join(f" {k}={v}" for k, v in options.items())
        todo.append((label, lambda method=method, options=options: slimkit.quantize(ref, method, **options)))
    for label, make in todo:
        built = time.time()
        lm = make()
        build_seconds = round(time.time() - built, 1)  # calibration / training included
        rows.append(measure(lm, ref, eval_config, bench_config, label))
        rows[-1]["build_seconds"] = build_seconds
        lm = None
        print(render(name, rows).splitlines()[-1], file=sys.stderr, flush=True)  # each row as it lands
        checkpoint(rows)
    return rows


def render(name, rows) -> str:
    base = rows[0]["bench"]
    causal = rows[0]["eval"]["kind"] == "causal-lm"

    def r(num, den):
        return f"{num / den:.2f}x" if num and den else "-"

    def n(v, d=3):
        return "-" if v is None else f"{v:,.{d}f}"

    if causal:
        head = "| method | perplexity | ppl vs fp32 | KL | top-1 | decode tok/s | decode speedup | p50 prefill ms | latency speedup | size MiB | size ratio | build s |"
    else:
        head = "| method | cosine vs fp32 | top-10 overlap | p50 ms (b1, s128) | latency speedup | size MiB | size ratio | build s |"
    lines = [f"### {name}", "", head, "|" + "---|" * (head.count("|") - 1)]
    ppl0 = rows[0]["eval"]["perplexity"]
    for row in rows:
        e, b = row["eval"], row["bench"]
        size = b["size_on_disk_mb"]
        common = [n(b["latency_ms"]["p50"], 1), r(base["latency_ms"]["p50"], b["latency_ms"]["p50"]), n(size, 1), r(size, base["size_on_disk_mb"]),
                  n(row.get("build_seconds"), 0)]
        if causal:
            ppl = e["perplexity"]
            cells = [n(ppl), f"{(ppl / ppl0 - 1) * 100:+.2f}%", n(e["kl_divergence"], 4), n(e["top1_agreement"], 4),
                     n(b["decode_tokens_per_s"], 1), r(b["decode_tokens_per_s"], base["decode_tokens_per_s"])] + common
        else:
            cells = [n(e["cosine_to_reference"], 4), n(e["retrieval_top10_overlap"], 3)] + common
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=None, help="cap on evaluation tokens (default: the whole split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2-135m,minilm-l6")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--json", default=None, help="also write every measurement to this file")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode tokens per run")
    ap.add_argument("--render", default=None, help="only print the tables of a --json file written earlier")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as fh:
            saved = json.load(fh)
        print("\n\n".join(render(name, rows) for name, rows in saved["results"].items()))
        print(f"\nEnvironment: {json.dumps(saved['environment'])}")
        return
    torch.set_num_threads(args.threads)
    eval_config = EvalConfig(max_tokens=args.max_tokens)
    bench_config = BenchConfig(batch_sizes=(1,), new_tokens=args.new_tokens, min_iters=5, min_seconds=1.0, decode_repeats=3, threads=args.threads)
    started = time.time()
    load_at_start = os.getloadavg()
    only = set(args.methods.split(",")) if args.methods else None
    tables, results = [], {}
    for name in args.models.split(","):
        def checkpoint(rows, name=name):  # partial results survive an interrupted run
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"results": {**results, name: rows}, "environment": {}}, fh, indent=1)

        rows = run_model(name, LM_METHODS if name == "smollm2-135m" else ENCODER_METHODS, eval_config, bench_config, only, checkpoint)
        results[name] = rows
        tables.append(render(name, rows))
        print(tables[-1] + "\n", flush=True)
    env = results[next(iter(results))][0]["bench"]["environment"]
    env["load_average_at_start"] = load_at_start
    env["load_average_at_end"] = os.getloadavg()
    print(f"\nEnvironment: {json.dumps(env)}\nEval: max_tokens={args.max_tokens}, window 512, stride 256. "
          f"Bench: seq 128, batch 1, {args.new_tokens} decode tokens, median of 3. Wall time {time.time() - started:.0f} s.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "environment": env}, fh, indent=1)


if __name__ == "__main__":
    main()
