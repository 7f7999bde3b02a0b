"""Reading a Hugging Face model directory, with checks that turn every bad file into one line.

This is the one place where configs, weights and tokenizers are read from disk
(the loader, artifacts and every exported runtime call it), so every error
transformers, tokenizers or huggingface_hub raise on a bad file, of whatever
type (a config its strict validation rejects, a tokenizer.json missing a key),
becomes a SlimkitError here that names the file and the fix.

Weights are read only from safetensors (never unpickled), a truncated or corrupt
file is refused with its name, weights holding NaN or Inf are refused, and
`trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from slimkit.core.arch import auto_class
from slimkit.core.errors import SlimkitError, short_reason


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
    except MemoryError:
        raise
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise SlimkitError(
                f"{path} needs custom code from its repository: pass --trust-remote-code "
                "only if you trust that code"
            ) from exc
        raise SlimkitError(
            f"transformers rejects {path / 'config.json'} ({root_reason(exc)}): fix that field of the config, "
            "or re-save the model with save_pretrained"
        ) from exc


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
    except MemoryError:
        raise
    except Exception as exc:
        where = files[0] if len(files) == 1 else f"{path}/*.safetensors"
        raise SlimkitError(
            f"cannot load the weights in {where} ({root_reason(exc)}): the files may be "
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
    except MemoryError:
        raise
    except Exception as exc:
        fix = "save the model's tokenizer next to it with tokenizer.save_pretrained(dir)"
        present = sorted(p.name for p in path.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "spiece", "sentencepiece")))
        if not present:
            raise SlimkitError(f"no tokenizer files in {path}: {fix}") from exc
        raise SlimkitError(f"cannot load the tokenizer in {path} from {', '.join(present)} ({root_reason(exc)}): {fix}") from exc
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def root_reason(exc: BaseException) -> str:
    """The first line of the innermost cause: huggingface_hub wraps a config's failed check
    ("hidden size (8) is not a multiple of ...") in an error whose own first line names only the validator."""
    while exc.__cause__ is not None and str(exc.__cause__).strip():
        exc = exc.__cause__
    reason = short_reason(exc).rstrip(".")
    return f"no key {reason}" if isinstance(exc, KeyError) else reason


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


def quiet_transformers() -> None:
    """slimkit shows its own progress; transformers' bars and notices would
    interleave with it (and with --json output)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
