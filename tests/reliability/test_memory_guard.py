"""--max-memory: the heavy commands estimate their peak memory before loading
any weights and refuse, in one line and without writing anything, when it is
over the limit; without the option they only warn when memory is short."""

from __future__ import annotations

import sys

import pytest
from conftest import assert_user_error, invoke_cli

import slimkit
from slimkit.core import memory
from slimkit.io import resources

COMMANDS = {
    "quantize": ["quantize", "{model}", "-m", "int8-wo", "--out", "{out}"],
    "qat": ["quantize", "{model}", "-m", "qat", "--out", "{out}"],
    "prune": ["prune", "{model}", "--method", "magnitude", "--sparsity", "0.5", "--out", "{out}"],
    "prune with recovery": ["prune", "{model}", "--method", "magnitude", "--sparsity", "0.5", "--recover-minutes", "1", "--out", "{out}"],
    "distill": ["distill", "{model}", "--student-layers", "1", "--steps", "1", "--out", "{out}"],
    "export": ["export", "{model}", "--format", "onnx", "--out", "{out}"],
    "optimize": ["optimize", "{model}", "--time-budget", "1m", "--out", "{out}"],
    "run": ["run", "{recipe}", "--model", "{model}", "--out", "{out}"],
    "eval": ["eval", "{model}", "--reference", "{model}"],
    "bench": ["bench", "{model}"],
    "sensitivity": ["sensitivity", "{model}"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_over_the_limit_refuses_before_loading(command, tiny, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the memory check")

    monkeypatch.setattr("slimkit.io.loader.load_dir", no_loading)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: int8-wo\n")
    out = tmp_path / "out"
    args = [a.format(model=tiny("llama"), out=out, recipe=recipe) for a in COMMANDS[command]]
    proc = invoke_cli(*args, "--max-memory", "1KiB")
    assert_user_error(proc, "needs about", "M parameters", "over --max-memory 1KiB", "raise the limit")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize(
    "value,fragment",
    [("lots", "cannot read --max-memory 'lots'"), ("0", "must be more than 0"), ("0GiB", "must be more than 0"),
     ("-1G", "cannot read"), ("4XB", "cannot read"), ("", "cannot read")],
)
def test_bad_limits_are_one_line_errors(value, fragment, tiny, tmp_path):
    out = tmp_path / "out"
    assert_user_error(invoke_cli("quantize", str(tiny("llama")), "-m", "int8-wo", "--out", str(out), "--max-memory", value),
                      fragment, "512MiB" if "read" in fragment else "4GiB")
    assert not out.exists()


@pytest.mark.parametrize("text,size", [("512MiB", 512 * 2**20), ("4GiB", 4 * 2**30), ("4G", 4 * 2**30), ("4gb", 4 * 2**30),
                                       ("1.5 GiB", 3 * 2**29), ("1KiB", 1024), ("2048", 2048), ("1T", 2**40)])
def test_sizes(text, size):
    assert resources.parse_size(text) == size


def test_under_the_limit_runs(tiny, tmp_path):
    out = tmp_path / "q"
    proc = invoke_cli("quantize", str(tiny("llama")), "-m", "int8-wo", "--out", str(out), "--max-memory", "64GiB")
    assert proc.returncode == 0, proc.stderr
    assert slimkit.load(str(out)).kind == "causal-lm"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert-cls"])
def test_parameters_are_counted_from_files_alone(arch, tiny, tmp_path):
    lm = slimkit.load(tiny(arch))
    assert resources.parameters(str(tiny(arch))) == lm.num_parameters()  # safetensors headers (tied weights once)
    artifact = slimkit.save(lm, tmp_path / "a")
    assert resources.parameters(str(artifact)) == lm.num_parameters()  # the manifest


def test_unreadable_sources_get_no_estimate(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\xff" * 12)
    for source in (tmp_path / "missing", tmp_path / "empty", tmp_path / "bad", "./nowhere"):
        assert resources.parameters(str(source)) is None  # loading reports what is wrong


def test_estimates_follow_the_documented_factors():
    est = resources.estimate("distill", "m", 10**9)
    assert est.bytes == 400 * 2**20 + 6 * 4 * 10**9
    assert est.describe() == "distill of m needs about 22.7 GiB (1000.0M parameters x 4 bytes x 6 + 400.0 MiB for Python and torch)"
    eval_est = resources.estimate("eval", "m", 10**8, extra_parameters=10**8)  # the reference is only run
    assert eval_est.bytes == 400 * 2**20 + int((2.5 + 1.5) * 4 * 10**8)
    assert "100.0M parameters x 4 bytes x 2.5 + 100.0M x 4 x 1.5 for the reference" in eval_est.describe()


def test_short_memory_only_warns(tiny, monkeypatch, capsys):
    monkeypatch.setattr(resources, "available", lambda: 2**20)
    est = resources.guard("quantize", str(tiny("llama")), None)
    err = capsys.readouterr().err
    assert est is not None and "warning:" in err and "only 1.0 MiB is available" in err and len(err.strip().splitlines()) == 1


def test_available_memory_is_known_here():
    free = resources.available()
    assert free is not None and 0 < free < 2**50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")
def test_tensors_left_in_a_mapped_weights_file_are_copied_out(tiny):
    """A loaded model points into its mapped safetensors file; after the copy nothing does,
    the mapping is gone once the loader lets go of it, and the model computes the same."""
    import gc

    import torch

    lm = slimkit.load(str(tiny("llama")))
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    weights = str(tiny("llama") / "model.safetensors")
    mapped = lambda: any(line.rstrip().endswith(weights) for line in open("/proc/self/maps"))  # noqa: E731
    assert mapped()
    assert memory.detach_from_files(lm.model) > 0
    gc.collect()
    assert not mapped() and memory.detach_from_files(lm.model) == 0
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, before)
