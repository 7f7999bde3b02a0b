"""Techniques by name: the one table that the CLI, YAML recipes and the search read.

A technique is a frozen dataclass config (validated in `__post_init__`) and an
`apply(model: LoadedModel, config, **context) -> LoadedModel` that returns a new
model and leaves the caller's untouched. Modules register themselves:

    @register("int8-dynamic", "quantize", Int8DynamicConfig, "int8 weights, per-token int8 activations")
    def apply(model, config, **context): ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from slimkit.errors import SlimkitError

STAGES = ("prune", "distill", "quantize", "export")


@dataclass(frozen=True)
class Technique:
    name: str
    stage: str
    config_cls: type
    apply: Callable
    summary: str


_TECHNIQUES: dict[str, Technique] = {}


def register(name: str, stage: str, config_cls: type, summary: str):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")

    def wrap(fn: Callable) -> Callable:
        if name in _TECHNIQUES:
            raise ValueError(f"technique {name!r} registered twice")
        _TECHNIQUES[name] = Technique(name, stage, config_cls, fn, summary)
        return fn

    return wrap


def get(name: str, stage: str | None = None) -> Technique:
    _import_builtin()
    pool = {n: t for n, t in _TECHNIQUES.items() if stage is None or t.stage == stage}
    if name not in pool:
        close = difflib.get_close_matches(name, list(pool), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SlimkitError(f"unknown {stage or 'technique'} method '{name}'{hint}: choose one of {', '.join(sorted(pool))}")
    return pool[name]


def techniques(stage: str | None = None) -> list[Technique]:
    _import_builtin()
    return [t for t in _TECHNIQUES.values() if stage is None or t.stage == stage]


def _import_builtin() -> None:
    """Import the modules that register the built-in techniques."""
    import importlib

    for module in _BUILTIN:
        importlib.import_module(module)


# Each technique package appends its module here as it lands.
_BUILTIN: list[str] = [
    "slimkit.quantize.cast",
    "slimkit.quantize.dynamic_int8",
    "slimkit.quantize.static_int8",
    "slimkit.quantize.weight_only",
    "slimkit.quantize.gptq",
    "slimkit.quantize.awq",
    "slimkit.quantize.qat",
    "slimkit.quantize.aliases",
    "slimkit.quantize.mixed",
    "slimkit.prune.unstructured",
    "slimkit.prune.semi_structured",
    "slimkit.prune.structured",
    "slimkit.prune.schedule",
    "slimkit.distill",
]
