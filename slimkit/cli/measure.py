"""Commands that measure a model: models, eval, bench, profile, generate."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from slimkit.cli.base import Device, Dtype, Json, MaxMemory, ModelArg, Threads, TrustRemote, bench_config, check_memory, command, emit, err, load_model, stdout
from slimkit.cli.display import bench_rows, eval_rows, table
from slimkit.core.data import TextSource
from slimkit.core.hardware import resolve_device
from slimkit.io.sources import EMBEDDED
from slimkit.measure.generation import generate
from slimkit.measure.quality import EvalConfig, evaluate
from slimkit.measure.speed import benchmark


@command("models")
def models_cmd(as_json: Json = False):
    """List the embedded models (they work offline)."""
    rows = [{"name": m.name, "package": m.pip_name, "description": m.description} for m in EMBEDDED.values()]
    emit(as_json, {"models": rows}, [table("Embedded models", [(r["name"], r["description"]) for r in rows], ("name", "what it is"))])


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
    device: Device = "cpu",
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Measure quality: perplexity, KL and top-1 vs a reference, embedding cosine, accuracy."""
    config = EvalConfig(window=window, stride=stride, max_tokens=max_tokens, batch_size=batch_size)
    device = resolve_device(device)
    source = TextSource.parse(data, split, text_key)
    check_memory("eval", model, max_memory, reference)
    lm = load_model(model, dtype, threads, trust_remote_code)
    ref = load_model(reference, "auto", None, trust_remote_code) if reference else None
    result = evaluate(lm, ref, source, config, device=device)
    emit(as_json, result.to_dict(), [table(f"Quality of {model}", eval_rows(result))])


@command("bench")
def bench_cmd(
    model: ModelArg,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence (prompt length for causal LMs)")] = 128,
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes for throughput")] = "1,4,8",
    new_tokens: Annotated[int, typer.Option(help="decode exactly this many tokens")] = 64,
    threads: Threads = None,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    compiled: Annotated[bool, typer.Option("--compile", help="decode through torch.compile with a static KV cache (about a minute to compile)")] = False,
    trust_remote_code: TrustRemote = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
):
    """Measure speed, memory and size: latency percentiles, throughput, prefill/decode tokens/s."""
    config = bench_config(seq_len, batch_sizes, new_tokens, threads, compiled)
    device = resolve_device(device)
    check_memory("bench", model, max_memory)
    lm = load_model(model, dtype, threads, trust_remote_code)
    result = benchmark(lm, config, device=device)
    emit(as_json, result.to_dict(), [table(f"Speed of {model}", bench_rows(result))])


@command("profile")
def profile_cmd(
    model: Annotated[str, typer.Argument(help="model to profile (default: the embedded smollm2-135m)")] = "smollm2-135m",
    max_tokens: Annotated[int | None, typer.Option(help="score at most this many tokens")] = None,
    threads: Threads = None,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: Json = False,
):
    """Evaluate and benchmark a model, and print one table."""
    device = resolve_device(device)
    lm = load_model(model, dtype, threads)
    quality = evaluate(lm, config=EvalConfig(max_tokens=max_tokens), device=device)
    speed = benchmark(lm, bench_config(128, "1,4,8", 64, threads), device=device)
    emit(
        as_json,
        {"eval": quality.to_dict(), "bench": speed.to_dict()},
        [table(f"{model}: quality and speed", eval_rows(quality) + bench_rows(speed))],
    )


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
    result = generate(load_model(model, "auto", threads), prompt, max_new_tokens, chat=chat, compile=compiled)
    if as_json:
        stdout.print_json(json.dumps(result.to_dict()))
    else:
        stdout.print(result.text, highlight=False, markup=False)
        speed = f", {result.decode_tokens_per_s:.1f} tokens/s" if result.decode_tokens_per_s else ""
        err.print(f"[dim]{result.new_tokens} new tokens{speed}[/]", highlight=False)
