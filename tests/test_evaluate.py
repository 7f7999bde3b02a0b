import json
import math

import pytest
import torch
import torch.nn.functional as F

import slimkit
from slimkit.core import data as D
from slimkit.core.errors import SlimkitError
from slimkit.core.metrics import next_token_stats, topk_overlap
from slimkit.measure.quality import EvalConfig, evaluate


def test_next_token_stats_math():
    torch.manual_seed(0)
    logits, ref = torch.randn(5, 11), torch.randn(5, 11)
    targets = torch.randint(0, 11, (5,))
    s = next_token_stats(logits, targets, ref)
    p, q = ref.softmax(-1), logits.softmax(-1)
    assert s["kl"] == pytest.approx((p * (p.log() - q.log())).sum().item(), rel=1e-5)
    assert s["nll"] == pytest.approx(F.cross_entropy(logits, targets, reduction="sum").item(), rel=1e-5)
    assert s["agree"] == (logits.argmax(-1) == ref.argmax(-1)).sum().item()
    assert next_token_stats(ref, targets, ref)["kl"] == pytest.approx(0.0, abs=1e-5)


def test_topk_overlap():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(50, 8), dim=-1)
    assert topk_overlap(a, a, 10) == pytest.approx(1.0)
    assert topk_overlap(a, F.normalize(torch.randn(50, 8), dim=-1), 10) < 0.5


def test_perplexity_matches_hf_loss_on_non_overlapping_windows(tiny):
    lm = slimkit.load(tiny("llama"))
    cfg = EvalConfig(window=64, stride=64, max_tokens=64 * 5)
    result = evaluate(lm, config=cfg)
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids, _ in D.lm_windows(lm.tokenizer, D.TextSource.parse(None).texts(), 64, 64, 64 * 5):
            x = torch.tensor([ids])
            loss = lm.model(input_ids=x, labels=x).loss  # mean over len - 1 predictions
            nll += loss.item() * (len(ids) - 1)
            n += len(ids) - 1
    assert result.tokens == n
    assert result.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_stride_gives_more_context(tiny):
    lm = slimkit.load(tiny("gpt2"))
    a = evaluate(lm, config=EvalConfig(window=64, stride=64, max_tokens=400))
    b = evaluate(lm, config=EvalConfig(window=64, stride=16, max_tokens=400))
    assert b.tokens > a.tokens  # no token is lost at window starts
    assert math.isfinite(a.perplexity) and math.isfinite(b.perplexity)


def test_batching_does_not_change_results(tiny):
    lm = slimkit.load(tiny("llama"))
    one = evaluate(lm, config=EvalConfig(window=32, stride=16, max_tokens=300, batch_size=1))
    four = evaluate(lm, config=EvalConfig(window=32, stride=16, max_tokens=300, batch_size=4))
    assert one.tokens == four.tokens
    assert one.perplexity == pytest.approx(four.perplexity, rel=1e-4)


def test_against_itself_and_against_another(tiny):
    lm = slimkit.load(tiny("llama"))
    cfg = EvalConfig(window=64, stride=32, max_tokens=300)
    same = evaluate(lm, reference=slimkit.load(tiny("llama")), config=cfg)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agreement == 1.0
    assert same.reference_perplexity == pytest.approx(same.perplexity, rel=1e-6)
    other = evaluate(lm, reference=slimkit.load(tiny("llama", seed=1)), config=cfg)
    assert other.kl_divergence > 1e-3
    assert other.top1_agreement < 1.0


def test_encoder_cosine_and_retrieval(tiny):
    cfg = EvalConfig(max_passages=64)
    same = evaluate(tiny("bert"), reference=tiny("bert"), config=cfg)
    assert same.samples == 64
    assert same.cosine_to_reference == pytest.approx(1.0, abs=1e-5)
    assert same.retrieval_top10_overlap == pytest.approx(1.0)
    other = evaluate(tiny("bert"), reference=tiny("bert", seed=1), config=cfg)
    assert other.cosine_to_reference < 0.999
    assert other.retrieval_top10_overlap < 1.0


def test_classifier_accuracy_and_f1(tiny, tmp_path):
    lm = slimkit.load(tiny("bert-cls"))
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the python language'}" for i in range(24)]
    with torch.no_grad():
        enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
        pred = lm.model(**enc).logits.argmax(-1).tolist()
    names = ["neg", "neu", "pos"]
    f = tmp_path / "labeled.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "label": names[p]}) for t, p in zip(texts, pred)))
    r = evaluate(lm, data=str(f))
    assert r.accuracy == 1.0 and r.f1_macro == 1.0 and r.samples == 24
    f.write_text("\n".join(json.dumps({"text": t, "label": (p + 1) % 3}) for t, p in zip(texts, pred)))
    r = evaluate(lm, reference=tiny("bert-cls"), data=str(f))
    assert r.accuracy == 0.0
    assert r.agreement_with_reference == 1.0


def test_classifier_label_out_of_range(tiny, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "x", "label": 7}) + "\n")
    with pytest.raises(SlimkitError, match="out of range"):
        evaluate(tiny("bert-cls"), data=str(f))


@pytest.mark.parametrize("content", ["", "   \n\n \t\n"])
def test_empty_dataset(tiny, tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(SlimkitError, match="has no"):
        evaluate(tiny("llama"), data=str(f))
    with pytest.raises(SlimkitError, match="has no"):
        evaluate(tiny("bert"), data=str(f))


def test_reference_of_another_kind_is_refused(tiny):
    with pytest.raises(SlimkitError, match="one kind"):
        evaluate(tiny("llama"), reference=tiny("bert"))


@pytest.mark.parametrize("kw", [{"window": 1}, {"stride": 0}, {"stride": 600}, {"batch_size": 0}, {"max_tokens": 1}])
def test_config_ranges(kw):
    with pytest.raises(SlimkitError):
        EvalConfig(**kw)
