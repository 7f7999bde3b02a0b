"""TensorRT engines: what runs on a CPU (shapes, the Q/DQ graph, every refusal), and, on a CUDA
machine with TensorRT 10, building, parity, bench and eval (skipped elsewhere, with the reason)."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_user_error, cli_json, invoke_cli

import slimkit
from slimkit.core.errors import SlimkitError

pytest.importorskip("onnxruntime", reason="TensorRT export starts from ONNX: pip install 'slimkit[onnx]'")
onnx = pytest.importorskip("onnx", reason="TensorRT export starts from ONNX: pip install 'slimkit[onnx]'")

from slimkit.exporters import ExportConfig, export  # noqa: E402
from slimkit.exporters import tensorrt as T  # noqa: E402

USABLE, WHY_NOT = T.available()
gpu = pytest.mark.skipif(not USABLE, reason=f"needs a CUDA GPU and TensorRT 10: {WHY_NOT}")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the CPU-only messages do not apply")


# --------------------------------------------------------------------------- pure Python


def test_profile_shapes():
    assert T.profile_shapes(512) == {"min": [1, 1], "opt": [1, 128], "max": [32, 512]}
    assert T.profile_shapes(8192)["max"] == [32, 512]  # capped: TensorRT sizes activation memory for the max
    assert T.profile_shapes(64) == {"min": [1, 1], "opt": [1, 64], "max": [32, 64]}  # opt never beyond max
    assert T.profile_shapes(None)["max"] == [32, 512]
    assert T.profile_shapes(512, opt=(64, 128))["opt"] == [32, 128]
    with pytest.raises(SlimkitError, match="at least 1 x 1"):
        T.profile_shapes(512, max_batch=0)


def test_batch_slices():
    assert T.batch_slices(3, 17, [32, 512]) == [slice(0, 3)]
    rows = T.batch_slices(70, 128, [32, 128])
    assert rows == [slice(0, 32), slice(32, 64), slice(64, 70)]
    assert sum(s.stop - s.start for s in rows) == 70
    with pytest.raises(SlimkitError, match="up to 128 tokens, got 129"):
        T.batch_slices(1, 129, [32, 128])


def test_built_here():
    here = {"version": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert T.built_here(dict(here), here) == ""
    assert "TensorRT 10.1.0" in T.built_here({**here, "version": "10.1.0"}, here)
    assert "GPU NVIDIA A10" in T.built_here({**here, "gpu": "NVIDIA A10"}, here)


# --------------------------------------------------------------------------- refusals (CPU)


@pytest.mark.parametrize(("cuda", "module", "fragments"), [
    (False, None, ["--format tensorrt: TensorRT needs an NVIDIA GPU with CUDA", "on CPU use --format onnxruntime"]),
    (True, None, ["TensorRT is not installed", "pip install 'tensorrt>=10,<11'", "or use --format onnxruntime"]),
    (True, SimpleNamespace(__version__="11.0.0"), ["TensorRT 10, and this is TensorRT 11.0.0", "tensorrt>=10,<11"]),
    (True, SimpleNamespace(__version__="10.3.0"), None),
])
def test_check(monkeypatch, cuda, module, fragments):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", module)  # None: import fails
    if fragments is None:
        T.check("--format")
        return
    with pytest.raises(SlimkitError) as err:
        T.check("--format")
    assert "\n" not in str(err.value)
    for f in fragments:
        assert f in str(err.value)


@no_cuda
@pytest.mark.parametrize("quant", ["fp16", "int8"])  # no --quantize, in a fresh interpreter: test_export_cli.py
def test_cli_export_without_cuda(tiny, tmp_path, quant):
    proc = invoke_cli("export", str(tiny("bert")), "--format", "tensorrt", "--quantize", quant, "--out", str(tmp_path / "trt"))
    assert_user_error(proc, "--format tensorrt: TensorRT needs an NVIDIA GPU with CUDA", "--format onnxruntime")
    assert not (tmp_path / "trt").exists()


def test_unknown_precision_is_refused(tiny, tmp_path):
    proc = invoke_cli("export", str(tiny("bert")), "--format", "tensorrt", "--quantize", "int4", "--out", str(tmp_path / "t"))
    assert_user_error(proc, "--quantize int4 is not available for --format tensorrt", "fp16, int8")


def _fake_engine_dir(tiny, tmp_path, built: dict):
    """An ONNX export relabelled as a TensorRT one: what a directory built on a GPU looks like, minus a real engine."""
    from slimkit.io.files import file_sha256

    out = export(tiny("bert"), tmp_path / "trt", ExportConfig("onnx"))
    (out / "model.engine").write_bytes(b"not an engine")
    manifest = json.loads((out / "slimkit.json").read_text())
    manifest["runtime"] = "tensorrt"
    manifest["export"].update(format="tensorrt", engine="model.engine", precision="float16", tensorrt=built)
    manifest["weights"] = ["model.engine"]
    manifest["files"] = {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != "slimkit.json"}
    (out / "slimkit.json").write_text(json.dumps(manifest))
    return out


BUILT = {"version": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
         "profile": {"min": [1, 1], "opt": [1, 128], "max": [32, 512]}}


@no_cuda
def test_engine_directory_refuses_to_load_without_cuda(tiny, tmp_path):
    out = _fake_engine_dir(tiny, tmp_path, BUILT)
    with pytest.raises(SlimkitError, match="is a TensorRT engine and cannot run here: TensorRT needs an NVIDIA GPU"):
        slimkit.load(str(out))
    assert_user_error(invoke_cli("bench", str(out), "--json"), "is a TensorRT engine and cannot run here",
                      "--format onnxruntime")
    assert_user_error(invoke_cli("eval", str(out), "--reference", str(tiny("bert")), "--json"),
                      "is a TensorRT engine and cannot run here")


def test_engine_from_another_gpu_or_version_is_refused(tiny, tmp_path, monkeypatch):
    out = _fake_engine_dir(tiny, tmp_path, BUILT)
    monkeypatch.setattr(T, "available", lambda: (True, ""))
    monkeypatch.setattr(T, "device_info", lambda: {**BUILT, "version": "10.8.0"})
    with pytest.raises(SlimkitError) as err:
        slimkit.load(str(out))
    msg = str(err.value)
    assert "built with TensorRT 10.3.0 and this machine has 10.8.0" in msg and "export the model again" in msg
    assert "--format tensorrt" in msg and "\n" not in msg
    monkeypatch.setattr(T, "device_info", lambda: {**BUILT, "gpu": "NVIDIA L4"})
    with pytest.raises(SlimkitError, match="built with GPU NVIDIA H100 80GB HBM3 and this machine has NVIDIA L4"):
        slimkit.load(str(out))


def test_int8_graph_is_symmetric_qdq(tiny, tmp_path):
    """The graph an int8 engine is built from: Q/DQ with signed int8 and zero points 0 (TensorRT reads nothing else)."""
    from onnx import numpy_helper

    from slimkit.exporters.onnx import graph_spec

    lm = slimkit.load(tiny("bert"))
    (tmp_path / "o").mkdir()
    graph, parity, dynamo = T.prepare_graph(lm, graph_spec(lm), tmp_path / "o", ExportConfig("tensorrt", "int8"))
    assert graph == tmp_path / "o" / "model.onnx" and not dynamo
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["model.onnx"]  # the work files are gone
    assert parity["fp32"]["max_abs_diff"] < 1e-4
    assert 0 < parity["int8-qdq"]["rel_l2"] < T.QDQ_TOLERANCE
    model = onnx.load(str(graph))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert sum(n.op_type == "QuantizeLinear" for n in qdq) > 0  # activations are quantized, not only weights
    zero_points = [inits[n.input[2]] for n in qdq if len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.dtype == "int8" and not z.any() for z in zero_points)


def test_causal_lm_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "check", lambda option="--format": None)
    with pytest.raises(SlimkitError, match="causal LM: use --format ort-genai"):
        export(tiny("llama"), tmp_path / "o", ExportConfig("tensorrt", "fp16"))
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- on a GPU with TensorRT 10


@pytest.fixture(scope="module")
def fp16_bert(tiny, tmp_path_factory):
    return export(tiny("bert"), tmp_path_factory.mktemp("trt") / "bert-fp16", ExportConfig("tensorrt", "fp16"))


@gpu
def test_fp16_engine_parity_and_manifest(fp16_bert, tiny):
    manifest = json.loads((fp16_bert / "slimkit.json").read_text())
    assert manifest["runtime"] == "tensorrt" and manifest["dtypes"] == ["float16"]
    info = manifest["export"]
    assert info["precision"] == "float16" and info["engine"] == "model.engine"
    assert info["parity"]["fp32"]["max_abs_diff"] < 1e-4
    assert 0 < info["parity"]["engine"]["rel_l2"] < T.TOLERANCE["float16"]
    assert info["tensorrt"]["profile"] == T.profile_shapes(512)
    assert info["tensorrt"] | T.device_info() == info["tensorrt"]  # version and GPU recorded as they are here
    assert manifest["versions"]["tensorrt"] == info["tensorrt"]["version"]
    assert {"model.engine", "model.onnx"} <= set(manifest["files"])


@gpu
def test_served_engine_matches_pytorch(fp16_bert, tiny):
    ref = slimkit.load(tiny("bert"))
    served = slimkit.load(str(fp16_bert))
    assert isinstance(served.model, T.TrtModel)
    ids = torch.randint(4, 500, (40, 24))  # 40 rows: two runs of the profile's 32
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.no_grad():
        want = ref.model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = served.model(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
    keep = mask.bool()
    assert got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got[keep], want[keep], dim=-1).min() > 0.999
    with pytest.raises(SlimkitError, match="up to 512 tokens"):
        served.model(input_ids=torch.ones(1, 513, dtype=torch.long))


@gpu
@pytest.mark.parametrize("arch", ["bert", "bert-cls"])
def test_int8_engine(tiny, tmp_path, arch):
    ref = slimkit.load(tiny(arch))
    out = export(ref, tmp_path / "o", ExportConfig("tensorrt", "int8"))
    parity = json.loads((out / "slimkit.json").read_text())["export"]["parity"]
    assert 0 < parity["int8-qdq"]["rel_l2"] < T.QDQ_TOLERANCE
    assert 0 < parity["engine"]["rel_l2"] < T.TOLERANCE["int8"]
    q = slimkit.evaluate(slimkit.load(str(out)), ref, config=slimkit.EvalConfig(max_passages=16))
    if ref.kind == "encoder":
        assert q.cosine_to_reference > 0.95
    else:
        assert q.agreement_with_reference > 0.8


@gpu
def test_bench_and_eval_on_the_engine_directory(fp16_bert, tiny):
    bench = cli_json("bench", str(fp16_bert), "--seq-len", "64", "--batch-sizes", "1,8,64")
    assert bench["dtype"] == "float16" and bench["device"].startswith("cuda")
    assert bench["latency_ms"]["p50"] > 0 and [t["batch_size"] for t in bench["throughput"]] == [1, 8, 64]
    assert bench["weights_on_disk_mb"] == pytest.approx((fp16_bert / "model.engine").stat().st_size / 2**20)
    quality = cli_json("eval", str(fp16_bert), "--reference", str(tiny("bert")))
    assert quality["cosine_to_reference"] > 0.999
