"""Greedy text generation with a KV cache, for any model slimkit serves.

The loop calls the model exactly as `slimkit.benchmark` does (a prefill,
then one token at a time with `past_key_values`), so it runs a PyTorch
model, an ONNX Runtime export and an onnxruntime-genai export alike, and the
tokens/s it reports are comparable to the benchmark's decode numbers.
Greedy decoding keeps the output deterministic, which makes two runtimes'
outputs comparable word for word.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from slimkit.core.arch import CAUSAL_LM
from slimkit.core.errors import SlimkitError
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel
from slimkit.measure.decoding import CompiledDecoder


@dataclass
class Generation:
    prompt: str
    text: str
    new_tokens: int
    prompt_tokens: int
    prefill_seconds: float
    decode_tokens_per_s: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def generate(model: LoadedModel | str, prompt: str, max_new_tokens: int = 32, chat: bool = False, compile: bool = False) -> Generation:
    """Greedy continuation of `prompt`; stops at EOS or after `max_new_tokens`.

    `compile` decodes through torch.compile with a static KV cache (decoding.py);
    the first step then includes the compilation, so its tokens/s are lower.
    """
    lm = load(model)
    if lm.kind != CAUSAL_LM:
        raise SlimkitError(f"{lm.name} is a {lm.kind}, not a causal LM: generate needs a text generation model")
    if max_new_tokens < 1:
        raise SlimkitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    tok = lm.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise SlimkitError(f"{lm.name}'s tokenizer has no chat template: drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise SlimkitError("the prompt is empty: pass some text with --prompt")
    eos = {t for t in _as_list(tok.eos_token_id) if t is not None}
    out_ids: list[int] = []
    state = {}
    if compile:
        decoder = CompiledDecoder(lm, ids.shape[1] + max_new_tokens + 1)
        first, step = decoder.prefill, decoder.step
    else:

        def first(ids):
            state["out"] = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return state["out"].logits[:, -1]

        def step(nxt):
            state["out"] = lm.model(input_ids=nxt, past_key_values=state["out"].past_key_values, use_cache=True)
            return state["out"].logits[:, -1]

    with torch.inference_mode():
        start = time.perf_counter()
        nxt = first(ids).argmax(-1, keepdim=True)  # (1, 1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        steps = 0
        while True:
            token = int(nxt[0, 0])
            if token in eos:
                break
            out_ids.append(token)
            if len(out_ids) >= max_new_tokens:
                break
            nxt = step(nxt).argmax(-1, keepdim=True)
            steps += 1
        decode = time.perf_counter() - start
    return Generation(prompt=prompt, text=tok.decode(out_ids, skip_special_tokens=True), new_tokens=len(out_ids),
                      prompt_tokens=int(ids.shape[1]), prefill_seconds=prefill,
                      decode_tokens_per_s=steps / decode if steps and decode > 0 else None)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
