"""slimkit artifacts: a model directory that reloads exactly and proves what it is.

Layout of an artifact directory:
  model.safetensors (or shards)   weights; no pickle anywhere
  config.json, generation_config  the Hugging Face config (plain HF loaders read it)
  tokenizer files
  slimkit.json                    the manifest, written last: format version, slimkit
                                  and library versions, model kind, source, dtypes,
                                  the resolved recipe, measured metrics, the format
                                  of every quantized module, the SHA-256 of every
                                  other file, and, for a model that came from a GGUF
                                  file, what its weights were stored as (source_format)

Modules that a model built from config.json does not have are recorded in the
manifest, each kind under its own key, through the table `RECORDS` that the
techniques register into (`register_modules`), so this layer never imports them:
quantization records each quantized module's format and shape under `modules`
(`{"format": "weight-only", "bits": 4, "group_size": 64, ...}`), pruning the
linear layers smaller than the config says under `pruned_shapes`. A quantized
model's weights are the small tensors themselves (int8, packed int4, scales),
saved from its state dict. Loading builds the plain architecture from
config.json, swaps the recorded modules in, then loads the safetensors state
dict into them and checks that every tensor found its place, so no pickle and
no fp32 copy is ever involved.

How those modules are stored is the artifact's `layout` (in the manifest): a
technique can register a standard layout (`register_layout`; quantization registers
compressed-tensors) that other loaders read, used when it holds the model exactly;
otherwise slimkit's own, and config.json then carries a quantization_config that
transformers and vLLM reject with a message naming slimkit.load, so no plain loader
ever fills the missing tensors with random weights. A model config.json describes in
full is saved by save_pretrained (layout `transformers`).

Saving is atomic: everything is written to a temporary sibling directory,
the manifest last, then renamed into place, so an interrupted save never
leaves a directory that looks complete. Loading reads the manifest, checks
every file's hash (a truncated or tampered file is refused with its name),
then reads the safetensors weights.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from slimkit.core.arch import KINDS, auto_class
from slimkit.core.errors import SlimkitError, short_reason
from slimkit.core.progress import note
from slimkit.io.files import check_safetensors, file_sha256, quiet_transformers, read_config, read_tokenizer, read_weights
from slimkit.io.model import MANIFEST, LoadedModel
from slimkit.io.sentence import write_layout
from slimkit.io.shards import ShardWriter, convert_shards, shard_files

FORMAT = "slimkit-artifact"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModuleRecord:
    """Modules that a model built from its config.json lacks, recorded in the manifest under `key`."""

    key: str
    describe: Callable[[nn.Module], dict]  # name -> spec of each such module; {} where the model has none
    rebuild: Callable[[nn.Module, dict], None]  # put empty modules of those specs in place, before the weights load
    own_weights: bool = False  # the state dict is written by safetensors itself (save_pretrained cannot write these modules)


RECORDS: dict[str, ModuleRecord] = {}


def register_modules(record: ModuleRecord) -> None:
    """Record (on save) and rebuild (on load) a kind of module that config.json does not describe."""
    if record.key in RECORDS and RECORDS[record.key] != record:
        raise ValueError(f"manifest key {record.key!r} registered twice")
    RECORDS[record.key] = record


@dataclass(frozen=True)
class Layout:
    """A standard on-disk layout (config.json + weights) for a model with recorded modules,
    which that standard's own loader reads; registered by the technique whose modules it holds."""

    name: str
    unfit: Callable[[nn.Module], str | None]  # why this model has no exact equivalent in the layout, or None
    encode: Callable[[dict, dict], dict]  # (one shard's tensors in slimkit's layout, module specs) -> the layout's tensors
    finish: Callable[[Path, dict], None]  # (directory, module specs): config.json's quantization_config
    read: Callable[[dict, dict], dict]  # (tensors as saved, manifest) -> the model's own state dict


LAYOUTS: dict[str, Layout] = {}
OWN_LAYOUT = "slimkit"
PLAIN_LAYOUT = "transformers"  # a model config.json describes in full: save_pretrained's own files

# What config.json carries when only slimkit can read the weights: a quantization_config that
# transformers (and vLLM) reject with this text. An unknown quant_method would not do: transformers
# 5 skips it with a warning and loads random weights for every tensor it cannot place.
SLIMKIT_ONLY = "this directory holds slimkit's own tensors ({why}): load it with slimkit.load(path)"


def register_layout(layout: Layout) -> None:
    if layout.name in LAYOUTS and LAYOUTS[layout.name] != layout:
        raise ValueError(f"layout {layout.name!r} registered twice")
    LAYOUTS[layout.name] = layout


def check_layout(asked: str | None) -> None:
    """Refuse an unknown layout name before any work is done."""
    if asked is not None and asked != OWN_LAYOUT and asked not in LAYOUTS:
        raise SlimkitError(f"unknown artifact layout '{asked}': choose one of {', '.join([*LAYOUTS, OWN_LAYOUT])}")


def choose_layout(model: nn.Module, records: dict, asked: str | None) -> tuple[str, str | None]:
    """(layout, why only slimkit reads it or None). `asked`: a layout name, or None for the first that is exact."""
    check_layout(asked)
    if not records:
        if asked not in (None, OWN_LAYOUT):
            raise SlimkitError(f"{asked} holds quantized layers and this model has none: save it without a layout (plain Hugging Face files)")
        return PLAIN_LAYOUT, None
    if asked == OWN_LAYOUT:
        return OWN_LAYOUT, "asked for"
    reshaped = any(not RECORDS[key].own_weights for key in records)
    reasons = {}
    for name, layout in LAYOUTS.items():
        if asked in (None, name):
            reasons[name] = "layer shapes that config.json cannot express" if reshaped else layout.unfit(model)
            if reasons[name] is None:
                return name, None
    if asked is not None:
        raise SlimkitError(f"{asked} cannot hold this model exactly ({reasons[asked]}): save it in slimkit's own layout "
                           "(--layout slimkit), or quantize with a method it holds: int4-wo, int8-wo, gptq or awq with "
                           "symmetric=true and embeddings=false, or int8-dynamic without smooth_alpha")
    return OWN_LAYOUT, "; ".join(sorted(set(reasons.values()))) or "no standard layout registered"


def mark_slimkit_only(path: Path, why: str) -> None:
    """Make config.json fail loudly in transformers and vLLM, naming slimkit.load."""
    config = json.loads((path / "config.json").read_text())
    text = SLIMKIT_ONLY.format(why=why)
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": OWN_LAYOUT,
                                     "config_groups": {OWN_LAYOUT: {"targets": ["Linear"], "weights": {"num_bits": 8, "type": text}}}}
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save(
    model: LoadedModel,
    out: str | os.PathLike,
    *,
    recipe: dict | list | None = None,
    metrics: dict | None = None,
    overwrite: bool = False,
    keep: tuple[str, ...] | list[str] = (),
    layout: str | None = None,
) -> Path:
    """Write `model` as an artifact directory at `out`, atomically; return its path.

    `keep`: entries of an existing `out` to carry into the new artifact
    (training logs or checkpoints a recipe wrote there); they are not hashed.
    `layout`: how modules that config.json cannot describe are stored: None takes
    the first registered standard layout that holds the model exactly
    (compressed-tensors), else slimkit's own, whose config.json makes plain
    transformers fail with a message naming slimkit.load; a name insists on it.
    """
    quiet_transformers()
    records = {key: entry for key, r in RECORDS.items() if (entry := r.describe(model.model))}
    chosen, why = choose_layout(model.model, records, layout)
    with staging(out, overwrite, "the artifact") as tmp:
        if model.staged is not None:  # a technique that streamed its blocks wrote the weights already
            for f in sorted(model.staged.iterdir()):
                shutil.move(f, tmp / f.name)  # a rename where both are on one file system
            model.staged = None
        elif records:
            write_state(model.model, tmp)
        else:
            model.model.save_pretrained(tmp, safe_serialization=True)
        if chosen in LAYOUTS:
            specs = records.get("modules", {})
            convert_shards(tmp, lambda tensors: LAYOUTS[chosen].encode(tensors, specs))
            LAYOUTS[chosen].finish(tmp, specs)
        if why is not None:
            mark_slimkit_only(tmp, why)
            note(f"{out} is in slimkit's own layout ({why}): transformers and vLLM refuse it; slimkit.load reads it")
        model.tokenizer.save_pretrained(tmp)
        write_layout(model.sentence, tmp)  # an encoder stays a sentence-transformers model
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": versions(),
            "kind": model.kind,
            "source": model.source,
            "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.model.parameters()}),
            "parameters": model.num_parameters(),
            "recipe": recipe if recipe is not None else model.manifest.get("recipe", []),
            "metrics": metrics or {},
            "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
            "layout": chosen,
            **({"slimkit_only": why} if why is not None else {}),
            **({"source_format": model.manifest["source_format"]} if model.manifest.get("source_format") else {}),
            **records,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        out = Path(out).expanduser()
        for name in keep:
            if (out / name).is_dir() and not (tmp / name).exists():
                shutil.copytree(out / name, tmp / name, symlinks=True)
    return Path(out).expanduser()


@contextmanager
def staging(out: str | os.PathLike, overwrite: bool = False, what: str = "the artifact"):
    """A temporary sibling directory of `out` that replaces it only if the block succeeds, so an
    interrupted write never leaves a directory that looks complete."""
    out = check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except (OSError, SafetensorError) as exc:
        raise SlimkitError(f"cannot write {what} to {out} ({short_reason(exc)}): free disk space or choose another --out") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    if hasattr(config, "quantization_config"):  # compressed-tensors' or slimkit's marker: the modules come from the manifest
        del config.quantization_config
    kind = manifest["kind"]
    records = {key: manifest[key] for key in RECORDS if manifest.get(key)}
    if records:
        model = _rebuild(path, kind, config, records, manifest, dtype)
    else:
        model = read_weights(path, kind, config, dtype or "auto")
    tokenizer = read_tokenizer(path)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=source or str(path), path=path, manifest=manifest)


def write_config(model: nn.Module, out: Path) -> None:
    """config.json (naming the model's class and dtype, as save_pretrained does) and the generation config."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if getattr(config, "dtype", None) is None:
        config.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out)


def own_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A module's state dict under `prefix`, as slimkit's own layout stores it."""
    return {f"{prefix}.{k}" if prefix else k: v for k, v in module.state_dict().items()}


def write_state(model: nn.Module, out: Path) -> None:
    """Config, generation config and the state dict (tied tensors stored once), in shards, of a model with recorded modules."""
    write_config(model, out)
    writer = ShardWriter(out)
    writer.add(own_tensors(model))
    writer.close()


def _rebuild(path: Path, kind: str, config, records: dict[str, dict], manifest: dict, dtype: torch.dtype | None) -> nn.Module:
    """Build from `config` on the meta device, put the recorded modules in place, then load the
    safetensors weights into them shard by shard: no float copy of the model is ever made."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = shard_files(path)
    if not files:
        raise SlimkitError(f"no *.safetensors weights in {path}: the artifact is incomplete; save it again")
    saved = getattr(config, "dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    if saved is None:
        check_safetensors(files[0])
        with safe_open(str(files[0]), "pt") as fh:
            first = next((fh.get_tensor(k).dtype for k in fh.keys() if fh.get_slice(k).get_dtype() in ("F32", "BF16", "F16")), torch.float32)
    with init_empty_weights(include_buffers=False):
        model = auto_class(kind).from_config(config, dtype=dtype or saved or first)
    for key, entry in records.items():
        RECORDS[key].rebuild(model, entry)
    layout = manifest.get("layout", OWN_LAYOUT)
    if layout not in (OWN_LAYOUT, PLAIN_LAYOUT) and layout not in LAYOUTS:
        raise SlimkitError(f"{path} is stored in the {layout} layout, which this slimkit cannot read: upgrade slimkit")
    expected = model.state_dict(keep_vars=True)
    marks = {(m, a): b._slimkit_weight for m in model.modules() for a, b in m._buffers.items() if hasattr(b, "_slimkit_weight")}
    unexpected: list[str] = []
    for f in files:
        check_safetensors(f)
        state = load_file(f)
        if layout in LAYOUTS:
            state = LAYOUTS[layout].read(state, manifest)
        unexpected += [k for k in state if k not in expected]
        try:
            model.load_state_dict({k: _like(v, expected[k]) for k, v in state.items() if k in expected}, strict=False, assign=True)
        except RuntimeError as exc:
            raise SlimkitError(f"cannot load the weights in {path} ({short_reason(exc)}): save the artifact again") from exc
        del state
    for (m, a), mark in marks.items():  # assigned tensors are new objects: mark the packed ones again
        m._buffers[a]._slimkit_weight = mark
    model.tie_weights()
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if missing or unexpected:
        raise SlimkitError(f"the weights in {path} do not match the model (e.g. {(missing or unexpected)[0]}): save the artifact again")
    return model.eval()


def _like(t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loaded tensor in the dtype the model was built with (floats only), as a copying load would give, in
    memory of its own: safetensors' tensors can start anywhere in the file's buffer, and the int8 and int4
    kernels read their weights with aligned vector loads (unaligned, they crash)."""
    return t.to(target.dtype) if t.is_floating_point() and target.is_floating_point() and t.dtype != target.dtype else t.clone()


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise SlimkitError(f"{path / MANIFEST} is unreadable ({short_reason(exc)}): the artifact is damaged; save it again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SlimkitError(f"{path / MANIFEST} is not a slimkit manifest: save the artifact again with slimkit")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise SlimkitError(f"{path} was written by a newer slimkit (format {manifest['format_version']}): upgrade slimkit")
    if manifest.get("kind") not in KINDS or not isinstance(manifest.get("files"), dict):
        raise SlimkitError(f"{path / MANIFEST} is incomplete (kind or files missing): save the artifact again")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    for name, digest in manifest["files"].items():
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise SlimkitError(f"{path} is missing {name}: the artifact is incomplete; save it again")
        if file_sha256(f) != digest:
            raise SlimkitError(f"{f} does not match its hash in {MANIFEST} (truncated or modified): save the artifact again")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move tmp to out; an existing out is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def versions(extra: dict | None = None) -> dict:
    """Library versions recorded in a manifest (and `extra`: an exporter's runtimes)."""
    import transformers

    from slimkit import __version__

    out = {"slimkit": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    return {**out, **(extra or {})}
