"""Students built from the teacher: the same model with fewer layers.

DistilBERT's recipe: copy the teacher, keep a subset of its transformer
blocks, and start training from the teacher's own weights. A block-dropped
student keeps the teacher's width, tokenizer, embeddings and head, so logit
KD, hidden-state and embedding losses all line up without projections, and
the student is a plain Hugging Face model of the same class: its config's
layer count is updated, so `save_pretrained` / `from_pretrained` just work.

Which layers, for a count N:
  similarity  (default) drop the contiguous run of L - N blocks whose input and
              output hidden states are most alike on calibration text (smallest
              mean angular distance; Gromov et al. 2024, "The unreasonable
              ineffectiveness of the deeper layers"): the run the stream passes
              through least changed. On SmolLM2 (30 -> 15) the untrained student
              scores perplexity ~5e4 this way against ~8e6 for an even spread.
  spread      N blocks spread evenly from the first to the last
              (`round(i * (L - 1) / (N - 1))`), as DistilBERT kept every other one.
`every=k` keeps blocks 0, k, 2k, ...; an explicit list keeps exactly those. Speed scales with the blocks removed;
embeddings and the LM head (a large share of a small model) stay.

Supported: every family the architecture adapter knows (`core.adapter`:
Llama-family, Gemma 2 and 3, Phi-3, BERT-family, GPT-2, OPT, GPT-NeoX); the adapter also
renumbers the kept blocks' KV-cache slots and writes the config's layer count.
The teacher is never modified: the student is a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from slimkit.core.adapter import adapter
from slimkit.core.errors import SlimkitError
from slimkit.io.model import LoadedModel

UNSUPPORTED = "pass your own student model instead"


def num_layers(model: nn.Module) -> int:
    return len(adapter(model, "a layer-dropped student", UNSUPPORTED).blocks)


def select_layers(n_teacher: int, layers: int | Sequence[int] | None = None, every: int | None = None) -> list[int]:
    """Teacher block indices the student keeps."""
    if (layers is None) == (every is None):
        raise SlimkitError("choose the student's layers with either a count / list (--student-layers) or every=k, not both")
    if every is not None:
        if not 1 <= every <= n_teacher:
            raise SlimkitError(f"every={every} is out of range: use 1..{n_teacher} (the teacher has {n_teacher} layers)")
        return list(range(0, n_teacher, every))
    if isinstance(layers, int):
        if not 1 <= layers <= n_teacher:
            raise SlimkitError(f"student layers must be in 1..{n_teacher} (the teacher's depth), got {layers}")
        if layers == 1:
            return [n_teacher - 1]
        return sorted({round(i * (n_teacher - 1) / (layers - 1)) for i in range(layers)})
    keep = [int(i) for i in layers]
    if not keep:
        raise SlimkitError("the student's layer list is empty: name at least one teacher layer to keep")
    bad = [i for i in keep if not 0 <= i < n_teacher]
    if bad:
        raise SlimkitError(f"student layer {bad[0]} is out of range: the teacher has layers 0..{n_teacher - 1}")
    if len(set(keep)) != len(keep) or keep != sorted(keep):
        raise SlimkitError(f"student layers {keep} must be increasing and distinct: list each teacher layer once, in order")
    return keep


LAYER_CHOICES = ("similarity", "spread")


@torch.no_grad()
def most_similar_run(model: nn.Module, n_keep: int, batches: list[dict]) -> list[int]:
    """Blocks to keep: all but the contiguous run of L - n_keep blocks across which the
    hidden states turn the least (mean angle over non-padding tokens of `batches`)."""
    n_layers = num_layers(model)
    n_drop = n_layers - n_keep
    if n_drop <= 0:
        return list(range(n_layers))
    angle = torch.zeros(n_layers - n_drop + 1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            hs = model(**kw, output_hidden_states=True).hidden_states  # L + 1 of (B, T, H)
            mask = batch.get("attention_mask", torch.ones(kw["input_ids"].shape)).bool()
            for start in range(len(angle)):
                cos = torch.nn.functional.cosine_similarity(hs[start][mask].float(), hs[start + n_drop][mask].float(), dim=-1)
                angle[start] += torch.arccos(cos.clamp(-1, 1)).sum().double()
    finally:
        model.train(was_training)
    start = int(angle.argmin())  # ties: the earliest run
    return [i for i in range(n_layers) if not start <= i < start + n_drop]


def drop_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A deep copy of `model` with only the blocks `keep` (teacher indices), config updated."""
    adapter(model, "a layer-dropped student", UNSUPPORTED)  # an unknown layout fails before the copy
    student = copy.deepcopy(model)  # the teacher is never touched
    adapter(student, "a layer-dropped student", UNSUPPORTED).keep_blocks_(keep)
    student.requires_grad_(True)  # trainable even when the caller froze the teacher
    return student


def make_student(teacher: LoadedModel, layers: int | Sequence[int] | None = None, every: int | None = None) -> LoadedModel:
    """A new LoadedModel: the teacher with fewer blocks, initialised from its weights."""
    keep = select_layers(num_layers(teacher.model), layers, every)
    student = drop_layers(teacher.model, keep)
    manifest = {k: v for k, v in teacher.manifest.items() if k == "recipe"}
    return LoadedModel(model=student, tokenizer=teacher.tokenizer, kind=teacher.kind, source=f"{teacher.source}[layers={len(keep)}]",
                       path=None, manifest=manifest, sentence=dict(teacher.sentence))


def default_layer_map(keep: Sequence[int]) -> list[tuple[int, int]]:
    """Student block i matches the teacher block it was copied from."""
    return [(i, j) for i, j in enumerate(keep)]
