"""fp32 vs bf16 for both embedded models, side by side in one run.

Each measurement runs the real `slimkit` CLI in its own process, so peak memory
belongs to that model alone. Quality of bf16 is measured against the fp32
model on the same tokens (KL, top-1 agreement; embedding cosine, retrieval).

    python benchmarks/bench_foundation.py [--max-tokens N] [--threads 2]

prints a markdown table of absolute numbers and ratios to fp32, plus the
environment; BENCHMARKS.md holds the latest output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODELS = ("smollm2-135m", "minilm-l6")
DTYPES = ("fp32", "bf16")


def cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "slimkit.cli", *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"slimkit {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def load_seconds(name: str) -> float:
    """Wall time of slimkit.load in a fresh process (the GGUF conversion is cached by then)."""
    code = f"import time, slimkit; t = time.perf_counter(); slimkit.load({name!r}); print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=None, help="cap on evaluation tokens (default: the whole split)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    threads = ["--threads", str(args.threads)]
    cap = ["--max-tokens", str(args.max_tokens)] if args.max_tokens else []

    rows = []
    env = {}
    started = time.time()
    for name in MODELS:
        load_seconds(name)  # make sure the cache exists before timing a load
        load_s = load_seconds(name)
        for dtype in DTYPES:
            print(f"measuring {name} {dtype} ...", file=sys.stderr)
            ref = ["--reference", name] if dtype != "fp32" else []
            quality = cli("eval", name, "--dtype", dtype, *ref, *cap, *threads)
            speed = cli("bench", name, "--dtype", dtype, *threads)
            env = speed["environment"]
            rows.append({"model": name, "dtype": dtype, "eval": quality, "bench": speed, "load_s": load_s})

    print(render(rows, env, args, time.time() - started))


def render(rows: list[dict], env: dict, args, seconds: float) -> str:
    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    out = [
        "| model | dtype | perplexity | KL vs fp32 | top-1 vs fp32 | cosine vs fp32 | top-10 overlap | p50 latency ms | latency speedup | prefill tok/s | decode tok/s | decode speedup | peak RSS MiB | size MiB | size ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for r in rows:
        e, b = r["eval"], r["bench"]
        if r["dtype"] == "fp32":
            base[r["model"]] = b
        f = base[r["model"]]

        def num(v, d=3):
            return "-" if v is None else f"{v:,.{d}f}"

        out.append(
            f"| {r['model']} | {r['dtype']} | {num(e['perplexity'])} | {num(e['kl_divergence'], 5)} | "
            f"{num(e['top1_agreement'], 4)} | {num(e['cosine_to_reference'], 4)} | {num(e['retrieval_top10_overlap'], 3)} | "
            f"{b['latency_ms']['p50']:.1f} | {ratio(f['latency_ms']['p50'], b['latency_ms']['p50'])} | "
            f"{num(b['prefill_tokens_per_s'], 0)} | {num(b['decode_tokens_per_s'], 1)} | "
            f"{ratio(b['decode_tokens_per_s'], f['decode_tokens_per_s'])} | {b['peak_memory_mb']:.0f} | "
            f"{b['size_on_disk_mb']:.1f} | {ratio(b['size_on_disk_mb'], f['size_on_disk_mb'])} |"
        )
    loads = ", ".join(f"{r['model']} {r['load_s']:.1f} s" for r in rows if r["dtype"] == "fp32")
    tokens = {r["model"]: r["eval"]["tokens"] or r["eval"]["samples"] for r in rows}
    out += [
        "",
        f"Latency: one {rows[0]['bench']['seq_len']}-token sequence (prefill for the causal LM), p50 over repeated runs after warm-up. "
        f"Decode: {rows[0]['bench']['new_tokens']} new tokens, greedy, KV cache. Quality on the evaluation split "
        f"(smollm2-135m: {tokens['smollm2-135m']} tokens scored, window 512, stride 256; minilm-l6: {tokens['minilm-l6']} passages). "
        f"Size: the saved artifact on disk. Cached load time (fresh process): {loads}.",
        "",
        f"Environment: {env.get('cpu')} ({', '.join(env.get('cpu_features', []))}), {env.get('threads')} threads of "
        f"{env.get('cores')} cores; Python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}; "
        f"run took {seconds / 60:.1f} min.",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
