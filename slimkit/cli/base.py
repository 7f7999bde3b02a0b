"""The command line's shared parts: the Typer app, the `command` decorator that turns
SlimkitErrors into one line and exit code 2, the options every command spells alike,
and loading a model from a CLI string."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from slimkit.core import progress
from slimkit.core.errors import SlimkitError
from slimkit.io.loader import load
from slimkit.io.resources import guard
from slimkit.io.serving import how_to_serve, serving_lines
from slimkit.measure.speed import BenchConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make PyTorch / Hugging Face models smaller and faster, and measure it honestly.",
)
stdout = Console()
err = Console(stderr=True)
state = {"debug": False}

ModelArg = Annotated[str, typer.Argument(help="embedded name, HF directory, slimkit artifact, .gguf file or hub id")]
Json = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
Threads = Annotated[int | None, typer.Option(help="CPU threads (default: all cores)")]
Dtype = Annotated[str, typer.Option(help="load as fp32, bf16 or fp16 (auto: as saved; fp32 for non-artifacts)")]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="run custom model code from the model's repository")]
MaxMemory = Annotated[str | None, typer.Option("--max-memory", help="refuse to start if the estimated peak memory exceeds this, e.g. 4GiB or 512M")]
Options = Annotated[list[str] | None, typer.Option("--option", "-o", help="method option KEY=VALUE, repeatable: -o group_size=64 -o ignore=lm_head,q_proj")]
Data = Annotated[str | None, typer.Option(help="calibration text: pydoc (default), a .txt/.jsonl file, or hf:NAME (its calibration split)")]
Seed = Annotated[int, typer.Option(help="seeds every random choice of the method: the same seed gives the same model")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out directory")]
Device = Annotated[str, typer.Option(help="where the model runs: cpu, cuda (or cuda:N) or auto (cuda where torch sees a GPU, else cpu)")]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    log_every: Annotated[float | None, typer.Option("--log-every", help="seconds between progress lines when stderr is not a "
                                                    "terminal (default 10, or $SLIMKIT_LOG_EVERY)")] = None,
):
    state["debug"] = debug
    if log_every is not None:
        os.environ["SLIMKIT_LOG_EVERY"] = str(log_every)  # the library and any process it starts read it there
    try:
        progress.log_every()
    except SlimkitError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def command(name: str):
    """Register a command whose SlimkitErrors become one line and exit code 2."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except SlimkitError as exc:
                if state["debug"]:
                    raise
                err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None

        return app.command(name)(run)

    return wrap


def load_model(source: str, dtype: str, threads: int | None, trust_remote_code: bool = False, lazy: bool = False):
    import torch

    dtypes = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise SlimkitError(f"unknown dtype '{dtype}': use one of {', '.join(dtypes)}")
    if threads is not None:
        if threads < 1:
            raise SlimkitError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return load(source, dtype=dtypes[dtype], trust_remote_code=trust_remote_code, lazy=lazy)


def check_memory(command: str, model: str, max_memory: str | None, *also: str | None, blockwise: dict | None = None) -> None:
    """Before loading: refuse past --max-memory, warn past the memory available (slimkit.io.resources)."""
    guard(command, model, max_memory, also=also, blockwise=blockwise)


def emit(as_json: bool, payload: dict, tables: list, served: Path | None = None) -> None:
    """Print `payload` as JSON, or the tables; then, for a written model at `served`, how to load it in each runtime."""
    ways = how_to_serve(served) if served is not None else []
    if as_json:
        stdout.print_json(json.dumps({**payload, "serve": [w.to_dict() for w in ways]} if ways else payload))
        return
    for t in tables:
        stdout.print(t)
    show_serving(ways)


def show_serving(ways: list) -> None:
    """The lines that load a written model in each runtime, last, as they should be pasted."""
    if ways:
        stdout.print("\nServe it:", highlight=False)
        for line in serving_lines(ways):
            stdout.print(line, highlight=False, markup=False, soft_wrap=True)


def items(text: str) -> list[str]:
    """A comma list's non-empty items, stripped."""
    return [v.strip() for v in text.split(",") if v.strip()]


def bench_config(seq_len: int, batch_sizes: str, new_tokens: int, threads: int | None, compiled: bool = False):
    try:
        sizes = tuple(int(b) for b in items(batch_sizes))
    except ValueError:
        raise SlimkitError(f"--batch-sizes must be comma-separated integers, got '{batch_sizes}'") from None
    return BenchConfig(seq_len=seq_len, batch_sizes=sizes, new_tokens=new_tokens, threads=threads, compile=compiled)
