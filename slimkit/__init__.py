"""slimkit: make PyTorch / Hugging Face models smaller and faster, and prove it.

    import slimkit
    lm = slimkit.load("smollm2-135m")
    q = slimkit.quantize(lm, "int4")
    slimkit.evaluate(q, lm).perplexity
    slimkit.benchmark(q).decode_tokens_per_s

The package is in layers, each importing only from the ones before it:
core < io < quantization, pruning, distillation < exporters < measure < report < search < cli
(README, "Architecture"). Importing slimkit imports the technique and exporter packages,
so every method and runtime is registered before anything is asked of the registry.
"""

import sys

if sys.version_info < (3, 11):  # before any import that would fail on an older Python in a less clear way
    raise ImportError("slimkit needs Python 3.11 or newer, and this is Python {}.{}.{}: install 3.11+ and reinstall slimkit with it".format(*sys.version_info[:3]))

__version__ = "0.1.0"

from slimkit.core.errors import SlimkitError
from slimkit.core.recipe import Recipe
from slimkit.core.registry import Context
from slimkit.distillation import DistillConfig, distill
from slimkit.exporters import ExportConfig, export
from slimkit.io.artifacts import save
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel
from slimkit.io.sources import EMBEDDED
from slimkit.measure.quality import EvalConfig, EvalResult, evaluate
from slimkit.measure.speed import BenchConfig, BenchResult, benchmark
from slimkit.pruning import prune
from slimkit.quantization import quantize
from slimkit.quantization.ranking import sensitivity

__all__ = [
    "EMBEDDED",
    "BenchConfig",
    "BenchResult",
    "Context",
    "DistillConfig",
    "EvalConfig",
    "EvalResult",
    "ExportConfig",
    "LoadedModel",
    "Recipe",
    "SlimkitError",
    "benchmark",
    "distill",
    "evaluate",
    "export",
    "load",
    "prune",
    "quantize",
    "save",
    "sensitivity",
]
