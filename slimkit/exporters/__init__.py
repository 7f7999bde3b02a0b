"""Export to deployment runtimes: one module per runtime, one directory per export.

    slimkit.export("minilm-l6", "out/minilm-int8", ExportConfig("onnxruntime", quantize="int8"))
    lm = slimkit.load("out/minilm-int8")   # served by ONNX Runtime, measured by evaluate/benchmark

Formats
  onnx         the fp32 ONNX graph, checked for parity, served by ONNX Runtime
  onnxruntime  the same graph with ONNX Runtime's offline fusions, optionally
               quantized: int8 (dynamic), int8-static (QDQ, calibrated), int4
               (MatMulNBits, block-wise weight-only); see `onnxruntime.py`
  ort-genai    a decoder LLM as an onnxruntime-genai model directory: fp32, the
               builder's int4, or a slimkit-quantized model's own codes carried
               exactly into MatMulNBits (see `genai_weights.py`)
  gguf         one GGUF file for llama.cpp and Ollama (f32, f16, q8_0, q4_0,
               q4_1), a slimkit-quantized model's codes carried exactly where
               its grid is the type's (see `gguf.py`)
  tensorrt     a TensorRT engine for encoders and classifiers: fp32, fp16, or
               int8 from a calibrated Q/DQ graph; needs CUDA and TensorRT 10
               (see `tensorrt.py`; untested on a GPU in this version)

Every format but gguf writes a directory; an exported directory is a slimkit artifact whose manifest (`slimkit.json`,
same conventions as `slimkit.io.artifacts`: written last, SHA-256 of every file,
temporary directory renamed into place) carries `"runtime"`; `slimkit.load`
dispatches on it, so the directory is evaluated and benchmarked through the
runtime that serves it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from slimkit.core.errors import SlimkitError
from slimkit.exporters import gguf, onnxruntime, ort_genai, runtime, tensorrt  # noqa: F401  (runtime: serves exported directories)
from slimkit.io.artifacts import FORMAT, FORMAT_VERSION, staging, versions
from slimkit.io.files import file_sha256
from slimkit.io.loader import load
from slimkit.io.model import MANIFEST, LoadedModel
from slimkit.io.sentence import write_layout

FORMATS = {
    "onnx": "fp32 ONNX graph with a parity check, served by ONNX Runtime",
    "onnxruntime": "ONNX Runtime: transformer fusions, int8 / int8-static / int4 quantization",
    "ort-genai": "decoder LLMs through onnxruntime-genai (KV cache, fp32 or int4)",
    "tensorrt": "TensorRT engine (fp16 / int8), needs CUDA",
    "gguf": "one GGUF file for llama.cpp / Ollama (f16, q8_0, q4_0, q4_1)",
}
BUILDERS = {"onnx": onnxruntime.build, "onnxruntime": onnxruntime.build, "ort-genai": ort_genai.build, "tensorrt": tensorrt.build}
QUANTIZE = {
    "onnx": (None,),
    "onnxruntime": (None, "int8", "int8-static", "int4"),
    "ort-genai": (None, "int4"),
    "tensorrt": (None, "fp16", "int8"),
    "gguf": gguf.TYPES,
}

EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass(frozen=True)
class ExportConfig:
    format: str = "onnx"
    quantize: str | None = None
    opset: int = 18
    exporter: str = "auto"  # dynamo (torch.export) | torchscript | auto: dynamo for causal LMs
    tolerance: float | None = None  # parity tolerance (None: the format's default)
    optimize: bool = True  # onnxruntime: offline transformer fusions
    block_size: int = 32  # int4: weights per quantization block
    accuracy_level: int = 4  # ort-genai MatMulNBits: 4 = int8 activations (fast on CPU), 0 = fp32 activations (exact)
    calibration_samples: int = 16  # int8-static: calibration sequences
    calibration_seq_len: int = 128
    method: str | None = None  # gguf: quantize with this slimkit method (awq, gptq) on the type's grid first, then carry its codes

    def __post_init__(self):
        if self.format not in FORMATS:
            raise SlimkitError(f"unknown export format '{self.format}': use one of {', '.join(FORMATS)}")
        if self.format == "gguf" and self.quantize is None:
            object.__setattr__(self, "quantize", "f16")  # a GGUF file always has a type; f16 is llama.cpp's usual float one
        allowed = QUANTIZE[self.format]
        if self.quantize not in allowed:
            names = ", ".join(q for q in allowed if q) or "none"
            raise SlimkitError(f"--quantize {self.quantize} is not available for --format {self.format}: use {names}"
                               + (" or --format onnxruntime" if self.format == "onnx" else ""))
        if self.method is not None and (self.format != "gguf" or self.method not in gguf.METHODS):
            raise SlimkitError(f"--method {self.method} is not available for --format {self.format}: "
                               f"use --format gguf with --method {' or '.join(gguf.METHODS)}")
        if self.method is not None:
            gguf.method_options(self.method, self.quantize)
        if self.exporter not in EXPORTERS:
            raise SlimkitError(f"unknown exporter '{self.exporter}': use one of {', '.join(EXPORTERS)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise SlimkitError(f"block size {self.block_size} is not supported: use 16, 32, 64, 128 or 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise SlimkitError(f"accuracy level {self.accuracy_level} is not supported: use 4 (int8 activations, "
                               "fastest on CPU) or 0 (fp32 activations, exact)")
        if self.tolerance is not None and not self.tolerance > 0:
            raise SlimkitError(f"tolerance must be positive, got {self.tolerance}")
        if self.calibration_samples < 1 or self.calibration_seq_len < 2:
            raise SlimkitError("calibration needs at least 1 sample of at least 2 tokens")


def export(model: LoadedModel | str, out: str | os.PathLike, config: ExportConfig = ExportConfig(), *,
           overwrite: bool = False, tokenizer=None) -> Path:
    """Export `model` to `out` for `config.format`, check it, and return the directory (gguf: the
    file). `model` may be a transformers model object with its `tokenizer=`."""
    lm = load(model, tokenizer=tokenizer)
    if lm.manifest.get("runtime", "torch") != "torch":
        raise SlimkitError(f"{lm.name} is already exported for {lm.manifest['runtime']}: export the PyTorch model instead")
    if config.format == "gguf":
        return gguf.export_gguf(lm, out, config, overwrite=overwrite)
    with staging(out, overwrite, "the export") as tmp:
        info = BUILDERS[config.format](lm, tmp, config)
        lm.tokenizer.save_pretrained(tmp)
        lm.model.config.save_pretrained(tmp)
        write_layout(lm.sentence, tmp)  # SentenceTransformer(out, backend="onnx") reads model.onnx with these
        write_manifest(tmp, lm, config, info)
    return Path(out).expanduser()


def summary(path: Path) -> dict:
    """What an export directory (or GGUF file) holds, for the CLI: runtime, precision, parity, size."""
    if path.is_file():
        return gguf.summary(path)
    manifest = json.loads((path / MANIFEST).read_text())
    export_info = manifest.get("export", {})
    parity = {k: v.get("max_abs_diff") if v.get("metric") == "max_abs" else v.get("rel_l2")
              for k, v in export_info.get("parity", {}).items()}
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
    return {"out": str(path), "runtime": manifest["runtime"], "kind": manifest["kind"],
            "precision": export_info.get("precision"), "fusions": export_info.get("fusions", {}),
            "parity": parity, "size_on_disk_mb": round(size, 2)}


def write_manifest(tmp: Path, lm: LoadedModel, config: ExportConfig, info: dict) -> None:
    """The manifest, last: kind, runtime, what was exported, and every file's hash."""
    step = {"export": {k: v for k, v in asdict(config).items() if v is not None}}
    prior = lm.manifest.get("recipe", [])
    if isinstance(prior, dict):  # a recipe as `slimkit run` and `slimkit optimize` save it: {"steps": [...], "seed": ...}
        prior = prior.get("steps", [])
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "runtime": info["runtime"],
        "versions": runtime_versions(info.get("versions", {})),
        "kind": lm.kind,
        "source": lm.source,
        "dtypes": [info.get("precision", "float32")],
        "parameters": lm.num_parameters(),
        "recipe": list(prior) + [step],
        "metrics": {},
        "export": info.get("export", {}),
        "weights": info["weights"],
        "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def runtime_versions(extra: dict) -> dict:
    """The manifest's versions, with the ONNX packages where they are installed."""
    out = {}
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions({**out, **extra})
