"""The sentence-transformers layout of an encoder, carried through every technique and export.

A sentence-transformers model directory is a Hugging Face model plus a few
small files that say how token vectors become one sentence vector:

  modules.json                        the pipeline: Transformer, Pooling, Normalize, ...
  sentence_bert_config.json           the Transformer module's settings (max_seq_length)
  config_sentence_transformers.json   versions, prompts, the similarity function
  1_Pooling/config.json               the pooling mode (mean, cls, max, ...)
  2_Normalize/, 2_Dense/ ...          the other modules' folders (Dense has weights)

`read_layout` keeps these files in memory (`LoadedModel.sentence`), so a
quantized, pruned or distilled copy and an export write them back next to the
new weights (`write_layout`) and `SentenceTransformer(out)` builds the same
pipeline around them. The Transformer module is always the directory's own
model (path ""): a layout whose Transformer lives in a subfolder (the old
`0_Transformer/` form) is rewritten to point at the root, so the original
weights in that subfolder are never carried along to load in place of the
compressed ones.

`pooling_modes` reads the pooling mode, which evaluation uses, so that a
CLS-pooled model is scored on the vectors it serves (default: mean, for an
encoder without this layout).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from slimkit.core.errors import SlimkitError, short_reason

MODULES = "modules.json"
ROOT_FILES = ("config_sentence_transformers.json", "sentence_bert_config.json")
TRANSFORMER = "sentence_transformers.models.Transformer"
LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
                "pooling_mode_lasttoken": "lasttoken"}


def read_layout(path: Path) -> dict[str, bytes]:
    """The sentence-transformers files of the directory `path` (relative name -> bytes); {} where it has none."""
    if not (path / MODULES).is_file():
        return {}
    try:
        modules = json.loads((path / MODULES).read_text())
        entries = [(str(m.get("path", "")), str(m.get("type", ""))) for m in modules]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise SlimkitError(f"{path / MODULES} is not a sentence-transformers module list ({short_reason(exc)}): "
                           "restore the file or remove it") from exc
    files = {name: (path / name).read_bytes() for name in ROOT_FILES if (path / name).is_file()}
    for sub, kind in entries:
        if not sub:
            continue
        rel = PurePosixPath(sub)
        if rel.is_absolute() or ".." in rel.parts:
            raise SlimkitError(f"{path / MODULES} names a module outside the model directory ({sub}): fix its paths")
        if kind == TRANSFORMER:  # the old layout: only its settings come to the root
            setting = path / sub / "sentence_bert_config.json"
            if setting.is_file():
                files["sentence_bert_config.json"] = setting.read_bytes()
            continue
        for f in sorted((path / sub).rglob("*")) if (path / sub).is_dir() else []:
            if f.is_file():
                files[f.relative_to(path).as_posix()] = f.read_bytes()
    rooted = [{**m, "path": ""} if m.get("type") == TRANSFORMER else m for m in modules]
    files[MODULES] = (json.dumps(rooted, indent=2) + "\n").encode()
    return files


def write_layout(files: dict[str, bytes], out: Path) -> None:
    """Write the files `read_layout` kept into `out`, with every module's folder (Normalize's is empty)."""
    if not files:
        return
    for m in json.loads(files[MODULES]):
        if m.get("path"):
            (out / m["path"]).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)


def pooling_modes(files: dict[str, bytes]) -> tuple[str, ...]:
    """The pooling modes of the layout's Pooling module, in the order its vectors are concatenated; ("mean",) without one."""
    if not files:
        return ("mean",)
    pool = next((m for m in json.loads(files[MODULES]) if m.get("type", "").endswith(".Pooling")), None)
    if pool is None:
        return ("mean",)
    name = (PurePosixPath(pool.get("path", "")) / "config.json").as_posix()
    config = json.loads(files[name]) if name in files else {}
    mode = config.get("pooling_mode")
    if mode is None:  # the older form: one boolean per mode
        mode = [m for key, m in LEGACY_MODES.items() if config.get(key)]
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    return modes or ("mean",)
