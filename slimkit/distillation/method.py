"""`distill`: the technique as the registry, recipes and CLI see it.

A `DistillConfig` names the student (a layer-dropped copy of the teacher, or a
given model), the losses and the training run; `apply(teacher, config)`
builds the student, trains it on the calibration split against the teacher
and returns it as a new LoadedModel. The teacher is left as it was.

Losses by model kind (see `losses.py`):
  * causal LM: logit KD (temperature, alpha) — `loss="ce"` trains the same
    student on the hard labels alone, without the teacher, as the baseline;
  * encoder: embedding loss (cosine or MSE) on mean-pooled sentence embeddings;
  * classifier: logit KD on unlabeled text (pure KD: there are no labels);
  * any kind: optional hidden-state and attention matching through a layer map.

`freeze` keeps the student modules it names as they were copied (say the
embeddings of a block-dropped student: its token vectors are the teacher's
already, and training fewer parameters on a small corpus overfits less and
steps faster).

`dropout` sets the student's dropout for training only (the artifact keeps the
model's own rates). The default keeps the model's rates; 0 turns dropout off,
which on a short CPU budget fits a block-dropped student much faster: all-MiniLM-L6-v2
to 3 layers, 10 minutes on 2 cores, reached cosine 0.948 to the teacher in 1,223 steps
without dropout against 0.928 in 754 steps with BERT's 0.1 (benchmarks/RESULTS-distill.md).
The student starts as a copy of the teacher, so it is far from the random start that
dropout's regularisation is tuned for; and on a CPU every step without it is about 1.6x
cheaper: in a profiled step with dropout, drawing the Bernoulli masks took a quarter of
the time, and attention left PyTorch's fused CPU kernel for the unfused math path.

`progressive(teacher, [cfg1, cfg2, ...])` chains stages, each student becoming
the next stage's teacher (30 → 20 → 15 layers, say): each step removes less at
once, so less knowledge is lost per step, at the cost of more training time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slimkit.core import data as D
from slimkit.core import losses as L
from slimkit.core.arch import CAUSAL_LM, CLASSIFIER, ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Context, register
from slimkit.core.selection import matches
from slimkit.core.training import Distiller, TrainConfig, train
from slimkit.distillation.student import LAYER_CHOICES, make_student, most_similar_run, num_layers, select_layers
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel

LOSSES = ("kd", "ce")
SIMILARITY_BATCHES = 4  # calibration micro-batches that decide which blocks a layer count keeps


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    student_layers: int | tuple[int, ...] | None = None  # a count, or the teacher layers to keep
    every: int | None = None  # or keep teacher layers 0, k, 2k, ...
    student: str | None = None  # or train this model (path or name) as the student
    layer_choice: str = "similarity"  # with a layer count: drop the most similar run of blocks, or spread evenly
    loss: str = "kd"  # kd: learn from the teacher; ce: hard labels only (baseline)
    temperature: float = 1.0
    alpha: float = 0.9  # share of logit KD against hard-label CE
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"
    attention_weight: float = 0.0
    attention_loss: str = "mse"
    layer_map: tuple[tuple[int, int], ...] | None = None  # (student i, teacher j); default: where i was copied from
    embedding_loss: str = "cosine"
    text_views: int = 1  # encoders/classifiers: training passages cut this many ways (new offsets and lengths)
    freeze: tuple[str, ...] = ()  # student module name patterns whose weights stay as copied, e.g. ("embeddings",)
    dropout: float | None = None  # the student's dropout while training; None keeps the model's own

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.student_layers, list):
            object.__setattr__(self, "student_layers", tuple(self.student_layers))
        if self.layer_map is not None:
            try:
                pairs = tuple((int(i), int(j)) for i, j in self.layer_map)
            except (TypeError, ValueError):
                raise SlimkitError("layer_map must be (student, teacher) pairs of layer numbers, e.g. [[0, 0], [1, 2]]") from None
            object.__setattr__(self, "layer_map", pairs)
        chosen = [n for n in ("student_layers", "every", "student") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise SlimkitError("choose the student one way: student_layers (--student-layers N), every=k, or student=MODEL")
        if self.layer_choice not in LAYER_CHOICES:
            raise SlimkitError(f"unknown layer choice '{self.layer_choice}': use one of {', '.join(LAYER_CHOICES)}")
        if self.loss not in LOSSES:
            raise SlimkitError(f"unknown distillation loss '{self.loss}': use kd (learn from the teacher) or ce (labels only)")
        if not self.temperature > 0:
            raise SlimkitError(f"temperature must be > 0, got {self.temperature}: use e.g. 1.0 or 2.0")
        if not 0 <= self.alpha <= 1:
            raise SlimkitError(f"alpha must be in [0, 1], got {self.alpha}: 1 is pure KD, 0 pure cross-entropy")
        if self.hidden_weight < 0 or self.attention_weight < 0:
            raise SlimkitError("hidden_weight and attention_weight must be >= 0 (0 turns the term off)")
        if self.loss == "ce" and (self.hidden_weight or self.attention_weight):
            raise SlimkitError("loss=ce trains without the teacher: set hidden_weight and attention_weight to 0, or use loss=kd")
        if isinstance(self.freeze, (list, str)):
            object.__setattr__(self, "freeze", (self.freeze,) if isinstance(self.freeze, str) else tuple(self.freeze))
        if not all(isinstance(p, str) and p for p in self.freeze):
            raise SlimkitError(f"freeze must be a list of module name patterns, got {self.freeze!r}: e.g. freeze=['embeddings']")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise SlimkitError(f"dropout must be in [0, 1), got {self.dropout}: 0 turns it off, leave it unset to keep the model's own")
        if self.text_views < 1:
            raise SlimkitError(f"text_views must be at least 1, got {self.text_views}: 1 cuts the text once")
        if self.hidden_loss not in ("mse", "cosine") or self.attention_loss not in ("mse", "kl") or self.embedding_loss not in ("cosine", "mse"):
            raise SlimkitError("loss kinds: hidden_loss is mse|cosine, attention_loss mse|kl, embedding_loss cosine|mse")


@register("distill", "distill", DistillConfig, "train a smaller student (fewer layers) on the teacher's outputs")
def apply(model: LoadedModel, config: DistillConfig, ctx: Context = Context()) -> LoadedModel:
    """Train a student of `model` (the teacher) on `ctx`'s text as `config` says; return it as a new LoadedModel."""
    teacher = model
    ctx.seed_everything()
    student, keep = _student(teacher, config, ctx)
    frozen = frozen_parameters(student.model, config.freeze)
    distiller = Distiller(student.model, build_loss(teacher, student, keep, config), teacher.kind)
    source = ctx.calibration()
    train_batches = make_batches(teacher, source, config, limit=None, seed=ctx.seed)
    eval_batches = make_batches(teacher, dataclasses.replace(source, split="evaluation"), config, limit=config.eval_batches)
    fingerprint = _fingerprint(teacher, config, distiller, source, train_batches)
    with set_dropout(student.model, config.dropout):
        result = train(distiller, teacher.model if distiller.loss.uses_teacher or teacher.kind != CAUSAL_LM else None,
                       train_batches, eval_batches, config, seed=ctx.seed, fingerprint=fingerprint, on_step=ctx.on_step,
                       freeze=frozen, device=ctx.device, label="Distilling")
    student.model.eval()
    step = {"method": "distill", **dataclasses.asdict(config)}
    training = {**result.to_dict(), "teacher_layers": keep}  # the blocks the student was copied from
    manifest = {"recipe": list(teacher.manifest.get("recipe", [])) + [step], "training": training}
    return LoadedModel(model=student.model, tokenizer=teacher.tokenizer, kind=teacher.kind, source=student.source, manifest=manifest,
                       sentence=dict(teacher.sentence))


def progressive(teacher: LoadedModel | str, stages: Sequence[DistillConfig], ctx: Context = Context()) -> LoadedModel:
    """Distil in stages: each stage's student is the next stage's teacher."""
    if not stages:
        raise SlimkitError("progressive distillation needs at least one stage")
    current = load(teacher)
    for cfg in stages:
        current = apply(current, cfg, ctx)
    return current


# --------------------------------------------------------------------------- building blocks


def _student(teacher: LoadedModel, cfg: DistillConfig, ctx: Context) -> tuple[LoadedModel, list[int] | None]:
    if cfg.student is not None:
        student = load(cfg.student)
        if student.kind != teacher.kind:
            raise SlimkitError(f"the student is a {student.kind} and the teacher a {teacher.kind}: distil between models of one kind")
        student.model.train()
        return student, None
    n_teacher = num_layers(teacher.model)
    if isinstance(cfg.student_layers, int) and cfg.layer_choice == "similarity":
        select_layers(n_teacher, cfg.student_layers)  # range check
        probe = make_batches(teacher, ctx.calibration(), cfg, limit=SIMILARITY_BATCHES)
        keep = most_similar_run(teacher.model, cfg.student_layers, probe)
    else:
        keep = select_layers(n_teacher, cfg.student_layers, cfg.every)
    return make_student(teacher, keep), keep


def frozen_parameters(model: torch.nn.Module, patterns: Sequence[str]) -> list[torch.nn.Parameter]:
    """The parameters of the modules that match `patterns`, which the training loop keeps as they are."""
    if not patterns:
        return []
    chosen = [m for n, m in model.named_modules() if n and matches(n, patterns)]
    if not chosen:
        raise SlimkitError(f"freeze: no module of the student matches {list(patterns)}; check the patterns against its module names")
    return [p for m in chosen for p in m.parameters()]


@contextlib.contextmanager
def set_dropout(model: torch.nn.Module, p: float | None):
    """Every dropout of `model` at rate `p` inside the block (None: unchanged), restored after.

    Dropout lives in `nn.Dropout` modules (BERT, GPT-2) and in float attributes that
    attention functions read at call time (Llama's `attention_dropout`); both are set."""
    if p is None:
        yield
        return
    saved = []
    for m in model.modules():
        names = ["p"] if isinstance(m, torch.nn.Dropout) else [n for n, v in vars(m).items() if "dropout" in n and type(v) is float]
        for name in names:
            saved.append((m, name, getattr(m, name)))
            setattr(m, name, float(p))
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _width(model) -> int:
    return int(model.config.hidden_size)


def build_loss(teacher: LoadedModel, student: LoadedModel, keep: list[int] | None, cfg: DistillConfig) -> L.DistillLoss:
    """The loss module for this teacher/student pair; projections are created here, once."""
    kind = teacher.kind
    terms: list[L.Term] = []
    if kind == ENCODER:
        if cfg.loss == "ce":
            raise SlimkitError("an encoder has no labels for loss=ce: use loss=kd (embedding loss against the teacher)")
        terms.append(L.EmbeddingLoss(kind=cfg.embedding_loss))
    else:
        if kind == CLASSIFIER and cfg.loss == "ce":
            raise SlimkitError("loss=ce needs labels, and the calibration text has none: use loss=kd for classifiers")
        t_out, s_out = teacher.model.get_output_embeddings(), student.model.get_output_embeddings()
        if kind == CAUSAL_LM and t_out is not None and s_out is not None and t_out.weight.shape[0] != s_out.weight.shape[0]:
            raise SlimkitError(
                f"logit KD needs one vocabulary: the student has {s_out.weight.shape[0]} tokens and the teacher "
                f"{t_out.weight.shape[0]}; use a student with the teacher's tokenizer"
            )
        alpha = 0.0 if cfg.loss == "ce" else (1.0 if kind == CLASSIFIER else cfg.alpha)
        terms.append(L.LogitKD(temperature=cfg.temperature, alpha=alpha))
    ns, nt = num_layers(student.model), num_layers(teacher.model)
    layer_map = cfg.layer_map or default_map(keep, ns, nt)
    if cfg.hidden_weight > 0:
        terms.append(L.HiddenStateLoss(layer_map, ns, nt, _width(student.model), _width(teacher.model), cfg.hidden_weight, cfg.hidden_loss))
    if cfg.attention_weight > 0:
        terms.append(L.AttentionLoss(layer_map, ns, nt, cfg.attention_weight, cfg.attention_loss))
    return L.DistillLoss(terms)


def default_map(keep: list[int] | None, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student block i ↔ the teacher block it was copied from; else spread evenly, last to last."""
    if keep is not None:
        return list(enumerate(keep))
    return [(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


def make_batches(lm: LoadedModel, source: D.TextSource, cfg: TrainConfig, limit: int | None, seed: int = 0) -> list[dict]:
    """Full micro-batches of `batch_size` sequences from `source` (at most `limit` of them); `seed`
    cuts the further text views."""
    bs = cfg.batch_size
    if lm.kind == CAUSAL_LM:
        n = limit * bs if limit else (cfg.max_samples or 10**7)
        out = []
        for ids in D.calibration_batches(lm.tokenizer, source, cfg.seq_len, n, bs):  # (B, seq_len)
            if len(ids) == bs:
                out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        return out
    n = limit * bs if limit else cfg.max_samples
    views = getattr(cfg, "text_views", 1) if limit is None else 1  # evaluation and probes see the plain passages
    texts = D.passage_views(source.texts(), views, seed, limit=n)
    D.require_nonempty(len(texts), source, "passages")
    if limit is None:  # training: passages of like length batched together, so little of a step is padding
        texts = by_length(lm.tokenizer, texts, cfg.seq_len)
    out = []
    for chunk in D.batched(texts, bs):
        if len(chunk) == bs:
            enc = lm.tokenizer(chunk, padding=True, truncation=True, max_length=cfg.seq_len, return_tensors="pt")
            out.append(dict(enc))
    return out


def by_length(tokenizer, texts: list[str], seq_len: int) -> list[str]:
    """`texts` sorted by their token count (cut at `seq_len`), ties in their original order.

    A batch is padded to its longest passage, and the lengths of prose passages spread
    widely (the embedded corpus: median 66 tokens, one in eight over 128), so batches
    cut from shuffled passages spend much of their compute on padding. The trainer
    shuffles the order of the batches each epoch; only their membership is by length."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]]
    return [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]


def _fingerprint(teacher: LoadedModel, cfg: DistillConfig, distiller: Distiller, source, batches: list[dict]) -> dict:
    first = hashlib.sha256(batches[0]["input_ids"].numpy().tobytes()).hexdigest()[:16] if batches else ""
    return {"teacher": teacher.source, "parameters": teacher.num_parameters(), "needs": sorted(distiller.loss.needs),
            "data": source.name, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "batches": len(batches), "first": first}
