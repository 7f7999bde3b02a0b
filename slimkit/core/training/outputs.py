"""What the loop trains and how it is scored: the `Distiller` (a model and its loss
terms), the model outputs those terms read, and the evaluation metric.

Every user of the loop trains a `Distiller`: distillation (a student against its
teacher), QAT (the fake-quantized model against the float one, or on labels
alone), recovery after pruning (the pruned model against the unpruned one, or on
labels). The loss is a `core.losses.DistillLoss` of weighted terms; `LogitKD` with
alpha 0 is plain next-token cross-entropy and needs no teacher.

Evaluation (on the evaluation split, never the one training reads) is lower-is-better:
student cross-entropy for causal LMs (the same number for KD and CE-only runs, so they
compare fairly), 1 - cosine to the teacher's embeddings for encoders, the KD loss for
classifiers.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.core.arch import CAUSAL_LM, ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.core.losses import DistillLoss, hard_loss, mean_pool


def model_outputs(model: nn.Module, batch: dict, needs: frozenset, kind: str) -> dict:
    """Run `model` and keep only the outputs the losses read."""
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    if kind == CAUSAL_LM:
        kw.pop("token_type_ids", None)
        kw["use_cache"] = False
    if "hidden_states" in needs:
        kw["output_hidden_states"] = True
    if "attentions" in needs:
        kw["output_attentions"] = True
    out = model(**kw)
    res = {}
    if "logits" in needs:
        res["logits"] = out.logits  # (B, T, V) or (B, C)
    if "last_hidden_state" in needs:
        res["last_hidden_state"] = out.last_hidden_state  # (B, T, H)
    if "hidden_states" in needs:
        res["hidden_states"] = tuple(out.hidden_states)  # L + 1 of (B, T, H)
    if "attentions" in needs:
        if not out.attentions:
            raise SlimkitError("the model returned no attention maps: attention transfer needs attn_implementation='eager'")
        res["attentions"] = tuple(out.attentions)  # L of (B, heads, T, T)
    return res


class Distiller(nn.Module):
    """The trained module: the student and the loss terms' parameters (projections).

    The teacher is not a submodule: it is frozen, not wrapped for data parallelism,
    and not saved in checkpoints.
    """

    def __init__(self, student: nn.Module, loss: DistillLoss, kind: str):
        super().__init__()
        self.student, self.loss, self.kind = student, loss, kind

    def forward(self, batch: dict, teacher_out: dict | None):
        s = model_outputs(self.student, batch, self.loss.needs, self.kind)
        return self.loss(s, teacher_out, batch)


def shard(batch: dict, rank: int, world: int, device) -> dict:
    """This process's rows (rank::world) of a global batch, on `device`."""
    return {k: v[rank::world].to(device) for k, v in batch.items()}


def eval_metric_name(kind: str) -> str:
    return {CAUSAL_LM: "eval_loss", ENCODER: "eval_1_minus_cosine"}.get(kind, "eval_kd_loss")


@torch.no_grad()
def held_out_metric(acc, distiller: Distiller, teacher, batches: list[dict], rank: int, world: int, device) -> float:
    """Mean eval metric over the evaluation batches (lower is better)."""
    distiller.eval()
    total = torch.zeros(2, device=device)  # sum, count
    for batch in batches:
        b = shard(batch, rank, world, device)
        with acc.autocast():
            if distiller.kind == CAUSAL_LM:
                logits = model_outputs(distiller.student, b, frozenset({"logits"}), CAUSAL_LM)["logits"]
                labels = b["labels"][:, 1:]
                n = (labels != -100).sum()
                total += torch.stack([hard_loss(logits[:, :-1], labels) * n, n.float()])
            elif distiller.kind == ENCODER:
                s = model_outputs(distiller.student, b, frozenset({"last_hidden_state"}), ENCODER)["last_hidden_state"]
                t = model_outputs(teacher, b, frozenset({"last_hidden_state"}), ENCODER)["last_hidden_state"]
                mask = b["attention_mask"]
                cos = torch.nn.functional.cosine_similarity(mean_pool(s.float(), mask), mean_pool(t.float(), mask), dim=-1)
                total += torch.stack([(1 - cos).sum(), torch.tensor(float(cos.numel()), device=device)])
            else:
                t = model_outputs(teacher, b, distiller.loss.needs, distiller.kind)
                loss, _ = distiller(b, t)
                total += torch.stack([loss * len(b["input_ids"]), torch.tensor(float(len(b["input_ids"])), device=device)])
    if world > 1:
        total = acc.reduce(total, "sum")
    return (total[0] / total[1].clamp(min=1)).item()
