"""A causal LM as one GGUF file, for llama.cpp and Ollama.

    slimkit export smollm2-135m --format gguf --quantize q4_0 --method awq --out smollm2-q4_0.gguf
    llama-cli -m smollm2-q4_0.gguf -cnv

The file holds what llama.cpp reads: the architecture's hyperparameters, the
tokenizer (byte-level BPE tokens, merges, token types, special ids, the chat
template) and every tensor under llama.cpp's name. Names come from the `gguf`
package's own table (`get_tensor_name_map`), the one transformers reads GGUF
files with, so slimkit's GGUF reader (`slimkit.load("x.gguf")`) and this
writer agree by construction. q and k rows are permuted into llama.cpp's
rotary order, the inverse of what the reader undoes.

Tensor types. Norms stay F32. Linear layers take the requested type; the
embedding (and an untied head) take Q8_0 under a 4-bit type, as llama.cpp's
own quantizer does for a tied embedding whose rows are not a multiple of 256
(its Q6_K falls back to Q8_0). A layer whose rows are not whole blocks of 32
stays F16.

Where the weights come from. A slimkit-quantized layer whose grid is the
target type's (`gguf_blocks.py`) is written with its own codes and fp16
scales, bit for bit; `--method awq|gptq|awq-gptq` first quantizes the float model with
that slimkit method on the target's grid (groups of 32; symmetric for Q4_0 and
Q8_0, float minimum for Q4_1; Q4_0's block scales searched for the least
importance-weighted error, `scale_search`) so that every linear layer is carried this way.
Every other weight is the float model's (a quantized layer's dequantized
weight), rounded to the type by the `gguf` package's reference quantizer, the
same round-to-nearest as llama.cpp's quantizer without an importance matrix.

The file is written beside its destination under a temporary name and renamed
into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import note
from slimkit.exporters.genai_weights import float_twin
from slimkit.exporters.gguf_blocks import BLOCK, as_numpy, carried_blocks, rope_permute
from slimkit.io.model import LoadedModel

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
METHODS = {"awq": ("awq", {}), "gptq": ("gptq", {}),  # --method -> the slimkit method and its options besides the grid
           "awq-gptq": ("awq", {"rounding": "gptq"})}  # AWQ's channel scales, then GPTQ's rounding of the scaled weights
ARCHITECTURES = {"llama": "llama"}  # Hugging Face model_type -> llama.cpp architecture (q/k rope-permuted)
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # gguf.LlamaFileType
PRE_TOKENIZERS = {  # the HF pre-tokenizer's layout -> llama.cpp's name for the same splitting
    ("Digits", "ByteLevel"): "smollm",
    ("ByteLevel",): "gpt-2",
}


def gguf_type(name: str):
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[name]


def method_options(method: str, quantize: str) -> dict:
    """The slimkit grid that is `quantize`'s, code for code: groups of 32; symmetric, or a float minimum for Q4_1.

    Q4_0's scales are searched (`scale_search`): Q4_0 has 16 levels, -8..7, and d may take
    either sign, so a block whose largest weight sits on the -8 level steps finer than absmax / 7."""
    if quantize not in ("q8_0", "q4_0", "q4_1"):
        raise SlimkitError(f"--method {method} makes integer codes: use it with --quantize q8_0, q4_0 or q4_1, not {quantize}")
    return {"bits": 8 if quantize == "q8_0" else 4, "group_size": BLOCK, "symmetric": quantize != "q4_1",
            "zero_point": "float", "embeddings": False, "scale_search": quantize == "q4_0", **METHODS[method][1]}


def check_model(lm: LoadedModel) -> str:
    """The llama.cpp architecture of `lm`, or a one-line error naming what can serve it instead."""
    if lm.kind != CAUSAL_LM:
        raise SlimkitError(f"--format gguf serves causal LMs, and {lm.name} is a {lm.kind}: use --format onnxruntime")
    model_type = getattr(lm.model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SlimkitError(f"--format gguf maps {', '.join(ARCHITECTURES)} models to llama.cpp, and {lm.name} is '{model_type}': "
                           "use --format ort-genai or onnxruntime")
    rope = dict(getattr(lm.model.config, "rope_parameters", None) or getattr(lm.model.config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise SlimkitError(f"{lm.name} uses '{rope.get('rope_type', rope.get('type'))}' rope scaling, which this GGUF writer "
                           "does not map: use --format ort-genai")
    return ARCHITECTURES[model_type]


def export_gguf(lm: LoadedModel, out: str | os.PathLike, config, *, overwrite: bool = False) -> Path:
    """Write `lm` as the GGUF file `out` (config: ExportConfig with format 'gguf'); return its path."""
    out = Path(out).expanduser()
    arch = check_model(lm)
    if out.is_dir() or (out.exists() and not overwrite):
        raise SlimkitError(f"{out} already exists: choose another --out or pass --overwrite")
    if not out.parent.is_dir():
        raise SlimkitError(f"{out.parent} is not a directory: create it or choose another --out")
    model = lm.model
    if config.method:
        from slimkit.quantization import quantize

        model = quantize(lm, METHODS[config.method][0], **method_options(config.method, config.quantize)).model
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write(model, lm.tokenizer, arch, config.quantize, tmp, lm.name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write(model: torch.nn.Module, tokenizer, arch: str, quantize: str, path: Path, name: str) -> dict:
    """Write the GGUF file; return what each tensor became (also stored in it, as `slimkit.tensor_sources`)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch)
    writer.add_name(name)
    add_hparams(writer, model)
    add_tokenizer(writer, tokenizer)
    report = add_tensors(writer, model, quantize)
    writer.add_file_type(FILE_TYPES[quantize])
    writer.add_quantization_version(2)
    writer.add_string("slimkit.tensor_sources", json.dumps(report["sources"], sort_keys=True))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return report


def add_hparams(writer, model: torch.nn.Module) -> None:
    """The hyperparameters llama.cpp builds the graph from; per-layer lists where pruning made layers differ."""
    cfg = model.config
    layers = model.model.layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = [layer.self_attn.q_proj.out_features // head_dim for layer in layers]
    kv_heads = [layer.self_attn.k_proj.out_features // head_dim for layer in layers]
    ffn = [layer.mlp.gate_proj.out_features for layer in layers]
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(ffn[0] if len(set(ffn)) == 1 else ffn)
    writer.add_head_count(heads[0] if len(set(heads)) == 1 else heads)
    writer.add_head_count_kv(kv_heads[0] if len(set(kv_heads)) == 1 else kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def add_tokenizer(writer, tokenizer) -> None:
    """Byte-level BPE as llama.cpp's 'gpt2' tokenizer model: tokens by id, merges, types, special ids, template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise SlimkitError(f"--format gguf writes byte-level BPE tokenizers, and this one is {bpe.get('type') or type(tokenizer).__name__}: "
                           "use --format ort-genai")
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]  # ids no token holds: llama.cpp needs one entry per id
    types = [5] * size  # gguf.TokenType.UNUSED
    for token, i in vocab.items():
        tokens[i], types[i] = token, 1  # NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = 3 if added.get("special") else 4  # CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("unk", writer.add_unk_token_id),
                     ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    ids = tokenizer("a")["input_ids"]  # what the tokenizer adds around text, as llama.cpp should
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(ids) and ids[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for the HF pre-tokenizer's splitting; 'default' (llama.cpp's GPT-2 style split) otherwise."""
    if not spec:
        return "default"
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    return PRE_TOKENIZERS.get(tuple(p.get("type") for p in parts), "default")


FLOAT_MODULES = (torch.nn.Linear, torch.nn.Embedding)
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def tensor_type(gguf_name: str, shape: tuple[int, ...], quantize: str):
    """The GGML type one tensor gets under the requested `quantize`."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or quantize == "f32":
        return T.F32
    if quantize != "f16" and shape[-1] % BLOCK:
        return T.F16  # rows that are not whole blocks
    if gguf_name.split(".")[0] in ("token_embd", "output") and quantize in ("q4_0", "q4_1"):
        return T.Q8_0
    return gguf_type(quantize)


def add_tensors(writer, model: torch.nn.Module, quantize: str) -> dict:
    """Every weight under its llama.cpp name; quantized layers' own codes where they are the target grid."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from gguf import quantize as gguf_quantize

    arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == writer.arch)
    names = get_tensor_name_map(arch, len(model.model.layers))
    twin, _ = float_twin(model)  # every quantized layer as the float layer it stands for
    modules = dict(model.named_modules())
    weights = twin.state_dict()
    sources, types, reasons = {}, Counter(), {}
    for hf_name, tensor in weights.items():
        if hf_name == "lm_head.weight" and torch.equal(tensor, weights["model.embed_tokens.weight"]):
            continue  # tied: llama.cpp reads the embedding as the head when there is no output tensor
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SlimkitError(f"tensor {hf_name} has no llama.cpp name: this layout cannot be exported to GGUF")
        qtype = tensor_type(gguf_name, tuple(tensor.shape), quantize)
        heads = rope_heads(model, hf_name)
        module = modules.get(hf_name.rsplit(".", 1)[0])
        quantized = tensor.dim() == 2 and not isinstance(module, FLOAT_MODULES)  # slimkit's int8/int4 storage
        data, source = None, "dequantized" if quantized else "float"
        if quantized and qtype.name in BLOCK_TYPES:
            data, why = carried_blocks(module, qtype)
            source = "carried" if data is not None else "requantized"
            if data is None:
                reasons[hf_name] = why
        if data is None:
            data = gguf_quantize(as_numpy(tensor), qtype)
        if heads:
            data = rope_permute(data, heads)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        sources[gguf_name] = source
        types[qtype.name] += 1
    if reasons:
        first = next(iter(reasons.items()))
        note(f"{len(reasons)} quantized layers are not {quantize}'s grid and were quantized again ({first[0]}: {first[1]})")
    return {"sources": sources, "types": dict(types), "requantized": reasons}


def rope_heads(model: torch.nn.Module, hf_name: str) -> int:
    """The head count whose rotary halves llama.cpp interleaves, for a q or k projection weight; 0 otherwise."""
    if not hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        return 0
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer = model.model.layers[int(hf_name.split(".")[2])]
    proj = layer.self_attn.q_proj if hf_name.endswith("q_proj.weight") else layer.self_attn.k_proj
    return proj.out_features // head_dim


def summary(path: Path) -> dict:
    """What a GGUF file holds, for the CLI: its tensor types, what was carried, its size."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields.get("slimkit.tensor_sources")
    sources = json.loads(field.contents()) if field is not None else {}
    return {"out": str(path), "runtime": "llama.cpp", "architecture": reader.fields["general.architecture"].contents(),
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
            "tensor_sources": dict(Counter(sources.values())), "size_on_disk_mb": round(path.stat().st_size / 2**20, 2)}
