"""Distillation losses: pure tensor math, and composable weighted terms.

A student learns from a teacher through several signals, each a term here:

* `LogitKD` — Hinton et al. (2015). Both distributions are softened by a
  temperature T: p = softmax(z / T). The student minimises KL(p_teacher ||
  p_student), multiplied by T² so that the gradient's size does not shrink as
  T grows, mixed with the ordinary hard-label cross-entropy:
  `alpha * T² * KL + (1 - alpha) * CE`. A higher T exposes the teacher's
  "dark knowledge" (which wrong answers are nearly right); T = 1 matches the
  teacher's actual distribution, which is what a language model is judged on.
* `HiddenStateLoss` — FitNets / TinyBERT. Student layer i's output is pulled
  towards teacher layer j's (a layer map). When the widths differ a learned
  linear projection maps student width to teacher width; it belongs to the
  loss module, is created once, trained with the student, and discarded after.
* `AttentionLoss` — attention transfer: the student's attention maps are
  matched to the teacher's (MSE, or KL between rows). When the head counts
  differ both are averaged over heads first.
* `EmbeddingLoss` — for sentence encoders: the mean-pooled embedding of each
  text is pulled towards the teacher's by cosine distance or MSE. It needs no
  labels and targets exactly what the encoder is used for.

Trade-offs: logit KD needs the same vocabulary and the teacher's full logits
(large for a 49k vocabulary); hidden and attention matching give a denser
signal per step but tie the student to the teacher's internal geometry and
need `output_hidden_states` / eager attention (slower). The functions take and
return tensors and are tested without any model; the classes only choose
inputs from model outputs and weight the results.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- pure math


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of values (...,) over positions where mask (...,) is true."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · KL(softmax(t/T) || softmax(s/T)), averaged over unmasked positions.

    student_logits, teacher_logits: (..., V); mask: (...) true where scored.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise SlimkitError(
            f"logit KD needs one vocabulary: the student has {student_logits.shape[-1]} outputs and the teacher "
            f"{teacher_logits.shape[-1]}; use a student with the teacher's tokenizer, or hidden-state/embedding losses"
        )
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    kl = (t.exp() * (t - s)).sum(-1)  # (...)
    return _masked_mean(kl, mask) * temperature**2


def hard_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of logits (..., V) against labels (...), skipping ignore_index."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                kind: str = "mse") -> torch.Tensor:
    """Distance between hidden states (B, T, H) of equal width, over unmasked tokens (B, T)."""
    if kind == "mse":
        per_token = (student.float() - teacher.float()).pow(2).mean(-1)  # (B, T)
    else:
        per_token = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)  # (B, T)
    return _masked_mean(per_token, mask)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                   kind: str = "mse") -> torch.Tensor:
    """Distance between attention maps (B, heads, T, T); rows of padding tokens are skipped.

    When head counts differ, both maps are averaged over heads first (B, 1, T, T).
    """
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    s, t = student.float(), teacher.float()
    if kind == "mse":
        per_row = (s - t).pow(2).mean(-1)  # (B, h, T)
    else:  # KL(teacher row || student row); both rows are distributions over keys
        eps = 1e-12
        per_row = (t * ((t + eps).log() - (s + eps).log())).sum(-1)  # (B, h, T)
    row_mask = None if mask is None else mask[:, None, :].expand_as(per_row)
    return _masked_mean(per_row, row_mask)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embeddings (B, H) from token states (B, T, H) and an attention mask (B, T)."""
    hidden = hidden.float()  # bf16 sums over many tokens would blur the small differences the losses measure
    if mask is None:
        return hidden.mean(1)
    m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """1 - cosine (or MSE) between sentence embeddings (B, H), averaged over the batch."""
    if student.shape[-1] != teacher.shape[-1]:
        raise SlimkitError(
            f"embedding loss needs one width: the student's embeddings have {student.shape[-1]} dims and the "
            f"teacher's {teacher.shape[-1]}; keep the teacher's hidden size"
        )
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return (student.float() - teacher.float()).pow(2).mean()


# --------------------------------------------------------------------------- composable terms


class Term(nn.Module):
    """One weighted loss term. `needs` names the model outputs it reads."""

    name = "term"
    needs: frozenset[str] = frozenset()
    uses_teacher = True

    def __init__(self, weight: float = 1.0):
        super().__init__()
        if weight < 0:
            raise SlimkitError(f"{self.name} weight must be >= 0, got {weight}")
        self.weight = weight


class LogitKD(Term):
    """alpha · T² · KL(teacher || student) + (1 - alpha) · CE(labels); alpha = 0 needs no teacher."""

    name = "logit_kd"
    needs = frozenset({"logits"})

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, alpha: float = 0.9):
        super().__init__(weight)
        if not temperature > 0:
            raise SlimkitError(f"temperature must be > 0, got {temperature}: use e.g. 1.0 or 2.0")
        if not 0 <= alpha <= 1:
            raise SlimkitError(f"alpha must be in [0, 1], got {alpha}: 1 is pure KD, 0 pure cross-entropy")
        self.temperature, self.alpha = temperature, alpha
        self.uses_teacher = alpha > 0

    def forward(self, s: dict, t: dict | None, batch: dict) -> torch.Tensor:
        logits = s["logits"]  # (B, T, V) for language models, (B, C) for classifiers
        mask = batch.get("attention_mask") if logits.dim() == 3 else None
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.alpha > 0:
            loss = loss + self.alpha * kd_loss(logits, t["logits"], self.temperature, mask)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * hard_loss(logits[:, :-1], batch["labels"][:, 1:])
        return loss


def check_layer_map(layer_map: Sequence[tuple[int, int]], n_student: int, n_teacher: int, what: str) -> tuple:
    """Validate (student i, teacher j) pairs; indices count blocks from 0 (hidden state i+1)."""
    pairs = tuple((int(i), int(j)) for i, j in layer_map)
    if not pairs:
        raise SlimkitError(f"{what} layer map is empty: give at least one (student, teacher) pair")
    for i, j in pairs:
        if not 0 <= i < n_student:
            raise SlimkitError(f"{what} layer map: student layer {i} is out of range 0..{n_student - 1}; fix the map")
        if not 0 <= j < n_teacher:
            raise SlimkitError(f"{what} layer map: teacher layer {j} is out of range 0..{n_teacher - 1}; fix the map")
    return pairs


class HiddenStateLoss(Term):
    """Match student block outputs to teacher block outputs through a layer map.

    A projection (student width -> teacher width, no bias) is created here, once,
    for each mapped pair when the widths differ; it is trained with the student.
    """

    name = "hidden"
    needs = frozenset({"hidden_states"})

    def __init__(self, layer_map, n_student: int, n_teacher: int, student_width: int, teacher_width: int,
                 weight: float = 1.0, kind: str = "mse"):
        super().__init__(weight)
        if kind not in ("mse", "cosine"):
            raise SlimkitError(f"hidden-state loss '{kind}' is unknown: use mse or cosine")
        self.layer_map, self.kind = check_layer_map(layer_map, n_student, n_teacher, "hidden-state"), kind
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False) for _ in self.layer_map
        ) if student_width != teacher_width else None

    def forward(self, s: dict, t: dict, batch: dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        total = 0.0
        for k, (i, j) in enumerate(self.layer_map):
            hs = s["hidden_states"][i + 1]  # (B, T, Hs); entry 0 is the embedding output
            if self.projections is not None:
                hs = self.projections[k](hs)  # (B, T, Ht)
            total = total + hidden_loss(hs, t["hidden_states"][j + 1], mask, self.kind)
        return total / len(self.layer_map)


class AttentionLoss(Term):
    """Match attention maps of mapped layers (MSE or KL), heads averaged when counts differ."""

    name = "attention"
    needs = frozenset({"attentions"})

    def __init__(self, layer_map, n_student: int, n_teacher: int, weight: float = 1.0, kind: str = "mse"):
        super().__init__(weight)
        if kind not in ("mse", "kl"):
            raise SlimkitError(f"attention loss '{kind}' is unknown: use mse or kl")
        self.layer_map, self.kind = check_layer_map(layer_map, n_student, n_teacher, "attention"), kind

    def forward(self, s: dict, t: dict, batch: dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        total = sum(attention_loss(s["attentions"][i], t["attentions"][j], mask, self.kind) for i, j in self.layer_map)
        return total / len(self.layer_map)


class EmbeddingLoss(Term):
    """Cosine distance (or MSE) between mean-pooled sentence embeddings."""

    name = "embedding"
    needs = frozenset({"last_hidden_state"})

    def __init__(self, weight: float = 1.0, kind: str = "cosine"):
        super().__init__(weight)
        if kind not in ("cosine", "mse"):
            raise SlimkitError(f"embedding loss '{kind}' is unknown: use cosine or mse")
        self.kind = kind

    def forward(self, s: dict, t: dict, batch: dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return embedding_loss(mean_pool(s["last_hidden_state"], mask), mean_pool(t["last_hidden_state"], mask), self.kind)


class DistillLoss(nn.Module):
    """A weighted sum of terms; its parameters (projections) are trained with the student."""

    def __init__(self, terms: Sequence[Term]):
        super().__init__()
        if not terms:
            raise SlimkitError("no distillation loss terms: give at least one (logit KD, hidden, attention or embedding)")
        self.terms = nn.ModuleList(terms)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(t.needs for t in self.terms))

    @property
    def uses_teacher(self) -> bool:
        return any(t.uses_teacher and t.weight > 0 for t in self.terms)

    def forward(self, s: dict, t: dict | None, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        total, parts = 0.0, {}
        for term in self.terms:
            if term.weight == 0:
                continue
            value = term(s, t, batch)
            parts[term.name] = value.item()
            total = total + term.weight * value
        return total, parts
