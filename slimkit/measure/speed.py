"""Speed, memory and size of a model, measured in the runtime that serves it.

  * latency: one sequence of `seq_len` tokens through the model, after
    warm-up, repeated until both `min_iters` and `min_seconds` are reached;
    p50/p90/p99 in milliseconds. For a causal LM this is the prefill of a
    `seq_len`-token prompt (only the last position's logits, as generation
    does), so prefill tokens/s = seq_len / p50.
  * throughput at several batch sizes (sequences/s and tokens/s).
  * decode tokens/s (causal LMs): greedy decoding with a KV cache for exactly
    `new_tokens` tokens after the prompt (no stop at EOS); only the decode
    steps are timed; the median of `decode_repeats` runs. With `compile`,
    through `torch.compile` and a static cache (decoding.py); the result says
    which runtime decoded (`decode_runtime`) and how long compiling took.
    For encoders and classifiers, `compile` runs latency and throughput
    through `torch.compile`d forwards instead; `compile_seconds` is the first
    call's (batch 1; other batch sizes compile again in their warm-up).
  * peak memory: the process's peak resident set size while benchmarking
    (its high-water mark is reset first where Linux allows), and CUDA's peak
    allocation on a GPU.
  * size on disk: the model saved as a slimkit artifact, bytes counted on disk
    (weights, config and tokenizer), not numel x element size; an exported
    directory (slimkit.export) is measured as it lies, file by file.

Threads are fixed (`threads`, default: all cores) and recorded with the CPU
model and library versions.

A `BenchResult` crosses process boundaries as JSON: `slimkit bench --json`
prints `to_dict()`, and `BenchResult.from_dict` reads it back (the search
benchmarks every candidate in a fresh process, so peak memory is its own).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from slimkit.core import data as D
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import environment, resolve_device
from slimkit.core.memory import peak_rss_mb
from slimkit.core.progress import status
from slimkit.io.artifacts import save
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel, placed
from slimkit.measure.decoding import CompiledDecoder, is_pytorch


@dataclass(frozen=True)
class BenchConfig:
    seq_len: int = 128
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    new_tokens: int = 64
    warmup: int = 2
    min_iters: int = 10
    min_seconds: float = 2.0
    max_iters: int = 200
    decode_repeats: int = 3
    threads: int | None = None
    measure_size: bool = True
    compile: bool = False  # decode through torch.compile with a static KV cache (measure.decoding)

    def __post_init__(self):
        checks = {
            "seq_len": self.seq_len >= 1,
            "new_tokens": self.new_tokens >= 1,
            "warmup": self.warmup >= 0,
            "min_iters": self.min_iters >= 1,
            "max_iters": self.max_iters >= self.min_iters,
            "decode_repeats": self.decode_repeats >= 1,
            "batch_sizes": bool(self.batch_sizes) and all(b >= 1 for b in self.batch_sizes),
            "threads": self.threads is None or self.threads >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise SlimkitError(f"benchmark setting {name}={getattr(self, name)!r} is out of range: use positive numbers")


@dataclass
class Latency:
    p50: float
    p90: float
    p99: float
    mean: float
    iterations: int


@dataclass
class BenchResult:
    model: str
    kind: str
    dtype: str
    device: str
    threads: int
    seq_len: int
    latency_ms: Latency
    throughput: list[dict] = field(default_factory=list)
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    new_tokens: int | None = None
    decode_runtime: str | None = None  # "eager" or "torch.compile"
    compile_seconds: float | None = None
    peak_memory_mb: float | None = None
    cuda_peak_memory_mb: float | None = None
    parameters: int = 0
    size_on_disk_mb: float | None = None
    weights_on_disk_mb: float | None = None
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BenchResult:
        """The result back from what `to_dict` wrote (`slimkit bench --json`, read by a process that
        ran the benchmark in another); a key this version does not write is an error, not dropped."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise SlimkitError(f"not a benchmark result of this slimkit version (unknown keys {', '.join(unknown)}): "
                               "run the benchmark with the same slimkit")
        return cls(**{**data, "latency_ms": Latency(**data["latency_ms"])})

    @property
    def best_tokens_per_s(self) -> float:
        """The highest throughput over the measured batch sizes, in tokens/s."""
        return max(t["tokens_per_s"] for t in self.throughput)


def benchmark(model: LoadedModel | str, config: BenchConfig = BenchConfig(), *, tokenizer=None, device: str | None = None) -> BenchResult:
    """Measure `model`'s latency, throughput, decode speed, memory and size.

    Runs in this process. A transformers model object (with its `tokenizer=`, which
    makes the real-text input and the saved size) is measured where it lies, so peak
    memory includes whatever else the caller's process holds; size on disk comes from
    saving it to a temporary artifact. `device` ("cpu", "cuda", "auto"; None: where the
    model is) is where it runs; the model goes back where it was afterwards."""
    device = resolve_device(device)
    lm = load(model, tokenizer=tokenizer)
    with placed(lm, device=device):
        result = _benchmark(lm, config)
    if config.measure_size:  # saved from where the model lives at rest: the same files whatever the device
        result.size_on_disk_mb, result.weights_on_disk_mb = size_on_disk(lm)
    return result


def _benchmark(lm: LoadedModel, config: BenchConfig) -> BenchResult:
    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = getattr(lm.model, "slimkit_device", None) or next((p.device for p in lm.model.parameters()), torch.device("cpu"))
    result = BenchResult(
        model=lm.name,
        kind=lm.kind,
        dtype=getattr(lm.model, "slimkit_dtype", None) or str(next((p.dtype for p in lm.model.parameters()), torch.float32)).replace("torch.", ""),
        device=str(device),
        threads=threads,
        seq_len=config.seq_len,
        latency_ms=Latency(0, 0, 0, 0, 0),
        parameters=lm.num_parameters(),
        environment=environment(threads),
    )
    sample = sample_inputs(lm, config.seq_len, device)
    runner = lm  # what latency and throughput run
    if config.compile and lm.kind != CAUSAL_LM:
        runner = compiled_forward(lm)
    memory = PeakMemory(device)
    with memory, torch.inference_mode():
        if runner is not lm:  # a compiled forward: its first call compiles
            start = time.perf_counter()
            with status("Compiling the forward"):
                _forward(runner, sample)
            result.compile_seconds = round(time.perf_counter() - start, 1)
        with status(f"Measuring latency ({config.seq_len} tokens)"):
            times = timed(lambda: _forward(runner, sample), config)
        result.latency_ms = latency_stats(times)
        if lm.kind == CAUSAL_LM:
            result.prefill_tokens_per_s = config.seq_len * 1000 / result.latency_ms.p50
        for bs in config.batch_sizes:
            batch = {k: v.expand(bs, -1).contiguous() for k, v in sample.items()}
            with status(f"Measuring throughput at batch size {bs}"):
                t = timed(lambda: _forward(runner, batch), config, min_iters=3, warmup=1)
            per_s = bs / statistics.median(t)
            result.throughput.append({"batch_size": bs, "sequences_per_s": per_s, "tokens_per_s": per_s * config.seq_len})
        if lm.kind == CAUSAL_LM:
            decode = _decode
            if config.compile:
                decoder = CompiledDecoder(lm, config.seq_len + config.new_tokens + 1)
                decode = lambda lm, prompt, n: _decode_compiled(decoder, prompt, n)  # noqa: E731
            label = "compiling and measuring" if config.compile else "Measuring"
            with status(f"{label} decode ({config.new_tokens} new tokens)"):
                decode(lm, sample["input_ids"], min(config.new_tokens, 4))  # warm-up (and compilation)
                runs = [decode(lm, sample["input_ids"], config.new_tokens) for _ in range(config.decode_repeats)]
            result.decode_tokens_per_s = config.new_tokens / statistics.median(runs)
            result.new_tokens = config.new_tokens
            result.decode_runtime = "torch.compile" if config.compile else "eager"
            if config.compile:
                result.compile_seconds = round(decoder.compile_seconds, 1)
    result.peak_memory_mb, result.cuda_peak_memory_mb = memory.peak_mb, memory.cuda_peak_mb
    return result


# --------------------------------------------------------------------------- inputs and runs


def sample_inputs(lm: LoadedModel, seq_len: int, device) -> dict[str, torch.Tensor]:
    """One real-text sequence of exactly `seq_len` tokens from the evaluation split."""
    ids: list[int] = []
    for chunk in D.token_stream(lm.tokenizer, D.TextSource.parse(None, "evaluation").texts()):
        ids.extend(chunk)
        if len(ids) >= seq_len:
            break
    while len(ids) < seq_len:  # a tiny corpus: repeat it
        ids = ids + ids
    input_ids = torch.tensor([ids[:seq_len]], device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if lm.kind != CAUSAL_LM and "token_type_ids" in getattr(lm.tokenizer, "model_input_names", []):
        inputs["token_type_ids"] = torch.zeros_like(input_ids)
    return inputs


def compiled_forward(lm: LoadedModel) -> LoadedModel:
    """`lm` with its forward compiled by torch.compile (each new input shape compiles once, in the warm-up)."""
    import dataclasses

    if not is_pytorch(lm.model):
        raise SlimkitError(f"{lm.name} cannot be compiled: --compile is for PyTorch models (exports run in their own runtime)")
    return dataclasses.replace(lm, model=torch.compile(lm.model, dynamic=False))


def _forward(lm: LoadedModel, inputs: dict):
    if lm.kind == CAUSAL_LM:
        return lm.model(**inputs, use_cache=True, logits_to_keep=1)
    return lm.model(**inputs)


def _decode(lm: LoadedModel, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for `new_tokens` greedy decode steps after prefilling `prompt`."""
    out = lm.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = lm.model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    return time.perf_counter() - start


def _decode_compiled(decoder, prompt: torch.Tensor, new_tokens: int) -> float:
    """As `_decode`, through a CompiledDecoder (static cache, compiled step)."""
    nxt = decoder.prefill(prompt).argmax(-1, keepdim=True)
    _sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        nxt = decoder.step(nxt).argmax(-1, keepdim=True)
    _sync(prompt.device)
    return time.perf_counter() - start


def timed(fn, config: BenchConfig, min_iters: int | None = None, warmup: int | None = None) -> list[float]:
    """Seconds per call, after warm-up, until both min_iters and min_seconds are reached."""
    min_iters = config.min_iters if min_iters is None else min_iters
    for _ in range(config.warmup if warmup is None else warmup):
        fn()
    device = torch.device("cuda") if torch.cuda.is_available() else None
    times: list[float] = []
    total = 0.0
    while len(times) < config.max_iters and (len(times) < min_iters or total < config.min_seconds):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        total += times[-1]
    return times


def latency_stats(seconds: list[float]) -> Latency:
    ms = sorted(s * 1000 for s in seconds)

    def pct(q: float) -> float:  # linear interpolation between closest ranks
        pos = (len(ms) - 1) * q
        lo = int(pos)
        hi = min(lo + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (pos - lo)

    return Latency(p50=pct(0.5), p90=pct(0.9), p99=pct(0.99), mean=sum(ms) / len(ms), iterations=len(ms))


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- memory and size


class PeakMemory:
    """Peak RSS (and CUDA peak) over a `with` block.

    Linux keeps a per-process high-water mark (VmHWM) that writing 5 to
    /proc/self/clear_refs resets; where that is not allowed the mark covers the
    process's whole life, which can only overstate the peak.
    """

    def __init__(self, device=None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.peak_mb: float | None = None
        self.cuda_peak_mb: float | None = None

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.peak_mb = peak_rss_mb()
        if self.cuda:
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        return False


def dir_size_mb(path: Path, pattern: str = "*") -> float:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file()) / 2**20


def size_on_disk(lm: LoadedModel) -> tuple[float, float]:
    """(whole artifact, weight files) in MiB, from a real save."""
    if lm.manifest.get("runtime", "torch") != "torch" and lm.path is not None:  # exported: its own files
        weights = lm.manifest.get("weights", [])
        return dir_size_mb(lm.path), sum((lm.path / w).stat().st_size for w in weights) / 2**20
    with tempfile.TemporaryDirectory(prefix="slimkit-size-") as tmp:
        with status("Saving to measure size on disk"):
            out = save(lm, Path(tmp) / "model")
        return dir_size_mb(out), dir_size_mb(out, "*.safetensors")
