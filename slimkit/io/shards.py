"""Weights written shard by shard, in the layout transformers reads (`model.safetensors`, or
`model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`).

`ShardWriter` takes tensors as a technique finishes them (a block at a time) and
writes a shard whenever what it holds passes `max_bytes`, so a model far larger
than memory is saved in pieces; `close` names the shards and writes the index.
Tensors of one `add` that share storage (a head tied to its embedding) are written
once, under the first name, as save_pretrained does.

`convert_shards` rewrites each shard through a function of its tensors (a standard
layout's encoding), one shard in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from slimkit.core.memory import release_memory
from slimkit.io.lazy import INDEX

SINGLE = "model.safetensors"
MAX_SHARD_BYTES = 2 * 2**30
STREAM_SHARD_BYTES = 128 * 2**20  # a streamed walk's shards: held before written, and what `save` converts at once (its peak: about 4.5x this)


class ShardWriter:
    def __init__(self, out: Path, max_bytes: int = MAX_SHARD_BYTES):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}  # name -> shard number
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue tensors (any device, contiguous or not); a shard is written once enough is queued, between
        modules (a module's tensors share a shard). Tensors of one call that share storage (a head tied to
        its embedding) are written once: pass tied tensors in one call. (Only within a call: the memory of
        a tensor written earlier may since have been freed and reused by another.)"""
        seen: set[tuple] = set()
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            by_module.setdefault(name.rpartition(".")[0], {})[name] = t
        for group in by_module.values():
            for name, t in group.items():
                if name in self.weight_map or name in self.pending:
                    raise ValueError(f"tensor {name} written twice")
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
                if key is not None and key in seen:
                    continue
                if key is not None:
                    seen.add(key)
                t = t.detach().to("cpu").contiguous()
                self.pending[name] = t
                self.pending_bytes += t.numel() * t.element_size()
            if self.pending_bytes >= self.max_bytes:
                self.flush()

    def flush(self) -> None:
        """Write what is queued as one shard."""
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / f"model-part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.weight_map.update({n: len(self.files) for n in self.pending})
        self.total += self.pending_bytes
        self.files.append(path)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give the shards their final names and write the index; return the files."""
        self.flush()
        if len(self.files) == 1:
            final = [self.out / SINGLE]
        else:
            n = len(self.files)
            final = [self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for src, dst in zip(self.files, final):
            src.rename(dst)
        if len(final) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": {k: final[i].name for k, i in sorted(self.weight_map.items())}}
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        self.files = final
        return final


def shard_files(path: Path) -> list[Path]:
    """A directory's weight files, in order."""
    return sorted(path.glob("*.safetensors"))


def convert_shards(path: Path, convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Rewrite every shard of `path` as convert(its tensors), one at a time, and the index to match."""
    from safetensors.torch import load_file, save_file

    weight_map = {}
    total = 0
    for f in shard_files(path):
        tensors = convert(load_file(str(f)))
        save_file(tensors, str(f), metadata={"format": "pt"})
        weight_map.update({n: f.name for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        release_memory()  # or the heap keeps this shard's copies and the next shard's come on top
    if (path / INDEX).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
