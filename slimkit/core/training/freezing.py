"""Which parameters train: one context manager freezes a set and gives every flag back.

Each technique freezes for its own reason: distillation the student modules a
user names (`freeze=["embeddings"]`: a block-dropped student's token vectors are
the teacher's already), QAT everything but the fake-quantized layers (the rounding
damaged those; the tied LM head shares the embedding), recovery after pruning the
embeddings (they were not pruned, and a tied head's weight gradient is a full
vocabulary matmul skipped). A frozen parameter gets no gradient at all, so its
backward matmuls are skipped too. Afterwards every parameter of the model has the
`requires_grad` it had before, whatever the run did in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn


@contextlib.contextmanager
def frozen(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Within the block `params` get no gradient; after it, each parameter of `model`
    has its own `requires_grad` back."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def all_but(model: nn.Module, trained: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters of `model` that are not among `trained` (to freeze the rest)."""
    keep = {id(p) for p in trained}
    return [p for p in model.parameters() if id(p) not in keep]
