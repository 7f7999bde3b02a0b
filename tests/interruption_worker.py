"""Run by tests/reliability/test_interruption.py in processes it kills.

The processes are forked from a multiprocessing fork server that has already
imported torch, transformers, ONNX and slimkit, so a trial costs its own work,
not the 5 seconds of a fresh interpreter's imports. The fork server only
imports; it never runs torch, so each forked child starts clean.
"""

from __future__ import annotations

import copy
import os
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


def fake_bench(artifact: Path, threads: int | None, compile: bool = False):
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
