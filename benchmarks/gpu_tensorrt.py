"""On a CUDA GPU, side by side in one run: all-MiniLM-L6-v2 in PyTorch fp32 / fp16 and as TensorRT fp16 / int8 engines.

    .venv/bin/python benchmarks/gpu_tensorrt.py [--rounds 3] [--out DIR] [--json]

Rows: PyTorch fp32 on the GPU (eager; every ratio is to it), PyTorch fp16 on
the GPU, `slimkit export minilm-l6 --format tensorrt --quantize fp16`, and
`--quantize int8` (Q/DQ calibrated on the calibration split). Columns:
latency p50 at batch 1 x 128 tokens and per batch of 32 x 128 tokens (the
`slimkit bench` harness: warm-up, then timed calls with CUDA synchronized),
each with its speed-up over PyTorch fp32; the embeddings' mean cosine to
PyTorch fp32 and their top-10 retrieval overlap on the evaluation split
(`slimkit eval`); the engine's size and build time.

Speeds are taken last, in `--rounds` rounds: each round measures every row
once, starting one row later than the round before, so a drift of the
GPU's clocks hits all rows alike; a row reports its median round.

Needs a CUDA GPU and TensorRT 10; elsewhere it exits with one line saying
which is missing. Written on a machine without a GPU: this script has not
been run yet, and no result of it is recorded in the repository.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import slimkit
from slimkit.core.hardware import environment
from slimkit.exporters import ExportConfig, export
from slimkit.exporters import tensorrt as T
from slimkit.measure.speed import BenchConfig, benchmark

MODEL = "minilm-l6"
SEQ, BATCH = 128, 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="keep the engine directories here (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    ok, why = T.available()
    if not ok:
        raise SystemExit(f"gpu_tensorrt.py needs a CUDA GPU and TensorRT 10: {why}")
    with tempfile.TemporaryDirectory(prefix="slimkit-trt-") as tmp:
        work = Path(args.out or tmp)
        rows = measure(work, args.rounds)
    env = {**environment(torch.get_num_threads()), "tensorrt": T.device_info()["version"],
           "cuda": torch.version.cuda}
    if args.json:
        print(json.dumps({"rows": rows, "environment": env}, indent=2))
    else:
        print(render(rows, env))


def measure(work: Path, rounds: int) -> list[dict]:
    cpu = slimkit.load(MODEL)  # the exporter's source and the parity reference, on the CPU
    engines = {}
    for quant in ("fp16", "int8"):
        log(f"building the TensorRT {quant} engine")
        start = time.perf_counter()
        out = export(cpu, work / f"trt-{quant}", ExportConfig("tensorrt", quant), overwrite=True)
        engines[quant] = (out, time.perf_counter() - start)
    fp32 = slimkit.load(MODEL)
    fp32.model.to("cuda")
    fp16 = slimkit.load(MODEL, dtype=torch.float16)
    fp16.model.to("cuda")
    rows = [{"name": "PyTorch fp32", "lm": fp32}, {"name": "PyTorch fp16", "lm": fp16}]
    for quant, (out, seconds) in engines.items():
        rows.append({"name": f"TensorRT {quant}", "lm": slimkit.load(str(out)), "export_seconds": round(seconds, 1),
                     "engine_mb": round((out / T.ENGINE).stat().st_size / 2**20, 2),
                     "engine_parity_rel_l2": json.loads((out / "slimkit.json").read_text())["export"]["parity"]["engine"]["rel_l2"]})
    for row in rows[1:]:
        log(f"quality of {row['name']}")
        q = slimkit.evaluate(row["lm"], fp32)
        row["cosine"], row["top10_overlap"] = q.cosine_to_reference, q.retrieval_top10_overlap
    config = BenchConfig(seq_len=SEQ, batch_sizes=(BATCH,), min_seconds=1.0, measure_size=False)
    runs: dict[str, list] = {row["name"]: [] for row in rows}
    for r in range(rounds):
        for row in rows[r % len(rows):] + rows[:r % len(rows)]:
            log(f"round {r + 1}/{rounds}: {row['name']}")
            b = benchmark(row["lm"], config)
            runs[row["name"]].append((b.latency_ms.p50, 1000 * BATCH / b.throughput[0]["sequences_per_s"]))
    for row in rows:
        row["latency_b1_ms"] = statistics.median(r[0] for r in runs[row["name"]])
        row[f"latency_b{BATCH}_ms"] = statistics.median(r[1] for r in runs[row["name"]])
        del row["lm"]
    base = rows[0]
    for row in rows:
        row["speedup_b1"] = base["latency_b1_ms"] / row["latency_b1_ms"]
        row[f"speedup_b{BATCH}"] = base[f"latency_b{BATCH}_ms"] / row[f"latency_b{BATCH}_ms"]
    return rows


def render(rows: list[dict], env: dict) -> str:
    head = (f"| model ({MODEL}) | 1 x {SEQ} p50 ms | vs fp32 | {BATCH} x {SEQ} p50 ms | vs fp32 | cosine to fp32 "
            "| top-10 overlap | engine MB | export s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        cos = f"{r['cosine']:.4f}" if "cosine" in r else "1 (reference)"
        overlap = f"{r['top10_overlap']:.3f}" if "top10_overlap" in r else ""
        lines.append(f"| {r['name']} | {r['latency_b1_ms']:.2f} | {r['speedup_b1']:.2f}x | {r[f'latency_b{BATCH}_ms']:.2f} "
                     f"| {r[f'speedup_b{BATCH}']:.2f}x | {cos} | {overlap} | {r.get('engine_mb', '')} | {r.get('export_seconds', '')} |")
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
