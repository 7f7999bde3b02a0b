"""Run by tests/reliability/test_interruption.py in processes it kills.

The processes are forked from a multiprocessing fork server that has already
imported torch, transformers, ONNX and slimkit, so a trial costs its own work,
not the 5 seconds of a fresh interpreter's imports. The fork server only
imports; it never runs torch, so each forked child starts clean.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

PRELOAD = ["torch", "transformers", "onnx", "onnxruntime", "torch.onnx", "slimkit.cli", "slimkit.io.artifacts",
           "slimkit.exporters", "slimkit.exporters.onnxruntime", "slimkit.search.loop", "slimkit.measure.quality", "slimkit.report",
           "slimkit.cli.display", "slimkit.io.resources", "transformers.models.bert.modeling_bert",
           "transformers.models.llama.modeling_llama", "transformers.tokenization_utils_tokenizers",
           "transformers.convert_slow_tokenizer", "pydantic", "slimkit.report.plots", "matplotlib.pyplot"]


def nothing() -> None:
    pass


def save_forever(model: str, out: str, ready) -> None:
    """Load `model`, set `ready`, then save it again and again as OUT/run-0, OUT/run-1, ... until killed."""
    import torch

    import slimkit

    torch.set_num_threads(1)
    lm = slimkit.load(model)
    ready.set()
    i = 0
    while True:
        slimkit.save(lm, f"{out}/run-{i}")
        i += 1


def writes_to_disk(event: str, args: tuple) -> bool:
    """Whether an audit event (sys.addaudithook) changes the file system: a file opened
    for writing, a directory made, something renamed or removed."""
    if event == "open":  # (path, mode, flags): mode is None for os.open
        mode, flags = args[1], args[2]
        return (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    return event in {"os.mkdir", "tempfile.mkdtemp", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree",
                     "shutil.copyfile", "shutil.copytree", "shutil.move", "os.symlink", "os.link", "os.truncate"}


def save_killed_at(model: str, out: str, kill_at: int | None, conn) -> None:
    """Load `model` and save it to `out`, dying by SIGKILL just before the save's `kill_at`-th
    change to the file system (counted from 0); never when None, then send the changes it made."""
    import torch

    import slimkit

    torch.set_num_threads(1)
    lm = slimkit.load(model)
    changes: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and writes_to_disk(event, args):
            if len(changes) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            changes.append(f"{event} {os.path.basename(str(args[0]))}")

    sys.addaudithook(hook)  # Python-level operations: the bytes that Rust writes (safetensors, tokenizers) fall between two of them
    slimkit.save(lm, out)
    watching[0] = False
    conn.send(changes)


def export_cli(model: str, out: str) -> None:
    """`slimkit export MODEL --format onnx --out OUT`: the real command line, in this process."""
    import torch

    from slimkit.cli.base import app

    torch.set_num_threads(1)
    sys.argv = ["slimkit", "export", model, "--format", "onnx", "--out", out, "--threads", "1"]
    app()


@dataclass(frozen=True)
class CastConfig:
    pass


def register_cast() -> None:
    """A technique for a fast search: a bf16 cast (smaller on disk, a little worse)."""
    from slimkit.core import registry

    registry.techniques()  # the built-ins first
    if "test-bf16" in {t.name for t in registry.techniques()}:
        return

    def cast(model, config, ctx):
        import torch

        new = copy.deepcopy(model)
        new.model.to(torch.bfloat16)
        return new

    registry.register("test-bf16", "quantize", CastConfig, "bf16 cast")(cast)


def fake_bench(artifact: Path, threads: int | None, compile: bool = False, device: str = "cpu"):
    """Benchmarks write nothing, and a real one is a fresh interpreter per candidate:
    measure only the size on disk, which is what the search's target (size) reads."""
    from bench_stand_in import bench_result

    size = sum(f.stat().st_size for f in Path(artifact).rglob("*") if f.is_file()) / 2**20
    return bench_result(size, 1.0, compile, peak_memory_mb=1.0)


def optimize_run(model: str, out: str) -> None:
    """`slimkit.optimize` on a tiny model: the original and one candidate, then the report."""
    import torch

    import slimkit
    from slimkit.search import measurements, presets
    from slimkit.search.config import OptimizeConfig
    from slimkit.search.loop import optimize

    torch.set_num_threads(1)
    os.environ["SLIMKIT_QUIET"] = "1"
    register_cast()
    presets.PRESETS["test"] = [[("test-bf16", {})]]
    measurements.bench_in_subprocess = fake_bench
    config = OptimizeConfig(target="size", max_quality_drop=0.05, preset="test", proxy_tokens=200, full_tokens=400, threads=1)
    optimize(slimkit.load(model), config, out)
