"""GGUF export of a tiny Llama: read back by the gguf package's reader and by slimkit's own GGUF loader.

llama.cpp itself loads these files in benchmarks/bench_gguf.py (it needs a compiled runtime)."""

import numpy as np
import pytest
import torch
from conftest import assert_user_error, invoke_cli

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.exporters import ExportConfig, export
from slimkit.exporters.genai_weights import float_twin
from slimkit.exporters.gguf_blocks import pack_blocks, rope_permute, unpack_codes

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path / "cache"))  # slimkit.load(x.gguf) converts into the cache


def field(reader, key):
    return reader.fields[key].contents()


def tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_f16_file_holds_llama_cpp_metadata_and_reloads_with_the_same_logits(tiny, tmp_path):
    src = slimkit.load(tiny("llama"))
    out = export(src, tmp_path / "tiny.gguf", ExportConfig("gguf"))  # f16 by default
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "llama"
    meta = {k: field(reader, f"llama.{k}") for k in ("block_count", "embedding_length", "feed_forward_length", "context_length",
                                                     "attention.head_count", "attention.head_count_kv", "rope.dimension_count")}
    assert meta == {"block_count": 2, "embedding_length": 64, "feed_forward_length": 128, "context_length": 512,
                    "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16}
    assert field(reader, "llama.rope.freq_base") == pytest.approx(src.model.config.rope_parameters["rope_theta"])
    assert field(reader, "general.file_type") == 1
    vocab = src.tokenizer.get_vocab()
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and len(tokens) == 512
    assert all(tokens[i] == t for t, i in vocab.items())
    assert field(reader, "tokenizer.ggml.token_type")[1] == 3  # <s>: a control token
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reads the embedding
    assert tensor(reader, "blk.1.attn_k.weight").tensor_type == T.F16 and list(tensor(reader, "blk.1.attn_k.weight").shape) == [64, 32]
    assert tensor(reader, "blk.0.attn_norm.weight").tensor_type == T.F32

    back = slimkit.load(str(out))
    ids = torch.randint(5, 500, (2, 12))
    want, got = logits(src.model, ids), logits(back.model, ids)
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    assert back.tokenizer("def main(): return 42")["input_ids"] == src.tokenizer("def main(): return 42")["input_ids"]


@pytest.mark.parametrize("method, options, qtype", [
    ("int4-wo", {"group_size": 32, "symmetric": True, "embeddings": False}, "q4_0"),
    ("int8-wo", {"group_size": 32, "embeddings": False}, "q8_0"),
    ("int4-wo", {"group_size": 32, "symmetric": False, "embeddings": False}, "q4_1"),  # float minimum per group: Q4_1's own grid
    # searched scales, signed, the -8 level used: what `--method awq` makes for q4_0
    ("awq", {"group_size": 32, "symmetric": True, "embeddings": False, "scale_search": True, "grid": 4, "calibration_samples": 2,
             "seq_len": 32}, "q4_0"),
])
def test_a_matching_grid_is_carried_code_for_code(tiny, tmp_path, method, options, qtype):
    q = slimkit.quantize(tiny("llama"), method, **options)
    out = export(q, tmp_path / "q.gguf", ExportConfig("gguf", quantize=qtype))
    reader = gguf.GGUFReader(out)
    layer = q.model.model.layers[1].self_attn
    for name, module, heads in (("blk.1.attn_v.weight", layer.v_proj, 0), ("blk.1.attn_q.weight", layer.q_proj, 4)):
        t = tensor(reader, name)
        assert t.tensor_type == T[qtype.upper()]
        codes, scales = unpack_codes(np.array(t.data), t.tensor_type, module.in_features)
        want = module.q_values().numpy().astype(np.int16) + (0 if qtype == "q8_0" else 8)
        want_scales = module.scale.numpy()
        if heads:  # q rows in llama.cpp's rotary order
            want, want_scales = rope_permute(want, heads), rope_permute(want_scales, heads)
        assert np.array_equal(codes, want) and np.array_equal(scales, want_scales)
        if options.get("scale_search"):
            assert codes.min() == 0 and (scales < 0).any()  # n = 0 is the level -8
    assert tensor(reader, "token_embd.weight").tensor_type == T.Q8_0
    assert slimkit.exporters.summary(out)["tensor_sources"] == {"carried": 14, "float": 6}

    # slimkit's GGUF loader gives back the dequantized slimkit model: carried layers bit for bit
    back = slimkit.load(str(out)).model
    twin, plan = float_twin(q.model)
    assert len(plan.weights) == 14  # 2 blocks x 7 linears; the tied head is the embedding
    for name in plan.weights:
        got = back.get_submodule(name).weight
        assert torch.equal(got, plan.weights[name]), name
    with torch.no_grad():
        twin.model.embed_tokens.weight.copy_(back.model.embed_tokens.weight)  # the embedding is Q8_0 of the float table
    ids = torch.randint(5, 500, (1, 16))
    assert torch.allclose(logits(back, ids), logits(twin, ids), atol=1e-4)


def test_a_grid_that_is_not_the_type_is_quantized_again_and_said(tiny, tmp_path):
    q = slimkit.quantize(tiny("llama"), "int4-wo", group_size=64, symmetric=True)
    out = export(q, tmp_path / "q.gguf", ExportConfig("gguf", quantize="q4_0"))
    summary = slimkit.exporters.summary(out)
    # groups of 64 are not Q4_0's 32; the int8 embedding (one scale a row, the tied head's too) becomes Q8_0 of its rows
    assert summary["tensor_sources"] == {"requantized": 15, "float": 5}
    assert summary["tensor_types"] == {"Q4_0": 14, "Q8_0": 1, "F32": 5}


def test_pack_blocks_is_ggml_layout():
    w = torch.randn(3, 64)
    ref = gguf.quantize(w.numpy(), T.Q4_0)  # the gguf package's own Q4_0 of w
    codes, d = unpack_codes(ref, T.Q4_0, 64)
    assert np.array_equal(pack_blocks(codes, d, None, T.Q4_0), ref)
    ref8 = gguf.quantize(w.numpy(), T.Q8_0)
    codes8, d8 = unpack_codes(ref8, T.Q8_0, 64)
    assert np.array_equal(pack_blocks(codes8, d8, None, T.Q8_0), ref8)


@pytest.mark.parametrize("method", ["gptq", "awq-gptq"])
def test_gptq_method_carries_every_linear_through_the_cli(tiny, tmp_path, method):
    out = tmp_path / "g.gguf"
    proc = invoke_cli("export", str(tiny("llama")), "--format", "gguf", "--quantize", "q4_0", "--method", method, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    reader = gguf.GGUFReader(out)
    assert sum(t.tensor_type == T.Q4_0 for t in reader.tensors) == 14
    assert slimkit.exporters.summary(out)["tensor_sources"] == {"carried": 14, "float": 6}


@pytest.mark.parametrize("args, fragments", [
    (["--quantize", "q5_k"], ["q5_k", "f16, q8_0, q4_0, q4_1"]),
    (["--quantize", "f16", "--method", "awq"], ["--method awq", "q8_0, q4_0 or q4_1"]),
    (["--method", "rtn", "--quantize", "q4_0"], ["--method rtn", "awq or gptq"]),
])
def test_bad_options_are_one_line_exit_2(tiny, tmp_path, args, fragments):
    out = tmp_path / "x.gguf"
    assert_user_error(invoke_cli("export", str(tiny("llama")), "--format", "gguf", *args, "--out", str(out)), *fragments)
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"] or not any(p.suffix == ".gguf" for p in tmp_path.iterdir())


def test_an_architecture_without_a_llama_cpp_mapping_writes_nothing(tiny, tmp_path):
    out = tmp_path / "x.gguf"
    assert_user_error(invoke_cli("export", str(tiny("gpt2")), "--format", "gguf", "--out", str(out)), "gpt2", "--format ort-genai")
    assert_user_error(invoke_cli("export", str(tiny("bert")), "--format", "gguf", "--out", str(out)), "causal LMs", "--format onnxruntime")
    assert not [p for p in tmp_path.iterdir() if p.name != "cache"]


def test_an_existing_file_is_kept(tiny, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_text("mine")
    with pytest.raises(SlimkitError, match="--overwrite"):
        export(tiny("llama"), out, ExportConfig("gguf"))
    assert out.read_text() == "mine"
