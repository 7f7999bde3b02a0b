"""ONNX export: parity on padded batches, the runtime wrapper, manifests and errors.

Every test runs real ONNX Runtime sessions on real files from tiny random
models of four architectures (Llama, GPT-2, BERT encoder, BERT classifier).
"""

import json

import numpy as np
import pytest
import torch

import slimkit
from slimkit.core.errors import SlimkitError

pytest.importorskip("onnxruntime", reason="ONNX export tests need the extra: pip install 'slimkit[onnx]'")

from slimkit.exporters import ExportConfig, export  # noqa: E402
from slimkit.exporters.onnx import check_parity, graph_spec  # noqa: E402
from slimkit.exporters.runtime import OrtCache, OrtModel  # noqa: E402

ARCHS = ["llama", "gpt2", "bert", "bert-cls"]


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """arch -> (torch model, exported fp32 directory), built once per module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"onnx-{arch}") / "out"
            cache[arch] = (slimkit.load(tiny(arch)), export(tiny(arch), out, ExportConfig("onnx")))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_export_passes_parity_and_writes_a_manifest(exported, arch):
    _, out = exported(arch)
    manifest = json.loads((out / "slimkit.json").read_text())
    assert manifest["runtime"] == "onnxruntime" and manifest["format"] == "slimkit-artifact"
    assert set(manifest["files"]) >= {"model.onnx", "config.json", "tokenizer.json"}
    parity = manifest["export"]["parity"]["fp32"]
    assert parity["max_abs_diff"] < 1e-4 and parity["cases"] >= 3
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directories


def test_the_printed_onnxruntime_lines_give_the_models_output(exported):
    from slimkit.io.serving import how_to_serve

    lm, out = exported("bert")
    way, last = how_to_serve(out)
    assert (way.runtime, last.runtime) == ("ONNX Runtime", "slimkit")
    scope = {}
    exec("\n".join(way.lines), scope)  # InferenceSession(dir/model.onnx) fed by the directory's tokenizer
    with torch.no_grad():
        want = lm.model(**lm.tokenizer(["Hello"], return_tensors="pt")).last_hidden_state
    assert np.allclose(scope["output"], want.numpy(), atol=1e-4)
    _, out = exported("llama")
    assert how_to_serve(out)[0].lines[-1].startswith("# inputs: input_ids, attention_mask, position_ids, past_key_values.0.key")


def _padded(lm, texts):
    return lm.tokenizer(texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("arch", ["bert", "bert-cls"])
def test_padded_batch_matches_torch_through_the_wrapper(exported, arch):
    lm, out = exported(arch)
    served = slimkit.load(str(out))
    assert isinstance(served.model, OrtModel) and served.kind == lm.kind
    enc = _padded(lm, ["a short one", "a much longer sentence about the attention mask and padding tokens here"])
    assert (enc["attention_mask"] == 0).any()  # a real mask, not all ones
    with torch.no_grad():
        ref = lm.model(**enc)
    got = served.model(**enc)
    if arch == "bert":
        keep = enc["attention_mask"].bool()
        assert torch.allclose(got.last_hidden_state[keep], ref.last_hidden_state[keep], atol=1e-4)
    else:
        assert torch.allclose(got.logits, ref.logits, atol=1e-4)


def test_graph_uses_the_mask(exported):
    """Padding changes the short row's outputs unless the graph ignores the mask."""
    lm, out = exported("bert")
    model = slimkit.load(str(out)).model
    ids = torch.randint(5, 500, (1, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, :8]
    masked = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, :8]
    alone = model(input_ids=ids[:, :8]).last_hidden_state[0]
    assert torch.allclose(masked, alone, atol=1e-4) and not torch.allclose(full, alone, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_decode_matches_torch(exported, arch):
    lm, out = exported(arch)
    served = slimkit.load(str(out))
    prompt = torch.randint(5, 500, (2, 7))
    nxt = torch.randint(5, 500, (2, 1))
    with torch.no_grad():
        ref = lm.model(input_ids=prompt, use_cache=True)
        ref2 = lm.model(input_ids=nxt, past_key_values=ref.past_key_values, use_cache=True)
    got = served.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    assert isinstance(got.past_key_values, OrtCache) and got.past_key_values.get_seq_length() == 7
    got2 = served.model(input_ids=nxt, past_key_values=got.past_key_values, use_cache=True)
    assert got.logits.shape == (2, 1, 512)
    assert torch.allclose(got.logits, ref.logits[:, -1:], atol=1e-4)
    assert torch.allclose(got2.logits, ref2.logits, atol=1e-4)
    assert got2.past_key_values.get_seq_length() == 8


def test_left_padded_generation_batch_matches_torch(exported):
    lm, out = exported("llama")
    served = slimkit.load(str(out))
    ids = torch.randint(5, 500, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generation pads
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = served.model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(got[keep], ref[keep], atol=1e-4)


def test_parity_check_fails_with_the_measured_difference(exported, tiny):
    """A graph checked against a different model must fail, naming the difference."""
    _, out = exported("llama")
    other = slimkit.load(tiny("llama", seed=1))
    with pytest.raises(SlimkitError, match=r"parity check failed: max difference \d"):
        check_parity(other, out / "model.onnx", graph_spec(other), 1e-3)


def test_evaluate_and_benchmark_run_through_onnxruntime(exported):
    lm, out = exported("llama")
    served = slimkit.load(str(out))
    cfg = slimkit.EvalConfig(window=64, stride=32, max_tokens=300)
    got, ref = slimkit.evaluate(served, lm, config=cfg), slimkit.evaluate(lm, config=cfg)
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-4)
    assert got.kl_divergence < 1e-6 and got.top1_agreement == 1.0
    bench = slimkit.benchmark(served, slimkit.BenchConfig(seq_len=16, batch_sizes=(1, 2), new_tokens=4, min_iters=2,
                                                          min_seconds=0, decode_repeats=1, threads=1))
    assert bench.decode_tokens_per_s > 0 and bench.parameters == lm.num_parameters()
    files = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    assert bench.size_on_disk_mb == pytest.approx(files)
    assert bench.weights_on_disk_mb == pytest.approx((out / "model.onnx").stat().st_size / 2**20)


def test_encoder_evaluate_through_onnxruntime(exported):
    lm, out = exported("bert")
    result = slimkit.evaluate(str(out), lm, config=slimkit.EvalConfig(max_passages=8))
    assert result.cosine_to_reference > 0.99999


def test_export_leaves_the_callers_model_alone(tiny, tmp_path):
    lm = slimkit.load(tiny("gpt2"))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    export(lm, tmp_path / "o", ExportConfig("onnx"))
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert not lm.model.training


def test_dynamo_exporter_for_an_encoder(tiny, tmp_path):
    out = export(tiny("bert"), tmp_path / "o", ExportConfig("onnx", exporter="dynamo"))
    manifest = json.loads((out / "slimkit.json").read_text())
    assert manifest["export"]["exporter"] == "dynamo"
    assert manifest["export"]["parity"]["fp32"]["max_abs_diff"] < 1e-4


# --------------------------------------------------------------------------- errors and files


def test_non_empty_out_is_refused_and_kept(tiny, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    with pytest.raises(SlimkitError, match="not empty: choose another --out or pass --overwrite"):
        export(tiny("bert"), tmp_path / "o")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep.txt"]


def test_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    import slimkit.exporters.onnxruntime as backend

    def broken(*a, **k):
        raise SlimkitError("ONNX parity check failed: max difference 9")

    monkeypatch.setattr(backend, "check_parity", broken)
    with pytest.raises(SlimkitError, match="parity"):
        export(tiny("bert"), tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_tampered_graph_is_refused(exported, tmp_path):
    import shutil

    _, out = exported("bert")
    copy = shutil.copytree(out, tmp_path / "copy")
    with open(copy / "model.onnx", "r+b") as fh:
        fh.seek(-16, 2)
        fh.write(b"\x00" * 16)
    with pytest.raises(SlimkitError, match="does not match its hash"):
        slimkit.load(str(copy))


def test_exported_model_refuses_a_dtype(exported):
    _, out = exported("bert")
    with pytest.raises(SlimkitError, match="drop --dtype"):
        slimkit.load(str(out), dtype=torch.bfloat16)


def test_reexport_is_refused(exported, tmp_path):
    _, out = exported("bert")
    with pytest.raises(SlimkitError, match="already exported"):
        export(str(out), tmp_path / "again")


@pytest.mark.parametrize(("fmt", "quant", "message"), [
    ("coreml", None, "unknown export format 'coreml'"),
    ("onnx", "int8", "not available for --format onnx"),
    ("onnxruntime", "int3", "use int8, int8-static, int4"),
])
def test_bad_config(fmt, quant, message):
    with pytest.raises(SlimkitError, match=message):
        ExportConfig(fmt, quantize=quant)


def test_foreign_cache_is_refused(exported):
    _, out = exported("llama")
    model = slimkit.load(str(out)).model
    with pytest.raises(SlimkitError, match="its own past_key_values"):
        model(input_ids=torch.tensor([[5]]), past_key_values=((torch.zeros(1),),), use_cache=True)


def test_empty_past_feeds_match_dtype(exported):
    _, out = exported("llama")
    model = slimkit.load(str(out)).model
    out1 = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert all(a.dtype == np.float32 and a.shape[2] == 3 for a in out1.past_key_values.arrays)
