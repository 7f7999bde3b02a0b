"""Decoder LLMs through onnxruntime-genai: export, parity check, and serving.

Export. A float model (whatever slimkit did to it: pruned, distilled, or
fp32) is saved as a Hugging Face directory and handed to onnxruntime-genai's
model builder, run as its own process. The builder writes a graph built for
decoding (GroupQueryAttention with a shared past/present buffer, rotary
caches, fused QKV and MLP MatMuls) plus `genai_config.json`; `--quantize
int4` makes it quantize every MatMul, the lm_head included, to block-wise
4-bit (MatMulNBits, symmetric round-to-nearest, accuracy level 4: int8
compute with VNNI).

A slimkit-quantized model (int4-wo, awq, gptq, the int8 embedding and its
tied head) keeps its own weights: the builder writes the fp32 graph of its
float twin and `genai_weights.py` puts the codes into MatMulNBits nodes,
exactly. Codes MatMulNBits cannot hold (float offsets, NF4, ...) are refused
with the fix, or re-quantized with `--quantize int4` and reported.

Parity. The genai runtime's logits for the whole prompt (a single sequence,
a batch of two, and a KV-cached decode step) are compared with PyTorch's:
max difference for fp32, relative L2 error for int4. For carried codes the
reference is the float twin (the artifact's weights, dequantized, in fp32):
at accuracy level 0 the difference is fp32 rounding, at level 4 it is the
int8 activations of MatMulNBits (about 1% of the logits). The written
weights are also decoded and compared with the codes (`max_weight_diff`, 0).

Serving. `GenaiModel` drives an `onnxruntime_genai.Generator` behind the
call signature `slimkit.evaluate` and `slimkit.benchmark` use: a call
without a cache starts a generator and returns the prompt's logits (all
positions, so perplexity is measured through this runtime); a call with the
returned `GenaiCache` appends the new token to the same generator. The
generator keeps its KV cache in a buffer of `max_length` positions, set to
the prompt plus `decode_budget` tokens. Padded batches are not served here
(genai derives its mask from pad tokens); unpadded batches are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError, short_reason
from slimkit.exporters.genai_graph import carry_codes
from slimkit.exporters.genai_weights import float_twin, quantized_layers, requantize
from slimkit.exporters.onnx import Parity
from slimkit.exporters.runtime import serve_with
from slimkit.io.files import read_config
from slimkit.io.model import LoadedModel

FP32_TOLERANCE = 1e-3  # of max(1, |reference|)
INT4_TOLERANCE = 0.5  # relative L2 error of the logits; quality is what `slimkit eval` measures
CARRIED_TOLERANCE = 0.05  # slimkit's own codes: only MatMulNBits' int8 activations (accuracy level 4) differ


def genai_module():
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise SlimkitError("--format ort-genai needs onnxruntime-genai: pip install 'slimkit[onnx]'") from exc
    return onnxruntime_genai


def build(lm: LoadedModel, out: Path, config) -> dict:
    genai_module()
    if lm.kind != CAUSAL_LM:
        raise SlimkitError(f"--format ort-genai serves causal LMs, and {lm.name} is a {lm.kind}: use --format onnxruntime")

    if quantized_layers(lm.model):
        return build_carried(lm, out, config)
    work = out / ".work"
    (work / "hf").mkdir(parents=True)
    lm.model.save_pretrained(work / "hf", safe_serialization=True)
    lm.tokenizer.save_pretrained(work / "hf")
    precision = "int4" if config.quantize == "int4" else "fp32"
    extra = ["--extra_options", f"int4_block_size={config.block_size}", f"int4_accuracy_level={max(config.accuracy_level, 1)}"] if precision == "int4" else []
    run_builder(lm.name, work / "hf", out, precision, extra)
    _rmtree(work)
    metric, tol = ("rel_l2", config.tolerance or INT4_TOLERANCE) if precision == "int4" else ("max_abs", config.tolerance or FP32_TOLERANCE)
    parity = check_parity(lm, out, tol, metric)
    export = {"format": "ort-genai", "precision": "int4" if precision == "int4" else "float32",
              "quantize": config.quantize, "parity": {precision: parity.to_dict()}}
    if precision == "int4":
        export["block_size"] = config.block_size
    return _info(out, export)


def build_carried(lm: LoadedModel, out: Path, config) -> dict:
    """A slimkit-quantized model: the builder's fp32 graph with slimkit's codes in MatMulNBits (genai_weights.py)."""
    twin, plan = float_twin(lm.model)
    if plan.refused and config.quantize != "int4":
        name, why = next(iter(plan.refused.items()))
        more = f" (and {len(plan.refused) - 1} more layers)" if len(plan.refused) > 1 else ""
        raise SlimkitError(f"{name}{more} cannot be exported to onnxruntime-genai exactly ({why.reason}): {why.fix}, "
                           "or export with --quantize int4 to re-quantize such layers")
    requantized = sorted(plan.refused)
    for name in requantized:
        plan.codes[name] = requantize(plan.weights[name], config.block_size)
    work = out / ".work"
    (work / "hf").mkdir(parents=True)
    twin.save_pretrained(work / "hf", safe_serialization=True)
    lm.tokenizer.save_pretrained(work / "hf")
    run_builder(lm.name, work / "hf", out, "fp32", [])
    _rmtree(work)
    carried = carry_codes(out / "model.onnx", plan, config.accuracy_level)
    reference = LoadedModel(twin, lm.tokenizer, lm.kind, lm.name)
    exact = not requantized and config.accuracy_level == 0
    tol = config.tolerance or (INT4_TOLERANCE if requantized else FP32_TOLERANCE if exact else CARRIED_TOLERANCE)
    parity = check_parity(reference, out, tol, "max_abs" if exact else "rel_l2")
    precision = "int4" if 4 in carried.bits.values() else "int8"
    export = {"format": "ort-genai", "precision": precision, "quantize": config.quantize,
              "carried": {"layers": len(plan.codes) - len(requantized), "nodes": len(carried.nodes),
                          "max_weight_diff": carried.max_weight_diff, "accuracy_level": config.accuracy_level,
                          "requantized": requantized, "quantized_embeddings": carried.tables},
              "parity": {precision: parity.to_dict()}}
    if requantized:
        export["block_size"] = config.block_size
    return _info(out, export)


def run_builder(name: str, hf_dir: Path, out: Path, precision: str, extra: list[str]) -> None:
    """onnxruntime-genai's model builder, in its own process; its failure is one line."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(hf_dir.parent / "cache"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise SlimkitError(f"onnxruntime-genai's model builder cannot export {name} ({reason[:200]}): "
                           "it supports Llama, Mistral, Phi, Qwen, Gemma and similar decoders; use --format onnxruntime")


def _info(out: Path, export: dict) -> dict:
    weights = sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".data"))
    return {"runtime": "ort-genai", "export": export, "weights": weights, "precision": export["precision"],
            "versions": {"onnxruntime-genai": genai_module().__version__}}


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- serving


@dataclass
class GenaiCache:
    """The generator that holds the KV cache, and how many tokens it has seen."""

    generator: object
    length: int

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class GenaiModel(nn.Module):
    """An onnxruntime-genai model called like a Hugging Face causal LM."""

    decode_budget = 1024

    def __init__(self, path: Path, config):
        super().__init__()
        og = genai_module()
        self.path, self.config = path, config
        self.slimkit_dtype = "float32"
        self.context_length = json.loads((path / "genai_config.json").read_text())["model"].get("context_length", 2048)
        self._og, self._model, self._threads = og, None, 0

    @property
    def model(self):
        threads = torch.get_num_threads()
        if self._model is None or threads != self._threads:
            cfg = self._og.Config(str(self.path))
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
            try:
                self._model, self._threads = self._og.Model(cfg), threads
            except Exception as exc:
                raise SlimkitError(f"onnxruntime-genai cannot open {self.path} ({short_reason(exc)}): export it again") from exc
        return self._model

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, logits_to_keep=0,
                **unused):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if attention_mask is not None and not bool(attention_mask.all()):
            raise SlimkitError("an onnxruntime-genai model is served here without padding: pass unpadded batches")
        ids = input_ids.cpu().numpy().astype(np.int32)
        if past_key_values is None:
            params = self._og.GeneratorParams(self.model)
            max_length = min(self.context_length, ids.shape[1] + self.decode_budget)
            params.set_search_options(max_length=max_length, batch_size=ids.shape[0])
            cache = GenaiCache(self._og.Generator(self.model, params), 0)
        elif isinstance(past_key_values, GenaiCache):
            cache = past_key_values
        else:
            raise SlimkitError("an exported model continues only from its own past_key_values: pass the cache it returned")
        try:
            cache.generator.append_tokens(ids)
        except RuntimeError as exc:
            raise SlimkitError(f"onnxruntime-genai refused the tokens ({short_reason(exc)}): decode one sequence at a "
                               "time, within the context length") from exc
        cache.length += ids.shape[1]
        logits = torch.from_numpy(np.asarray(cache.generator.get_output("logits"), dtype=np.float32))
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache if use_cache is not False else None)


def load_genai(path: Path, manifest: dict) -> GenaiModel:
    model = GenaiModel(path, read_config(path))
    model.slimkit_dtype = manifest.get("export", {}).get("precision", "float32")
    return model


def check_parity(lm: LoadedModel, path: Path, tolerance: float, metric: str):
    served = GenaiModel(path, lm.model.config)
    vocab = int(getattr(lm.model.config, "vocab_size", 100) or 100)
    g = torch.Generator().manual_seed(0)
    pairs = []
    for batch, length in ((1, 9), (2, 6)):
        ids = torch.randint(4, vocab, (batch, length), generator=g)
        nxt = torch.randint(4, vocab, (batch, 1), generator=g)
        with torch.no_grad():
            ref = lm.model(input_ids=ids, use_cache=True)
            got = served(input_ids=ids, use_cache=True)
            pairs.append((got.logits, ref.logits))
            if batch == 1:  # genai appends to one sequence at a time
                step = lm.model(input_ids=nxt, past_key_values=ref.past_key_values, use_cache=True)
                pairs.append((served(input_ids=nxt, past_key_values=got.past_key_values, use_cache=True).logits, step.logits))
    return Parity.of(pairs, tolerance, metric).check("onnxruntime-genai", f"the exported model does not reproduce {lm.name}; "
                                                     "raise --tolerance if the difference is expected")


serve_with("ort-genai", load_genai)
