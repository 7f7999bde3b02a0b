"""Every kind of artifact slimkit writes, loaded by plain transformers in a process that never
imports slimkit: either the same logits as `slimkit.load`, or an error that names slimkit.load.
Never random weights. Those saved as compressed-tensors are also decompressed by the
compressed-tensors package itself, which must give slimkit's dequantized weights exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import techniques
from slimkit.core.selection import set_module
from slimkit.quantization.embedding import Int8Embedding, TiedInt8Head
from slimkit.quantization.modules import WeightOnlyLinear

CAL = {"calibration_samples": 2, "seq_len": 32}
QAT = {"steps": 1, "seq_len": 32, "batch_size": 2, "calibration_samples": 2}
MIXED = {"low": "int4-wo", "low_options": {"group_size": 32}, "high": "int8-wo", "max_kl": 10.0, "batch_size": 2, **CAL}
# (how to make it, its options, the layout it must be saved in)
CASES = {
    "int4": ("quantize", "int4", {}, "compressed-tensors"),
    "int8": ("quantize", "int8", CAL, "slimkit"),  # AWQ scales that no layer before can absorb
    "int4-wo-sym": ("quantize", "int4-wo", {"symmetric": True, "embeddings": False}, "compressed-tensors"),
    "int4-wo-integer-zero": ("quantize", "int4-wo", {"zero_point": "integer", "embeddings": False}, "compressed-tensors"),
    "int4-wo-float-zero": ("quantize", "int4-wo", {"embeddings": False}, "compressed-tensors"),
    "int8-wo": ("quantize", "int8-wo", {"embeddings": False}, "compressed-tensors"),
    "int8-wo-group": ("quantize", "int8-wo", {"group_size": 32, "embeddings": False}, "compressed-tensors"),
    "int8-wo-embeddings": ("quantize", "int8-wo", {}, "compressed-tensors"),
    "int8-dynamic": ("quantize", "int8-dynamic", {}, "compressed-tensors"),
    "int8-dynamic-smooth": ("quantize", "int8-dynamic", {"smooth_alpha": 0.5, **CAL}, "slimkit"),
    "int8-static": ("quantize", "int8-static", CAL, "slimkit"),
    "nf4": ("quantize", "nf4", {}, "slimkit"),
    "gptq": ("quantize", "gptq", CAL, "compressed-tensors"),
    "gptq-sym": ("quantize", "gptq", {"symmetric": True, "embeddings": False, **CAL}, "compressed-tensors"),
    "awq-sym": ("quantize", "awq", {"symmetric": True, "embeddings": False, "grid": 4, **CAL}, "compressed-tensors"),
    "mixed": ("quantize", "mixed", MIXED, "compressed-tensors"),
    "qat": ("quantize", "qat", QAT, "compressed-tensors"),
    "qat-sym": ("quantize", "qat", {"symmetric": True, "embeddings": False, **QAT}, "compressed-tensors"),
    "bf16": ("quantize", "bf16", {}, "transformers"),
    "fp16": ("quantize", "fp16", {}, "transformers"),
    "magnitude": ("prune", "magnitude", {"sparsity": 0.5}, "transformers"),
    "wanda": ("prune", "wanda", {"sparsity": 0.5, **CAL}, "transformers"),
    "gradual": ("prune", "gradual", {"steps": 2, "recover_minutes": 0.0, **CAL}, "transformers"),
    "2:4": ("prune", "2:4", CAL, "transformers"),
    "structured-uniform": ("prune", "structured", {"head_groups": 1, "mlp_channels": 32, **CAL}, "transformers"),
    "structured-non-uniform": ("prune", "structured", {"mlp_channels": 32, "uniform": False, **CAL}, "slimkit"),
    "gpt2-int8-wo": ("quantize", "int8-wo", {"embeddings": False}, "slimkit"),  # Conv1D: compressed-tensors cannot hold it
    "distill": ("distill", "distill", {"student_layers": 1, "steps": 1, "seq_len": 32, "batch_size": 2, "eval_batches": 1, "max_samples": 4}, "transformers"),
}

IDS = torch.randint(5, 512, (2, 12), generator=torch.Generator().manual_seed(0))  # the tiny models' vocabulary is 512

PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
for path in sys.argv[2:]:
    try:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            torch.save(model(ids).logits.float(), path + ".plain.pt")
    except Exception as exc:
        open(path + ".plain.err", "w").write(f"{type(exc).__name__}: {exc}")
assert "slimkit" not in sys.modules
"""


def make(lm, case: str):
    stage, method, options, _ = CASES[case]
    if stage == "distill":
        return slimkit.distill(lm, **options)
    return getattr(slimkit, stage)(lm, method, **options)


def test_every_method_has_a_case():
    covered = {method for _, method, _, _ in CASES.values()}
    assert {t.name for t in techniques() if t.stage in ("quantize", "prune", "distill")} <= covered


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    """case -> (artifact dir, slimkit.load's logits, plain transformers' logits or its error text)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: steadiest on one thread of a busy machine
    models = {arch: slimkit.load(str(tiny(arch))) for arch in ("llama", "gpt2")}
    root = tmp_path_factory.mktemp("plain")
    paths = {case: slimkit.save(make(models[case.split("-")[0] if case.startswith("gpt2") else "llama"], case), root / case) for case in CASES}
    proc = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(IDS.tolist()), *map(str, paths.values())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = {}
    for case, path in paths.items():
        with torch.no_grad():
            ours = slimkit.load(str(path)).model(IDS).logits.float()
        err = path.with_name(path.name + ".plain.err")
        plain = err.read_text() if err.exists() else torch.load(path.with_name(path.name + ".plain.pt"))
        out[case] = (path, ours, plain)
    torch.set_num_threads(threads)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# slimkit's weight-only kernels take bf16 activations (2^-9 relative rounding), and compressed-tensors'
# fake quantization scales a token's activations by absmax / 127.5 where slimkit (and vLLM) use 127
TOLERANCE = {"compressed-tensors": 2e-2, "transformers": 1e-5}


@pytest.mark.parametrize("case", list(CASES))
def test_plain_transformers_loads_it_right_or_says_how(artifacts, case):
    path, ours, plain = artifacts[case]
    manifest = json.loads((path / "slimkit.json").read_text())
    assert manifest["layout"] == CASES[case][3]
    if isinstance(plain, str):
        assert "slimkit.load(path)" in plain, plain
        assert manifest["layout"] == "slimkit" and manifest["slimkit_only"].lower() in plain.lower()
        return
    assert manifest.get("slimkit_only") is None
    assert rel(plain, ours) < TOLERANCE[manifest["layout"]], case


def dequantized(module: torch.nn.Module) -> torch.Tensor:
    """slimkit's fp32 weight of a quantized module (a tied int8 head: its embedding's rows)."""
    module = getattr(module, "embedding", module)
    return module.dequantize() if hasattr(module, "dequantize") else module.weight_q.float() * module.weight_scale[:, None]


def test_compressed_tensors_decompresses_exactly(artifacts):
    """compressed-tensors' own compressors give back slimkit's dequantized weights: bit for bit, or to
    float rounding where a float offset becomes a float zero point ((q - lo) * s + m is (q - zp) * s)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    checked = 0
    for case, (path, _, _) in artifacts.items():
        if CASES[case][3] != "compressed-tensors":
            continue
        config = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
        state = load_file(path / "model.safetensors")
        model = slimkit.load(str(path)).model
        for scheme in config.config_groups.values():
            compressor = BaseCompressor.get_value_from_registry(scheme.format)
            for name in scheme.targets:
                module = dict(model.named_modules())[name]
                local = {k.removeprefix(name + "."): v for k, v in state.items() if k.rpartition(".")[0] == name}
                weight = compressor.decompress(local, scheme)["weight"]
                expected = dequantized(module)
                if getattr(module, "offset", None) is None:
                    assert torch.equal(weight, expected), (case, name)
                else:
                    step = module.scale.float().repeat_interleave(module.group_size, dim=1)  # (N, K)
                    assert ((weight - expected).abs() <= 1e-5 * step).all(), (case, name)
                checked += 1
    assert checked


@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if spec[3] == "compressed-tensors" and spec[1] != "int8-dynamic"])
def test_plain_transformers_computes_slimkits_dequantized_model(artifacts, case):
    """Weight-only: the gap to slimkit.load is its kernels' bf16 activations; against slimkit's
    dequantized weights (embeddings and heads included) in fp32 (the same model, no kernel), plain transformers agrees to float rounding."""
    path, _, plain = artifacts[case]
    model = slimkit.load(str(path)).model
    for name, module in list(model.named_modules()):
        if isinstance(module, (WeightOnlyLinear, TiedInt8Head)):
            w = dequantized(module)
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=getattr(module, "bias", None) is not None)
            layer.weight.data, layer.bias = w, getattr(module, "bias", None)
            set_module(model, name, layer)
        elif isinstance(module, Int8Embedding):
            set_module(model, name, torch.nn.Embedding.from_pretrained(dequantized(module), padding_idx=module.padding_idx))
    with torch.no_grad():
        assert rel(plain, model(IDS).logits.float()) < 1e-5


def test_slimkit_reloads_compressed_tensors_onto_its_kernels(artifacts):
    path, ours, _ = artifacts["int4-wo-sym"]
    model = slimkit.load(str(path)).model
    kernels = {m.kernel() for m in model.modules() if hasattr(m, "kernel")}
    assert kernels == {"int4pack"}
    path, _, _ = artifacts["int8-wo"]
    assert {m.kernel() for m in slimkit.load(str(path)).model.modules() if hasattr(m, "kernel")} == {"int8pack"}


def test_asking_for_a_layout_that_cannot_hold_the_model_writes_nothing(tiny, tmp_path):
    q = slimkit.quantize(str(tiny("llama")), "nf4")
    with pytest.raises(SlimkitError, match="compressed-tensors cannot hold this model exactly .*nf4.*slimkit"):
        slimkit.save(q, tmp_path / "out", layout="compressed-tensors")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SlimkitError, match="unknown artifact layout 'gguf'"):
        slimkit.save(q, tmp_path / "out", layout="gguf")


def test_slimkit_only_on_request(tiny, tmp_path):
    q = slimkit.quantize(str(tiny("llama")), "int8-wo", embeddings=False)
    path = slimkit.save(q, tmp_path / "out", layout="slimkit")
    assert json.loads((path / "slimkit.json").read_text())["layout"] == "slimkit"
    assert "slimkit.load(path)" in json.dumps(json.loads((path / "config.json").read_text())["quantization_config"])
