"""`--device cpu|cuda|auto` / `device=`: checked before any model loads, and where the work runs.

Asking for CUDA where torch sees no GPU is one line naming `--device cpu`; the CPU is the
default and gives what it gave before; on a GPU (tests marked), a quantized model runs there on
the CUDA kernels, measures like its CPU self and saves the same files.
"""

import pytest
import torch
from conftest import assert_user_error, invoke_cli, invoke_json

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import resolve_device, training_device
from slimkit.io.model import model_device, on_device, placed
from slimkit.measure.quality import EvalConfig
from slimkit.quantization.modules import WeightOnlyLinear

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: checks that models run and quantize there")
without_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal a machine without a CUDA GPU gives")


def test_resolve_device():
    assert resolve_device(None) is None
    assert resolve_device("cpu") == resolve_device(" CPU ") == "cpu"
    assert resolve_device("auto") == ("cuda" if CUDA else "cpu")
    for bad in ("gpu", "cpu:1", "cuda:x", "mps"):
        with pytest.raises(SlimkitError, match="use --device cpu, cuda"):
            resolve_device(bad)
    assert training_device("cpu") == "cpu" and training_device("auto") is None and training_device(None) is None


@without_cuda
def test_cuda_without_a_gpu_is_one_line_naming_the_fix(tiny):
    with pytest.raises(SlimkitError, match="needs a CUDA GPU.*use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(SlimkitError, match="use --device cpu"):
        slimkit.quantize(str(tiny("llama")), "int8-wo", device="cuda")


@without_cuda
@pytest.mark.parametrize("command", [
    ["quantize", "{m}", "-m", "int8-wo", "--out", "{out}"],
    ["sensitivity", "{m}"],
    ["prune", "{m}", "-m", "magnitude", "--sparsity", "0.5", "--out", "{out}"],
    ["distill", "{m}", "--student-layers", "1", "--steps", "1", "--out", "{out}"],
    ["eval", "{m}"],
    ["bench", "{m}"],
    ["profile", "{m}"],
    ["optimize", "{m}", "--out", "{out}"],
])
def test_every_command_refuses_cuda_without_a_gpu_before_loading(command, tiny, tmp_path):
    out = tmp_path / "out"
    args = [a.format(m=tiny("llama"), out=out) for a in command]
    assert_user_error(invoke_cli(*args, "--device", "cuda"), "--device cpu")
    assert not out.exists()


def test_cpu_is_the_default_and_gives_the_same_numbers(tiny):
    path = str(tiny("llama"))
    plain = invoke_json("eval", path, "--max-tokens", "64")
    on_cpu = invoke_json("eval", path, "--max-tokens", "64", "--device", "cpu")
    auto = invoke_json("eval", path, "--max-tokens", "64", "--device", "auto")
    assert plain["perplexity"] == on_cpu["perplexity"]
    if not CUDA:
        assert auto["perplexity"] == plain["perplexity"]


def test_on_device_copies_and_leaves_the_callers_model(tiny):
    lm = slimkit.load(str(tiny("llama")))
    assert on_device(lm, None) is lm and on_device(lm, "cpu") is lm
    moved = on_device(lm, "meta")
    assert moved is not lm and moved.donated and model_device(moved.model).type == "meta"
    assert model_device(lm.model).type == "cpu" and moved.source == lm.source


@needs_cuda
def test_quantized_on_cuda_runs_the_cuda_kernels_and_saves_what_the_cpu_saves(tiny, tmp_path):
    lm = slimkit.load(str(tiny("llama")))
    on_gpu = slimkit.quantize(lm, "int4-wo", device="cuda", group_size=32)
    on_cpu = slimkit.quantize(lm, "int4-wo", device="cpu", group_size=32)
    assert model_device(lm.model).type == "cpu"  # the caller's model stayed
    assert model_device(on_gpu.model).type == "cuda"
    kinds = {m.kernel(model_device(on_gpu.model)) for m in on_gpu.model.modules() if isinstance(m, WeightOnlyLinear)}
    assert kinds == {"int4-tinygemm"}
    config = EvalConfig(max_tokens=256)
    gpu = slimkit.evaluate(on_gpu, config=config)
    cpu = slimkit.evaluate(on_cpu, config=config)
    assert abs(gpu.perplexity / cpu.perplexity - 1) < 0.01
    with placed(on_gpu, device="cpu"):
        slimkit.save(on_gpu, tmp_path / "gpu")
    slimkit.save(on_cpu, tmp_path / "cpu")
    a, b = slimkit.load(str(tmp_path / "gpu")).model.state_dict(), slimkit.load(str(tmp_path / "cpu")).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) or (a[k].is_floating_point() and torch.allclose(a[k], b[k], rtol=1e-3)) for k in a)


@needs_cuda
def test_measuring_on_cuda_puts_the_model_back(tiny):
    lm = slimkit.load(str(tiny("llama")))
    r = slimkit.evaluate(lm, config=EvalConfig(max_tokens=64), device="cuda")
    assert r.perplexity > 1 and model_device(lm.model).type == "cpu"
    b = slimkit.benchmark(lm, slimkit.BenchConfig(seq_len=16, batch_sizes=(1,), new_tokens=4, warmup=0, min_iters=1, min_seconds=0.0,
                                                   decode_repeats=1), device="cuda")
    assert b.device.startswith("cuda") and b.cuda_peak_memory_mb and model_device(lm.model).type == "cpu"
