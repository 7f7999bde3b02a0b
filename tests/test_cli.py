"""The `slimkit` command: JSON interface and error lines.

Most checks run the CLI in this process (conftest.invoke_cli); a real subprocess
where only a fresh interpreter shows it: the entry point and --help, --debug's
traceback, environment variables read at import, a load that fails inside a library."""

import shutil

import pytest
from conftest import assert_user_error, invoke_cli, invoke_json, run_cli

EVAL_FAST = ["--max-tokens", "200", "--window", "64", "--stride", "32"]
BENCH_FAST = ["--seq-len", "16", "--batch-sizes", "1,2", "--new-tokens", "4", "--threads", "1"]


def test_models_lists_embedded():
    names = [m["name"] for m in invoke_json("models")["models"]]
    assert names == ["smollm2-135m", "minilm-l6"]


def test_eval_json_with_reference(tiny):
    out = invoke_json("eval", str(tiny("llama")), "--reference", str(tiny("llama", seed=1)), *EVAL_FAST)
    for key in ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement"):
        assert isinstance(out[key], float), key
    assert out["kl_divergence"] > 0


def test_eval_encoder_json(tiny):
    out = invoke_json("eval", str(tiny("bert")), "--reference", str(tiny("bert")))
    assert out["cosine_to_reference"] == pytest.approx(1.0, abs=1e-5)


def test_bench_json(tiny):
    out = invoke_json("bench", str(tiny("gpt2")), *BENCH_FAST)
    assert set(out["latency_ms"]) >= {"p50", "p90", "p99"}
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_memory_mb", "size_on_disk_mb"):
        assert out[key] > 0, key
    assert out["threads"] == 1


def test_table_output(tiny):
    proc = invoke_cli("bench", str(tiny("bert")), *BENCH_FAST)
    assert proc.returncode == 0, proc.stderr
    assert "latency p50" in proc.stdout and "size on disk" in proc.stdout


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "eval", str(tmp_path / "missing"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("models", "eval", "bench", "profile"):
        assert cmd in proc.stdout


# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    assert_user_error(invoke_cli("eval", str(tmp_path / "nope")), "no such file or directory", "check the path")


def test_unknown_embedded_name():
    proc = run_cli("bench", "minilm", env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(proc, "did you mean 'minilm-l6'")


def test_offline_hub_id(tmp_path):
    proc = run_cli("eval", "someone/some-model", env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)})
    assert_user_error(proc, "cannot be reached", "go online")


def test_corrupt_weights(tiny, tmp_path):
    d = shutil.copytree(tiny("llama"), tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_user_error(run_cli("bench", str(d)), "model.safetensors", "re-save or re-download")


def test_empty_dataset(tiny, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n\n   \n")
    assert_user_error(invoke_cli("eval", str(tiny("llama")), "--data", str(f)), "has no", "pass a file with non-empty text")


def test_unsupported_model_kind(tmp_path):
    import transformers as T

    model = T.T5ForConditionalGeneration(T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64))
    model.save_pretrained(tmp_path / "t5")
    assert_user_error(invoke_cli("eval", str(tmp_path / "t5")), "unsupported model", "causal LM")


def test_out_of_range_option(tiny):
    assert_user_error(invoke_cli("eval", str(tiny("llama")), "--stride", "0"), "stride")
    assert_user_error(invoke_cli("bench", str(tiny("llama")), "--batch-sizes", "1,x"), "--batch-sizes")
