"""The Python API on transformers model objects in memory, with an optional tokenizer:
the kind comes from the class, the caller's model is never changed, and a step that
needs text without a tokenizer says `tokenizer=`."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from transformers import AutoTokenizer

import slimkit
from slimkit.core.errors import SlimkitError

CONFIGS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=3)),
    "bert": lambda: T.BertModel(T.BertConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, pad_token_id=3)),
    "bert-cls": lambda: T.BertForSequenceClassification(T.BertConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                                     num_hidden_layers=2, num_attention_heads=4, num_labels=3)),
}
FAST_BENCH = slimkit.BenchConfig(seq_len=16, batch_sizes=(1,), new_tokens=2, warmup=0, min_iters=1, min_seconds=0.0,
                                 max_iters=1, decode_repeats=1)


def build(arch: str):
    torch.manual_seed(0)
    return CONFIGS[arch]().eval()  # built from a config: never saved, config.architectures unset


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before: dict):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert not model.training


@pytest.mark.parametrize("arch,kind", [("llama", "causal-lm"), ("bert", "encoder"), ("bert-cls", "classifier")])
def test_kind_comes_from_the_class(arch, kind, tok):
    model = build(arch)
    assert model.config.architectures is None
    lm = slimkit.load(model, tokenizer=tok)
    assert lm.kind == kind and lm.model is model and lm.path is None


def test_quantize_without_calibration_needs_no_tokenizer_and_copies(tok):
    model = build("llama")
    before = snapshot(model)
    q = slimkit.quantize(model, "int4")  # round to nearest, groups of 32: no text
    assert q.model is not model
    assert_untouched(model, before)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(q.model(ids).logits.flatten(), model(ids).logits.flatten(), dim=0)
    assert cos > 0.98
    # made without a tokenizer, measured with one
    result = slimkit.evaluate(q, model, tokenizer=tok, config=slimkit.EvalConfig(window=32, stride=32, max_tokens=64))
    assert result.top1_agreement > 0.5


def test_a_step_that_reads_text_asks_for_the_tokenizer(tmp_path):
    model = build("llama")
    with pytest.raises(SlimkitError, match="tokenizer=") as err:
        slimkit.quantize(model, "int8")  # AWQ calibrates on text
    assert "\n" not in str(err.value)
    with pytest.raises(SlimkitError, match="tokenizer="):
        slimkit.evaluate(model)
    with pytest.raises(SlimkitError, match="tokenizer="):
        slimkit.benchmark(model, FAST_BENCH)
    with pytest.raises(SlimkitError, match="tokenizer="):
        slimkit.save(slimkit.quantize(model, "int8-wo"), tmp_path / "q")


def test_calibrated_quantize_evaluate_and_benchmark_in_memory(tok):
    model = build("llama")
    before = snapshot(model)
    q = slimkit.quantize(model, "int8", tokenizer=tok, calibration_samples=2, seq_len=32)
    result = slimkit.evaluate(q, model, tokenizer=tok, config=slimkit.EvalConfig(window=32, stride=32, max_tokens=64))
    assert result.kl_divergence is not None and result.kl_divergence >= 0 and result.perplexity > 1
    bench = slimkit.benchmark(model, FAST_BENCH, tokenizer=tok)
    assert bench.kind == "causal-lm" and bench.decode_tokens_per_s > 0 and bench.size_on_disk_mb > 0
    assert_untouched(model, before)


def test_prune_and_distill_an_encoder_in_memory(tok, tmp_path):
    model = build("bert")
    before = snapshot(model)
    pruned = slimkit.prune(model, "magnitude", sparsity=0.5)
    student = slimkit.distill(model, tokenizer=tok, student_layers=1, steps=1, seq_len=32, batch_size=2, eval_batches=1, max_samples=4)
    assert student.model.config.num_hidden_layers == 1
    result = slimkit.evaluate(pruned, model, tokenizer=tok, config=slimkit.EvalConfig(max_passages=8))
    assert 0 < result.cosine_to_reference < 1
    assert_untouched(model, before)
    reloaded = slimkit.load(str(slimkit.save(slimkit.load(model, tokenizer=tok), tmp_path / "saved")))
    assert reloaded.kind == "encoder"


def test_refusals_name_the_fix(tok):
    training = CONFIGS["bert"]()  # nn.Module starts in training mode
    with pytest.raises(SlimkitError, match=r"model\.eval\(\)"):
        slimkit.quantize(training, "int8-wo")
    with pytest.raises(SlimkitError, match="PreTrainedModel"):
        slimkit.quantize(torch.nn.Linear(4, 4), "int8-wo")
    with pytest.raises(SlimkitError, match="drop tokenizer="):
        slimkit.load("some/model", tokenizer=tok)
    with pytest.raises(SlimkitError, match="tokenizer= takes a transformers tokenizer"):
        slimkit.load(build("bert"), tokenizer="bert-base-uncased")


def test_export_an_encoder_in_memory(tok, tmp_path):
    model = build("bert")
    with pytest.raises(SlimkitError, match="tokenizer="):
        slimkit.export(model, tmp_path / "none", slimkit.ExportConfig("onnx"))
    assert not (tmp_path / "none").exists()  # nothing half-written
    out = slimkit.export(model, tmp_path / "onnx", slimkit.ExportConfig("onnx"), tokenizer=tok)
    served = slimkit.load(str(out))
    enc = tok(["a few words to embed"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(served.model(**enc).last_hidden_state, model(**enc).last_hidden_state, atol=1e-4, rtol=1e-4)
