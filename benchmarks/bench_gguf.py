"""slimkit's GGUF files served by llama.cpp, side by side with llama.cpp's own quantizer.

    python benchmarks/bench_gguf.py --threads 2 --max-tokens 4096 --rounds 3 --work /tmp/gguf-bench

Every file is exported from slimkit's SmolLM2-135M (`slimkit export --format gguf`) and loaded
by llama.cpp through llama-cpp-python. Each row is checked first: its logits on a fixed prompt
against PyTorch running the same file's weights, dequantized (what `slimkit.load(file)` reads),
then measured by slimkit's harness through `benchmarks/llamacpp_model.py`: perplexity on the
evaluation split (the same token windows for every row, tokenized once by slimkit's
tokenizer) and decode tokens/s after a 64-token prompt, every row taking one turn per round.

Rows: fp32 and f16; Q8_0 (round-to-nearest, the gguf package's reference quantizer); Q8_0 and
Q4_0 from slimkit's AWQ and GPTQ codes on their grids, carried exactly (Q4_0's block scales
searched for the least importance-weighted error, `scale_search`, as `--method` does); slimkit's
Q4_0 round-to-nearest; and llama.cpp's own `llama_model_quantize` Q4_0 of the f16 file, without
and with an importance matrix. `--types q4_0` measures only the Q4_0 rows (the f16 file is
still written: llama.cpp's quantizer reads it). llama.cpp's `llama-imatrix` tool is not part of llama-cpp-python, so
the matrix is collected here the way it collects it (per linear layer, the mean square of each
input column over the calibration tokens) from the PyTorch model on slimkit's calibration
split, the same text AWQ and GPTQ calibrate on, and handed to the quantizer's C API.

llama-cpp-python is a benchmark-only dependency. When `import llama_cpp` fails this script
builds it from source into the running interpreter (pip, `--no-deps`, so nothing else moves),
without AMX, which crashes in some VMs (RUNTIME-NOTES.md), and prints what it does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
PROMPT = "The def statement introduces a function definition. It must be followed by the function name and"


def ensure_llama_cpp():
    try:
        import llama_cpp

        return llama_cpp
    except ImportError:
        pass
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cmake = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    if " avx512f " in flags:
        cmake += ["-DGGML_AVX512=ON"] + [f"-DGGML_AVX512_{f.upper()}=ON" for f in ("vnni", "bf16") if f" avx512_{f} " in flags]
    env = {**os.environ, "CMAKE_ARGS": " ".join(cmake)}
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", LLAMA_CPP_PYTHON, "diskcache"]
    print(f"llama_cpp is not importable: building it (4-30 min on 2 cores):\n  CMAKE_ARGS='{env['CMAKE_ARGS']}' {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    import llama_cpp

    return llama_cpp


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


TYPES = ("f32", "f16", "q8_0", "q4_0")


def export_rows(lm, work: Path, methods: list[str], reuse: bool, llama_cpp, threads: int, types: tuple[str, ...] = TYPES) -> dict[str, Path]:
    """label -> GGUF file, exported by slimkit (and one quantized by llama.cpp from the f16 file), for the `types` asked."""
    from slimkit.exporters import ExportConfig, export

    plan = [("fp32 (slimkit f32)", "f32", None), ("f16 (slimkit)", "f16", None), ("Q8_0 (slimkit RTN)", "q8_0", None)]
    plan += [(f"Q8_0 (slimkit {m.upper()} codes)", "q8_0", m) for m in methods]
    plan += [(f"Q4_0 (slimkit {m.upper()} codes, searched scales)", "q4_0", m) for m in methods]
    plan += [("Q4_0 (slimkit RTN)", "q4_0", None)]
    files = {}
    for label, qtype, method in plan:
        if qtype not in types and qtype != "f16":  # f16: the source of llama.cpp's own Q4_0 and of the tokenizer check
            continue
        path = work / f"smollm2-{qtype}{'-' + method if method else ''}.gguf"
        if not (reuse and path.exists()):
            t = time.time()
            export(lm, path, ExportConfig("gguf", quantize=qtype, method=method), overwrite=True)
            log(f"exported {path.name} in {time.time() - t:.0f} s")
        files[label] = path
    if "q4_0" not in types:
        return files
    ours = work / "smollm2-q4_0-llama-quantize.gguf"
    if not (reuse and ours.exists()):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = threads
        rc = llama_cpp.llama_model_quantize(str(files["f16 (slimkit)"]).encode(), str(ours).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed with {rc}")
        log(f"llama.cpp quantized {ours.name}")
    files["Q4_0 (llama.cpp llama-quantize of the f16 file)"] = ours
    with_imatrix = work / "smollm2-q4_0-llama-quantize-imatrix.gguf"
    if not (reuse and with_imatrix.exists()):
        llama_quantize_imatrix(llama_cpp, files["f16 (slimkit)"], with_imatrix, importance_matrix(lm), threads)
        log(f"llama.cpp quantized {with_imatrix.name} with an importance matrix")
    files["Q4_0 (llama.cpp llama-quantize, importance matrix)"] = with_imatrix
    return files


def importance_matrix(lm, samples: int = 16, seq_len: int = 512) -> dict[str, np.ndarray]:
    """What llama-imatrix collects, from the PyTorch model: per linear layer (by its GGUF name), the mean
    square of each input column over the calibration split's tokens (the windows AWQ and GPTQ calibrate on)."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    from slimkit.core.data import calibration_batches

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, len(lm.model.model.layers))
    sums, counts, hooks = {}, {}, []

    def collect(name):
        def hook(module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (tokens, K)
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name, module in lm.model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            hooks.append(module.register_forward_pre_hook(collect(names.get_name(f"{name}.weight", try_suffixes=(".weight",)))))
    try:
        with torch.no_grad():
            for ids in calibration_batches(lm.tokenizer, seq_len=seq_len, calibration_samples=samples):
                lm.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}


def llama_quantize_imatrix(llama_cpp, src: Path, dst: Path, imatrix: dict[str, np.ndarray], threads: int) -> None:
    """llama.cpp's Q4_0 quantizer given an importance matrix through its C API (a NULL-named entry ends the array)."""
    import ctypes

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep = []  # the names and arrays must outlive the call
    for i, (name, values) in enumerate(imatrix.items()):
        keep.append((name.encode(), np.ascontiguousarray(values)))
        entries[i].name = keep[-1][0]
        entries[i].data = keep[-1][1].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = values.size
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit("llama_model_quantize with an importance matrix failed")


def dequantized(lm, path: Path) -> torch.nn.Module:
    """The PyTorch model holding the file's weights, dequantized (q/k rows back in Hugging Face's rotary order):
    what `slimkit.load(file)` reads, without converting and caching a safetensors copy per file."""
    import copy

    from gguf import MODEL_ARCH, GGUFReader, dequantize, get_tensor_name_map

    model = copy.deepcopy(lm.model)
    cfg = model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            gname = names.get_name(name, try_suffixes=(".weight",))
            if gname not in tensors:  # the tied head: the embedding
                continue
            t = tensors[gname]
            w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(param.shape)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = w.shape[0] // (cfg.hidden_size // cfg.num_attention_heads)
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(param.shape)
            param.copy_(w)
    return model.eval()


def logit_check(served, lm, path: Path, ids: torch.Tensor) -> dict:
    """llama.cpp's logits on the prompt against the PyTorch model with the same file's dequantized weights."""
    ref = dequantized(lm, path)
    with torch.no_grad():
        want = ref(input_ids=ids).logits[0]  # (T, V)
    got = served(input_ids=ids).logits[0]
    rel = ((got - want).norm() / want.norm()).item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    return {"rel_l2": rel, "top1": top1, "max_abs": (got - want).abs().max().item()}


def tensor_types(path: Path) -> str:
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return ", ".join(f"{n} {k}" for k, n in counts.most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens scored (0: the whole split)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="decode rounds; every row takes one turn per round")
    ap.add_argument("--methods", default="awq,gptq,awq-gptq", help="slimkit methods (export --method) whose codes are carried")
    ap.add_argument("--work", default="gguf-bench", help="directory for the GGUF files")
    ap.add_argument("--reuse", action="store_true", help="measure existing files again instead of exporting")
    ap.add_argument("--types", default=",".join(TYPES), help=f"file types whose rows to measure, of {','.join(TYPES)} "
                    "(q4_0 includes llama.cpp's own Q4_0 rows)")
    args = ap.parse_args()
    types = tuple(t for t in args.types.split(",") if t)
    if not set(types) <= set(TYPES):
        raise SystemExit(f"--types takes {','.join(TYPES)}, got {args.types}")
    llama_cpp = ensure_llama_cpp()
    from llamacpp_model import LlamaCppModel

    import slimkit
    from slimkit.core.arch import CAUSAL_LM
    from slimkit.core.hardware import environment
    from slimkit.io.model import LoadedModel
    from slimkit.measure.quality import EvalConfig
    from slimkit.measure.speed import BenchConfig

    torch.set_num_threads(args.threads)
    started = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lm = slimkit.load("smollm2-135m")
    files = export_rows(lm, work, [m for m in args.methods.split(",") if m], args.reuse, llama_cpp, args.threads, types)
    eval_cfg = EvalConfig(max_tokens=args.max_tokens or None)
    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    torch_q = slimkit.evaluate(lm, config=eval_cfg)
    log(f"PyTorch fp32: ppl {torch_q.perplexity:.3f} on {torch_q.tokens} tokens")

    from slimkit.core.data import TextSource

    text = "\n\n".join(list(TextSource.parse(None, "evaluation").texts())[:20])
    probe = LlamaCppModel(files["f16 (slimkit)"], args.threads).llm
    if "f16" not in types:
        del files["f16 (slimkit)"]
    same = probe.tokenize(text.encode(), add_bos=False, special=False) == lm.tokenizer(text)["input_ids"]
    log(f"llama.cpp's tokenizer from the file {'matches' if same else 'DIFFERS FROM'} slimkit's on {len(text)} characters of evaluation text")
    del probe
    served, rows = {}, {}
    for label, path in files.items():
        model = LlamaCppModel(path, args.threads)
        served[label] = LoadedModel(model, lm.tokenizer, CAUSAL_LM, f"llama.cpp {path.name}", path=None)  # slimkit's tokens for every row
        check = logit_check(model, lm, path, ids)
        q = slimkit.evaluate(served[label], config=eval_cfg)
        rows[label] = {"path": path, "ppl": q.perplexity, "tokens": q.tokens, "check": check, "tps": [],
                       "size": path.stat().st_size / 2**20, "types": tensor_types(path)}
        log(f"{label}: ppl {q.perplexity:.3f}, logits vs PyTorch on the dequantized file rel L2 {check['rel_l2']:.2e}, top-1 {check['top1']:.2f}")
    bench = BenchConfig(seq_len=64, batch_sizes=(1,), new_tokens=args.new_tokens, warmup=1, min_iters=1, min_seconds=0,
                        decode_repeats=1, threads=args.threads, measure_size=False)
    for r in range(args.rounds):
        order = list(served)[r % len(served):] + list(served)[:r % len(served)]  # rotated: drift hits every row alike
        for label in order:
            rows[label]["tps"].append(slimkit.benchmark(served[label], bench).decode_tokens_per_s)
        log(f"round {r + 1}: " + ", ".join(f"{k.split(' (')[0]} {rows[k]['tps'][-1]:.0f}" for k in order))

    fp32 = rows.get("fp32 (slimkit f32)", {"ppl": torch_q.perplexity, "tokens": torch_q.tokens})  # without the row: PyTorch's
    base = rows.get("Q4_0 (llama.cpp llama-quantize of the f16 file)")
    if base is None:  # no Q4_0 rows: ratios against the first row
        base = next(iter(rows.values()))
    for row in rows.values():
        row["tps_median"] = statistics.median(row["tps"])
    print(f"\nSmolLM2-135M GGUF files in llama.cpp {llama_cpp.__version__}: perplexity on {fp32['tokens']} tokens of the "
          f"evaluation split (PyTorch fp32: {torch_q.perplexity:.3f}); decode {args.new_tokens} tokens after a 64-token prompt, "
          f"median of {args.rounds} rotated rounds, {args.threads} threads.\n")
    print("| file | tensor types | size MiB | perplexity | vs fp32 | vs llama.cpp Q4_0 | decode tok/s | vs llama.cpp Q4_0 | logits vs its dequantized weights in PyTorch (rel L2, top-1) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        c = row["check"]
        print(f"| {label} | {row['types']} | {row['size']:.1f} | {row['ppl']:.3f} | {row['ppl'] / fp32['ppl'] - 1:+.2%} | "
              f"{row['ppl'] / base['ppl'] - 1:+.2%} | {row['tps_median']:.1f} | {row['tps_median'] / base['tps_median']:.2f}x | "
              f"{c['rel_l2']:.1e}, {c['top1']:.2f} |")
    print(f"\nllama.cpp's tokenizer read from the file {'gives the same ids as' if same else 'DIFFERS FROM'} slimkit's "
          f"on {len(text)} characters of the evaluation split.")
    print("\nTargets:")
    for label, q8 in rows.items():
        if label.startswith("Q8_0"):
            print(f"  {label} perplexity within +0.5% of fp32: {q8['ppl'] / fp32['ppl'] - 1:+.2%} -> "
                  f"{'met' if q8['ppl'] <= fp32['ppl'] * 1.005 else 'MISSED'}")
    for label, row in rows.items():
        if label.startswith("Q4_0") and "codes" in label:
            gain = 1 - row["ppl"] / base["ppl"]
            speed = row["tps_median"] / base["tps_median"]
            print(f"  {label}: perplexity {gain:.1%} lower than llama.cpp's Q4_0 (target >= 5%: {'met' if gain >= 0.05 else 'MISSED'}); "
                  f"decode {speed:.2f}x (target 0.95-1.05x: {'met' if 0.95 <= speed <= 1.05 else 'MISSED'})")
    imx = rows.get("Q4_0 (llama.cpp llama-quantize, importance matrix)")
    for label, row in rows.items():
        if imx is not None and label.startswith("Q4_0") and "codes" in label:
            print(f"  {label} no worse than llama.cpp's Q4_0 with an importance matrix: {row['ppl']:.3f} vs {imx['ppl']:.3f} -> "
                  f"{'met' if row['ppl'] <= imx['ppl'] else 'MISSED'}")
    env = environment(args.threads)
    print(f"\nEnvironment: {env['cpu']} ({', '.join(env['cpu_features'])}), {args.threads} threads of {env['cores']} cores; "
          f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, llama-cpp-python {llama_cpp.__version__}, "
          f"gguf {version('gguf')}; run took {(time.time() - started) / 60:.1f} min.")


if __name__ == "__main__":
    main()
