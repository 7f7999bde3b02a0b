"""slimkit artifacts: a model directory that reloads exactly and proves what it is.

Layout of an artifact directory:
  model.safetensors (or shards)   weights; no pickle anywhere
  config.json, generation_config  the Hugging Face config (plain HF loaders read it)
  tokenizer files
  slimkit.json                    the manifest, written last: format version, slimkit
                                  and library versions, model kind, source, dtypes,
                                  the resolved recipe, measured metrics, the format
                                  of every quantized module, and the SHA-256 of
                                  every other file

A quantized model's weights are the small tensors themselves (int8, packed
int4, scales), saved from its state dict. The manifest's `modules` maps each
quantized module's name to its format and shape (`{"format": "weight-only",
"bits": 4, "group_size": 64, ...}`); loading builds the plain architecture
from config.json, swaps those modules in, then loads the safetensors state
dict into them strictly, so no pickle and no fp32 copy is ever involved.

Saving is atomic: everything is written to a temporary sibling directory,
the manifest last, then renamed into place, so an interrupted save never
leaves a directory that looks complete. Loading reads the manifest, checks
every file's hash (a truncated or tampered file is refused with its name),
then reads the safetensors weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from slimkit.errors import SlimkitError, short_reason
from slimkit.models import (
    MANIFEST,
    LoadedModel,
    check_safetensors,
    file_sha256,
    quiet_transformers,
    read_config,
    read_tokenizer,
    read_weights,
)
from slimkit.quantize.common import quantized_modules

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 1


def save(
    model: LoadedModel,
    out: str | os.PathLike,
    *,
    recipe: dict | list | None = None,
    metrics: dict | None = None,
    overwrite: bool = False,
    keep: tuple[str, ...] | list[str] = (),
) -> Path:
    """Write `model` as an artifact directory at `out`, atomically; return its path.

    `keep`: entries of an existing `out` to carry into the new artifact
    (training logs or checkpoints a recipe wrote there); they are not hashed.
    """
    quiet_transformers()
    out = check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        modules = quantized_modules(model.model)
        if modules:
            _save_quantized(model.model, tmp)
        else:
            model.model.save_pretrained(tmp, safe_serialization=True)
        model.tokenizer.save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "kind": model.kind,
            "source": model.source,
            "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.model.parameters()}),
            "parameters": model.num_parameters(),
            "recipe": recipe if recipe is not None else model.manifest.get("recipe", []),
            "modules": modules,
            "metrics": metrics or {},
            "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        manifest.update(_pruned_entry(model))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for name in keep:
            if (out / name).is_dir() and not (tmp / name).exists():
                shutil.copytree(out / name, tmp / name, symlinks=True)
        replace_dir(tmp, out)
    except (OSError, SafetensorError) as exc:
        raise SlimkitError(f"cannot write the artifact to {out} ({short_reason(exc)}): free disk space or choose another --out") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_destination(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a destination that would lose data; call before long work, not after."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SlimkitError(f"{out} exists and is a file: choose a directory path for the artifact")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SlimkitError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
    return out


def load_artifact(path: Path, *, source: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    manifest = read_manifest(path)
    verify_files(path, manifest)
    config = read_config(path)
    kind = manifest["kind"]
    if manifest.get("modules"):
        model = _load_quantized(path, kind, config, manifest["modules"], dtype)
    elif manifest.get("pruned_shapes"):  # non-uniformly pruned: rebuild the smaller modules first
        from slimkit.prune.shapes import build_pruned

        model = build_pruned(path, kind, config, manifest["pruned_shapes"], dtype or "auto")
    else:
        model = read_weights(path, kind, config, dtype or "auto")
    tokenizer = read_tokenizer(path)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=source or str(path), path=path, manifest=manifest)


def _save_quantized(model: torch.nn.Module, out: Path) -> None:
    """Config, generation config and the state dict of a model with quantized modules."""
    from safetensors.torch import save_model

    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})  # tied tensors stored once


def _load_quantized(path: Path, kind: str, config, modules: dict, dtype: torch.dtype | None) -> torch.nn.Module:
    from safetensors.torch import load_model

    from slimkit.models import auto_class
    from slimkit.quantize.common import rebuild_modules

    weights = path / "model.safetensors"
    check_safetensors(weights)
    saved = getattr(config, "dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    model = auto_class(kind).from_config(config, dtype=dtype or saved or torch.float32)
    rebuild_modules(model, modules)
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise SlimkitError(f"cannot load the quantized weights in {path} ({short_reason(exc)}): save the artifact again") from exc
    return model.eval()


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise SlimkitError(f"{path / MANIFEST} is unreadable ({short_reason(exc)}): the artifact is damaged; save it again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SlimkitError(f"{path / MANIFEST} is not a slimkit manifest: save the artifact again with slimkit")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise SlimkitError(f"{path} was written by a newer slimkit (format {manifest['format_version']}): upgrade slimkit")
    if manifest.get("kind") not in ("causal-lm", "encoder", "classifier") or not isinstance(manifest.get("files"), dict):
        raise SlimkitError(f"{path / MANIFEST} is incomplete (kind or files missing): save the artifact again")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise SlimkitError(f"{path} is missing {name}: the artifact is incomplete; save it again")
        if file_sha256(f) != digest:
            raise SlimkitError(f"{f} does not match its hash in {MANIFEST} (truncated or modified): save the artifact again")


def _pruned_entry(model: LoadedModel) -> dict:
    """slimkit.prune: linear layers smaller than the config says (non-uniform pruning)."""
    from slimkit.prune.shapes import pruned_shapes

    shapes = pruned_shapes(model.model)
    return {"pruned_shapes": shapes} if shapes else {}


def replace_dir(tmp: Path, out: Path) -> None:
    """Move tmp to out; an existing out is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict:
    import transformers

    from slimkit import __version__

    return {"slimkit": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
