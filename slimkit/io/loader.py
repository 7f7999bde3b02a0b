"""`load`: any supported model source to a `LoadedModel`.

`load(source)` accepts
  * an embedded name (`smollm2-135m`, `minilm-l6`; see `sources.EMBEDDED`),
  * a saved slimkit artifact directory (it has a `slimkit.json` manifest),
  * an exported directory (a manifest naming the runtime that serves it),
  * a local Hugging Face directory (it has a `config.json`),
  * a `.gguf` file, dequantized to fp32 once and cached as safetensors,
  * a Hugging Face Hub id, downloaded when online; offline it fails at once,
  * a transformers model object in memory, with `tokenizer=` (never copied or changed here).

Three kinds of model are first class, detected from the config (`core.arch`):
causal language models, encoders (sentence embeddings) and sequence
classifiers. Anything else is refused with a message that says so.

Exported directories are served by the runtime their manifest names, through
the table `RUNTIMES` that each exporter registers into (`register_runtime`):
the loader never imports an exporter.

Loading never unpickles: weights are read from safetensors (or GGUF), and
`trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from slimkit.core.arch import ENCODER, detect_kind
from slimkit.core.errors import SlimkitError
from slimkit.io.artifacts import load_artifact, read_manifest, verify_files
from slimkit.io.files import quiet_transformers, read_config, read_tokenizer, read_weights
from slimkit.io.lazy import open_lazy
from slimkit.io.model import MANIFEST, LoadedModel
from slimkit.io.sentence import read_layout
from slimkit.io.sources import (
    EMBEDDED,
    HUB_ID,
    NoTokenizer,
    embedded_path,
    gguf_origin,
    gguf_to_hf_dir,
    hub_snapshot,
    in_memory,
    looks_like_path,
    usable_tokenizer,
)

# runtime name -> serve(path, manifest, source) -> LoadedModel, for exported directories (see `register_runtime`)
RUNTIMES: dict[str, Callable[[Path, dict, str], LoadedModel]] = {}


def register_runtime(name: str, serve: Callable[[Path, dict, str], LoadedModel]) -> None:
    """Serve directories whose manifest says `"runtime": name` with `serve(path, manifest, source)`."""
    if name in RUNTIMES and RUNTIMES[name] is not serve:
        raise ValueError(f"runtime {name!r} registered twice")
    RUNTIMES[name] = serve


def load(
    source: str | os.PathLike | LoadedModel | nn.Module,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    tokenizer=None,
    lazy: bool = False,
) -> LoadedModel:
    """Load a model from any supported source; see the module docstring.

    dtype: None keeps a slimkit artifact's saved dtypes and loads everything
    else in float32 (the reference precision). tokenizer: for a model object
    (`sources.in_memory`); every other source brings its own. lazy: a Hugging Face
    directory's weights stay in their files until a technique reads them (`io.lazy`),
    block by block where it can; other sources load as usual.
    """
    if isinstance(source, nn.Module):
        if dtype is not None:
            raise SlimkitError("dtype= is for loading from files: convert the model object yourself (model.to(dtype))")
        return in_memory(source, tokenizer)
    if tokenizer is not None and not takes_tokenizer(source):
        raise SlimkitError(f"tokenizer= goes with a model object; {getattr(source, 'name', source)} brings its own tokenizer: drop tokenizer=")
    if isinstance(source, LoadedModel):
        return dataclasses.replace(source, tokenizer=usable_tokenizer(tokenizer)) if tokenizer is not None else source
    quiet_transformers()
    text = os.fspath(source)
    if text in EMBEDDED:
        path = embedded_path(text)
        if path.suffix == ".gguf":
            return _load_gguf(path, text, dtype)
        return load_dir(path, source=text, dtype=dtype, lazy=lazy)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return _load_gguf(path, text, dtype)
            raise SlimkitError(
                f"{text} is a file, not a model: pass a model directory (with config.json), "
                "a .gguf file, a hub id or an embedded name (see `slimkit models`)"
            )
        return load_dir(path, source=text, dtype=dtype, trust_remote_code=trust_remote_code, lazy=lazy)
    if looks_like_path(text) or not HUB_ID.match(text):
        raise SlimkitError(f"no such file or directory: {text}; check the path")
    snapshot = hub_snapshot(text)
    return load_dir(snapshot, source=text, dtype=dtype, trust_remote_code=trust_remote_code, lazy=lazy)


def _load_gguf(path: Path, source: str, dtype: torch.dtype | None, lazy: bool = False) -> LoadedModel:
    """A GGUF file through its fp32 copy; the manifest keeps what the weights were stored as
    (`source_format`), which every artifact made from it carries on."""
    converted = gguf_to_hf_dir(path)
    lm = load_dir(converted, source=source, dtype=dtype, lazy=lazy)
    lm.manifest["source_format"] = gguf_origin(converted)
    return lm


def takes_tokenizer(source) -> bool:
    """Whether `tokenizer=` applies to `source`: a model object, or one loaded from memory without a tokenizer."""
    return isinstance(source, nn.Module) or (isinstance(source, LoadedModel) and isinstance(source.tokenizer, NoTokenizer))


def load_dir(
    path: Path, *, source: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False, lazy: bool = False
) -> LoadedModel:
    """Load a local directory: an exported one, a slimkit artifact, or a Hugging Face model;
    an encoder keeps its sentence-transformers files (`sentence.read_layout`)."""
    lm = _load_dir(path, source=source, dtype=dtype, trust_remote_code=trust_remote_code, lazy=lazy)
    if lm.kind == ENCODER:
        lm.sentence = read_layout(path)
    return lm


def _load_dir(path: Path, *, source: str, dtype: torch.dtype | None, trust_remote_code: bool, lazy: bool) -> LoadedModel:
    if (path / MANIFEST).exists():
        manifest = read_manifest(path)
        runtime = manifest.get("runtime", "torch")
        if runtime != "torch":  # exported: served by its runtime
            return _serve(path, manifest, source, dtype)
        return load_artifact(path, source=source, dtype=dtype)
    if not (path / "config.json").is_file():
        raise SlimkitError(
            f"{path} is not a model directory (no config.json): pass a Hugging Face model "
            "directory, a slimkit artifact, a .gguf file or an embedded name"
        )
    config = read_config(path, trust_remote_code=trust_remote_code)
    kind = detect_kind(config)
    tokenizer = read_tokenizer(path, trust_remote_code=trust_remote_code)
    if lazy and not trust_remote_code:
        model, weights = open_lazy(path, kind, config, dtype)
        return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=source, path=path, weights=weights, dtype=dtype)
    model = read_weights(path, kind, config, dtype or torch.float32, trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=source, path=path)


def _serve(path: Path, manifest: dict, source: str, dtype) -> LoadedModel:
    runtime = manifest["runtime"]
    if dtype is not None:
        raise SlimkitError(f"{path} is an exported {runtime} model: it runs at its exported precision; drop --dtype")
    if runtime not in RUNTIMES:
        raise SlimkitError(f"{path} needs the runtime '{runtime}', which this slimkit cannot serve: upgrade slimkit")
    verify_files(path, manifest)
    return RUNTIMES[runtime](path, manifest, source)
