"""`slimkit quantize`: the artifact it writes, --list, and one-line errors.

The CLI runs in this process (conftest.invoke_cli); one error runs in a real
subprocess, to show that nothing else reaches a fresh interpreter's stderr."""

import json

from conftest import assert_user_error, invoke_cli, invoke_json, run_cli

from slimkit.core.options import parse_options


def test_list_shows_every_method():
    methods = {m["name"]: m["summary"] for m in invoke_json("quantize", "--list")["methods"]}
    assert {"bf16", "fp16", "int8-dynamic", "int8-static", "int8-wo", "int4-wo", "nf4", "int8", "int4"} <= set(methods)
    assert all(methods.values())
    proc = invoke_cli("quantize", "--list")
    assert proc.returncode == 0 and "int4-wo" in proc.stdout


def test_quantize_then_eval_and_bench_the_artifact(tiny, tmp_path):
    out = tmp_path / "q"
    info = invoke_json("quantize", str(tiny("llama")), "--method", "int4", "--out", str(out), "-o", "group_size=32", "-o", "symmetric=true")
    assert info["options"] == {"group_size": 32, "symmetric": True} and info["quantized_modules"] > 0
    assert info["layout"] == "compressed-tensors" and "slimkit_only" not in info  # int8 rows and packed int4: plain loaders read it
    manifest = json.loads((out / "slimkit.json").read_text())
    assert manifest["recipe"][-1]["method"] == "int4-wo"
    ev = invoke_json("eval", str(out), "--reference", str(tiny("llama")), "--max-tokens", "200", "--window", "64", "--stride", "32")
    assert 0 < ev["kl_divergence"] < 0.5
    bench = invoke_json("bench", str(out), "--seq-len", "16", "--batch-sizes", "1", "--new-tokens", "4", "--threads", "1")
    assert bench["decode_tokens_per_s"] > 0 and bench["size_on_disk_mb"] > 0


def test_errors_are_one_line(tiny, tmp_path):
    model = str(tiny("llama"))
    out = str(tmp_path / "q")
    assert_user_error(invoke_cli("quantize", model, "--method", "int9", "--out", out), "unknown quantize method 'int9'", "did you mean")
    assert_user_error(invoke_cli("quantize", model, "--method", "int4-wo", "--out", out, "-o", "group_size=48"), "group_size=48 is not supported", "32, 64, 128, 256")
    assert_user_error(invoke_cli("quantize", model, "--method", "int4-wo", "--out", out, "-o", "bits=3"), "unknown option 'bits'", "group_size")
    assert_user_error(invoke_cli("quantize", model, "--method", "int8-wo", "--out", out, "-o", "targets=nothing*"), "no linear layers", "nothing*")
    assert_user_error(invoke_cli("quantize", model, "--out", out), "needs --method")
    # the latest of these errors (the model loaded and quantized first), in a fresh interpreter
    assert_user_error(run_cli("quantize", model, "--method", "nf4", "--out", out, "--layout", "compressed-tensors"),
                      "compressed-tensors cannot hold this model exactly (nf4 modules", "int8-dynamic without smooth_alpha")
    assert_user_error(invoke_cli("quantize", model, "--method", "nf4", "--out", out, "--layout", "gguf"), "unknown artifact layout 'gguf'")
    assert not (tmp_path / "q").exists()


def test_parse_options_types():
    assert parse_options("int8-wo", ["group_size=none", "symmetric=false", "ignore=lm_head,q_proj"]) == {
        "group_size": None, "symmetric": False, "ignore": ("lm_head", "q_proj")}
    assert parse_options("nf4", ["double-quant=yes"]) == {"double_quant": True}
    assert parse_options("int8-dynamic", ["smooth_alpha=0.5", "calibration_samples=8"]) == {"smooth_alpha": 0.5, "calibration_samples": 8}
    assert parse_options("int8-dynamic", ["smooth_alpha=none"]) == {"smooth_alpha": None}


def test_int8_static_with_an_observer(tiny, tmp_path):
    out = tmp_path / "q"
    info = invoke_json("quantize", str(tiny("llama")), "--method", "int8-static", "--out", str(out),
                    "-o", "observer=entropy", "-o", "calibration_samples=2", "-o", "seq_len=64")
    assert info["options"] == {"observer": "entropy", "calibration_samples": 2, "seq_len": 64} and info["quantized_modules"] > 0
    manifest = json.loads((out / "slimkit.json").read_text())
    assert manifest["recipe"][-1]["method"] == "int8-static" and manifest["recipe"][-1]["observer"] == "entropy"
    assert {spec["format"] for spec in manifest["modules"].values()} == {"int8-static"}
    assert parse_options("int8-static", ["percentile=99.9", "weight_granularity=per_tensor", "symmetric_activations=false"]) == {
        "percentile": 99.9, "weight_granularity": "per_tensor", "symmetric_activations": False}
    assert_user_error(invoke_cli("quantize", str(tiny("llama")), "--method", "int8-static", "--out", str(out), "-o", "observer=kl"),
                      "observer='kl' is unknown", "minmax, percentile, entropy, mse")
