"""Quality of a model, measured against the original where one is given.

Causal LMs
  * perplexity over sliding windows (`window` tokens, advancing by `stride`;
    every token scored once with at least `window - stride` tokens of context);
  * against a reference model, on the same tokens in the same pass:
    KL(reference || model) of the next-token distributions (mean nats per
    token) and top-1 agreement (how often both pick the same next token).
Encoders (sentence embeddings, pooled as the model's sentence-transformers
  config says, `1_Pooling/config.json`; mean over the attention mask without one)
  * mean cosine similarity of each passage's embedding to the reference's;
  * retrieval agreement: each evaluation passage queries all the others, and
    the overlap of the two models' top-10 neighbours is averaged.
Classifiers
  * accuracy and macro F1 on labeled records (`.jsonl` with `text`/`label`);
  * against a reference: prediction agreement and KL of the class distributions.

The text is the evaluation split of the chosen source, never calibration.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from slimkit.core import data as D
from slimkit.core.arch import CAUSAL_LM, ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import resolve_device
from slimkit.core.metrics import f1_macro, next_token_stats, topk_overlap
from slimkit.core.progress import track
from slimkit.io.loader import load, takes_tokenizer
from slimkit.io.model import LoadedModel, placed
from slimkit.io.sentence import pooling_modes


@dataclass
class EvalResult:
    model: str
    kind: str
    data: str
    perplexity: float | None = None
    reference: str | None = None
    reference_perplexity: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    cosine_to_reference: float | None = None
    retrieval_top10_overlap: float | None = None
    accuracy: float | None = None
    f1_macro: float | None = None
    agreement_with_reference: float | None = None
    tokens: int | None = None
    samples: int | None = None
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalConfig:
    window: int = 512
    stride: int = 256
    batch_size: int = 1
    max_tokens: int | None = None  # cap on evaluation tokens (None: the whole split)
    max_passages: int = 256  # encoder / classifier passages
    max_length: int = 256  # encoder / classifier truncation

    def __post_init__(self):
        if self.window < 2:
            raise SlimkitError(f"window must be at least 2 tokens, got {self.window}")
        if not 0 < self.stride <= self.window:
            raise SlimkitError(f"stride must be in 1..window ({self.window}), got {self.stride}")
        if self.batch_size < 1:
            raise SlimkitError(f"batch size must be at least 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise SlimkitError(f"max tokens must be at least 2, got {self.max_tokens}")
        if self.max_passages < 2:
            raise SlimkitError(f"max passages must be at least 2, got {self.max_passages}")


def evaluate(
    model: LoadedModel | str,
    reference: LoadedModel | str | None = None,
    data: D.TextSource | str | None = None,
    config: EvalConfig = EvalConfig(),
    *,
    tokenizer=None,
    device: str | None = None,
) -> EvalResult:
    """Measure `model`'s quality on `data` (default: the embedded evaluation split).

    `model` and `reference` may be transformers model objects; `tokenizer` is theirs.
    `device` ("cpu", "cuda", "auto"; None: where each model is) is where both run;
    each goes back where it was afterwards."""
    device = resolve_device(device)
    if tokenizer is not None and not takes_tokenizer(model) and not takes_tokenizer(reference):
        raise SlimkitError("tokenizer= goes with a model object; both models bring their own tokenizer: drop tokenizer=")
    model = load(model, tokenizer=tokenizer if takes_tokenizer(model) else None)
    if reference is not None:
        reference = load(reference, tokenizer=tokenizer if takes_tokenizer(reference) else None)
    source = data if isinstance(data, D.TextSource) else D.TextSource.parse(data)
    if reference is not None and reference.kind != model.kind:
        raise SlimkitError(f"the reference is of kind {reference.kind} and the model of kind {model.kind}: compare models of one kind")
    result = EvalResult(model=model.name, kind=model.kind, data=source.name, reference=reference.name if reference else None)
    result.settings = asdict(config)
    start = time.perf_counter()
    with placed(model, reference, device=device), torch.inference_mode():
        if model.kind == CAUSAL_LM:
            _eval_causal_lm(model, reference, source, config, result)
        elif model.kind == ENCODER:
            _eval_encoder(model, reference, source, config, result)
        else:
            _eval_classifier(model, reference, source, config, result)
    result.seconds = round(time.perf_counter() - start, 3)
    return result


# --------------------------------------------------------------------------- causal LM


def _scored_logits(lm: LoadedModel, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits predicting the last `keep - 1` tokens of each row: (B, keep - 1, V)."""
    device = _device(lm.model)
    logits = lm.model(input_ids=ids.to(device), use_cache=False, logits_to_keep=keep).logits
    return logits[:, :-1]


def _eval_causal_lm(model, reference, source, config, result):
    windows = D.lm_windows(model.tokenizer, source.texts(), config.window, config.stride, config.max_tokens)
    totals = {"nll": 0.0, "n": 0, "ref_nll": 0.0, "kl": 0.0, "agree": 0}
    for ids, n_scored in track(D.lm_batches(windows, config.batch_size), "Evaluating perplexity"):
        keep = max(n_scored) + 1
        logits = _scored_logits(model, ids, keep)
        ref_logits = _scored_logits(reference, ids, keep) if reference is not None else None
        targets = ids[:, -(keep - 1) :]
        for row, n in enumerate(n_scored):  # row by row: (n, V) logits stay small
            sl = slice(keep - 1 - n, keep - 1)
            stats = next_token_stats(
                logits[row, sl], targets[row, sl].to(logits.device), ref_logits[row, sl] if ref_logits is not None else None
            )
            for k, v in stats.items():
                totals[k] += v
    D.require_nonempty(totals["n"], source, "tokens to score (it needs at least 2 tokens)")
    n = totals["n"]
    result.tokens = n
    result.perplexity = _ppl(totals["nll"] / n)
    if reference is not None:
        result.reference_perplexity = _ppl(totals["ref_nll"] / n)
        result.kl_divergence = totals["kl"] / n
        result.top1_agreement = totals["agree"] / n


def _ppl(mean_nll: float) -> float:
    return float(torch.tensor(mean_nll).exp())


# --------------------------------------------------------------------------- encoder


def embed(lm: LoadedModel, texts: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """L2-normalized sentence embeddings, pooled as the model's own pooling config says (default mean): (N, H * modes)."""
    modes = pooling_modes(lm.sentence)
    out = []
    for batch in D.batched(texts, batch_size):
        enc = lm.tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v.to(_device(lm.model)) for k, v in enc.items()}
        hidden = lm.model(**enc).last_hidden_state.float()  # (B, T, H)
        out.append(F.normalize(pool(hidden, enc["attention_mask"], modes), dim=-1).cpu())
    return torch.cat(out)


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """Token vectors (B, T, H) under an attention mask (B, T) -> sentence vectors (B, H * len(modes)),
    each mode as sentence-transformers' Pooling computes it, concatenated in order."""
    m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
    count = m.sum(1).clamp(min=1e-9)  # (B, 1)
    vectors = []
    for mode in modes:
        if mode == "cls":  # the first unmasked token (left padding too)
            first = mask.int().argmax(1)  # (B,)
            vectors.append(hidden[torch.arange(hidden.shape[0]), first])
        elif mode == "lasttoken":  # the last unmasked token (right padding too)
            last = hidden.shape[1] - 1 - mask.int().flip(1).argmax(1)  # (B,)
            vectors.append(hidden[torch.arange(hidden.shape[0]), last])
        elif mode == "max":
            vectors.append(hidden.masked_fill(m == 0, float("-inf")).max(1).values)
        elif mode == "mean":
            vectors.append((hidden * m).sum(1) / count)
        elif mode == "mean_sqrt_len_tokens":
            vectors.append((hidden * m).sum(1) / count.sqrt())
        elif mode == "weightedmean":  # position weights 1, 2, ... counted from the first real token
            w = m * (torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device)[None, :, None]
                     - mask.int().argmax(1)[:, None, None])  # (B, T, 1)
            vectors.append((hidden * w).sum(1) / w.sum(1).clamp(min=1e-9))
        else:
            raise SlimkitError(f"pooling mode '{mode}' in the model's 1_Pooling/config.json is not one slimkit scores: "
                               "use cls, mean, max, mean_sqrt_len_tokens, weightedmean or lasttoken")
    return torch.cat(vectors, dim=-1)


def _eval_encoder(model, reference, source, config, result):
    texts = D.passages(source.texts(), limit=config.max_passages)
    D.require_nonempty(len(texts), source, "passages")
    emb = embed(model, texts, max_length=config.max_length)
    result.samples = len(texts)
    if reference is not None:
        if len(texts) < 2:
            raise SlimkitError(f"dataset {source.name} has one passage; retrieval needs at least 2")
        ref = embed(reference, texts, max_length=config.max_length)
        if ref.shape != emb.shape:
            raise SlimkitError(f"embedding sizes differ ({emb.shape[1]} vs reference {ref.shape[1]}): compare encoders of one width")
        result.cosine_to_reference = F.cosine_similarity(emb, ref, dim=-1).mean().item()
        result.retrieval_top10_overlap = topk_overlap(emb, ref, 10)


# --------------------------------------------------------------------------- classifier


def _class_logits(lm, texts, config):
    out = []
    for batch in D.batched(texts, 32):
        enc = lm.tokenizer(batch, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
        enc = {k: v.to(_device(lm.model)) for k, v in enc.items()}
        out.append(lm.model(**enc).logits.float().cpu())
    return torch.cat(out)


def _eval_classifier(model, reference, source, config, result):
    labeled = source.kind in ("jsonl", "hf")
    if labeled:
        records = list(source.records())
        texts = [str(r.get(source.text_key, "")) for r in records]
    else:
        texts = D.passages(source.texts(), limit=config.max_passages)
    D.require_nonempty(len(texts), source, "records")
    logits = _class_logits(model, texts, config)
    result.samples = len(texts)
    pred = logits.argmax(-1)
    if labeled:
        gold = torch.tensor([_label_id(model, r, source) for r in records])
        result.accuracy = (pred == gold).float().mean().item()
        result.f1_macro = f1_macro(pred, gold, logits.shape[-1])
    if reference is not None:
        ref = _class_logits(reference, texts, config)
        result.agreement_with_reference = (pred == ref.argmax(-1)).float().mean().item()
        result.kl_divergence = F.kl_div(
            F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean"
        ).item()


def _label_id(lm, record, source) -> int:
    if source.label_key not in record:
        raise SlimkitError(f"a record in {source.location} has no '{source.label_key}' field: add labels to every record")
    label = record[source.label_key]
    num = lm.config.num_labels
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise SlimkitError(f"label {label!r} in {source.location} is not an integer or a class name")
    if isinstance(label, str):
        mapping = {k.lower(): v for k, v in (lm.config.label2id or {}).items()}
        if label.lower() not in mapping:
            raise SlimkitError(f"label '{label}' is not one of the model's classes {sorted(mapping)}: fix the data")
        return int(mapping[label.lower()])
    if not 0 <= label < num:
        raise SlimkitError(f"label {label} is out of range for a model with {num} classes")
    return label


def _device(module: torch.nn.Module) -> torch.device:
    if getattr(module, "slimkit_device", None) is not None:  # an exported model whose runtime takes inputs there
        return module.slimkit_device
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
