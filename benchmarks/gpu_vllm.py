"""On a CUDA GPU, side by side in one run: slimkit's compressed-tensors checkpoints of SmolLM2-135M served by vLLM.

    .venv/bin/python benchmarks/gpu_vllm.py [--rounds 3] [--max-tokens 4096] [--dtype bfloat16] [--graphs]
                                            [--out DIR [--build-only | --reuse]] [--json]

Does vLLM serve what slimkit writes, with the numbers slimkit computes? Each row is
built here from the embedded SmolLM2-135M and written by `slimkit.save`:

  original      fp32 in plain transformers files; vLLM casts it to --dtype. Every speed ratio is to it.
  int4-wo g32   symmetric, embeddings left in float: compressed-tensors pack-quantized W4A16.
  gptq g64      symmetric, embeddings in float, 16 calibration windows: W4A16 as llm-compressor's
                GPTQ writes it, at groups of 64 (its usual 128 does not divide SmolLM2's 576 inputs).
  int8-dynamic  W8A8: int8 weights per channel, int8 activations per token at run time.
  int4 default  `slimkit.quantize(lm, "int4-wo")` as it comes: asymmetric grid (float zero points)
                and int8 embedding rows, written int-quantized, which transformers reads and vLLM is
                not expected to: the row reports what vLLM did, and the run goes on either way.

A row whose manifest names another layout than the one expected is skipped with the reason;
a row that vLLM refuses says so with the first line of vLLM's message. Columns: perplexity on
the evaluation split from vLLM's prompt logprobs and from `slimkit.evaluate` (fp32, on the GPU),
on the same token windows (`core.data.lm_windows` with EvalConfig's window 512 and stride 256
over the first --max-tokens tokens; slimkit's fp32 original reads 12.536 on 4,096 tokens, as in
benchmarks/RESULTS-export.md), and their difference (target: within 1%; the original's row
shows what --dtype alone costs); how many of 32 greedy tokens after a fixed prompt vLLM and
transformers (`from_pretrained`, which reads compressed-tensors, run in --dtype on the GPU) agree
on before they first differ; decode throughput in vLLM (64 prompts of 32 tokens from the
evaluation split, 128 new tokens each, EOS ignored, prefill included) and its ratio to the
original's. Below the table: the vLLM scheme and kernel behind each row's layers (Marlin, the
usual W4A16 kernel, asks in some vLLM versions for input widths divisible by 128, which 576 is
not), load and build times. The embedded model was shipped as a Q4_1 GGUF (groups of 32), so
int4 at groups of 32 re-finds its grid: its small perplexity cost is not what int4 costs a model
trained in float.

Each vLLM engine runs in a process of its own, in-process there
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so a refusal raises vLLM's own message rather than
"engine core initialization failed"), with its share of GPU memory; all stay loaded so that
speeds are taken last, in --rounds rounds: each round times every engine once, starting one
engine later than the round before, so a drift of the GPU's clocks hits all rows alike; a row
reports its median round. At 135M parameters a decode step is bound by kernel launches, not by
reading weights: the ratio says whether the quantized kernels cost time, not what they save on
a large model. Engines run eager by default (`enforce_eager`); --graphs turns on vLLM's
torch.compile and CUDA graphs, at about a minute more per row.

vLLM pins one compressed-tensors version and slimkit writes with 0.20 or newer. Where the two
disagree, build the artifacts where slimkit's is installed (`--out DIR --build-only`, no GPU
needed), copy DIR, and serve them in vLLM's environment with `--out DIR --reuse`.

Needs a CUDA GPU and vLLM (0.10 or newer); elsewhere it exits with code 2 and one line saying
which is missing. Written on a machine without a GPU: this script has not been run yet, and no
result of it is recorded in the repository; about 6 minutes eager is an estimate.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

import slimkit
from slimkit.core import data as D
from slimkit.core.errors import short_reason
from slimkit.core.hardware import environment
from slimkit.measure.quality import EvalConfig

MODEL = "smollm2-135m"
DEVICE = "cuda"  # where slimkit and transformers score
PROMPT = "Python's garbage collector frees memory that"  # the greedy comparison's fixed prompt
GREEDY_TOKENS = 32
BATCH, PROMPT_LEN, NEW_TOKENS = 64, 32, 128
MAX_MODEL_LEN = 1024  # a 512-token window, or 32 + 128 tokens, fit with room to spare
DIFF_TARGET = 0.01
TIMEOUT_S = {"load": 420, "ppl": 120, "greedy": 60, "bench": 120}


@dataclass(frozen=True)
class Artifact:
    name: str
    scheme: str
    method: str | None  # None: the original, saved as it is
    layout: str  # what the manifest must say
    options: dict = field(default_factory=dict)


ARTIFACTS = (
    Artifact("original", "fp32 weights, served in --dtype", None, "transformers"),
    Artifact("int4-wo g32", "W4A16 pack-quantized, symmetric, groups of 32", "int4-wo", "compressed-tensors",
             dict(symmetric=True, embeddings=False, group_size=32)),
    Artifact("gptq g64", "W4A16 pack-quantized, symmetric, groups of 64 (GPTQ)", "gptq", "compressed-tensors",
             dict(symmetric=True, embeddings=False, group_size=64, calibration_samples=16)),
    Artifact("int8-dynamic", "W8A8 int8, dynamic per-token activations", "int8-dynamic", "compressed-tensors"),
    Artifact("int4 default", "W4A16 asymmetric + int8 embedding, int-quantized", "int4-wo", "compressed-tensors"),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def missing() -> str | None:
    """What this machine lacks for the run, or None."""
    lacks = []
    if not torch.cuda.is_available():
        lacks.append(f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)")
    if importlib.util.find_spec("vllm") is None:
        lacks.append("vLLM is not installed (pip install vllm)")
    return "; ".join(lacks) or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens scored by both (default 4096)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"), help="vLLM's and transformers' activation dtype")
    ap.add_argument("--graphs", action="store_true", help="let vLLM compile and capture CUDA graphs (default: eager)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=min(0.3, 0.8 / len(ARTIFACTS)),
                    help="each engine's share of GPU memory (default: 0.8 split over the rows, at most 0.3)")
    ap.add_argument("--out", help="keep the artifacts here (default: a temporary directory)")
    ap.add_argument("--build-only", action="store_true", help="write the artifacts to --out and stop (no GPU needed)")
    ap.add_argument("--reuse", action="store_true", help="with --out: serve the artifacts already there (an earlier run's, "
                    "or built where slimkit's compressed-tensors is installed) instead of building them")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    if (args.reuse or args.build_only) and not args.out:
        ap.error("--reuse and --build-only work on the artifacts in --out DIR: pass --out")
    if args.build_only:
        for row in build_all(slimkit.load(MODEL), Path(args.out), args.reuse):
            print(f"{row['name']}: {row.get('skipped') or row['layout'] + ' layout in ' + row['path']}")
        return
    lacks = missing()
    if lacks:
        print(f"gpu_vllm.py needs a CUDA GPU and vLLM: {lacks}", file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    ctx = mp.get_context("spawn")  # a CUDA parent cannot fork
    engines = [Engine(ctx) for _ in ARTIFACTS]  # they import vLLM while the artifacts are built
    with tempfile.TemporaryDirectory(prefix="slimkit-vllm-") as tmp:
        try:
            rows = measure(Path(args.out or tmp), engines, args)
        finally:
            for engine in engines:
                engine.close()
    env = {**environment(torch.get_num_threads()), "cuda": torch.version.cuda,
           **{name: _version(name) for name in ("vllm", "compressed-tensors")},
           "vllm_dtype": args.dtype, "vllm_mode": "torch.compile + CUDA graphs" if args.graphs else "eager",
           "run_minutes": round((time.perf_counter() - start) / 60, 1)}
    if args.json:
        print(json.dumps({"rows": rows, "environment": env}, indent=2))
    else:
        print(render(rows, env))


# --------------------------------------------------------------------------- the vLLM side


def worker(conn) -> None:
    """One vLLM engine, run in this process, answering the parent's requests over `conn`."""
    os.dup2(2, 1)  # vLLM logs to stdout; the parent's stdout is for the table
    sys.stdout = sys.stderr
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_HOST_IP="127.0.0.1", VLLM_NO_USAGE_STATS="1",
                      DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        import vllm
    except Exception as exc:  # the answer to every request
        vllm, broken = None, f"import vllm failed: {type(exc).__name__}: {exc}"
    llm = None
    while True:
        msg = conn.recv()
        op = msg["op"]
        if op == "quit":
            return
        try:
            if vllm is None:
                reply = {"error": broken}
            elif op == "load":
                begin = time.perf_counter()
                llm = vllm.LLM(model=msg["path"], dtype=msg["dtype"], gpu_memory_utilization=msg["utilization"],
                               enforce_eager=not msg["graphs"], max_model_len=MAX_MODEL_LEN, max_num_seqs=BATCH,
                               enable_prefix_caching=False, seed=0)
                reply = {"load_s": time.perf_counter() - begin, "kernels": kernels(llm)}
            elif op == "ppl":
                reply = prompt_nll(llm, vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), msg["windows"])
            elif op == "greedy":
                params = vllm.SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
                out = llm.generate([{"prompt_token_ids": msg["ids"]}], params, use_tqdm=False)[0]
                reply = {"tokens": list(out.outputs[0].token_ids)}
            elif op == "bench":
                params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
                begin = time.perf_counter()
                outs = llm.generate([{"prompt_token_ids": ids} for ids in msg["prompts"]], params, use_tqdm=False)
                reply = {"seconds": time.perf_counter() - begin, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}
            else:
                reply = {"error": f"unknown request {op!r}"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send(reply)


def prompt_nll(llm, params, windows: list) -> dict:
    """Summed negative log-likelihood of each window's last `n_scored` tokens, from vLLM's prompt logprobs."""
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in windows], params, use_tqdm=False)
    nll, n = 0.0, 0
    for (ids, scored), out in zip(windows, outs):
        logprobs = out.prompt_logprobs  # [None, {token: Logprob}, ...]: entry j scores ids[j] given ids[:j]
        nll -= sum(logprobs[j][ids[j]].logprob for j in range(len(ids) - scored, len(ids)))
        n += scored
    return {"nll": nll, "tokens": n}


def kernels(llm) -> str:
    """Which vLLM scheme and kernel serve the linear layers, counted; best effort across vLLM versions."""
    def names(model):
        found = Counter()
        for module in model.modules():
            scheme = getattr(module, "scheme", None)
            if scheme is not None:
                kernel = getattr(scheme, "kernel", None)
                found[type(scheme).__name__ + (f"/{type(kernel).__name__}" if kernel is not None else "")] += 1
        return dict(found)

    try:
        found = llm.apply_model(names)[0]
    except Exception as exc:
        return f"unknown ({short_reason(exc, 80)})"
    return ", ".join(f"{k} x{v}" for k, v in sorted(found.items())) or "unquantized"


class Engine:
    """The parent's handle on one worker process."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child,), name="vllm-engine")
        self.proc.start()
        child.close()

    def ask(self, op: str, **msg) -> dict:
        try:
            self.conn.send({"op": op, **msg})
            if not self.conn.poll(TIMEOUT_S[op]):
                raise RuntimeError(f"no answer to '{op}' within {TIMEOUT_S[op]} s")
            reply = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"the vLLM process ended during '{op}' (exit code {self.proc.exitcode})") from exc
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send({"op": "quit"})
            except OSError:
                pass
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# --------------------------------------------------------------------------- the run


def build_all(source, work: Path, reuse: bool) -> list[dict]:
    """One row per artifact, built into `work`; a row that cannot be served as planned says why in `skipped`."""
    rows = []
    for spec in ARTIFACTS:
        row = {"name": spec.name, "scheme": spec.scheme}
        rows.append(row)
        log(f"building {spec.name}")
        try:
            row.update(build(source, spec, work / spec.name.replace(" ", "-"), reuse))
        except Exception as exc:
            row["skipped"] = f"not built: {type(exc).__name__}: {exc}"
        else:
            if row["layout"] != spec.layout:
                row["skipped"] = f"written in the {row['layout']} layout, not {spec.layout}"
    return rows


def build(source, spec: Artifact, out: Path, reuse: bool) -> dict:
    """Write `spec`'s artifact to `out` (or, with `reuse`, take the one already there)."""
    start = time.perf_counter()
    if not (reuse and (out / "slimkit.json").exists()):
        lm = source if spec.method is None else slimkit.quantize(source, spec.method, **spec.options)
        slimkit.save(lm, out, overwrite=True)
    manifest = json.loads((out / "slimkit.json").read_text())
    return {"path": str(out), "layout": manifest.get("layout"), "build_s": round(time.perf_counter() - start, 1),
            "size_mb": round(sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2**20, 1)}


def hf_greedy(path: str, ids: list[int], dtype: torch.dtype) -> list[int]:
    """GREEDY_TOKENS argmax tokens after `ids` from plain transformers, no cache and no logits processors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE).eval()
    seq = torch.tensor([ids], device=DEVICE)  # (1, T)
    with torch.inference_mode():
        for _ in range(GREEDY_TOKENS):
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    del model
    return seq[0, len(ids):].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(work: Path, engines: list[Engine], args) -> list[dict]:
    source = slimkit.load(MODEL)
    config = EvalConfig(max_tokens=args.max_tokens)
    texts = D.TextSource.parse(None)  # the evaluation split, as slimkit.evaluate reads it
    windows = list(D.lm_windows(source.tokenizer, texts.texts(), config.window, config.stride, config.max_tokens))
    stream = next(D.lm_windows(source.tokenizer, texts.texts(), BATCH * PROMPT_LEN, BATCH * PROMPT_LEN))[0]
    prompts = [stream[i * PROMPT_LEN:(i + 1) * PROMPT_LEN] for i in range(BATCH)]
    prompt_ids = source.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    dtype = getattr(torch, args.dtype)

    rows = build_all(source, work, args.reuse)
    for row in rows:  # slimkit's side first; the engines take the GPU's memory after
        if "skipped" in row:
            continue
        log(f"slimkit.evaluate {row['name']} on {DEVICE}")
        try:
            lm = slimkit.load(row["path"])
            lm.model.to(DEVICE)
            ours = slimkit.evaluate(lm, config=config)
            row["slimkit_ppl"], row["slimkit_tokens"] = ours.perplexity, ours.tokens
            del lm
        except Exception as exc:
            row["slimkit_error"] = f"{type(exc).__name__}: {exc}"
        try:
            row["hf_greedy"] = hf_greedy(row["path"], prompt_ids, dtype)
        except Exception as exc:
            row["hf_error"] = f"{type(exc).__name__}: {exc}"
        torch.cuda.empty_cache()

    live = []
    for row, engine in zip(rows, engines):
        if "skipped" in row:
            engine.close()
            continue
        log(f"vLLM: loading {row['name']}")
        try:
            row.update(engine.ask("load", path=row["path"], dtype=args.dtype, utilization=args.gpu_memory_utilization, graphs=args.graphs))
        except RuntimeError as exc:
            row["vllm_refused"] = str(exc)
            engine.close()
            continue
        try:
            scored = engine.ask("ppl", windows=windows)
            row["vllm_ppl"], row["vllm_tokens"] = math.exp(scored["nll"] / scored["tokens"]), scored["tokens"]
            row["vllm_greedy"] = engine.ask("greedy", ids=prompt_ids)["tokens"]
            engine.ask("bench", prompts=prompts)  # warm-up
        except RuntimeError as exc:
            row["vllm_error"] = str(exc)
            continue
        live.append((row, engine))

    for r in range(args.rounds):
        turn = live[r % len(live):] + live[:r % len(live)] if live else []
        for row, engine in turn:
            if "vllm_error" in row:
                continue
            log(f"round {r + 1}/{args.rounds}: {row['name']}")
            try:
                b = engine.ask("bench", prompts=prompts)
                row.setdefault("rounds_tokens_per_s", []).append(b["tokens"] / b["seconds"])
            except RuntimeError as exc:
                row["vllm_error"] = str(exc)

    base = rows[0].get("rounds_tokens_per_s")
    for row in rows:
        if "vllm_ppl" in row and "slimkit_ppl" in row:
            row["difference"] = row["vllm_ppl"] / row["slimkit_ppl"] - 1
        if "vllm_greedy" in row and "hf_greedy" in row:
            row["greedy_prefix"] = common_prefix(row["vllm_greedy"], row["hf_greedy"])
        if row.get("rounds_tokens_per_s"):
            row["tokens_per_s"] = statistics.median(row["rounds_tokens_per_s"])
            if base:
                row["vs_original"] = row["tokens_per_s"] / statistics.median(base)
    return rows


def render(rows: list[dict], env: dict) -> str:
    lines = [f"| artifact ({MODEL}) | scheme | vLLM loads? | vLLM ppl | slimkit ppl | difference | greedy prefix "
             f"| tokens/s ({BATCH} x {NEW_TOKENS}) | x original |", "|" + "---|" * 9]
    notes = []
    for r in rows:
        if "skipped" in r:
            loads = f"skipped: {_brief(r['skipped'], 100)}"
        elif "vllm_refused" in r:
            loads = f"refused: {_brief(r['vllm_refused'], 100)}"
        else:
            loads = "yes" if "vllm_error" not in r else f"yes, then failed: {_brief(r['vllm_error'], 80)}"
        diff = (f"{r['difference']:+.2%} ({'ok' if abs(r['difference']) <= DIFF_TARGET else f'over {DIFF_TARGET:.0%}'})"
                if "difference" in r else "")
        prefix = f"{r['greedy_prefix']}/{GREEDY_TOKENS}" if "greedy_prefix" in r else ""
        lines.append(f"| {r['name']} | {r['scheme']} | {loads} | {_num(r, 'vllm_ppl', '.4f')} | {_num(r, 'slimkit_ppl', '.4f')} "
                     f"| {diff} | {prefix} | {_num(r, 'tokens_per_s', ',.0f')} | {_num(r, 'vs_original', '.2f')}{'x' if 'vs_original' in r else ''} |")
        if "path" in r:
            notes.append(f"* {r['name']}: {r['layout']} layout, {r['size_mb']} MiB, built in {r['build_s']} s"
                         + (f"; vLLM loaded it in {r['load_s']:.1f} s, kernels: {r['kernels']}" if "load_s" in r else "")
                         + (f"; tokens scored: vLLM {r['vllm_tokens']}, slimkit {r.get('slimkit_tokens')}" if "vllm_tokens" in r else "")
                         + (f"; vLLM's refusal: {' / '.join(r['vllm_refused'].split(chr(10)))[:600]}" if "vllm_refused" in r else "")
                         + (f"; slimkit failed: {_brief(r['slimkit_error'], 120)}" if "slimkit_error" in r else "")
                         + (f"; transformers failed: {_brief(r['hf_error'], 120)}" if "hf_error" in r else ""))
    lines += ["", *notes, "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
    return "\n".join(lines)


def _brief(text: str, limit: int) -> str:
    """The first line of a message, for a table cell (the JSON keeps it whole)."""
    return short_reason(Exception(text.replace("|", "/")), limit)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _num(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else ""


if __name__ == "__main__":
    main()
