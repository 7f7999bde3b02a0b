"""Serve an exported ONNX directory through the same code paths as a PyTorch model.

`OrtModel` is an `nn.Module` without parameters whose call signature is the
subset of a Hugging Face model's that `slimkit.evaluate` and
`slimkit.benchmark` use:

    model(input_ids=..., attention_mask=..., use_cache=False, logits_to_keep=k).logits
    model(input_ids=..., past_key_values=past, use_cache=True).past_key_values
    model(**tokenizer_output).last_hidden_state

so an exported model is measured by exactly the harness that measures the
original (`tensorrt.TrtModel` does the same for a TensorRT engine on a GPU).
Tensors cross the boundary as torch tensors (zero-copy views of NumPy arrays).
The KV cache is an `OrtCache`: the graph's present tensors and the attention
mask they were computed under; the graph appends to it.

The ONNX Runtime session is created on first use with `torch.get_num_threads()`
intra-op threads (and again if that number changes), so `--threads` and
`BenchConfig.threads` govern ORT the way they govern PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimkit.core.arch import CAUSAL_LM, CLASSIFIER
from slimkit.core.errors import SlimkitError
from slimkit.exporters.onnx import GraphSpec, positions, session
from slimkit.io.files import read_config, read_tokenizer
from slimkit.io.loader import register_runtime
from slimkit.io.model import LoadedModel


@dataclass
class OrtCache:
    """Past keys/values as the graph returned them, and the mask they cover (B, past)."""

    arrays: list[np.ndarray]
    mask: torch.Tensor

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.arrays[0].shape[2]) if self.arrays else 0


class OrtModel(nn.Module):
    """An ONNX graph in an ONNX Runtime session, called like a Hugging Face model."""

    def __init__(self, graph: Path, spec: GraphSpec, config, dtype: str = "float32"):
        super().__init__()
        self.graph, self.spec, self.config = graph, spec, config
        self.slimkit_dtype = dtype  # what benchmark reports instead of a parameter dtype
        self._session = None
        self._threads = 0

    @property
    def session(self):
        threads = torch.get_num_threads()
        if self._session is None or threads != self._threads:
            self._session, self._threads = session(self.graph, threads, self.spec.kind), threads
            self._past_type = {i.name: i.type for i in self._session.get_inputs()}.get(
                self.spec.past_names[0] if self.spec.layers else "", "tensor(float)")
        return self._session

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0, position_ids=None, **unused):
        from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, SequenceClassifierOutput

        if input_ids is None:
            raise SlimkitError("an exported model needs input_ids (inputs_embeds is not supported)")
        input_ids = input_ids.cpu()
        if self.spec.kind != CAUSAL_LM:
            mask = attention_mask.cpu() if attention_mask is not None else torch.ones_like(input_ids)
            feeds = {"input_ids": input_ids, "attention_mask": mask}
            if "token_type_ids" in self.spec.inputs:
                feeds["token_type_ids"] = token_type_ids.cpu() if token_type_ids is not None else torch.zeros_like(input_ids)
            (out,) = self.session.run(None, {k: v.numpy() for k, v in feeds.items()})
            out = torch.from_numpy(out)
            return SequenceClassifierOutput(logits=out) if self.spec.kind == CLASSIFIER else BaseModelOutput(last_hidden_state=out)
        logits, cache = self._decoder_step(input_ids, attention_mask, past_key_values, position_ids)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache if use_cache is not False else None)

    def _decoder_step(self, input_ids, attention_mask, past: OrtCache | None, position_ids):
        sess = self.session
        batch, new = input_ids.shape
        if past is None:
            np_dtype = np.float16 if self._past_type == "tensor(float16)" else np.float32
            empty = np.zeros((batch, self.spec.kv_heads, 0, self.spec.head_dim), dtype=np_dtype)
            past = OrtCache([empty] * (2 * self.spec.layers), torch.ones(batch, 0, dtype=torch.long))
        elif not isinstance(past, OrtCache):
            raise SlimkitError("an exported model continues only from its own past_key_values: pass the cache it returned")
        if attention_mask is None:
            mask = torch.cat([past.mask, torch.ones(batch, new, dtype=torch.long)], dim=1)
        else:
            mask = attention_mask.cpu().long()
        pos = position_ids.cpu() if position_ids is not None else positions(mask, new)
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        feeds.update(zip(self.spec.past_names, past.arrays))
        logits, *present = sess.run(None, feeds)
        return torch.from_numpy(logits), OrtCache(present, mask)


def load_ort(path: Path, manifest: dict) -> OrtModel:
    """The OrtModel of a directory exported for ONNX Runtime."""
    export = manifest.get("export") or {}
    try:
        spec = GraphSpec.from_dict(export["graph_spec"])
    except (KeyError, TypeError) as exc:
        raise SlimkitError(f"{path / 'slimkit.json'} has no graph description: export the model again") from exc
    return OrtModel(path / export.get("graph", "model.onnx"), spec, read_config(path), export.get("precision", "float32"))


def serve_with(runtime: str, build: Callable[[Path, dict], nn.Module]) -> None:
    """Let `slimkit.load` serve directories exported for `runtime`: `build(path, manifest)` makes the
    module that runs them, called like a Hugging Face model (hashes are checked by the loader first)."""

    def serve(path: Path, manifest: dict, source: str | None) -> LoadedModel:
        model = build(path, manifest)
        model.slimkit_parameters = manifest.get("parameters", 0)
        return LoadedModel(model=model, tokenizer=read_tokenizer(path), kind=manifest["kind"], source=source or str(path),
                           path=path, manifest=manifest)

    register_runtime(runtime, serve)


serve_with("onnxruntime", load_ort)
