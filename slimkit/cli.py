"""The `slimkit` command line: a thin shell over the library.

Errors a user can cause print one line and exit 2; `slimkit --debug ...`
shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from slimkit.errors import SlimkitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make PyTorch / Hugging Face models smaller and faster, and measure it honestly.",
)
stdout = Console()
err = Console(stderr=True)
_state = {"debug": False}

ModelArg = Annotated[str, typer.Argument(help="embedded name, HF directory, slimkit artifact, .gguf file or hub id")]
Json = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
Threads = Annotated[int | None, typer.Option(help="CPU threads (default: all cores)")]
Dtype = Annotated[str, typer.Option(help="load as fp32, bf16 or fp16 (auto: as saved; fp32 for non-artifacts)")]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="run custom model code from the model's repository")]
MaxMemory = Annotated[str | None, typer.Option("--max-memory", help="refuse to start if the estimated peak memory exceeds this, e.g. 4GiB or 512M")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False):
    _state["debug"] = debug


def command(name: str):
    """Register a command whose SlimkitErrors become one line and exit code 2."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except SlimkitError as exc:
                if _state["debug"]:
                    raise
                err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None

        return app.command(name)(run)

    return wrap


def _load(source: str, dtype: str, threads: int | None, trust_remote_code: bool = False):
    import torch

    from slimkit.models import load

    dtypes = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise SlimkitError(f"unknown dtype '{dtype}': use one of {', '.join(dtypes)}")
    if threads is not None:
        if threads < 1:
            raise SlimkitError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return load(source, dtype=dtypes[dtype], trust_remote_code=trust_remote_code)


def _guard(command: str, model: str, max_memory: str | None, *also: str | None) -> None:
    """Before loading: refuse past --max-memory, warn past the memory available (slimkit.resources)."""
    from slimkit.resources import guard

    guard(command, model, max_memory, also=also)


def _emit(as_json: bool, payload: dict, tables: list) -> None:
    if as_json:
        stdout.print_json(json.dumps(payload))
    else:
        for t in tables:
            stdout.print(t)


@command("models")
def models_cmd(as_json: Json = False):
    """List the embedded models (they work offline)."""
    from slimkit.display import table
    from slimkit.models import EMBEDDED

    rows = [{"name": m.name, "package": m.pip_name, "description": m.description} for m in EMBEDDED.values()]
    _emit(as_json, {"models": rows}, [table("Embedded models", [(r["name"], r["description"]) for r in rows], ("name", "what it is"))])


@command("eval")
def eval_cmd(
    model: ModelArg,
    reference: Annotated[str | None, typer.Option("--reference", "-r", help="the original model to compare against")] = None,
    data: Annotated[str | None, typer.Option(help="pydoc (default), a .txt/.jsonl file, or hf:NAME[:CONFIG[:SPLIT]]")] = None,
    split: Annotated[str | None, typer.Option(help="calibration, evaluation, heldout or all")] = None,
    window: Annotated[int, typer.Option(help="perplexity window (tokens)")] = 512,
    stride: Annotated[int, typer.Option(help="perplexity stride (tokens)")] = 256,
    max_tokens: Annotated[int | None, typer.Option(help="score at most this many tokens")] = None,
    batch_size: int = 1,
    text_key: Annotated[str, typer.Option(help="text field of .jsonl records")] = "text",
    threads: Threads = None,
    dtype: Dtype = "auto",
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Measure quality: perplexity, KL and top-1 vs a reference, embedding cosine, accuracy."""
    from slimkit.data import TextSource
    from slimkit.display import eval_rows, table
    from slimkit.evaluate import EvalConfig, evaluate

    config = EvalConfig(window=window, stride=stride, max_tokens=max_tokens, batch_size=batch_size)
    source = TextSource.parse(data, split, text_key)
    _guard("eval", model, max_memory, reference)
    lm = _load(model, dtype, threads, trust_remote_code)
    ref = _load(reference, "auto", None, trust_remote_code) if reference else None
    result = evaluate(lm, ref, source, config)
    _emit(as_json, result.to_dict(), [table(f"Quality of {model}", eval_rows(result))])


@command("bench")
def bench_cmd(
    model: ModelArg,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence (prompt length for causal LMs)")] = 128,
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes for throughput")] = "1,4,8",
    new_tokens: Annotated[int, typer.Option(help="decode exactly this many tokens")] = 64,
    threads: Threads = None,
    dtype: Dtype = "auto",
    compiled: Annotated[bool, typer.Option("--compile", help="decode through torch.compile with a static KV cache (about a minute to compile)")] = False,
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Measure speed, memory and size: latency percentiles, throughput, prefill/decode tokens/s."""
    from slimkit.benchmark import benchmark
    from slimkit.display import bench_rows, table

    config = _bench_config(seq_len, batch_sizes, new_tokens, threads, compiled)
    _guard("bench", model, max_memory)
    lm = _load(model, dtype, threads, trust_remote_code)
    result = benchmark(lm, config)
    _emit(as_json, result.to_dict(), [table(f"Speed of {model}", bench_rows(result))])


@command("profile")
def profile_cmd(
    model: Annotated[str, typer.Argument(help="model to profile (default: the embedded smollm2-135m)")] = "smollm2-135m",
    max_tokens: Annotated[int | None, typer.Option(help="score at most this many tokens")] = None,
    threads: Threads = None,
    dtype: Dtype = "auto",
    as_json: Json = False,
):
    """Evaluate and benchmark a model, and print one table."""
    from slimkit.benchmark import benchmark
    from slimkit.display import bench_rows, eval_rows, table
    from slimkit.evaluate import EvalConfig, evaluate

    lm = _load(model, dtype, threads)
    quality = evaluate(lm, config=EvalConfig(max_tokens=max_tokens))
    speed = benchmark(lm, _bench_config(128, "1,4,8", 64, threads))
    _emit(
        as_json,
        {"eval": quality.to_dict(), "bench": speed.to_dict()},
        [table(f"{model}: quality and speed", eval_rows(quality) + bench_rows(speed))],
    )


@command("run")
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="recipe file (.yaml or .json)")],
    out: Annotated[str, typer.Option("--out", help="directory for the resulting artifact")],
    model: Annotated[str | None, typer.Option(help="model to compress (default: the recipe's, else smollm2-135m)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="score at most this many tokens")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out")] = False,
    threads: Threads = None,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Apply a recipe, measure the result against the original, and save the artifact."""
    from slimkit.artifacts import check_destination, save
    from slimkit.benchmark import benchmark
    from slimkit.display import bench_rows, eval_rows, table
    from slimkit.evaluate import EvalConfig, evaluate
    from slimkit.models import DEFAULT_MODEL
    from slimkit.recipe import Recipe

    plan = Recipe.load(recipe)
    confined = plan.confined(out)  # logs and checkpoints go inside OUT, never elsewhere
    check_destination(out, overwrite)
    _guard("run", model or plan.model or DEFAULT_MODEL, max_memory)
    original = _load(model or plan.model or DEFAULT_MODEL, "auto", threads)
    compressed = confined.apply(original)
    quality = evaluate(compressed, original, config=EvalConfig(max_tokens=max_tokens))
    speed = benchmark(compressed, _bench_config(128, "1,4,8", 64, threads))
    metrics = {"eval": quality.to_dict(), "bench": speed.to_dict()}
    kept = confined.written(out)  # OUT may now hold them: checked empty (or --overwrite) above
    path = save(compressed, out, recipe=plan.to_dict(), metrics=metrics, overwrite=overwrite or bool(kept), keep=kept)
    _emit(as_json, {"artifact": str(path), **metrics}, [table(f"{plan.label} -> {path}", eval_rows(quality) + bench_rows(speed))])


@command("optimize")
def optimize_cmd(
    model: Annotated[str, typer.Argument(help="model to optimize (default: the embedded smollm2-135m)")] = "smollm2-135m",
    target: Annotated[str, typer.Option(help="latency, throughput, memory or size")] = "latency",
    max_quality_drop: Annotated[str, typer.Option(help="quality budget, e.g. 1% (perplexity ratio, 1 - cosine)")] = "1%",
    preset: Annotated[str | None, typer.Option(help="latency, throughput, memory, size or edge (default: the target's)")] = None,
    runtime: Annotated[str, typer.Option(help="runtime that will serve the model: auto (torch, and onnxruntime for encoders and "
                                              "classifiers), torch, onnxruntime (encoders, classifiers), ort-genai (causal LMs) "
                                              "or tensorrt (encoders, classifiers; CUDA)")] = "auto",
    time_budget: Annotated[str, typer.Option(help="wall-clock budget for the whole run, e.g. 10m")] = "10m",
    out: Annotated[str, typer.Option(help="output directory: model/, report.html, report.md, results.json")] = "slimkit-out",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out")] = False,
    compiled: Annotated[bool | None, typer.Option("--compile/--no-compile", help="benchmark candidates through torch.compile (default: for the latency target)")] = None,
    seed: Annotated[int, typer.Option(help="seed of every candidate's recipe: the same seed gives the same candidates")] = 0,
    threads: Threads = None,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Search for the fastest / smallest model within a quality budget, and report."""
    import time

    from slimkit.optimize import OptimizeConfig, check_installed, optimize, parse_duration, parse_fraction
    from slimkit.progress import search_progress

    started = time.perf_counter()
    config = OptimizeConfig(target=target, max_quality_drop=parse_fraction(max_quality_drop), preset=preset, runtime=runtime,
                            time_budget_s=parse_duration(time_budget), threads=threads, seed=seed, compile=compiled)
    check_installed(runtime)  # before the model loads: a missing runtime (or GPU) is known without it
    _guard("optimize", model, max_memory)
    with search_progress() as progress:  # the model is not kept here, so the search can drop it from memory
        results = optimize(_load(model, "auto", threads), config, out, overwrite=overwrite, on_progress=progress, started=started)
    from slimkit.report import recommendation

    if as_json:
        _emit(True, results, [])
    else:
        stdout.print(recommendation(results), highlight=False)
        stdout.print(f"model: {out}/model   report: {out}/report.html", highlight=False)


@command("quantize")
def quantize_cmd(
    model: Annotated[str | None, typer.Argument(help="model to quantize (embedded name, HF directory, artifact, .gguf, hub id)")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="quantization method (see --list)")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="artifact directory to write")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="method option KEY=VALUE, repeatable: -o group_size=64 -o ignore=lm_head,q_proj")] = None,
    data: Annotated[str | None, typer.Option(help="calibration text: pydoc (default), a .txt/.jsonl file, or hf:NAME (its calibration split)")] = None,
    list_methods: Annotated[bool, typer.Option("--list", help="list every quantization method and exit")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out directory")] = False,
    threads: Threads = None,
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Quantize a model and save it as an artifact that `eval` and `bench` accept."""
    from slimkit import registry
    from slimkit.artifacts import save
    from slimkit.benchmark import dir_size_mb
    from slimkit.display import table
    from slimkit.quantize import parse_options, quantize
    from slimkit.quantize.common import quantized_modules

    if list_methods:
        rows = [{"name": t.name, "summary": t.summary} for t in registry.techniques("quantize")]
        return _emit(as_json, {"methods": rows}, [table("Quantization methods", [(r["name"], r["summary"]) for r in rows], ("method", "what it does"))])
    missing = [flag for flag, value in (("MODEL", model), ("--method", method), ("--out", out_dir)) if not value]
    if missing:
        raise SlimkitError(f"quantize needs {', '.join(missing)}: e.g. slimkit quantize smollm2-135m --method int8 --out ./smollm2-int8")
    options = parse_options(method, option or [])
    _guard("training" if method == "qat" else "quantize", model, max_memory)
    q = quantize(_load(model, "fp32", threads, trust_remote_code), method, data=data, **options)
    training = {"training": q.manifest["training"]} if "training" in q.manifest else {}  # methods that train (qat)
    path = save(q, out_dir, overwrite=overwrite, metrics=training)
    info = {"model": model, "method": method, "options": options, "out": str(path), "quantized_modules": len(quantized_modules(q.model)),
            "parameters": q.num_parameters(), "size_on_disk_mb": round(dir_size_mb(path), 3), **training}
    _emit(as_json, info, [table(f"Quantized {model} with {method}", [(k, str(v)) for k, v in info.items()])])


@command("sensitivity")
def sensitivity_cmd(
    model: ModelArg,
    method: Annotated[str, typer.Option("--method", "-m", help="quantize method whose per-layer loss to measure")] = "int4-wo",
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="method option KEY=VALUE, repeatable: -o group_size=64")] = None,
    granularity: Annotated[str, typer.Option(help="block (each transformer block's linears together) or layer (each linear)")] = "block",
    metric: Annotated[str, typer.Option(help="auto, kl, ppl (causal LMs) or cosine (encoders)")] = "auto",
    samples: Annotated[int, typer.Option(help="calibration windows to measure on")] = 4,
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 256,
    data: Annotated[str | None, typer.Option(help="calibration text: pydoc (default), a .txt/.jsonl file, or hf:NAME (its calibration split)")] = None,
    threads: Threads = None,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Rank layers (or blocks) by how much quantizing each alone hurts quality, most sensitive first."""
    from slimkit.display import fmt, table
    from slimkit.quantize import parse_options
    from slimkit.quantize.sensitivity import sensitivity

    options = parse_options(method, option or [])
    _guard("quantize", model, max_memory)
    r = sensitivity(_load(model, "fp32", threads), method, options, data=data, granularity=granularity, metric=metric, n_samples=samples, seq_len=seq_len)
    rows = [(f"{i + 1}. {u.name}" + (f" ({len(u.layers)} layers)" if len(u.layers) > 1 else ""), fmt(u.score, 6)) for i, u in enumerate(r.units)]
    title = f"Sensitivity of {model} to {method} ({r.metric} on {r.tokens} calibration tokens, {r.seconds:.0f} s)"
    _emit(as_json, r.to_dict(), [table(title, rows, (r.granularity, r.metric))])


@command("export")
def export_cmd(
    model: ModelArg,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="directory to write (new or empty)")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx, onnxruntime, ort-genai or tensorrt")] = "onnx",
    quantize: Annotated[str | None, typer.Option(help="onnxruntime: int8, int8-static, int4; ort-genai: int4; tensorrt: fp16, int8")] = None,
    block_size: Annotated[int, typer.Option(help="int4: weights per quantization block")] = 32,
    accuracy_level: Annotated[int, typer.Option(help="ort-genai int4/int8: 4 = int8 activations (fast), 0 = fp32 (exact)")] = 4,
    optimize: Annotated[bool, typer.Option(help="onnxruntime: apply transformer fusions")] = True,
    exporter: Annotated[str, typer.Option(help="auto, dynamo (torch.export) or torchscript")] = "auto",
    tolerance: Annotated[float | None, typer.Option(help="parity tolerance (default: the format's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
    threads: Threads = None,
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Export to a deployment runtime (ONNX, ONNX Runtime, onnxruntime-genai, TensorRT), parity-checked."""
    from slimkit.display import table
    from slimkit.export import ExportConfig, export, summary

    config = ExportConfig(fmt, quantize, exporter=exporter, tolerance=tolerance, optimize=optimize, block_size=block_size,
                          accuracy_level=accuracy_level)
    _guard("export", model, max_memory)
    lm = _load(model, "auto", threads, trust_remote_code)
    info = summary(export(lm, out_dir, config, overwrite=overwrite))
    _emit(as_json, info, [table(f"Exported {model}", [(k, str(v)) for k, v in info.items()])])


@command("generate")
def generate_cmd(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option(help="stop after this many tokens")] = 32,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the tokenizer's chat template")] = False,
    compiled: Annotated[bool, typer.Option("--compile", help="decode through torch.compile with a static KV cache")] = False,
    threads: Threads = None,
    as_json: Json = False,
):
    """Generate text greedily with a KV cache (a PyTorch model or an exported directory)."""
    from slimkit.generate import generate

    result = generate(_load(model, "auto", threads), prompt, max_new_tokens, chat=chat, compile=compiled)
    if as_json:
        stdout.print_json(json.dumps(result.to_dict()))
    else:
        stdout.print(result.text, highlight=False, markup=False)
        speed = f", {result.decode_tokens_per_s:.1f} tokens/s" if result.decode_tokens_per_s else ""
        err.print(f"[dim]{result.new_tokens} new tokens{speed}[/]", highlight=False)


@command("prune")
def prune_cmd(
    model: ModelArg,
    method: Annotated[str, typer.Option(help="magnitude, wanda, 2:4 (or any N:M), structured, gradual")],
    out_dir: Annotated[str, typer.Option("--out", help="artifact directory to write")],
    sparsity: Annotated[float | None, typer.Option(help="fraction of weights zeroed; for structured, of parameters removed")] = None,
    recover_minutes: Annotated[float, typer.Option(help="recovery training budget on the calibration split (minutes)")] = 0.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing --out")] = False,
    threads: Threads = None,
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Prune a model (unstructured, N:M or structured) and save it as an artifact."""
    from slimkit.artifacts import save
    from slimkit.display import fmt, table
    from slimkit.prune import cli_options, prune, summary

    name, options = cli_options(method, sparsity, recover_minutes)
    _guard("training" if recover_minutes > 0 else "prune", model, max_memory)
    lm = _load(model, "auto", threads, trust_remote_code)
    pruned = prune(lm, name, **options)
    path = save(pruned, out_dir, overwrite=overwrite)
    info = {**summary(pruned, lm.num_parameters()), "out": str(path)}
    rows = [(k.replace("_", " "), fmt(v)) for k, v in info.items() if k != "layers" and v is not None]
    _emit(as_json, info, [table(f"Pruned {model} with {method}", rows)])


@command("distill")
def distill_cmd(
    teacher: ModelArg,
    out_dir: Annotated[str, typer.Option("--out", help="artifact directory for the trained student")],
    student_layers: Annotated[str, typer.Option(help="N (drop the run of teacher layers that turns the hidden states least) or a comma list of teacher layers to keep")] = "",
    minutes: Annotated[float | None, typer.Option(help="wall-clock training budget")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (default: as many as --minutes allows)")] = None,
    loss: Annotated[str, typer.Option(help="kd: learn from the teacher; ce: labels only, without the teacher (baseline)")] = "kd",
    temperature: float = 1.0,
    alpha: Annotated[float, typer.Option(help="share of KD against hard-label cross-entropy")] = 0.9,
    lr: float = 1e-4,
    batch_size: int = 4,
    seq_len: int = 256,
    dropout: Annotated[float | None, typer.Option(help="the student's dropout while training (default: the model's own; 0 fits faster on short budgets)")] = None,
    hidden_weight: Annotated[float, typer.Option(help="weight of hidden-state matching through --layer-map (0: off)")] = 0.0,
    hidden_loss: Annotated[str, typer.Option(help="hidden-state matching: mse or cosine (per token)")] = "mse",
    layer_map: Annotated[str, typer.Option(help="student:teacher block pairs for hidden matching, e.g. 2:5 (default: each student block and its source)")] = "",
    freeze: Annotated[str, typer.Option(help="comma list of student module names kept as copied, e.g. embeddings")] = "",
    text_views: Annotated[int, typer.Option(help="encoders: cut the training passages this many ways")] = 1,
    cache_teacher: Annotated[str | None, typer.Option(help="cache the teacher's outputs in this directory for repeated epochs")] = None,
    data: Annotated[str | None, typer.Option(help="pydoc (default), a .txt/.jsonl file, or hf:NAME; its calibration split trains")] = None,
    checkpoint_dir: Annotated[str | None, typer.Option(help="write checkpoints here (with --checkpoint-every) and --resume from them")] = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    log_dir: Annotated[str | None, typer.Option(help="write metrics.jsonl (and TensorBoard logs when installed) here")] = None,
    threads: Threads = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing --out directory")] = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Distil a smaller student (fewer layers) from TEACHER and save it as an artifact."""
    import dataclasses

    from slimkit.artifacts import save
    from slimkit.display import table
    from slimkit.distill import DistillConfig, apply

    layers = _layer_spec(student_layers)
    config = DistillConfig(student_layers=layers, minutes=minutes, steps=steps, loss=loss, temperature=temperature, alpha=alpha,
                           lr=lr, batch_size=batch_size, seq_len=seq_len, dropout=dropout, hidden_weight=hidden_weight, hidden_loss=hidden_loss,
                           layer_map=_layer_pairs(layer_map), freeze=tuple(_items(freeze)),
                           text_views=text_views, cache_teacher=cache_teacher, data=data, checkpoint_dir=checkpoint_dir,
                           checkpoint_every=checkpoint_every, resume=resume, log_dir=log_dir)
    _guard("distill", teacher, max_memory)
    student = apply(_load(teacher, "auto", threads), config)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under torchrun: one process writes
        return
    training = student.manifest["training"]
    path = save(student, out_dir, recipe=student.manifest["recipe"], metrics={"training": training}, overwrite=overwrite)
    rows = [(k, str(v)) for k, v in training.items() if k != "history"] + [("artifact", str(path))]
    _emit(as_json, {"artifact": str(path), "config": dataclasses.asdict(config), "training": training}, [table(f"Distilled {teacher}", rows)])


def _items(text: str) -> list[str]:
    """A comma list's non-empty items, stripped."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _layer_pairs(text: str) -> tuple[tuple[int, int], ...] | None:
    """--layer-map "2:5,1:4" as ((2, 5), (1, 4)); empty: None (the default map)."""
    if not text.strip():
        return None
    try:
        return tuple((int(a), int(b)) for a, b in (pair.split(":") for pair in _items(text)))
    except ValueError:
        raise SlimkitError(f"--layer-map takes student:teacher pairs of block numbers, e.g. 2:5 or 1:4,2:5; got '{text}'") from None


def _layer_spec(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in _items(text))
    except ValueError:
        values = ()
    if not values:
        raise SlimkitError(f"--student-layers must be a layer count or a comma list of teacher layers, got '{text}'")
    return values[0] if len(values) == 1 else values


def _bench_config(seq_len: int, batch_sizes: str, new_tokens: int, threads: int | None, compiled: bool = False):
    from slimkit.benchmark import BenchConfig

    try:
        sizes = tuple(int(b) for b in _items(batch_sizes))
    except ValueError:
        raise SlimkitError(f"--batch-sizes must be comma-separated integers, got '{batch_sizes}'") from None
    return BenchConfig(seq_len=seq_len, batch_sizes=sizes, new_tokens=new_tokens, threads=threads, compile=compiled)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
