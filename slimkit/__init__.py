"""slimkit: make PyTorch / Hugging Face models smaller and faster, and prove it.

    import slimkit
    lm = slimkit.load("smollm2-135m")
    slimkit.evaluate(lm).perplexity
    slimkit.benchmark(lm).decode_tokens_per_s
"""

__version__ = "0.1.0"

from slimkit.artifacts import save
from slimkit.benchmark import BenchConfig, BenchResult, benchmark
from slimkit import distill  # a package that is also callable: slimkit.distill(teacher, ...)
from slimkit.distill import DistillConfig
from slimkit.errors import SlimkitError
from slimkit.evaluate import EvalConfig, EvalResult, evaluate
from slimkit.models import EMBEDDED, LoadedModel, load
from slimkit.quantize import quantize
from slimkit.quantize.sensitivity import sensitivity
from slimkit.prune import prune

__all__ = [
    "EMBEDDED",
    "BenchConfig",
    "BenchResult",
    "DistillConfig",
    "EvalConfig",
    "EvalResult",
    "LoadedModel",
    "SlimkitError",
    "benchmark",
    "distill",
    "evaluate",
    "load",
    "quantize",
    "prune",
    "save",
    "sensitivity",
]
