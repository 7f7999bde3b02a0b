"""Every common model family through every technique, on a tiny random model of each
(width 64, 2 blocks, the test tokenizer's 512 tokens): quantize with each method,
prune (unstructured and structured), build a layer-dropped student, export to ONNX.

Each result must run, stay near the float model (a loose bound per method: the
weights are random, so 4-bit grids lose far more than on a trained model), and
come back from its saved files the same. The adapter (`core.adapter`) is what
makes the techniques reach each family's layers; `test_adapter.py` checks what it
names, this checks that everything built on it works end to end.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import slimkit
from slimkit.core.adapter import find
from slimkit.core.arch import ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.core.selection import linear_weight
from slimkit.distillation.student import make_student, num_layers

SIZES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, pad_token_id=3, bos_token_id=1, eos_token_id=2)
GQA = dict(num_key_value_heads=2)
# name -> (config class, model class, config overrides): what each one brings that the others do not
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {**GQA, "tie_word_embeddings": True}),  # grouped-query attention, tied head
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, GQA),  # q/k/v biases
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {**GQA, "head_dim": 16}),  # q/k norms
    "mistral": (T.MistralConfig, T.MistralForCausalLM, GQA),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, GQA),  # fused qkv_proj and gate_up_proj
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {**GQA, "head_dim": 16}),  # scaled embedding, sandwich norms, soft-capped logits
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {**GQA, "head_dim": 16}),  # and q/k norms, sliding and full layers
    "gpt-neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {}),  # fused qkv interleaved per head, parallel residual
    "opt": (T.OPTConfig, T.OPTForCausalLM, {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, {"n_inner": 128}),  # Conv1D layers
    "bert": (T.BertConfig, T.BertModel, {}),  # post-norm encoder
    "roberta": (T.RobertaConfig, T.RobertaForMaskedLM, {}),
    "xlm-roberta": (T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification, {"num_labels": 3}),  # classifier head
}
IDS = torch.arange(5, 29)[None]  # (1, 24)
CALIBRATION = dict(calibration_samples=2, seq_len=16)

# The largest relative L2 change of the outputs each method may make. Measured on these
# models: int8 methods <= 0.04 (int8-static), 4-bit ones <= 0.35 (GPTQ on Gemma 3, whose random
# weights spread widely); a method that loses a scale or a layer moves them by ~1.
BOUND_8BIT, BOUND_4BIT = 0.08, 0.5
METHODS = {
    "int4-wo": ({}, BOUND_4BIT),
    "int8-wo": ({}, BOUND_8BIT),
    "nf4": ({}, BOUND_4BIT),
    "int8-dynamic": ({}, BOUND_8BIT),
    "int8-static": (CALIBRATION, BOUND_8BIT),
    "gptq": (CALIBRATION, BOUND_4BIT),
    "awq": ({**CALIBRATION, "group_size": 32}, BOUND_4BIT),
    "mixed": (CALIBRATION, BOUND_4BIT),  # int4-wo, int8-wo where the budget needs it
}
COMPRESSED_TENSORS = ("int4-wo", "int8-wo", "int8-dynamic", "gptq", "mixed")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models' small matmuls run fastest, and steadiest on a busy machine, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer_dir):
    """family(name) -> (LoadedModel of that tiny model saved with the test tokenizer, its float outputs on IDS)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            config_cls, model_cls, extra = FAMILIES[name]
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(name)
            model_cls(config_cls(**{**SIZES, **extra})).eval().save_pretrained(path)
            T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
            lm = slimkit.load(str(path))
            cache[name] = lm, run(lm.model)
        return cache[name]

    return get


def run(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def relative_change(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def assert_round_trip(lm, path) -> None:
    """Saved and loaded again: every tensor bit for bit, and the same outputs.

    The outputs are compared to float rounding, not bit for bit: loaded tensors lie at
    other memory alignments, where BLAS may sum in another order (measured: 7e-9 on
    XLM-R's classifier, which is exact again once its weights are copied)."""
    back = slimkit.load(str(slimkit.save(lm, path)))
    assert type(back.model) is type(lm.model)
    before, after = lm.model.state_dict(), back.model.state_dict()
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    torch.testing.assert_close(run(back.model), run(lm.model), rtol=1e-5, atol=1e-6)


def _cases(methods):
    return [pytest.param(f, m, id=f"{f}-{m}") for f in FAMILIES for m in methods]


# --------------------------------------------------------------------------- quantize


@pytest.mark.parametrize(("name", "method"), _cases(METHODS))
def test_quantize_stays_close_and_round_trips(name, method, family, tmp_path):
    lm, ref = family(name)
    options, bound = METHODS[method]
    if method == "mixed":  # a budget in the metric that fits the model's kind
        options = {**options, **({"max_cosine_drop": 0.01} if lm.kind == ENCODER else {"max_kl": 0.05})}
    q = slimkit.quantize(lm, method, **options)
    out = run(q.model)
    assert torch.isfinite(out).all()
    assert relative_change(out, ref) < bound
    assert_round_trip(q, tmp_path / method)


# GPT-NeoX's head is `lm_head` in the model and `embed_out` in the files save_pretrained writes (transformers
# renames it both ways). The compressed-tensors layout is written under the model's own names, which slimkit
# reloads as they are and plain transformers maps to its head too.
@pytest.mark.parametrize("method", COMPRESSED_TENSORS[:2])
def test_gpt_neox_in_compressed_tensors_loads_in_plain_transformers(method, family, tmp_path):
    lm, ref = family("gpt-neox")
    q = slimkit.quantize(lm, method)
    path = slimkit.save(q, tmp_path / method)
    assert json.loads((path / "slimkit.json").read_text())["layout"] == "compressed-tensors"
    plain = T.AutoModelForCausalLM.from_pretrained(path).eval()
    assert relative_change(run(plain), run(q.model)) < 0.02  # slimkit's kernels take bf16 activations
    assert relative_change(run(plain), ref) < METHODS[method][1]


# --------------------------------------------------------------------------- prune


def _block_linears(model) -> list[str]:
    arch = find(model)
    return [n for b in arch.blocks for n in (*b.attn_in(), b.o, *b.mlp_in, b.mlp_out)]


@pytest.mark.parametrize(("name", "method"), _cases(("magnitude", "wanda")))
def test_unstructured_pruning_zeroes_half_and_round_trips(name, method, family, tmp_path):
    lm, _ = family(name)
    pruned = slimkit.prune(lm, method, sparsity=0.5, **(CALIBRATION if method == "wanda" else {}))
    weights = [linear_weight(pruned.model.get_submodule(n)) for n in _block_linears(pruned.model)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert 0.49 <= zeros <= 0.51  # every block's projections, fused ones included
    assert torch.isfinite(run(pruned.model)).all()
    assert_round_trip(pruned, tmp_path / method)


@pytest.mark.parametrize("name", FAMILIES)
def test_structured_pruning_shrinks_every_block_and_round_trips(name, family, tmp_path):
    """MLP channels everywhere, a kv head group where the family's heads can be cut; where they
    cannot (a fused qkv interleaved per head, OPT), a one-line refusal that names what works."""
    lm, ref = family(name)
    arch = find(lm.model)
    options = dict(mlp_channels=32, **CALIBRATION, batch_size=1)
    if arch.family.prune_heads:
        options["head_groups"] = 1
    else:
        with pytest.raises(SlimkitError, match=r"heads cannot be pruned here: use units=\('mlp',\) or \('layers',\)$"):
            slimkit.prune(lm, "structured", **options, head_groups=1)
    pruned = slimkit.prune(lm, "structured", **options)
    small = find(pruned.model)
    assert {linear_weight(pruned.model.get_submodule(b.mlp_out)).shape[1] for b in small.blocks} == {96}
    assert getattr(pruned.model.config, small.mlp_width) == 96
    if arch.family.prune_heads:
        assert {small.kv_groups(b)[0] for b in small.blocks} == {arch.kv_groups(arch.blocks[0])[0] - 1}
    assert pruned.num_parameters() < lm.num_parameters()
    out = run(pruned.model)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert_round_trip(pruned, tmp_path / "structured")


# --------------------------------------------------------------------------- distil, export


@pytest.mark.parametrize("name", FAMILIES)
def test_a_student_with_one_block_runs_and_round_trips(name, family, tmp_path):
    lm, ref = family(name)
    student = make_student(lm, layers=1)
    assert num_layers(student.model) == 1 and num_layers(lm.model) == 2
    out = run(student.model)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert_round_trip(student, tmp_path / "student")


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_export_runs_in_onnx_runtime_like_torch(name, family, tmp_path):
    """The graph in a real ONNX Runtime session gives the PyTorch outputs. Traced with
    TorchScript here (about a second each); causal LMs default to torch.export, which takes
    10-30 s per model and is exercised in test_export_onnx.py."""
    pytest.importorskip("onnxruntime")
    lm, ref = family(name)
    out = slimkit.export(lm, tmp_path / "onnx", slimkit.ExportConfig("onnx", exporter="torchscript"))
    served = slimkit.load(str(out))
    assert served.manifest["runtime"] == "onnxruntime" and type(served.model).__name__ == "OrtModel"
    torch.testing.assert_close(run(served.model), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.01), (4, 0.15)])
def test_a_scaled_embedding_keeps_its_scale_when_quantized(bits, bound, family):
    """Gemma's embedding multiplies the rows it looks up by sqrt(hidden_size) = 8; its quantized
    lookup (int8 rows, or the tied 4-bit head's codes) does too (without it: a change of 0.875)."""
    lm, _ = family("gemma2")
    q = slimkit.quantize(lm, "int4-wo", embedding_bits=bits)
    with torch.no_grad():
        assert relative_change(q.model.get_input_embeddings()(IDS), lm.model.get_input_embeddings()(IDS)) < bound


def test_the_lookup_scale_is_the_one_the_embedding_multiplies_by_and_anything_else_is_refused():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding

    from slimkit.quantization.embedding import lookup_scale

    class Shifted(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    assert lookup_scale(torch.nn.Embedding(16, 8)) == 1.0
    for dtype in (torch.float32, torch.bfloat16):  # Gemma multiplies in the weights' dtype: bf16(sqrt(2048)) = 45.25
        emb = Gemma2TextScaledWordEmbedding(16, 2048, 0, embed_scale=2048**0.5).to(dtype)
        torch.nn.init.normal_(emb.weight)
        assert lookup_scale(emb) == float(torch.tensor(2048**0.5, dtype=dtype))
    with pytest.raises(SlimkitError, match=r"^the input embedding Shifted does not return its rows times one constant.*embeddings=False$"):
        lookup_scale(Shifted(16, 8))


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3"])
def test_awq_folds_every_scale_into_the_producers_the_adapter_names(name, family):
    """RMSNorms into q/k/v and gate/up, v into o, up into down: through Phi-3's fused qkv_proj
    and gate_up_proj as through separate layers, so no layer keeps an explicit input scale."""
    from slimkit.core import data as D
    from slimkit.core.adapter import find
    from slimkit.core.selection import select_linears
    from slimkit.io.model import copy_model
    from slimkit.quantization.awq import AWQConfig, scale_whole_

    lm, ref = family(name)
    scaled = copy_model(lm, "awq")
    config = AWQConfig(group_size=32, embeddings=False, **CALIBRATION)  # a tied head's fold waits for its quantization
    names = list(select_linears(scaled.model, config.targets, config.ignore))
    batches = D.calibration_batches(scaled.tokenizer, None, config.seq_len, config.calibration_samples, batch_size=1)
    explicit, _ = scale_whole_(scaled.model, find(scaled.model), names, None, batches, True, config)
    assert explicit == {}
    torch.testing.assert_close(run(scaled.model), ref, rtol=1e-4, atol=1e-5)  # the folds change no output
    q = slimkit.quantize(lm, "awq", group_size=32, embeddings=False, **CALIBRATION)  # block by block, the same folds
    assert not any(getattr(m, "inv_input_scale", None) is not None for m in q.model.modules())


def test_phi3_heads_go_alike_in_every_layer_and_its_mlp_need_not(family, tmp_path):
    """Phi-3's attention splits qkv_proj by the config's query head count, shared by every layer:
    heads pruned unevenly, or in some layers only, are refused in one line. MLP channels are
    the layers' own (gate_up_proj is split in halves), so they may differ per layer."""
    lm, ref = family("phi3")
    options = dict(**CALIBRATION, batch_size=1)
    for uneven in ({"uniform": False}, {"targets": ("model.layers.0",)}):
        with pytest.raises(SlimkitError, match=r"^Phi-3's attention reads its head count from the config, .*or units=\('mlp',\)$"):
            slimkit.prune(lm, "structured", head_groups=1, **uneven, **options)
    pruned = slimkit.prune(lm, "structured", sparsity=0.2, uniform=False, **options)
    arch = find(pruned.model)
    widths = [linear_weight(pruned.model.get_submodule(b.mlp_out)).shape[1] for b in arch.blocks]
    assert sum(widths) < 2 * 128 and all(pruned.model.get_submodule(b.mlp_in[0]).out_features == 2 * w for b, w in zip(arch.blocks, widths))
    assert torch.isfinite(run(pruned.model)).all()
    assert_round_trip(pruned, tmp_path / "uneven")
