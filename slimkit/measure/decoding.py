"""Decoding through `torch.compile`: a static KV cache and one compiled token step.

Eager Hugging Face decoding on a CPU is bound by overhead, not by reading the
weights: each token runs a few thousand small PyTorch ops (norms, rotary
embeddings, cache concatenations, dtype casts, 7 linear layers x 30 blocks
for SmolLM2-135M), each costing microseconds of Python and dispatch. A
quantized model reads 4x fewer bytes than fp32 but pays the same overhead,
so in eager mode int8 decodes only about 2.5x faster than fp32.

Here the KV cache is a transformers `StaticCache` (preallocated, fixed
shapes), so the one-token step has the same shapes every time and compiles
once with inductor into fused C++ kernels; the int8/int4 weight kernels are
called from the compiled graph as they are. The prompt is prefilled eagerly
into the same cache. Compiling costs about a minute on 2 cores the first time
(it is cached by inductor on disk for later processes), which is why it is an
option of `benchmark`/`generate`, reported separately, never silently mixed
into eager numbers.
"""

from __future__ import annotations

import time

import torch

from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.io.model import LoadedModel


def is_pytorch(model) -> bool:
    """A transformers model run by PyTorch (not an exported graph in another runtime)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


class CompiledDecoder:
    """Greedy decoding of `lm` with a static cache of `max_len` tokens and a compiled step.

        dec = CompiledDecoder(lm, max_len=256)
        logits = dec.prefill(ids)           # (1, V) for the last prompt token
        logits = dec.step(next_token)       # (1, V), one token at a time
    """

    def __init__(self, lm: LoadedModel, max_len: int):
        if lm.kind != CAUSAL_LM or not is_pytorch(lm.model):
            raise SlimkitError(f"{lm.name} cannot be compiled: compiled decoding is for PyTorch causal LMs (exports run in their own runtime)")
        from transformers import StaticCache

        self.lm, self.max_len = lm, max_len
        try:
            self.cache = StaticCache(config=lm.model.config, max_cache_len=max_len)
        except (TypeError, ValueError, AttributeError) as exc:
            raise SlimkitError(f"{lm.name} has no static KV cache support ({exc}): measure it without --compile") from exc
        self._step = torch.compile(lm.model.forward, dynamic=False)
        self.position = 0
        self.compile_seconds: float | None = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Fill the cache with the prompt `ids` (1, T); logits of its last token (1, V)."""
        if ids.shape[0] != 1:
            raise SlimkitError("compiled decoding runs one sequence at a time: pass a batch of 1")
        if ids.shape[1] >= self.max_len:
            raise SlimkitError(f"the prompt has {ids.shape[1]} tokens, more than the compiled cache holds ({self.max_len}): raise max_len")
        self.cache.reset()
        n = ids.shape[1]
        out = self.lm.model(input_ids=ids, past_key_values=self.cache, use_cache=True, cache_position=torch.arange(n), logits_to_keep=1)
        self.position = n
        return out.logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append `token` (1, 1); logits of the next token (1, V)."""
        if self.position >= self.max_len:
            raise SlimkitError(f"the compiled cache is full ({self.max_len} tokens): raise max_len")
        first = self.compile_seconds is None
        start = time.perf_counter()
        try:
            out = self._step(input_ids=token, past_key_values=self.cache, use_cache=True, cache_position=torch.tensor([self.position]))
        except Exception as exc:  # inductor reports a missing compiler or an unsupported op in many exception types
            if not first:
                raise
            raise SlimkitError(f"torch.compile failed for {self.lm.name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): "
                               "it needs a C++ compiler (e.g. apt-get install g++); or measure without --compile") from exc
        if first:
            self.compile_seconds = time.perf_counter() - start
        self.position += 1
        return out.logits[:, -1]
