"""Shared fixtures: a tokenizer trained here and tiny random models built from
configs (Llama, GPT-2, BERT encoder, BERT classifier), saved as real
Hugging Face directories. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SLIMKIT_QUIET", "1")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (512 tokens) trained on the calibration split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimkit.core.data import TextSource

    texts = list(TextSource.parse(None, "calibration").texts())[:60]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, show_progress=False))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def _save(model, tokenizer_dir: Path, path: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def build_tiny(arch: str, tokenizer_dir: Path, path: Path, seed: int = 0) -> Path:
    import transformers as T

    torch.manual_seed(seed)
    vocab = 512
    if arch == "llama":
        cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
        model = T.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                           bos_token_id=1, eos_token_id=2, pad_token_id=3)
        model = T.GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = T.BertConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512, pad_token_id=3)
        model = T.BertModel(cfg)
    elif arch == "bert-cls":
        cfg = T.BertConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512, pad_token_id=3, num_labels=3,
                           id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
        model = T.BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    return _save(model.eval(), tokenizer_dir, path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer_dir):
    """tiny(arch) -> path of a saved random model of that architecture."""
    cache: dict[str, Path] = {}

    def get(arch: str, seed: int = 0) -> Path:
        key = f"{arch}-{seed}"
        if key not in cache:
            cache[key] = build_tiny(arch, tokenizer_dir, tmp_path_factory.mktemp(key), seed)
        return cache[key]

    return get


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `slimkit` command in a subprocess."""
    full_env = {**os.environ, "SLIMKIT_QUIET": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "slimkit.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def invoke_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real CLI code in this process (fast: no interpreter start-up).

    Returns the same shape as run_cli, and stderr holds what a fresh process would
    print there: warnings too, each once, those Python hides by default left out.
    What the command changes in the process (torch's threads, the environment) is
    put back. Environment variables read at import time (the hub endpoint, say)
    must be patched on the module instead.
    """
    import traceback
    import warnings

    from typer.testing import CliRunner

    from slimkit.cli.base import app, state

    state["debug"] = False
    threads, environ = torch.get_num_threads(), dict(os.environ)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filters[:] = [f for f in warnings.filters if f[0] == "ignore"]  # the libraries' own, and Python's defaults
            warnings.simplefilter("always", append=True)
            result = CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(threads)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
    shown = dict.fromkeys(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                          for w in caught if not issubclass(w.category, HIDDEN_BY_DEFAULT))
    stderr = "".join(shown) + result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


def cli_json(*args: str, **kw) -> dict:
    proc = run_cli(*args, "--json", **kw)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def invoke_json(*args: str) -> dict:
    """cli_json in this process (invoke_cli)."""
    proc = invoke_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line on stderr that names the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])


@pytest.fixture
def one_thread():
    """Tiny models' small matmuls run fastest, and steadiest on a busy 2-core machine, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
