"""Side by side, in one run: PyTorch eager vs ONNX Runtime vs onnxruntime-genai on CPU.

    .venv/bin/python benchmarks/bench_export.py --threads 2 --max-tokens 2048

all-MiniLM-L6-v2: PyTorch fp32, ORT fp32 (fused), ORT int8 (dynamic), ORT
int8-static (QDQ): latency at batch 1 x 128 tokens, and the embeddings'
cosine to PyTorch fp32 on the evaluation split.
SmolLM2-135M: PyTorch fp32, ORT fp32, ORT int8, ORT int4, genai fp32 and
genai int4 (the builder's own round-to-nearest), slimkit's int4 with integer
zero points (round-to-nearest, AWQ, GPTQ; group 32, the int8 embedding with
its tied head) carried exactly into genai, and llama.cpp on the packaged Q4_1
GGUF (llama-cpp-python, when installed): decode tokens/s (greedy, KV cache,
after a 64-token prompt), perplexity on the evaluation split, KL and top-1
agreement to PyTorch fp32, size on disk. A second table puts the 4-bit
decoders side by side: speed as a ratio to genai's own int4 and to llama.cpp.

    .venv/bin/python benchmarks/bench_export.py --only 4bit   # just the 4-bit decoder rows (and PyTorch fp32)

Every speed number comes from `slimkit bench DIR --json` in a fresh process
(so peak memory is that model's alone), quality from `slimkit.evaluate`
against the PyTorch original. Ratios are to PyTorch fp32 in this run.
Speeds are taken last, in `--rounds` rounds: each round benches every row
once, starting one row later than the round before, so a drift of the host's
speed hits all rows alike; a row reports its median round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import slimkit
from slimkit.core.hardware import environment
from slimkit.exporters import ExportConfig, export
from slimkit.exporters.onnxruntime import reuse_graphs, seed_graph

ENCODER = "minilm-l6"
DECODER = "smollm2-135m"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench(model: str, args, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "slimkit.cli", "bench", model, "--json", "--threads", str(args.threads), *extra]
    return _run_json(cmd, model)


def _run_json(cmd: list[str], what: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed for {what}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


@dataclass
class Pending:
    """A row whose quality is known and whose speed is still to be measured (`measure` benches it once)."""

    make: object  # _enc_row or _dec_row
    runtime: str
    precision: str
    measure: object
    quality: object
    seconds: float | None
    base: "Pending | None" = None  # the PyTorch fp32 row the ratios are to (None: this is it)
    runs: list = field(default_factory=list)

    def median_run(self) -> dict:
        key = (lambda b: b["decode_tokens_per_s"]) if self.make is _dec_row else (lambda b: -b["latency_ms"]["p50"])
        return sorted(self.runs, key=key)[len(self.runs) // 2]


def timed_rows(pending: list[Pending], rounds: int) -> list[dict]:
    """Bench every row `rounds` times, rotating the order each round; rows from each one's median run."""
    for r in range(rounds):
        order = pending[r % len(pending):] + pending[:r % len(pending)]
        for p in order:
            p.runs.append(p.measure())
            log(f"round {r + 1}/{rounds}: {p.runtime} {p.precision}")
    rows = []
    for p in pending:
        base = (p.base or p).median_run()
        rows.append(p.make(p.runtime, p.precision, p.median_run(), base, p.quality, p.seconds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4096, help="perplexity tokens")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode tokens per run")
    ap.add_argument("--work", default=None, help="where exports go (default: a temporary directory)")
    ap.add_argument("--skip", default="", help="comma-separated row names to skip")
    ap.add_argument("--only", default="", help="comma-separated row names to run (or '4bit': the 4-bit decoder rows)")
    ap.add_argument("--reuse", action="store_true", help="measure exports already in --work instead of exporting again")
    ap.add_argument("--rounds", type=int, default=3, help="rotated rounds of speed measurement; each row reports its median")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="slimkit-bench-export-"))
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.replace("4bit", ",".join(FOUR_BIT)).split(",")))
    wanted = lambda key: key not in skip and (not only or key in only)  # noqa: E731
    pending, started = [], time.time()
    if not only or any(k.startswith("minilm-") for k in only):
        _encoder_rows(pending, work, args, wanted)
    if not only or any(k.startswith("smollm2-") for k in only):
        _decoder_rows(pending, work, args, wanted)
    rows = timed_rows(pending, args.rounds)

    env = environment(args.threads)
    import onnxruntime
    import onnxruntime_genai

    env.update(onnxruntime=onnxruntime.__version__, onnxruntime_genai=onnxruntime_genai.__version__,
               load_average=[round(x, 1) for x in __import__("os").getloadavg()])
    if (llama := _llama_cpp_version()) is not None:
        env["llama_cpp_python"] = llama
    print(render(rows, env, args, time.time() - started))


FOUR_BIT = ["smollm2-genai-int4", "smollm2-genai-slimkit-rtn", "smollm2-genai-slimkit-awq", "smollm2-genai-slimkit-gptq",
            "smollm2-genai-slimkit-awq-head4", "smollm2-genai-slimkit-awq-sym-head4", "smollm2-genai-slimkit-gptq-sym-head4",
            "smollm2-llamacpp-q4_1"]
HEAD4 = {"embedding_bits": 4}  # the tied head (and the embedding that reads it) on the layers' 4-bit grid
IZP = {"group_size": 32, "zero_point": "integer"}  # asymmetric with integer zero points, as MatMulNBits stores them
SYM = {"group_size": 32, "symmetric": True}  # no zero points: MatMulNBits' default, and its faster path
SLIMKIT_INT4 = {  # row -> quantize method and options, all in groups of 32
    "rtn": ("int4", {"zero_point": "integer"}),
    "awq": ("awq", IZP),
    "gptq": ("gptq", IZP),
    "awq-head4": ("awq", {**IZP, **HEAD4}),
    "awq-sym-head4": ("awq", {**SYM, **HEAD4}),
    "gptq-sym-head4": ("gptq", {**SYM, **HEAD4}),
}


def _encoder_rows(rows, work, args, wanted) -> None:
    enc = slimkit.load(ENCODER)
    enc_bench = ["--seq-len", "128", "--batch-sizes", "1"]
    base = Pending(_enc_row, "PyTorch eager", "fp32", lambda: bench(ENCODER, args, *enc_bench), None, None)
    rows.append(base)
    with reuse_graphs():
        for name, cfg in [("ORT", ExportConfig("onnxruntime")), ("ORT", ExportConfig("onnxruntime", quantize="int8")),
                          ("ORT", ExportConfig("onnxruntime", quantize="int8-static"))]:
            label = cfg.quantize or "fp32"
            if not wanted(f"minilm-{label}"):
                continue
            out, seconds = _export(enc, work / f"minilm-{label}", cfg, args.reuse)
            q = slimkit.evaluate(str(out), enc, config=slimkit.EvalConfig(max_passages=256))
            rows.append(Pending(_enc_row, name, label, lambda out=out: bench(str(out), args, *enc_bench), q, seconds, base))
            log(f"MiniLM {name} {label}: cosine {q.cosine_to_reference:.4f}")


def _decoder_rows(rows, work, args, wanted) -> None:
    dec = slimkit.load(DECODER)
    dec_bench = ["--seq-len", "64", "--batch-sizes", "1", "--new-tokens", str(args.new_tokens)]
    eval_cfg = slimkit.EvalConfig(max_tokens=args.max_tokens)
    ref_q = slimkit.evaluate(dec, config=eval_cfg)
    base = Pending(_dec_row, "PyTorch eager", "fp32", lambda: bench(DECODER, args, *dec_bench), ref_q, None)
    rows.append(base)
    candidates = [("ORT", "fp32", ExportConfig("onnxruntime")), ("ORT", "int8", ExportConfig("onnxruntime", quantize="int8")),
                  ("ORT", "int4", ExportConfig("onnxruntime", quantize="int4")),
                  ("onnxruntime-genai", "fp32", ExportConfig("ort-genai")),
                  ("onnxruntime-genai", "int4", ExportConfig("ort-genai", quantize="int4"))]
    with reuse_graphs():
        for name, label, cfg in candidates:
            key = f"smollm2-{'genai-' if cfg.format == 'ort-genai' else ''}{label}"
            if not wanted(key):
                continue
            out, seconds = _export(dec, work / key, cfg, args.reuse)
            if label == "fp32" and cfg.format == "onnxruntime":
                seed_graph(dec, out)
            q = slimkit.evaluate(str(out), dec, config=eval_cfg)
            label = "int4 (builder: symmetric RTN, g32)" if label == "int4" and cfg.format == "ort-genai" else label
            rows.append(Pending(_dec_row, name, label, lambda out=out: bench(str(out), args, *dec_bench), q, seconds, base))
            log(f"SmolLM2 {name} {label}: ppl {q.perplexity:.3f}")
    for variant, (method, options) in SLIMKIT_INT4.items():
        key = f"smollm2-genai-slimkit-{variant}"
        if not wanted(key):
            continue
        artifact = work / f"smollm2-{variant}-int4"
        if not (args.reuse and (artifact / "slimkit.json").exists()):
            slimkit.save(slimkit.quantize(dec, method, **options), artifact, overwrite=True)
        out, seconds = _export(str(artifact), work / key, ExportConfig("ort-genai"), args.reuse)
        q = slimkit.evaluate(str(out), dec, config=eval_cfg)
        head = "4-bit head" if options.get("embedding_bits") == 4 else "int8 head"
        grid = "symmetric" if options.get("symmetric") else "integer zero points"
        label = f"slimkit int4 {method.upper() if method != 'int4' else 'RTN'} ({grid}, g32; {head})"
        rows.append(Pending(_dec_row, "onnxruntime-genai", label, lambda out=out: bench(str(out), args, *dec_bench), q, seconds, base))
        log(f"SmolLM2 genai {label}: ppl {q.perplexity:.3f}")
    if wanted("smollm2-llamacpp-q4_1") and _llama_cpp_version() is not None:
        from llamacpp_model import load_gguf, packaged_gguf

        q = slimkit.evaluate(load_gguf(packaged_gguf(), args.threads), dec, config=eval_cfg)
        cmd = [sys.executable, str(Path(__file__).with_name("llamacpp_model.py")), "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens)]
        rows.append(Pending(_dec_row, "llama.cpp", "Q4_1 (packaged GGUF)", lambda: _run_json(cmd, "llama.cpp"), q, None, base))
        log(f"SmolLM2 llama.cpp Q4_1: ppl {q.perplexity:.3f}")


def _llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


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
            "size": b["size_on_disk_mb"], "peak": b["peak_memory_mb"], "export_s": seconds,
            "tokens_per_s": tps, "perplexity": q.perplexity, "fp32_perplexity": q.reference_perplexity}


def render(rows, env, args, seconds) -> str:
    lines = ["| model | runtime | precision | speed | vs PyTorch fp32 | quality vs PyTorch fp32 | size on disk (MiB) | peak RSS (MiB) | export (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        export_s = "-" if r["export_s"] is None else f"{r['export_s']:.0f}"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['precision']} | {r['speed']} | {r['vs_torch']} | {r['quality']} "
                     f"| {r['size']:.1f} | {r['peak']:.0f} | {export_s} |")
    if env is None:
        return "\n".join(lines)
    lines += _four_bit_table(rows)
    lines += ["", "Speed: MiniLM latency p50 at batch 1 x 128 tokens; SmolLM2 greedy decode tokens/s with a KV cache "
              f"after a 64-token prompt, {args.new_tokens} new tokens, median of 3 runs; each row's median of "
              f"{args.rounds} rotated rounds. Perplexity over "
              f"{args.max_tokens} tokens of the evaluation split (window 512, stride 256).",
              "", f"Environment: {json.dumps(env)}", f"Wall time of the run: {seconds / 60:.1f} min"]
    return "\n".join(lines)


def _four_bit_table(rows) -> list[str]:
    """The 4-bit decoders side by side: decode speed against genai's own int4 and llama.cpp, perplexity against fp32."""
    four = [r for r in rows if "int4" in r["precision"] or r["runtime"] == "llama.cpp"]
    four = [r for r in four if r["runtime"] in ("onnxruntime-genai", "llama.cpp")]
    if not four:
        return []
    builder = next((r["tokens_per_s"] for r in four if r["precision"].startswith("int4 (builder")), None)
    llama = next((r["tokens_per_s"] for r in four if r["runtime"] == "llama.cpp"), None)
    ratio = lambda r, ref: "-" if ref is None else f"{r['tokens_per_s'] / ref:.2f}x"  # noqa: E731
    out = ["", "| 4-bit decoder | runtime | decode tok/s | vs genai int4 | vs llama.cpp Q4_1 | perplexity | vs fp32 |",
           "|---|---|---|---|---|---|---|"]
    for r in four:
        out.append(f"| {r['precision']} | {r['runtime']} | {r['tokens_per_s']:.1f} | {ratio(r, builder)} | {ratio(r, llama)} "
                   f"| {r['perplexity']:.3f} | {100 * (r['perplexity'] / r['fp32_perplexity'] - 1):+.2f}% |")
    return out


if __name__ == "__main__":
    main()
