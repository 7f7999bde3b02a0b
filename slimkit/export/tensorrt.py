"""TensorRT engines (fp16 / int8) built from the checked ONNX graph, on NVIDIA GPUs.

Method: export and check the fp32 ONNX graph as `--format onnx` does, then
build a serialized engine with TensorRT's ONNX parser, optimization profiles
for the dynamic batch and sequence axes, and the requested precision flag.
An engine is tied to the GPU model and TensorRT version that built it, so it
is rebuilt rather than shipped across machines.

This module needs CUDA and the `tensorrt` package. Where either is missing
(a CPU-only machine) `check` raises a SlimkitError that says so before doing
any work (`slimkit export --format tensorrt` and `slimkit optimize --runtime
tensorrt` both call it first); engine building and its parity check are not
implemented in this version, and `check` says that too rather than pretending.
"""

from __future__ import annotations

from pathlib import Path

from slimkit.errors import SlimkitError
from slimkit.models import LoadedModel


def available() -> tuple[bool, str]:
    """(usable, why not): TensorRT needs a CUDA GPU and the tensorrt package."""
    import torch

    if not torch.cuda.is_available():
        return False, "TensorRT needs an NVIDIA GPU with CUDA, and none is available here"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed: pip install tensorrt (on a CUDA machine)"
    return True, ""


def check(option: str = "--format") -> None:
    """Raise, before any work, why no engine can be built here: one line naming the fix.

    `option` is the flag that asked for TensorRT (`--format` of export, `--runtime` of optimize).
    """
    ok, why = available()
    if not ok:
        raise SlimkitError(f"{option} tensorrt: {why}; on CPU use {option} onnxruntime")
    raise SlimkitError(f"{option} tensorrt: engine building is not implemented in this slimkit version; "
                       f"use {option} onnxruntime, or build an engine from the exported model.onnx with trtexec")


def build(lm: LoadedModel, out: Path, config) -> dict:
    check("--format")
