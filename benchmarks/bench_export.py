"""Side by side, in one run: PyTorch eager vs ONNX Runtime vs onnxruntime-genai on CPU.

    .venv/bin/python benchmarks/bench_export.py --threads 2 --max-tokens 2048

all-MiniLM-L6-v2: PyTorch fp32, ORT fp32 (fused), ORT int8 (dynamic), ORT
int8-static (QDQ): latency at batch 1 x 128 tokens, and the embeddings'
cosine to PyTorch fp32 on the evaluation split.
SmolLM2-135M: PyTorch fp32, ORT fp32, ORT int8, ORT int4, genai fp32 and
genai int4: decode tokens/s (greedy, KV cache, after a 64-token prompt),
perplexity on the evaluation split, KL and top-1 agreement to PyTorch fp32,
size on disk.

Every speed number comes from `slimkit bench DIR --json` in a fresh process
(so peak memory is that model's alone), quality from `slimkit.evaluate`
against the PyTorch original. Ratios are to PyTorch fp32 in this run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import slimkit
from slimkit.benchmark import environment
from slimkit.export import ExportConfig, export
from slimkit.export.onnxruntime import reuse_graphs, seed_graph

ENCODER = "minilm-l6"
DECODER = "smollm2-135m"


def bench(model: str, args, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "slimkit.cli", "bench", model, "--json", "--threads", str(args.threads), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed for {model}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4096, help="perplexity tokens")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode tokens per run")
    ap.add_argument("--work", default=None, help="where exports go (default: a temporary directory)")
    ap.add_argument("--skip", default="", help="comma-separated row names to skip")
    ap.add_argument("--reuse", action="store_true", help="measure exports already in --work instead of exporting again")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="slimkit-bench-export-"))
    skip = set(filter(None, args.skip.split(",")))
    rows, started = [], time.time()

    enc = slimkit.load(ENCODER)
    enc_bench = ["--seq-len", "128", "--batch-sizes", "1"]
    base = bench(ENCODER, args, *enc_bench)
    rows.append(_enc_row("PyTorch eager", "fp32", base, base, None, None))
    with reuse_graphs():
        for name, cfg in [("ORT", ExportConfig("onnxruntime")), ("ORT", ExportConfig("onnxruntime", quantize="int8")),
                          ("ORT", ExportConfig("onnxruntime", quantize="int8-static"))]:
            label = cfg.quantize or "fp32"
            if f"minilm-{label}" in skip:
                continue
            out, seconds = _export(enc, work / f"minilm-{label}", cfg, args.reuse)
            q = slimkit.evaluate(str(out), enc, config=slimkit.EvalConfig(max_passages=256))
            rows.append(_enc_row(name, label, bench(str(out), args, *enc_bench), base, q, seconds))
            print(render(rows[-1:], None, args, 0).splitlines()[2], file=sys.stderr, flush=True)
    del enc

    dec = slimkit.load(DECODER)
    dec_bench = ["--seq-len", "64", "--batch-sizes", "1", "--new-tokens", str(args.new_tokens)]
    eval_cfg = slimkit.EvalConfig(max_tokens=args.max_tokens)
    base = bench(DECODER, args, *dec_bench)
    ref_q = slimkit.evaluate(dec, config=eval_cfg)
    rows.append(_dec_row("PyTorch eager", "fp32", base, base, ref_q, None))
    candidates = [("ORT", "fp32", ExportConfig("onnxruntime")), ("ORT", "int8", ExportConfig("onnxruntime", quantize="int8")),
                  ("ORT", "int4", ExportConfig("onnxruntime", quantize="int4")),
                  ("onnxruntime-genai", "fp32", ExportConfig("ort-genai")),
                  ("onnxruntime-genai", "int4", ExportConfig("ort-genai", quantize="int4"))]
    with reuse_graphs():
        for name, label, cfg in candidates:
            key = f"smollm2-{'genai-' if cfg.format == 'ort-genai' else ''}{label}"
            if key in skip:
                continue
            out, seconds = _export(dec, work / key, cfg, args.reuse)
            if label == "fp32" and cfg.format == "onnxruntime":
                seed_graph(dec, out)
            q = slimkit.evaluate(str(out), dec, config=eval_cfg)
            rows.append(_dec_row(name, label, bench(str(out), args, *dec_bench), base, q, seconds))
            print(render(rows[-1:], None, args, 0).splitlines()[2], file=sys.stderr, flush=True)

    env = environment(args.threads)
    import onnxruntime
    import onnxruntime_genai

    env.update(onnxruntime=onnxruntime.__version__, onnxruntime_genai=onnxruntime_genai.__version__,
               load_average=[round(x, 1) for x in __import__("os").getloadavg()])
    print(render(rows, env, args, time.time() - started))


def _export(lm, out: Path, cfg, reuse: bool):
    """(directory, export seconds); an existing export is measured again when reusing (seconds unknown)."""
    if reuse and (out / "slimkit.json").exists():
        return out, None
    t = time.time()
    return export(lm, out, cfg, overwrite=True), time.time() - t


def _enc_row(runtime, precision, b, base, q, seconds):
    p50 = b["latency_ms"]["p50"]
    return {"model": "all-MiniLM-L6-v2", "runtime": runtime, "precision": precision,
            "speed": f"{p50:.2f} ms", "vs_torch": f"{base['latency_ms']['p50'] / p50:.2f}x faster",
            "quality": "cosine 1 (reference)" if q is None else f"cosine {q.cosine_to_reference:.4f}, top-10 {q.retrieval_top10_overlap:.3f}",
            "size": b["size_on_disk_mb"], "peak": b["peak_memory_mb"], "export_s": seconds}


def _dec_row(runtime, precision, b, base, q, seconds):
    tps = b["decode_tokens_per_s"]
    quality = f"ppl {q.perplexity:.3f}"
    if q.kl_divergence is not None:
        quality += f", KL {q.kl_divergence:.4f}, top-1 {q.top1_agreement:.3f}"
    return {"model": "SmolLM2-135M", "runtime": runtime, "precision": precision, "speed": f"{tps:.1f} tok/s",
            "vs_torch": f"{tps / base['decode_tokens_per_s']:.2f}x", "quality": quality,
            "size": b["size_on_disk_mb"], "peak": b["peak_memory_mb"], "export_s": seconds}


def render(rows, env, args, seconds) -> str:
    lines = ["| model | runtime | precision | speed | vs PyTorch fp32 | quality vs PyTorch fp32 | size on disk (MiB) | peak RSS (MiB) | export (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        export_s = "-" if r["export_s"] is None else f"{r['export_s']:.0f}"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['precision']} | {r['speed']} | {r['vs_torch']} | {r['quality']} "
                     f"| {r['size']:.1f} | {r['peak']:.0f} | {export_s} |")
    if env is None:
        return "\n".join(lines)
    lines += ["", "Speed: MiniLM latency p50 at batch 1 x 128 tokens; SmolLM2 greedy decode tokens/s with a KV cache "
              f"after a 64-token prompt, {args.new_tokens} new tokens, median of 3 runs. Perplexity over "
              f"{args.max_tokens} tokens of the evaluation split (window 512, stride 256).",
              "", f"Environment: {json.dumps(env)}", f"Wall time of the run: {seconds / 60:.1f} min"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
