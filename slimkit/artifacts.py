"""slimkit artifacts: a model directory that reloads exactly and proves what it is.

Layout of an artifact directory:
  model.safetensors (or shards)   weights; no pickle anywhere
  config.json, generation_config  the Hugging Face config (plain HF loaders read it)
  tokenizer files
  slimkit.json                    the manifest, written last: format version, slimkit
                                  and library versions, model kind, source, dtypes,
                                  the resolved recipe, measured metrics, and the
                                  SHA-256 of every other file

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

from slimkit.errors import SlimkitError, short_reason
from slimkit.models import MANIFEST, LoadedModel, file_sha256, read_config, read_tokenizer, read_weights

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 1


def save(
    model: LoadedModel,
    out: str | os.PathLike,
    *,
    recipe: dict | list | None = None,
    metrics: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as an artifact directory at `out`, atomically; return its path."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SlimkitError(f"{out} exists and is a file: choose a directory path for the artifact")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SlimkitError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
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
            "metrics": metrics or {},
            "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        manifest.update(_pruned_entry(model))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out)
    except OSError as exc:
        raise SlimkitError(f"cannot write the artifact to {out} ({short_reason(exc)}): free disk space or choose another --out") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_artifact(path: Path, *, source: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    manifest = read_manifest(path)
    verify_files(path, manifest)
    config = read_config(path)
    kind = manifest["kind"]
    if manifest.get("pruned_shapes"):  # non-uniformly pruned: rebuild the smaller modules first
        from slimkit.prune.shapes import build_pruned

        model = build_pruned(path, kind, config, manifest["pruned_shapes"], dtype or "auto")
    else:
        model = read_weights(path, kind, config, dtype or "auto")
    tokenizer = read_tokenizer(path)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=source or str(path), path=path, manifest=manifest)


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


def _replace_dir(tmp: Path, out: Path) -> None:
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
