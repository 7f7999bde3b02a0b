"""`slimkit prune` end to end: artifact that eval and bench accept, honest speed notes, error lines.

The CLI runs in this process (conftest.invoke_cli); one error runs in a real
subprocess, to show that nothing else reaches a fresh interpreter's stderr."""

import json

import pytest
from conftest import assert_user_error, invoke_cli, invoke_json, run_cli


def test_prune_wanda_artifact_is_accepted_by_eval_and_bench(tiny, tmp_path):
    out = invoke_json("prune", str(tiny("llama")), "--method", "wanda", "--sparsity", "0.5", "--out", str(tmp_path / "w"))
    assert out["sparsity"] == pytest.approx(0.5) and "no speed without sparse kernels" in out["speed"]
    manifest = json.loads((tmp_path / "w" / "slimkit.json").read_text())
    assert manifest["recipe"][-1]["method"] == "wanda"
    ev = invoke_json("eval", str(tmp_path / "w"), "--reference", str(tiny("llama")), "--max-tokens", "200", "--window", "64", "--stride", "32")
    assert ev["kl_divergence"] > 0
    bench = invoke_json("bench", str(tmp_path / "w"), "--seq-len", "16", "--batch-sizes", "1", "--new-tokens", "4", "--threads", "1")
    assert bench["prefill_tokens_per_s"] > 0


def test_prune_structured_table_says_what_shrank(tiny, tmp_path):
    proc = invoke_cli("prune", str(tiny("bert")), "--method", "structured", "--sparsity", "0.2", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert "removed fraction" in proc.stdout and "parameters after" in proc.stdout
    out = invoke_json("eval", str(tmp_path / "s"), "--reference", str(tiny("bert")))
    assert 0 < out["cosine_to_reference"] < 1


def test_prune_two_four_states_no_speed_on_cpu(tiny, tmp_path):
    proc = invoke_cli("prune", str(tiny("gpt2")), "--method", "2:4", "--out", str(tmp_path / "n"))
    assert proc.returncode == 0, proc.stderr
    assert "no speed without sparse kernels" in " ".join(proc.stdout.split())


@pytest.mark.parametrize(
    "args,fragments,run",
    [
        (["--method", "magnitude", "--sparsity", "1.5"], ["sparsity must be a fraction in [0, 1)"], invoke_cli),
        (["--method", "4:4"], ["N:M sparsity needs 0 < N < M"], invoke_cli),
        (["--method", "2:4", "--sparsity", "0.3"], ["sparsity is fixed by the pattern"], invoke_cli),
        (["--method", "prune-all"], ["unknown prune method 'prune-all'"], invoke_cli),
        (["--method", "structured", "--sparsity", "0.95"], ["cannot remove"], run_cli),  # the latest: in a fresh interpreter
    ],
)
def test_prune_bad_input_is_one_line(tiny, tmp_path, args, fragments, run):
    assert_user_error(run("prune", str(tiny("llama")), *args, "--out", str(tmp_path / "x")), *fragments)
