"""The architecture adapter on a tiny random model of every family it knows: what it
names exists, has the shapes that name implies and is wired as it says (checked by
running the model), and the techniques that ask it work on each family."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import slimkit
from slimkit.core.adapter import FAMILIES, adapter, find
from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.selection import linear_weight
from slimkit.distillation.student import drop_layers, num_layers
from slimkit.io.model import LoadedModel

SIZES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=512, pad_token_id=3, bos_token_id=1, eos_token_id=2)
GQA = dict(num_key_value_heads=2)
# name -> (config class, model class, config overrides, the family the adapter should find)
MODELS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {**GQA, "tie_word_embeddings": True}, "llama"),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, GQA, "llama"),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, GQA, "llama"),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {**GQA, "head_dim": 16}, "llama"),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {**GQA, "head_dim": 16}, "gemma2"),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {**GQA, "head_dim": 16}, "gemma2"),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, GQA, "phi3"),
    "bert": (T.BertConfig, T.BertModel, {}, "bert"),
    "roberta": (T.RobertaConfig, T.RobertaForMaskedLM, {}, "bert"),
    "xlm-roberta": (T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification, {"num_labels": 3}, "bert"),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, {"n_inner": 128}, "gpt2"),
    "opt": (T.OPTConfig, T.OPTForCausalLM, {"ffn_dim": 128, "word_embed_proj_dim": 64}, "opt"),
    "opt-post-norm": (T.OPTConfig, T.OPTForCausalLM, {"ffn_dim": 128, "word_embed_proj_dim": 64, "do_layer_norm_before": False}, "opt"),
    "gpt-neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {}, "gpt-neox"),
}
IDS = torch.arange(5, 37)[None]  # (1, 32)


def build(name: str, seed: int = 0):
    config_cls, model_cls, extra, _ = MODELS[name]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**SIZES, **extra})).eval()


def run(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dir):
    """saved(name) -> a Hugging Face directory of that tiny model with the test tokenizer."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            build(name).save_pretrained(path, safe_serialization=True)
            T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get


def _out_rows(model, name) -> int:
    return linear_weight(model.get_submodule(name)).shape[0]  # (out, in)


def _in_cols(model, name) -> int:
    return linear_weight(model.get_submodule(name)).shape[1]


# --------------------------------------------------------------------------- what the adapter names


@pytest.mark.parametrize("name", MODELS)
def test_every_name_is_a_module_with_the_shapes_it_implies(name):
    model = build(name)
    arch = find(model)
    assert arch is not None and arch.family.name == MODELS[name][3]
    cfg, hidden = model.config, model.config.hidden_size
    assert len(arch.blocks) == getattr(cfg, arch.layer_count) == 3
    assert [b.name for b in arch.blocks] == [f"{arch.layers}.{i}" for i in range(3)]
    assert model.get_submodule(arch.embeddings) is model.get_input_embeddings()
    if model.get_output_embeddings() is not None:
        assert model.get_submodule(arch.head) is model.get_output_embeddings()
    for b in arch.blocks:
        width = _in_cols(model, b.mlp_out)
        assert getattr(cfg, arch.mlp_width) == width == 128
        for n in b.mlp_in:  # one row per channel, in each stacked part (Phi-3's gate_up_proj: two)
            rows = arch.mlp_rows(b, n, torch.arange(width))
            assert _out_rows(model, n) == len(rows) == b.mlp_parts * width and sorted(rows.tolist()) == list(range(len(rows)))
        assert all(_in_cols(model, n) == hidden for n in b.attn_in() + b.mlp_in)
        assert _out_rows(model, b.o) == hidden and _out_rows(model, b.mlp_out) == hidden
        for norm in (b.attn_norm, b.mlp_norm):
            assert norm is None or model.get_submodule(norm).weight.shape == (hidden,)
        parts = arch.qkv_rows(b)
        if parts is None:  # a fused qkv whose heads are not read here
            assert b.q is None and _out_rows(model, b.qkv) == 3 * _in_cols(model, b.o)
            continue
        n_kv, per = arch.kv_groups(b)
        (q, q_rows), (k, k_rows), (v, v_rows) = parts["q"], parts["k"], parts["v"]
        assert n_kv * per * b.head_dim == len(q_rows) == _in_cols(model, b.o)
        assert n_kv * b.head_dim == len(k_rows) == len(v_rows)
        every = torch.cat([q_rows, k_rows, v_rows]) if b.qkv else None  # fused: the parts tile its rows
        assert every is None or (sorted(every.tolist()) == list(range(_out_rows(model, b.qkv))) and q == k == v == b.qkv)
        assert (n_kv, per) == ((2, 2) if "num_key_value_heads" in MODELS[name][2] else (4, 1))
    assert arch.final_norm is not None and model.get_submodule(arch.final_norm).weight.shape == (hidden,)
    for layer, norm in arch.reads.items():
        assert model.get_submodule(norm).weight.shape == (_in_cols(model, layer),)


@pytest.mark.parametrize("name", MODELS)
def test_block_of_names_the_block_that_holds_a_layer(name):
    arch = find(build(name))
    for b in arch.blocks:
        assert {arch.block_of(n) for n in (*b.attn_in(), b.o, *b.mlp_in, b.mlp_out)} == {b.name}
    assert arch.block_of(arch.embeddings) is None and arch.block_of(arch.layers) is None
    assert arch.head is None or arch.block_of(arch.head) is None


@pytest.mark.parametrize("name", MODELS)
def test_the_named_norms_feed_the_named_layers(name):
    """Run the model: each layer's input is exactly the output of the norm the adapter says it reads."""
    model = build(name)
    arch = find(model)
    pairs = [(b.attn_in()[0], b.attn_norm) for b in arch.blocks] + [(b.mlp_in[0], b.mlp_norm) for b in arch.blocks]
    pairs += list(arch.reads.items())
    pairs = [(layer, norm) for layer, norm in pairs if norm is not None]
    assert len(pairs) >= 2 * len(arch.blocks) - 1  # only block 0 of a post-norm model without an embedding norm reads none
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out)) for n in {n for _, n in pairs}]
    hooks += [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0])) for n, _ in pairs]
    run(model)
    for h in hooks:
        h.remove()
    for layer, norm in pairs:
        width = seen[norm].shape[-1]
        assert torch.equal(seen[layer].reshape(-1, width), seen[norm].reshape(-1, width)), (layer, norm)


@pytest.mark.parametrize("name", MODELS)
def test_row_sources_fold_exactly(name):
    """Scaling the producer's indexed output rows by 1 / s and the consumer's input
    columns by s[index] leaves the model's output unchanged: the index (grouped-query
    heads, a fused layer's v or up part included) is how the rows really reach the columns."""
    model = build(name)
    arch = find(model)
    reference = run(model)
    folded = 0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in arch.blocks:
            assert (arch.row_source(b.o) is None) == (arch.qkv_rows(b) is None)
            assert (arch.row_source(b.mlp_out) is None) == (b.mlp_up is None)
            for consumer in (b.o, b.mlp_out):
                if (source := arch.row_source(consumer)) is None:
                    continue
                producer, index = source
                rows = _out_rows(model, producer)
                assert index.shape == (_in_cols(model, consumer),) and int(index.max()) == rows - 1
                s = torch.ones(rows)  # (rows,): a fused producer's other parts (q, k; gate) stay
                s[index] = torch.rand(len(index), generator=g)[index - index.min()] + 0.5
                p = model.get_submodule(producer)
                p.weight.div_(s[:, None])
                if p.bias is not None:
                    p.bias.div_(s)
                model.get_submodule(consumer).weight.mul_(s[index][None, :])
                folded += 1
    assert folded == sum((arch.qkv_rows(b) is not None) + (b.mlp_up is not None) for b in arch.blocks)  # none in GPT-2, GPT-NeoX's attention
    torch.testing.assert_close(run(model), reference, rtol=1e-4, atol=1e-5)


def test_post_norm_blocks_read_the_previous_blocks_norm():
    arch = find(build("bert"))
    assert arch.blocks[0].attn_norm == "embeddings.LayerNorm"
    assert arch.blocks[1].attn_norm == "encoder.layer.0.output.LayerNorm"
    assert arch.blocks[1].mlp_norm == "encoder.layer.1.attention.output.LayerNorm"
    assert arch.final_norm == "encoder.layer.2.output.LayerNorm"
    pre, post = find(build("opt")), find(build("opt-post-norm"))
    assert pre.blocks[0].attn_norm == "model.decoder.layers.0.self_attn_layer_norm" and post.blocks[0].attn_norm is None


def test_an_unknown_architecture_is_one_line_naming_the_families_and_the_way_out():
    model = T.BloomForCausalLM(T.BloomConfig(vocab_size=512, hidden_size=64, n_layer=3, n_head=4))  # transformer.h.*.self_attention: no family
    assert find(model) is None
    with pytest.raises(SlimkitError) as info:
        num_layers(model)
    message = str(info.value)
    assert message.startswith("a layer-dropped student does not support BloomForCausalLM")
    assert message.endswith("pass your own student model instead") and "\n" not in message
    assert all(f.title in message for f in FAMILIES)
    lm = LoadedModel(model=model, tokenizer=None, kind=CAUSAL_LM, source="bloom")
    with pytest.raises(SlimkitError, match=r"^structured pruning does not support .* use method magnitude, wanda or 2:4 instead$"):
        slimkit.prune(lm, "structured")
    with pytest.raises(SlimkitError, match="^sharding does not support BloomForCausalLM"):
        adapter(model, "sharding", "do it by hand")


# --------------------------------------------------------------------------- techniques that ask it


@pytest.mark.parametrize("name", MODELS)
def test_a_student_with_fewer_layers_builds_and_runs(name):
    teacher = build(name)
    student = drop_layers(teacher, [0, 2])
    assert num_layers(student) == getattr(student.config, find(student).layer_count) == 2
    assert num_layers(teacher) == 3  # the teacher is untouched
    t_arch, s_arch = find(teacher), find(student)
    for s_block, t_block in zip(s_arch.blocks, (t_arch.blocks[0], t_arch.blocks[2])):
        assert torch.equal(student.get_submodule(s_block.mlp_out).weight, teacher.get_submodule(t_block.mlp_out).weight)
    out = run(student)
    assert out.shape == run(teacher).shape and torch.isfinite(out).all()
    if student.can_generate():
        with torch.no_grad():  # kept blocks are renumbered: the KV cache has one slot per student layer
            gen = student.generate(IDS[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
            full = student(input_ids=gen[:, :-1]).logits[:, -1].argmax(-1)
        assert torch.equal(gen[:, -1], full)


@pytest.mark.parametrize("name", [n for n in MODELS if n != "opt-post-norm"])
def test_structured_pruning_runs_and_round_trips(name, saved, tmp_path):
    """MLP channels on every family, and heads where the family allows: the pruned model
    is smaller, its config says so, and it saves and reloads to the same outputs."""
    lm = slimkit.load(str(saved(name)))
    family = find(lm.model).family
    calib = dict(calibration_samples=4, seq_len=32, batch_size=2)
    heads = {"head_groups": 1} if family.prune_heads else {}
    pruned = slimkit.prune(lm, "structured", mlp_channels=32, **heads, **calib)
    arch = find(pruned.model)
    assert {_in_cols(pruned.model, b.mlp_out) for b in arch.blocks} == {96} == {getattr(pruned.config, arch.mlp_width)}
    if heads:
        n_kv = {arch.kv_groups(b)[0] for b in arch.blocks}
        assert n_kv == {find(lm.model).kv_groups(find(lm.model).blocks[0])[0] - 1}
    else:
        fused = "fused" if arch.blocks[0].qkv else "attention"
        with pytest.raises(SlimkitError, match=f"^{family.title}'s {fused} .*heads cannot be pruned here"):
            slimkit.prune(lm, "structured", head_groups=1, **calib)
    assert pruned.num_parameters() < lm.num_parameters()
    back = slimkit.load(str(slimkit.save(pruned, tmp_path / "p")))
    assert torch.equal(run(back.model), run(pruned.model))


@pytest.mark.parametrize("name", [n for n in MODELS if MODELS[n][3] != "opt"])
def test_slicing_out_units_equals_zeroing_what_reads_them(name):
    """Removing a kv head group (where the family allows) and MLP channels without refit
    gives the model whose o and down columns for those units are zero: the rows cut from
    q, k, v (a stacked fused qkv's parts) and from the MLP inputs (both halves of a fused
    gate_up) are the units' own, so nothing else moved."""
    from slimkit.pruning.removal import remove_head_groups, remove_mlp_channels
    from slimkit.pruning.structured import sync_config

    model = build(name)
    arch = find(model)
    zeroed = build(name)
    with torch.no_grad():
        for b in arch.blocks:
            linear_weight(zeroed.get_submodule(b.mlp_out))[:, 1::4] = 0  # (out, in), a view of a Conv1D's weight
            remove_mlp_channels(arch, b, torch.tensor([c for c in range(128) if c % 4 != 1]))
            if arch.family.prune_heads:
                n_kv, per = arch.kv_groups(b)
                linear_weight(zeroed.get_submodule(b.o))[:, b.group_rows(0, per)[0]] = 0
                remove_head_groups(arch, b, list(range(1, n_kv)))
    sync_config(find(model))
    assert {_in_cols(model, b.mlp_out) for b in arch.blocks} == {96}
    torch.testing.assert_close(run(model), run(zeroed), rtol=1e-4, atol=1e-5)
