"""Teacher outputs cached on disk, one safetensors file per (micro-batch, process).

Repeated epochs then skip the teacher's forward pass. Full-vocabulary logits
are large (seq_len x vocab x 4 bytes per sequence), so this pays off for big
teachers with small vocabularies, and for encoders. A `cache.json`
fingerprint (teacher, data, loss needs, batching) guards against reusing a
cache made for another run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from slimkit.core.errors import SlimkitError


class TeacherCache:
    """Teacher outputs per (micro-batch, process) in safetensors files under `root`."""

    def __init__(self, root: str | None, fingerprint: dict, rank: int, world: int):
        self.root = Path(root) if root else None
        self.suffix = f"r{rank}of{world}"
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "cache.json"
        if meta.exists():
            if json.loads(meta.read_text()) != fingerprint:
                raise SlimkitError(f"teacher cache {self.root} was made for another teacher, data or loss: delete it or choose another cache dir")
        elif rank == 0:
            meta.write_text(json.dumps(fingerprint, sort_keys=True))

    def _file(self, index: int) -> Path:
        return self.root / f"{index:06d}-{self.suffix}.safetensors"

    def has(self, index: int) -> bool:
        """Whether micro-batch `index`'s teacher outputs are on disk (never without a cache)."""
        return self.root is not None and self._file(index).exists()

    def get(self, index: int, compute) -> dict:
        if self.root is None:
            return compute()
        f = self._file(index)
        if f.exists():
            return _unflatten(load_file(f))
        out = compute()
        tmp = f.with_suffix(".tmp")
        save_file(_unshared(_flatten(out)), tmp)
        os.replace(tmp, f)
        return out


def _unshared(flat: dict) -> dict:
    """CPU tensors that safetensors can write: a tensor sharing memory with one before it
    (an encoder's last_hidden_state is hidden_states[-1]) is copied."""
    out, seen = {}, set()
    for k, v in flat.items():
        t = v.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _flatten(out: dict) -> dict:
    flat = {}
    for k, v in out.items():
        if isinstance(v, tuple):
            flat.update({f"{k}.{i}": t for i, t in enumerate(v)})
        else:
            flat[k] = v
    return flat


def _unflatten(flat: dict) -> dict:
    out, seqs = {}, {}
    for k, v in flat.items():
        name, _, idx = k.partition(".")
        if idx:
            seqs.setdefault(name, {})[int(idx)] = v
        else:
            out[name] = v
    for name, items in seqs.items():
        out[name] = tuple(items[i] for i in sorted(items))
    return out
