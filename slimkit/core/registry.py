"""Techniques by name: the one table that the CLI, YAML recipes and the search read.

A technique is a frozen dataclass config (validated in `__post_init__`, errors
naming the fix) and a handler `apply(model, config, ctx) -> model` that returns a
new model and leaves the caller's untouched (as torchao's `quantize_` maps a config
to its handler). Every handler receives the same `Context`: the calibration text,
the seed, the device and a progress callback. Technique modules register
themselves when slimkit is imported:

    @register("int8-dynamic", "quantize", Int8DynamicConfig, "int8 weights, per-token int8 activations")
    def apply(model, config, ctx): ...
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable
from dataclasses import dataclass

from slimkit.core.data import TextSource
from slimkit.core.errors import SlimkitError

STAGES = ("prune", "distill", "quantize", "export")


@dataclass(frozen=True)
class Context:
    """What every technique receives besides the model and its config.

    data: the text that calibrates or trains, a `TextSource` used as given (the public
        calls and the CLI parse a user's string as its calibration split, never
        evaluation); None: the calibration split of the embedded corpus.
    seed: seeds torch, Python's `random` and every shuffle a technique makes, so one
        seed gives one model (training on a time budget aside).
    device: where training runs ("cpu", "cuda"; None: where the model is; distillation
        then lets Accelerate choose, a GPU where there is one); calibration runs where the
        model is.
    on_step: called with the optimizer step after each training step (progress, tests).
    stream: a technique that goes block by block writes each finished block of a lazy model
        to disk (`LoadedModel.staged`) instead of keeping it: for `save` right after (the CLI);
        a directory says where to stage those files (beside the artifact to be).
    """

    data: TextSource | None = None
    seed: int = 0
    device: str | None = None
    on_step: Callable[[int], None] | None = None
    stream: bool | str = False

    def __post_init__(self):
        if self.data is not None and not isinstance(self.data, TextSource):
            raise SlimkitError(f"data must be a TextSource, got {type(self.data).__name__}: use TextSource.parse('my.txt')")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SlimkitError(f"seed must be an integer, got {self.seed!r}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise SlimkitError(f"device '{self.device}' is not supported: use cpu or cuda")

    def calibration(self) -> TextSource:
        """The text to calibrate or train on: `data`, or the embedded corpus's calibration split."""
        return TextSource.parse(None, "calibration") if self.data is None else self.data

    def device_for(self, model) -> str:
        """Where `model` trains: the context's device, else the device the model is on."""
        return self.device or next(model.parameters()).device.type

    def seed_everything(self) -> None:
        import torch

        torch.manual_seed(self.seed)
        random.seed(self.seed)


@dataclass(frozen=True)
class Technique:
    name: str
    stage: str
    config_cls: type
    apply: Callable  # apply(model, config, ctx) -> model
    summary: str


TECHNIQUES: dict[str, Technique] = {}


def register(name: str, stage: str, config_cls: type, summary: str):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")

    def wrap(fn: Callable) -> Callable:
        if name in TECHNIQUES:
            raise ValueError(f"technique {name!r} registered twice")
        TECHNIQUES[name] = Technique(name, stage, config_cls, fn, summary)
        return fn

    return wrap


def get(name: str, stage: str | None = None) -> Technique:
    pool = {n: t for n, t in TECHNIQUES.items() if stage is None or t.stage == stage}
    if name not in pool:
        close = difflib.get_close_matches(name, list(pool), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SlimkitError(f"unknown {stage or 'technique'} method '{name}'{hint}: choose one of {', '.join(sorted(pool))}")
    return pool[name]


def techniques(stage: str | None = None) -> list[Technique]:
    return [t for t in TECHNIQUES.values() if stage is None or t.stage == stage]
