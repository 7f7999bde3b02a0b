"""The catalogue of bad inputs: each is one line on stderr naming the fix, exit
code 2, no traceback, and nothing written. RELIABILITY.md lists them."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, invoke_cli
from safetensors.torch import load_file, save_file

FAST_EVAL = ["--max-tokens", "100", "--window", "32", "--stride", "32"]


def _copy(tiny, arch, tmp_path) -> Path:
    return Path(shutil.copytree(tiny(arch), tmp_path / "model"))


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _poison(d: Path, value: float) -> Path:
    f = d / "model.safetensors"
    tensors = load_file(f)
    name = sorted(k for k, v in tensors.items() if v.dim() == 2)[0]
    tensors[name][0, 0] = value
    save_file(tensors, f, metadata={"format": "pt"})
    return d


def _gguf_truncated(tmp_path: Path) -> Path:
    f = tmp_path / "cut.gguf"
    # a real GGUF header (magic, version 3, 1 tensor, 1 metadata entry) with the rest missing
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + b"\x05")
    return f


def _remote_code(d: Path) -> Path:
    return _edit_config(d, auto_map={"AutoConfig": "custom.CustomConfig"}, model_type="my-custom-arch")


# (id, argv builder, fragments the one-line message must contain)
CASES = [
    ("missing-path", lambda t, p: ["eval", str(p / "nope")], ["no such file or directory"]),
    ("missing-relative-path", lambda t, p: ["bench", "./does/not/exist"], ["no such file or directory"]),
    ("directory-not-a-model", lambda t, p: ["eval", str(p)], ["not a model directory", "config.json"]),
    ("file-not-a-model", lambda t, p: ["eval", str(_write(p / "notes.txt", "hi"))], ["is a file, not a model"]),
    ("truncated-safetensors", lambda t, p: ["eval", str(_truncate(_copy(t, "llama", p)))], ["truncated or corrupt", "re-download"]),
    ("corrupt-safetensors-header", lambda t, p: ["eval", str(_scramble(_copy(t, "llama", p)))], ["corrupt"]),
    ("safetensors-trailing-garbage", lambda t, p: ["eval", str(_append(_copy(t, "gpt2", p)))], ["truncated or corrupt"]),
    ("pickle-only-weights", lambda t, p: ["eval", str(_pickle_only(_copy(t, "llama", p)))], ["does not unpickle", "safetensors"]),
    ("invalid-config-json", lambda t, p: ["eval", str(_write(_copy(t, "llama", p) / "config.json", "{oops").parent)], ["not valid JSON"]),
    ("impossible-config-sizes", lambda t, p: ["eval", str(_edit_config(_copy(t, "llama", p), hidden_size=48))], ["cannot load the weights"]),
    ("config-rejected-by-transformers", lambda t, p: ["eval", str(_write(_copy(t, "llama", p) / "config.json", json.dumps({"model_type": "llama", "hidden_size": 8})).parent)],
     ["config.json", "hidden size (8) is not a multiple of the number of attention heads (32)", "fix that field"]),
    ("tokenizer-json-missing-keys", lambda t, p: ["eval", str(_write(_copy(t, "llama", p) / "tokenizer.json", '{"version": "1.0", "model": {"type": "BPE"}}').parent)],
     ["tokenizer.json", "no key 'added_tokens'", "tokenizer.save_pretrained"]),
    ("weights-of-unknown-dtype", lambda t, p: ["eval", str(_unknown_dtype(_copy(t, "llama", p)))], ["model.safetensors", "unknown variant", "re-save or re-download"]),
    ("nan-weights", lambda t, p: ["eval", str(_poison(_copy(t, "llama", p), float("nan")))], ["NaN or Inf"]),
    ("inf-weights", lambda t, p: ["bench", str(_poison(_copy(t, "bert", p), float("inf")))], ["NaN or Inf"]),
    ("truncated-gguf", lambda t, p: ["eval", str(_gguf_truncated(p))], ["cannot read GGUF file", "re-download"]),
    ("not-a-gguf", lambda t, p: ["eval", str(_write(p / "x.gguf", "definitely not gguf"))], ["not a GGUF file"]),
    ("remote-code-without-flag", lambda t, p: ["eval", str(_remote_code(_copy(t, "llama", p)))], ["--trust-remote-code"]),
    ("empty-dataset", lambda t, p: ["eval", str(t("llama")), "--data", str(_write(p / "e.txt", ""))], ["has no"]),
    ("whitespace-dataset", lambda t, p: ["eval", str(t("bert")), "--data", str(_write(p / "w.txt", " \n\n\t\n"))], ["has no"]),
    ("missing-dataset", lambda t, p: ["eval", str(t("llama")), "--data", str(p / "nope.txt")], ["no such data file"]),
    ("unsupported-dataset-type", lambda t, p: ["eval", str(t("llama")), "--data", str(_write(p / "d.csv", "a,b"))], [".txt", ".jsonl"]),
    ("binary-dataset", lambda t, p: ["eval", str(t("llama")), "--data", str(_executable_head(p / "program.txt"))], ["program.txt is not text", "is NUL", "UTF-8"]),
    ("binary-calibration-data", lambda t, p: ["quantize", str(t("llama")), "--method", "int8", "--data", str(_executable_head(p / "program.txt")),
                                              "--out", str(p / "q")], ["program.txt is not text", "is NUL"]),
    ("dataset-in-another-encoding", lambda t, p: ["eval", str(t("llama")), "--data", str(_write_bytes(p / "l.txt", "déjà vu\n".encode("latin-1") * 50))],
     ["l.txt is not UTF-8 text", "byte 1 (0xe9)", "iconv"]),
    ("bad-jsonl-line", lambda t, p: ["eval", str(t("llama")), "--data", str(_write(p / "d.jsonl", '{"text": "a"}\n{bad'))], ["d.jsonl:2"]),
    ("jsonl-without-text", lambda t, p: ["eval", str(t("llama")), "--data", str(_write(p / "d.jsonl", '{"body": "a"}'))], ["--text-key"]),
    ("unknown-split", lambda t, p: ["eval", str(t("llama")), "--split", "train"], ["unknown split"]),
    ("label-out-of-range", lambda t, p: ["eval", str(t("bert-cls")), "--data", str(_write(p / "l.jsonl", '{"text": "a", "label": 9}'))], ["out of range"]),
    ("unknown-class-name", lambda t, p: ["eval", str(t("bert-cls")), "--data", str(_write(p / "l.jsonl", '{"text": "a", "label": "maybe"}'))], ["not one of the model's classes"]),
    ("window-too-small", lambda t, p: ["eval", str(t("llama")), "--window", "1"], ["window"]),
    ("stride-zero", lambda t, p: ["eval", str(t("llama")), "--stride", "0"], ["stride"]),
    ("stride-over-window", lambda t, p: ["eval", str(t("llama")), "--window", "32", "--stride", "64"], ["stride"]),
    ("threads-zero", lambda t, p: ["bench", str(t("llama")), "--threads", "0"], ["threads"]),
    ("bad-batch-sizes", lambda t, p: ["bench", str(t("llama")), "--batch-sizes", "4,-1"], ["out of range"]),
    ("new-tokens-zero", lambda t, p: ["bench", str(t("llama")), "--new-tokens", "0"], ["out of range"]),
    ("unknown-dtype", lambda t, p: ["bench", str(t("llama")), "--dtype", "int3"], ["unknown dtype"]),
    ("unsupported-architecture", lambda t, p: ["eval", str(_t5(p))], ["unsupported model"]),
    ("reference-of-another-kind", lambda t, p: ["eval", str(t("llama")), "--reference", str(t("bert")), *FAST_EVAL], ["one kind"]),
    ("unknown-embedded-name", lambda t, p: ["eval", "minilm"], ["did you mean 'minilm-l6'"]),
    ("offline-hub-id", lambda t, p: ["eval", "some-org/some-model"], ["cannot be reached"]),
    ("tampered-artifact", lambda t, p: ["eval", str(_tampered_artifact(t, p))], ["does not match its hash"]),
    ("artifact-missing-file", lambda t, p: ["bench", str(_artifact_missing_weights(t, p))], ["missing model.safetensors"]),
    ("artifact-from-the-future", lambda t, p: ["eval", str(_future_artifact(t, p))], ["upgrade slimkit"]),
    ("unknown-quantize-method", lambda t, p: ["quantize", str(t("llama")), "--method", "int3", "--out", str(p / "q")], ["did you mean 'int8'"]),
    ("bits-out-of-range", lambda t, p: ["quantize", str(t("llama")), "--method", "gptq", "-o", "bits=3", "--out", str(p / "q")], ["bits=3", "use 4 or 8"]),
    ("bad-group-size", lambda t, p: ["quantize", str(t("llama")), "--method", "int4-wo", "-o", "group_size=48", "--out", str(p / "q")], ["group_size=48"]),
    ("unknown-observer", lambda t, p: ["quantize", str(t("llama")), "--method", "int8-static", "-o", "observer=kl", "--out", str(p / "q")], ["observer", "minmax"]),
    ("bad-compute-dtype", lambda t, p: ["quantize", str(t("llama")), "--method", "int8-wo", "-o", "compute_dtype=int8", "--out", str(p / "q")], ["compute_dtype='int8' is not supported", "bf16"]),
    ("qat-negative-lr", lambda t, p: ["quantize", str(t("llama")), "--method", "qat", "-o", "lr=-1", "--out", str(p / "q")], ["lr"]),
    ("mixed-unknown-low-method", lambda t, p: ["quantize", str(t("llama")), "--method", "mixed", "-o", "low=int3", "-o", "max_kl=0.1", "--out", str(p / "q")], ["int3"]),
    ("sparsity-out-of-range", lambda t, p: ["prune", str(t("llama")), "--method", "magnitude", "--sparsity", "1.5", "--out", str(p / "q")], ["sparsity must be a fraction"]),
    ("temperature-zero", lambda t, p: ["distill", str(t("llama")), "--student-layers", "1", "--steps", "1", "--temperature", "0", "--out", str(p / "q")], ["temperature"]),
    ("recipe-unknown-key", lambda t, p: ["run", str(_write(p / "r.yaml", "steps:\n  - method: int4-wo\n    group_sise: 64\n")), "--model", str(t("llama")), "--out", str(p / "q")], ["steps[0].group_sise: unknown key"]),
    ("recipe-wrong-type", lambda t, p: ["run", str(_write(p / "r.yaml", "steps:\n  - method: gptq\n    bits: four\n")), "--model", str(t("llama")), "--out", str(p / "q")], ["steps[0].bits: expected int"]),
]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _executable_head(path: Path) -> Path:
    """The first 5 KB of this Python's executable, named like text."""
    return _write_bytes(path, Path(sys.executable).resolve().read_bytes()[:5000])


def _truncate(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    return d


def _scramble(d: Path) -> Path:
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[10:30] = b"\xff" * 20
    f.write_bytes(bytes(raw))
    return d


def _append(d: Path) -> Path:
    with open(d / "model.safetensors", "ab") as fh:
        fh.write(b"junk" * 10)
    return d


def _unknown_dtype(d: Path) -> Path:
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "Q9", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return d


def _pickle_only(d: Path) -> Path:
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    return d


def _t5(p: Path) -> Path:
    import transformers as T

    T.T5ForConditionalGeneration(T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)).save_pretrained(p / "t5")
    return p / "t5"


def _artifact(t, p: Path) -> Path:
    import slimkit

    return slimkit.save(slimkit.load(t("llama")), p / "artifact")


def _tampered_artifact(t, p):
    a = _artifact(t, p)
    f = a / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the last weight
    f.write_bytes(bytes(raw))
    return a


def _artifact_missing_weights(t, p):
    a = _artifact(t, p)
    (a / "model.safetensors").unlink()
    return a


def _future_artifact(t, p):
    a = _artifact(t, p)
    m = json.loads((a / "slimkit.json").read_text())
    m["format_version"] = 99
    (a / "slimkit.json").write_text(json.dumps(m))
    return a


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    _, argv, fragments = case
    work = tmp_path / "work"
    work.mkdir()
    args = argv(tiny, work)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert_user_error(invoke_cli(*args), *fragments)
    after = sorted(str(p) for p in tmp_path.rglob("*") if not str(p).startswith(str(tmp_path / "hf")))
    assert after == [b for b in before if not b.startswith(str(tmp_path / "hf"))], "an error left files behind"
