"""`LoadedModel`: a model ready to run, with its tokenizer and what slimkit knows of it."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

MANIFEST = "slimkit.json"  # the file that makes a directory a slimkit artifact (see `artifacts`)


@dataclass
class LoadedModel:
    """A model ready to run, with its tokenizer and what slimkit knows of it."""

    model: nn.Module
    tokenizer: object
    kind: str
    source: str
    path: Path | None = None  # local directory the weights were read from
    manifest: dict = field(default_factory=dict)  # slimkit.json of an artifact
    donated: bool = False  # the caller gave it away: the next technique changes it in place (see `copy_model`)
    sentence: dict[str, bytes] = field(default_factory=dict)  # an encoder's sentence-transformers files (`io.sentence`)
    staged: Path | None = None  # weights a streaming technique already wrote (`io.shards`), which `save` takes as they are
    weights: object | None = None  # `io.lazy.Weights` while parameters wait in their files (on the meta device)
    dtype: object | None = None  # what a lazy model's weights are read as (None: the checkpoint's own)

    @property
    def config(self):
        return self.model.config

    @property
    def name(self) -> str:
        return self.source

    def num_parameters(self) -> int:
        if getattr(self.model, "slimkit_parameters", None) is not None:  # an exported model holds none in torch
            return self.model.slimkit_parameters
        seen, total = set(), 0
        for p in self.model.parameters():
            key = id(p) if p.is_meta else p.data_ptr()  # a lazy or streamed model's tensors have no memory, hence no address
            if key not in seen:
                seen.add(key)
                total += p.numel()
        for b in self.model.buffers():  # packed quantized weights live in buffers;
            # `_slimkit_weight` is True or the number of weights per element (2 for packed int4)
            total += b.numel() * int(getattr(b, "_slimkit_weight", 0))
        return total

    def record(self, stage: str, method: str, config, **facts) -> "LoadedModel":
        """Append a technique's step (its config, and what it measured) to the recipe the artifact saves."""
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
        step = {"stage": stage, "method": method, **plain, **facts}
        self.manifest["recipe"] = list(self.manifest.get("recipe", [])) + [step]
        return self


def copy_model(lm: LoadedModel, suffix: str, *, lazy: bool = False) -> LoadedModel:
    """A deep copy for a technique to change; the caller's model is never touched.

    A `donated` model, one its caller no longer uses, is changed in place
    instead: one fp32 copy of the model in memory, not two. A lazy model (its
    weights still in their files) is read afresh from the files instead of
    copied; `lazy=True`, for a technique that goes block by block
    (`io.blockwise`), keeps the copy lazy: no memory at all.
    """
    if lm.weights is not None:
        from slimkit.io.lazy import materialize, open_lazy

        model, _ = open_lazy(lm.path, lm.kind, copy.deepcopy(lm.config), lm.dtype, lm.weights)
        if not lazy:
            materialize(model, "", lm.weights, lm.dtype)
        return LoadedModel(model=model, tokenizer=lm.tokenizer, kind=lm.kind, source=f"{lm.source}+{suffix}", path=None,
                           manifest=copy.deepcopy(lm.manifest), sentence=dict(lm.sentence), weights=lm.weights if lazy else None, dtype=lm.dtype)
    if lm.donated:
        lm.donated, lm.source, lm.path = False, f"{lm.source}+{suffix}", None
        return lm
    return LoadedModel(
        model=copy.deepcopy(lm.model),
        tokenizer=lm.tokenizer,
        kind=lm.kind,
        source=f"{lm.source}+{suffix}",
        path=None,
        manifest=copy.deepcopy(lm.manifest),
        sentence=dict(lm.sentence),
    )


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights lie: its first parameter's (or buffer's) device; the CPU for none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are one; "cuda" (no index) is the current GPU."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _exported(model: nn.Module) -> bool:
    return getattr(model, "slimkit_device", None) is not None  # a runtime's session: it runs where that runtime puts it


def on_device(lm: LoadedModel, device: str | None) -> LoadedModel:
    """`lm` ready for a technique to run on `device`: `lm` itself where it already lies there (or
    `device` is None), else a copy there, `donated` so the technique changes it in place rather
    than copying it again. The caller's model stays where it was."""
    if device is None or _exported(lm.model) or lm.weights is not None or same_device(model_device(lm.model), device):
        return lm  # (a lazy model is read onto the CPU block by block)
    if lm.donated:
        lm.model.to(device)
        return lm
    moved = copy_model(lm, "")
    moved.source, moved.path, moved.donated = lm.source, lm.path, True  # the same model, elsewhere
    moved.model.to(device)
    return moved


@contextlib.contextmanager
def placed(*models: LoadedModel | None, device: str | None):
    """Run the block with each model on `device`, and put each back where it was afterwards
    (measuring a model does not move the caller's model for good). None: as they are."""
    moves = []
    try:
        for lm in models:
            if device is None or lm is None or _exported(lm.model) or lm.staged is not None or lm.weights is not None:
                continue  # (a streamed or lazy model holds no tensors to move)
            before = model_device(lm.model)
            if not same_device(before, device):
                moves.append((lm, before))
                lm.model.to(device)
        yield
    finally:
        for lm, before in moves:
            lm.model.to(before)
