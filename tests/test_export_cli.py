"""`slimkit export`, and `bench` / `eval` / `generate` on an exported directory.

The CLI runs in this process (conftest.invoke_cli); the TensorRT error runs in a
real subprocess, to show that nothing else reaches a fresh interpreter's stderr."""

import json

import pytest
from conftest import assert_user_error, invoke_cli, invoke_json, run_cli

pytest.importorskip("onnxruntime", reason="ONNX export tests need the extra: pip install 'slimkit[onnx]'")

BENCH_FAST = ["--seq-len", "16", "--batch-sizes", "1,2", "--new-tokens", "4", "--threads", "1"]
EVAL_FAST = ["--max-tokens", "200", "--window", "64", "--stride", "32"]


@pytest.fixture(scope="module")
def exported_llama(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "llama-int8"
    info = invoke_json("export", str(tiny("llama")), "--format", "onnxruntime", "--quantize", "int8", "--out", str(out))
    return out, info


def test_export_json(exported_llama):
    out, info = exported_llama
    assert info["runtime"] == "onnxruntime" and info["precision"] == "int8" and info["kind"] == "causal-lm"
    assert info["parity"]["fp32"] < 1e-4 and 0 < info["parity"]["int8"] < 0.25
    assert json.loads((out / "slimkit.json").read_text())["files"]["model.onnx"]
    assert [w["runtime"] for w in info["serve"]] == ["ONNX Runtime", "slimkit"]  # what loads the export
    assert info["serve"][0]["lines"][1] == f'session = ort.InferenceSession("{out / "model.onnx"}")'


def test_bench_and_eval_on_the_exported_directory(exported_llama, tiny):
    out, _ = exported_llama
    bench = invoke_json("bench", str(out), *BENCH_FAST)
    assert bench["dtype"] == "int8" and bench["decode_tokens_per_s"] > 0 and bench["threads"] == 1
    assert bench["size_on_disk_mb"] == pytest.approx(sum(p.stat().st_size for p in out.iterdir()) / 2**20)
    quality = invoke_json("eval", str(out), "--reference", str(tiny("llama")), *EVAL_FAST)
    assert quality["top1_agreement"] > 0.9 and quality["kl_divergence"] < 0.05


def test_generate_matches_torch(exported_llama, tiny):
    from slimkit.measure.generation import generate

    out, _ = exported_llama
    got = invoke_json("generate", str(out), "--prompt", "The def statement", "--max-new-tokens", "6")
    want = generate(str(tiny("llama")), "The def statement", 6)
    assert got["prompt_tokens"] == want.prompt_tokens and got["new_tokens"] == want.new_tokens
    assert got["text"] == want.text  # int8 keeps the greedy choice on this tiny model


def test_export_errors(tiny, tmp_path, exported_llama):
    out, _ = exported_llama
    assert_user_error(invoke_cli("export", str(tiny("bert")), "--format", "coreml", "--out", str(tmp_path / "x")),
                      "unknown export format 'coreml'", "onnxruntime")
    assert_user_error(invoke_cli("export", str(tiny("bert")), "--out", str(out)), "not empty", "--overwrite")
    assert not (tmp_path / "x").exists()


def test_tensorrt_without_cuda_is_a_clear_error(tiny, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU-only message does not apply")
    proc = run_cli("export", str(tiny("bert")), "--format", "tensorrt", "--out", str(tmp_path / "trt"))
    assert_user_error(proc, "TensorRT needs an NVIDIA GPU with CUDA", "--format onnxruntime")
    assert not (tmp_path / "trt").exists()
