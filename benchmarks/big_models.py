"""Real model sizes on this machine: peak memory and wall time of slimkit on 1B-7B shapes.

    python benchmarks/big_models.py --work /tmp/big --shapes tinyllama-1.1b llama2-7b \
        [--calibrate-on tinyllama-1.1b] [--samples 128] [--seq-len 512] [--threads 2]

Builds random-init bf16 checkpoints of real shapes (written shard by shard, never whole
in memory; vocabulary: SmolLM2's tokenizer, 49,152 tokens, so calibration text
tokenizes), then runs each command the way a user would, in its own process, and
records that process's own peak resident memory (VmHWM, read as it exits) and wall time, beside
the memory guard's estimate for the same command (`io.resources.blockwise_estimate`):

  * `slimkit quantize DIR --method int4` (round to nearest, block by block, streamed to disk);
  * `slimkit quantize DIR --method gptq` and `--method awq` (calibrated block by block on
    `--samples` windows of `--seq-len` tokens) on the shapes named by `--calibrate-on`;
  * reloading the artifact with `slimkit.load` and generating 8 tokens greedily.

Random weights make perplexity meaningless here; this measures memory and time only.
Prints a markdown table (with the rate in parameters per second, so other sizes can be
predicted) and the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # transformers LlamaConfig fields of public models' shapes
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}

PEAK = """
import runpy, sys, atexit
def report():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            print('PEAK_RSS_KIB', line.split()[1], file=sys.stderr, flush=True)
atexit.register(report)
sys.argv = ['slimkit'] + sys.argv[1:]
runpy.run_module('slimkit.cli', run_name='__main__')
"""

RELOAD = """
import sys, time, torch, slimkit
torch.set_num_threads(int(sys.argv[2]))
t = time.perf_counter()
lm = slimkit.load(sys.argv[1])
loaded = time.perf_counter() - t
ids = lm.tokenizer("The def statement introduces", return_tensors="pt").input_ids
t = time.perf_counter()
out = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
gen = time.perf_counter() - t
for line in open('/proc/self/status'):
    if line.startswith('VmHWM:'):
        peak = int(line.split()[1])
print('RESULT', loaded, gen, peak, repr(lm.tokenizer.decode(out[0, ids.shape[1]:])), flush=True)
"""


def build(name: str, out: Path, tokenizer_dir: Path) -> int:
    """A random-init bf16 checkpoint of shape `name`, written tensor by tensor; returns its parameter count."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimkit.io.shards import ShardWriter

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[name])
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    if (out / "config.json").is_file():
        return count
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(out, max_bytes=2 * 2**30)
    for n, p in model.named_parameters():
        t = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=gen) * 0.02
        writer.add({n: t.to(torch.bfloat16)})
    writer.close()
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    tok.save_pretrained(out)
    return count


def run(args: list[str], threads: int) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB of that process, last stderr lines) of one `slimkit` command."""
    env = {**os.environ, "SLIMKIT_LOG_EVERY": "30", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    peak = next((int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")), 0)
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(args)} failed (exit {proc.returncode})")
    return wall, peak / 2**20, proc.stderr[-300:]


def reload(path: Path, threads: int) -> tuple[float, float, float, str]:
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(path), str(threads)], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(f"reloading {path} failed:\n{proc.stderr[-3000:]}")
    _, loaded, gen, peak, text = line.split(" ", 4)
    return float(loaded), float(gen), int(peak) / 2**20, text


def main() -> None:
    from slimkit.core.hardware import environment
    from slimkit.io.loader import load
    from slimkit.io.resources import blockwise_estimate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--calibrate-on", nargs="*", default=["tinyllama-1.1b"], choices=list(SHAPES))
    ap.add_argument("--methods", nargs="*", default=["int4", "gptq", "awq"], choices=["int4", "gptq", "awq"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tokenizer_dir = load("smollm2-135m", lazy=True).path  # the embedded model's converted directory
    rows = []
    for name in args.shapes:
        ckpt = args.work / name
        t = time.perf_counter()
        params = build(name, ckpt, tokenizer_dir)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
        print(f"{name}: {params / 1e9:.2f}B parameters, {size:.1f} GiB bf16 ({time.perf_counter() - t:.0f} s to build)", flush=True)
        calibration = ["-o", f"calibration_samples={args.samples}", "-o", f"seq_len={args.seq_len}"]
        jobs = [(m, ["--method", m] + (calibration if m != "int4" else [])) for m in args.methods
                if m == "int4" or name in args.calibrate_on]
        for label, extra in jobs:
            out = args.work / f"{name}-{label}"
            wall, peak, _ = run(["quantize", str(ckpt), *extra, "--out", str(out), "--overwrite", "--threads", str(args.threads)], args.threads)
            art = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30
            loaded, gen, reload_peak, text = reload(out, args.threads)
            est = blockwise_estimate(str(ckpt), {"samples": args.samples, "seq_len": args.seq_len} if label != "int4" else {})
            rows.append(dict(shape=name, params_b=params / 1e9, ckpt_gib=size, command=f"quantize --method {label}" + (f" ({args.samples}x{args.seq_len} tokens)" if label != "int4" else ""),
                             peak_gib=peak, estimate_gib=est.bytes / 2**30, estimate_stage=est.peak_stage, x_ckpt=peak / size, wall_s=wall, rate=params / wall, artifact_gib=art,
                             reload_s=loaded, reload_peak_gib=reload_peak, gen8_s=gen, text=text))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| shape | params | checkpoint (bf16) | command | peak RSS | guard's estimate (its peak stage) | peak / estimate | x checkpoint | wall | params/s | artifact | reload: time, peak RSS | 8 tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['params_b']:.2f}B | {r['ckpt_gib']:.1f} GiB | `{r['command']}` | {r['peak_gib']:.2f} GiB | "
              f"{r['estimate_gib']:.2f} GiB ({r['estimate_stage']}) | {r['peak_gib'] / r['estimate_gib']:.2f} | {r['x_ckpt']:.2f}x | "
              f"{r['wall_s']:.0f} s | {r['rate'] / 1e6:.1f}M | {r['artifact_gib']:.2f} GiB | {r['reload_s']:.0f} s, {r['reload_peak_gib']:.2f} GiB | {r['gen8_s']:.1f} s |")
    print("\nenvironment:", json.dumps(environment(args.threads)))


if __name__ == "__main__":
    main()
