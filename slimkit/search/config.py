"""The settings of a search: `OptimizeConfig` (validated where it is built, each error naming the fix),
the `Target` a run optimizes for, and the parsing of the CLI's durations and fractions.

A target names the candidate metric it ranks by (`Target.metric`, also `target_metric` in
results.json): measured speeds and memory are noisy, so the ranking treats values within
`tie_tolerance` of the best as a tie; size on disk is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import resolve_device
from slimkit.search.presets import PRESETS, RUNTIMES, TARGETS


@dataclass(frozen=True)
class Target:
    name: str
    metric: str  # a benchmark figure of a candidate's metrics (`Speed`), and its key in results.json
    label: str
    higher_is_better: bool
    noisy: bool = True  # measured speed or memory (ties within tie_tolerance); size on disk is exact


def target_for(name: str, kind: str) -> Target:
    if name == "latency":
        if kind == CAUSAL_LM:
            return Target(name, "decode_tokens_per_s", "decode tokens/s", True)
        return Target(name, "latency_ms_p50", "p50 latency (ms)", False)
    if name == "throughput":
        return Target(name, "throughput_tokens_per_s", "throughput (tokens/s)", True)
    if name == "memory":
        return Target(name, "peak_memory_mb", "peak memory (MiB)", False)
    if name == "size":
        return Target(name, "size_on_disk_mb", "size on disk (MiB)", False, noisy=False)
    raise SlimkitError(f"unknown target '{name}': use one of {', '.join(TARGETS)}")


@dataclass(frozen=True)
class OptimizeConfig:
    target: str = "latency"
    max_quality_drop: float = 0.01
    preset: str | None = None  # default: the target's preset
    runtime: str = "auto"  # auto: torch, and ONNX Runtime for encoders and classifiers where it is installed (auto_runtimes)
    time_budget_s: float = 600.0
    proxy_tokens: int = 4096
    proxy_passages: int = 64
    full_tokens: int | None = None  # None: the whole evaluation split
    threads: int | None = None
    seed: int = 0
    compile: bool | None = None  # None: compile the candidates where the target is served compiled (latency; throughput of encoders)
    rollback: bool = True  # roll near misses back to a higher precision on their most sensitive blocks
    tie_tolerance: float = 0.03  # measured speeds / memory this close to the best count as a tie
    device: str = "cpu"  # where candidates are evaluated and benchmarked (cpu, cuda, auto); they are built on the CPU

    def __post_init__(self):
        if self.target not in TARGETS:
            raise SlimkitError(f"unknown target '{self.target}': use one of {', '.join(TARGETS)}")
        if not 0 < self.max_quality_drop < 1:
            raise SlimkitError(f"max quality drop must be between 0 and 100%, got {100 * self.max_quality_drop:g}%")
        if self.preset is not None and self.preset not in PRESETS:
            raise SlimkitError(f"unknown preset '{self.preset}': use one of {', '.join(PRESETS)}")
        if self.runtime not in RUNTIMES:
            raise SlimkitError(f"runtime '{self.runtime}' is not available for optimize: use --runtime auto, torch, onnxruntime "
                               "(encoders, classifiers), ort-genai (causal LMs) or tensorrt (encoders, classifiers; CUDA)")
        if self.runtime not in ("torch", "auto") and self.compile:
            raise SlimkitError(f"--compile is for --runtime torch: a {self.runtime} export is not compiled by torch")
        if self.time_budget_s <= 0:
            raise SlimkitError(f"time budget must be positive, got {self.time_budget_s:g} s")
        if self.proxy_tokens < 64:
            raise SlimkitError(f"proxy tokens must be at least 64, got {self.proxy_tokens}")
        object.__setattr__(self, "device", resolve_device(self.device) or "cpu")  # "auto" becomes the device it chose
        if not 0 <= self.tie_tolerance < 0.5:
            raise SlimkitError(f"tie tolerance must be a fraction in [0, 0.5), got {self.tie_tolerance:g}: e.g. 0.03 for 3%")

    def compiles(self, kind: str) -> bool:
        """Whether the PyTorch candidates are benchmarked through torch.compile."""
        if self.runtime not in ("torch", "auto"):
            return False
        if self.compile is not None:
            return self.compile
        return self.target == "latency" or (self.target == "throughput" and kind != CAUSAL_LM)


def parse_duration(text: str) -> float:
    """'10m', '90s', '1h', '600' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise SlimkitError(f"cannot read the duration '{text}': write e.g. 90s, 10m or 1h") from None


def parse_fraction(text: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise SlimkitError(f"cannot read '{text}' as a fraction: write e.g. 1% or 0.01") from None
