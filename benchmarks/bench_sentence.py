"""sentence-transformers serving slimkit's exports of all-MiniLM-L6-v2, side by side in one run.

    .venv/bin/python benchmarks/bench_sentence.py --threads 2

Rows, each a `SentenceTransformer` as a user would build it:
  PyTorch fp32   SentenceTransformer(<minilm-l6 directory>)
  ORT fp32       SentenceTransformer(<slimkit export --format onnxruntime>, backend="onnx")
  ORT int8       SentenceTransformer(<slimkit export --format onnxruntime --quantize int8>, backend="onnx")
  ORT int8, SkipLayerNorm fusion off
                 the same, with the session option slimkit's own ONNX Runtime session
                 sets: model_kwargs={"session_options": opts} where
                 opts.add_session_config_entry("optimization.disable_specified_optimizers",
                 "SkipLayerNormFusion"). Without it ONNX Runtime fuses Add + LayerNorm
                 into SkipLayerNormalization when it loads the graph, which changes
                 int8's rounding a little (cosine to slimkit's vectors 0.999, not 1.0000)

Latency: `encode` of one passage truncated to 128 tokens (batch 1: tokenization,
the model, pooling and normalisation, as a request would run), p50 after warm-up.
The rows are timed in `--rounds` rounds, each round every row once, starting
one row later than the round before, so a drift of the host's speed hits all
rows alike; a row reports its median round. Quality: on the evaluation split's
passages, the mean cosine of each row's embeddings to PyTorch fp32's, the
top-10 retrieval overlap, and the cosine of sentence-transformers' embeddings
to slimkit's own (`slimkit.evaluate`'s embedder on the same export, served by
slimkit's ONNX Runtime session), one passage at a time, the lowest over the
passages: 1.0000 means the two serve the same vectors. (In batches, int8's
dynamic activation scales are taken over the whole batch, so a passage's
vector depends on its neighbours, and sentence-transformers sorts passages by
length before batching.)

The ONNX backend of sentence-transformers needs `optimum.onnxruntime`
(`pip install --no-deps optimum optimum-onnx`); ONNX Runtime's sessions get
`--threads` intra-op threads, as PyTorch does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import slimkit
from slimkit.core import data as D
from slimkit.core.hardware import environment
from slimkit.core.metrics import topk_overlap
from slimkit.io.sources import embedded_path
from slimkit.measure.quality import embed

TORCH = "PyTorch fp32"
SLIMKIT_SESSION = "ORT int8, SkipLayerNorm fusion off"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sentence_model(path: Path, threads: int, label: str):
    from sentence_transformers import SentenceTransformer

    if label == TORCH:
        return SentenceTransformer(str(path), device="cpu")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if label == SLIMKIT_SESSION:  # as slimkit's own session: ORT's load-time SkipLayerNormalization fusion off
        opts.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    return SentenceTransformer(str(path), device="cpu", backend="onnx", model_kwargs={"session_options": opts})


def p50_ms(model, text: str, iters: int) -> float:
    for _ in range(3):
        model.encode([text])
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        model.encode([text])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50, help="encodes per row per round")
    ap.add_argument("--passages", type=int, default=256)
    args = ap.parse_args()
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"sentence-transformers' ONNX backend needs optimum.onnxruntime ({exc}): pip install --no-deps optimum optimum-onnx")
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()
    source = embedded_path("minilm-l6")
    with tempfile.TemporaryDirectory(prefix="bench-sentence-") as tmp:
        dirs = {TORCH: source}
        for label, quantize in (("ORT fp32", None), ("ORT int8", "int8")):
            log(f"exporting {label}")
            dirs[label] = slimkit.export("minilm-l6", Path(tmp) / label.replace(" ", "-"),
                                         slimkit.ExportConfig("onnxruntime", quantize=quantize))
        dirs[SLIMKIT_SESSION] = dirs["ORT int8"]
        models = {label: sentence_model(path, args.threads, label) for label, path in dirs.items()}
        texts = D.passages(D.TextSource.parse(None, "evaluation").texts(), limit=args.passages)
        log("embedding the evaluation passages")  # at the model's own max_seq_length (256), as slimkit.evaluate does
        emb = {label: torch.as_tensor(m.encode(texts, batch_size=32, convert_to_numpy=True)) for label, m in models.items()}
        # ST against slimkit one passage at a time: int8's dynamic activation scales are taken over the whole
        # batch, so in a batch a passage's vector depends on its neighbours, and ST sorts passages by length
        exported = [label for label in dirs if label != TORCH]
        single = {label: torch.as_tensor(models[label].encode(texts, batch_size=1, convert_to_numpy=True)) for label in exported}
        with torch.inference_mode():
            own = {label: embed(slimkit.load(str(dirs[label])), texts, batch_size=1, max_length=models[label].max_seq_length)
                   for label in exported}
        long_text = max(texts, key=len)
        if len(models[TORCH].tokenizer(long_text)["input_ids"]) < 128:
            raise SystemExit("the timed passage must fill 128 tokens")
        for m in models.values():
            m.max_seq_length = 128
        runs: dict[str, list[float]] = {label: [] for label in models}
        labels = list(models)
        for r in range(args.rounds):
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                runs[label].append(p50_ms(models[label], long_text, args.iters))
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in runs.items()))
    base = statistics.median(runs[TORCH])
    print("| row | backend | p50 latency ms (batch 1 x 128) | speedup vs PyTorch fp32 | cosine vs PyTorch fp32 | top-10 overlap | cosine ST vs slimkit |")
    print("|---|---|---|---|---|---|---|")
    for label in labels:
        p50 = statistics.median(runs[label])
        cos = F.cosine_similarity(emb[label], emb[TORCH], dim=-1).mean().item()
        overlap = topk_overlap(emb[label], emb[TORCH], 10)
        same = f"{F.cosine_similarity(single[label], own[label], dim=-1).min().item():.5f} (min)" if label in own else "-"
        backend = "torch" if label == TORCH else "onnx" + (" + session option" if label == SLIMKIT_SESSION else "")
        print(f"| {label} | {backend} | {p50:.2f} | {base / p50:.2f}x | {cos:.4f} | {overlap:.3f} | {same} |")
    env = environment(args.threads)
    import onnxruntime
    import sentence_transformers

    print(f"\nRounds: {args.rounds} x {args.iters} encodes per row; {len(texts)} passages. Load average (1 min) at start "
          f"{load[0]:.1f}, at end {os.getloadavg()[0]:.1f}. Environment: {env.get('cpu')}, "
          f"{args.threads} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}, optimum {_version('optimum')}; "
          f"run took {(time.perf_counter() - started) / 60:.1f} min.")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
