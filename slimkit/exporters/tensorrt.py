"""TensorRT engines (fp32 / fp16 / int8) built from the checked ONNX graph, on NVIDIA GPUs.

Steps, each checked before the next:
  1. export the fp32 ONNX graph and check its parity with PyTorch, as
     `--format onnx` does. ONNX Runtime's fusions are left out: their contrib
     ops are not ONNX, and TensorRT fuses the graph its own way.
  2. int8 only: quantize the graph explicitly, with QuantizeLinear /
     DequantizeLinear pairs (`onnxruntime.quantize`, int8-static: activation
     ranges calibrated on the calibration split, weights per output channel),
     symmetric, since TensorRT reads only signed int8 with zero point 0; and
     check it in ONNX Runtime. The scales travel in the graph, so TensorRT
     needs no calibrator of its own (implicit calibration is deprecated since
     TensorRT 10.1). Only MatMuls with constant weights are quantized; the
     attention products of two activations stay in floating point.
  3. build: TensorRT's ONNX parser, one optimization profile over the dynamic
     batch and sequence axes (`profile_shapes`: min 1 x 1, opt 1 x 128, max
     32 x the model's positions, at most 512), and the precision flags: none
     for fp32 (TensorRT still uses TF32 on Ampere and later), FP16 for fp16,
     INT8 and FP16 for int8 (what the Q/DQ nodes leave in floating point runs
     in fp16). The engine is written as `model.engine` next to the
     `model.onnx` it came from.
  4. parity again, through the engine, on the same padded batches: relative
     L2 error against PyTorch (`TOLERANCE`; an fp16 or int8 engine differs a
     little everywhere, and `slimkit eval` measures what that costs).

An engine is tied to the TensorRT version and the GPU that built it: the
manifest records both, with the precision and the profile, and loading the
engine anywhere else is refused with a message to rebuild it there.

`TrtModel` serves an engine to `slimkit bench` and `slimkit eval` the way
`OrtModel` serves an ONNX graph: called like a Hugging Face encoder or
classifier, with torch CUDA tensors as the engine's input and output buffers,
run on the current CUDA stream. A batch larger than the profile's runs in
slices; a sequence longer than the profile is refused. Causal LMs are not
built (a KV-cached decoder is `--format ort-genai`'s job). The CUDA peak
memory `slimkit bench` reports counts those torch buffers, not the activation
memory TensorRT allocates for itself.

Needs CUDA, a GPU and TensorRT 10 (TensorRT 11 removed the precision flags
used here). Where one is missing, `check` says which before any work
(`slimkit export --format tensorrt` and `slimkit optimize --runtime tensorrt`
both call it first), and an exported engine directory refuses to load.

Status: written on a machine without a GPU. The parts that run on a CPU (the
profile and slicing arithmetic, the symmetric Q/DQ graph, the refusals) are
tested there; engine building and serving are untested on a GPU in this
version: their tests skip without CUDA and TensorRT, and no GPU speed or
quality has been measured (`benchmarks/gpu_tensorrt.py` measures them where a
GPU is available).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimkit.core.arch import CAUSAL_LM, CLASSIFIER
from slimkit.core.errors import SlimkitError, short_reason
from slimkit.exporters.onnx import GRAPH, GraphSpec, check_parity, export_graph, graph_spec, onnx_modules, save_single_file
from slimkit.exporters.onnxruntime import FP32_TOLERANCE, quantize
from slimkit.exporters.runtime import serve_with
from slimkit.io.files import read_config
from slimkit.io.model import LoadedModel

ENGINE = "model.engine"
OPT_SHAPE = (1, 128)  # (batch, sequence) TensorRT tunes its kernels for
MAX_BATCH = 32  # evaluate embeds and classifies in batches of 32
MAX_SEQ = 512
PRECISIONS = {None: "float32", "fp16": "float16", "int8": "int8"}  # --quantize -> precision
FLAGS = {"float32": (), "float16": ("FP16",), "int8": ("INT8", "FP16")}  # TensorRT builder flags per precision
TOLERANCE = {"float32": 0.01, "float16": 0.02, "int8": 0.5}  # relative L2 error of the engine against PyTorch
QDQ_TOLERANCE = 0.5  # relative L2 error of the int8 Q/DQ graph in ONNX Runtime (QUANT_TOLERANCE["int8-static"])
TRT_MAJOR = 10


def available() -> tuple[bool, str]:
    """(usable, why not): TensorRT needs a CUDA GPU and the tensorrt package, version 10."""
    if not torch.cuda.is_available():
        return False, "TensorRT needs an NVIDIA GPU with CUDA, and none is available here"
    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed: pip install 'tensorrt>=10,<11' (on a CUDA machine)"
    major = int(str(trt.__version__).split(".")[0])
    if major != TRT_MAJOR:
        return False, f"slimkit builds engines with TensorRT 10, and this is TensorRT {trt.__version__}: pip install 'tensorrt>=10,<11'"
    return True, ""


def check(option: str = "--format") -> None:
    """Raise, before any work, why no engine can be built here: one line naming the fix.

    `option` is the flag that asked for TensorRT (`--format` of export, `--runtime` of optimize).
    """
    ok, why = available()
    if not ok:
        where = "on CPU use" if not torch.cuda.is_available() else "or use"
        raise SlimkitError(f"{option} tensorrt: {why}; {where} {option} onnxruntime")


# --------------------------------------------------------------------------- shapes (pure)


def profile_shapes(max_positions: int | None, opt: tuple[int, int] = OPT_SHAPE, max_batch: int = MAX_BATCH,
                   max_seq: int = MAX_SEQ) -> dict[str, list[int]]:
    """The one optimization profile's (batch, sequence) shapes: {"min", "opt", "max"}.

    Every input of an encoder or classifier graph is (batch, sequence), so one
    set of shapes covers them all. The longest sequence is the model's
    positions, capped at `max_seq` (TensorRT sizes activation memory for it).
    """
    longest = min(max_seq, max_positions) if max_positions and max_positions > 0 else max_seq
    if max_batch < 1 or longest < 1:
        raise SlimkitError(f"an engine profile needs at least 1 x 1 tokens, got {max_batch} x {longest}")
    return {"min": [1, 1], "opt": [min(opt[0], max_batch), min(opt[1], longest)], "max": [max_batch, longest]}


def batch_slices(batch: int, seq: int, max_shape: list[int]) -> list[slice]:
    """Rows of a (batch, seq) input in runs the profile allows; a sequence past it is refused."""
    max_batch, max_seq = max_shape
    if seq > max_seq:
        raise SlimkitError(f"the TensorRT engine takes sequences of up to {max_seq} tokens, got {seq}: "
                           f"pass at most {max_seq} tokens (slimkit bench --seq-len {max_seq})")
    if batch < 1 or seq < 1:
        raise SlimkitError(f"the TensorRT engine needs at least one token per row, got a {batch} x {seq} batch")
    return [slice(i, min(i + max_batch, batch)) for i in range(0, batch, max_batch)]


def built_here(recorded: dict, current: dict) -> str:
    """Why an engine recorded as built with `recorded` cannot run under `current` ('' if it can)."""
    for key, what in (("version", "TensorRT"), ("gpu", "GPU")):
        if recorded.get(key) != current.get(key):
            return f"it was built with {what} {recorded.get(key)} and this machine has {current.get(key)}"
    return ""


# --------------------------------------------------------------------------- build


def build(lm: LoadedModel, out: Path, config) -> dict:
    """Write model.onnx and model.engine into `out`; return manifest fields."""
    check("--format")
    if lm.kind == CAUSAL_LM:
        raise SlimkitError(f"--format tensorrt builds encoders and classifiers, and {lm.name} is a causal LM: "
                           "use --format ort-genai (KV-cached decoding)")
    spec = graph_spec(lm)
    precision = PRECISIONS[config.quantize]
    graph, parity, dynamo = prepare_graph(lm, spec, out, config)
    shapes = profile_shapes(getattr(lm.model.config, "max_position_embeddings", None))
    start = time.perf_counter()
    (out / ENGINE).write_bytes(build_engine(graph, spec, shapes, precision))
    seconds = time.perf_counter() - start
    tol = config.tolerance or TOLERANCE[precision]
    parity["engine"] = check_parity(lm, graph, spec, tol, metric="rel_l2", what=f"TensorRT {precision} engine",
                                    sess=EngineSession(Engine(out / ENGINE))).to_dict()
    built = {**device_info(), "profile": shapes, "build_seconds": round(seconds, 1)}
    export = {"format": "tensorrt", "graph": GRAPH, "engine": ENGINE, "graph_spec": spec.to_dict(),
              "precision": precision, "quantize": config.quantize, "parity": parity, "tensorrt": built,
              "exporter": "dynamo" if dynamo else "torchscript", "opset": config.opset}
    return {"runtime": "tensorrt", "export": export, "weights": [ENGINE], "precision": precision,
            "versions": {"tensorrt": built["version"]}}


def prepare_graph(lm: LoadedModel, spec: GraphSpec, out: Path, config) -> tuple[Path, dict, bool]:
    """The checked ONNX graph the engine is built from, as `out/model.onnx`: (path, parity, dynamo).

    fp32 and fp16 engines start from the fp32 graph; int8 engines from its
    symmetric Q/DQ quantization. Runs on a CPU (ONNX Runtime only).
    """
    onnx_modules()
    work = out / ".work"
    work.mkdir()
    graph = work / "fp32.onnx"
    dynamo = config.exporter == "dynamo"  # auto: the tracer, as for every encoder
    try:
        export_graph(lm, graph, spec, opset=config.opset, dynamo=dynamo)
        save_single_file(graph, graph)
        parity = {"fp32": check_parity(lm, graph, spec, config.tolerance or FP32_TOLERANCE).to_dict()}
        if config.quantize == "int8":
            graph = quantize(lm, spec, graph, work / "int8-qdq.onnx", config, method="int8-static", symmetric=True)
            parity["int8-qdq"] = check_parity(lm, graph, spec, config.tolerance or QDQ_TOLERANCE, metric="rel_l2",
                                              what="int8 Q/DQ ONNX").to_dict()
        save_single_file(graph, out / GRAPH)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out / GRAPH, parity, dynamo


def build_engine(graph: Path, spec: GraphSpec, shapes: dict, precision: str) -> bytes:
    """A serialized TensorRT engine for the ONNX graph at `graph`, one profile over `shapes`."""
    import tensorrt as trt

    log = _logger()
    log.errors.clear()
    builder = trt.Builder(log)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors)) or _last_error(log)
        raise SlimkitError(f"TensorRT cannot parse {graph.name} ({short_reason(errors)}): "
                           "use --format onnxruntime for this model")
    cfg = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in spec.inputs:
        profile.set_shape(name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    cfg.add_optimization_profile(profile)
    for flag in FLAGS[precision]:
        cfg.set_flag(getattr(trt.BuilderFlag, flag))
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise SlimkitError(f"TensorRT could not build a {precision} engine ({short_reason(_last_error(log))}): "
                           "try another --quantize, or --format onnxruntime")
    return bytes(serialized)


def device_info() -> dict:
    """What an engine is tied to: the TensorRT version and the GPU (name and compute capability)."""
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability()
    return {"version": trt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


# --------------------------------------------------------------------------- run


_LOGGER = None


def _logger():
    """The process's one TensorRT logger: keeps errors for our messages, prints nothing."""
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                    self.errors.append(msg)

        _LOGGER = Logger()
    return _LOGGER


def _last_error(log) -> str:
    return log.errors[-1] if log.errors else "no error was logged"


class Engine:
    """A deserialized engine and one execution context: feeds (torch tensors) in, CUDA tensors out."""

    def __init__(self, path: Path):
        import tensorrt as trt

        log = _logger()
        log.errors.clear()
        self.runtime = trt.Runtime(log)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise SlimkitError(f"TensorRT cannot load {path} ({short_reason(_last_error(log))}): "
                               "export the model again on this machine (--format tensorrt)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                  trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
        unknown = [n for n in names if self.engine.get_tensor_dtype(n) not in dtypes]
        if unknown:
            raise SlimkitError(f"{path} has inputs or outputs of a type slimkit cannot feed ({', '.join(unknown)}): "
                               "export the model again")
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.max_shape = [int(d) for d in self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2]]  # (batch, sequence)

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = torch.device("cuda", torch.cuda.current_device())
        stream = torch.cuda.current_stream(device)
        held = []  # inputs stay alive until the engine is enqueued; later reuse is ordered on the same stream
        for name in self.inputs:
            t = feeds[name].to(device=device, dtype=self.dtypes[name]).contiguous()  # (B, T)
            held.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise SlimkitError(f"the TensorRT engine does not take {name} of shape {tuple(t.shape)} "
                                   f"(its profile allows up to {self.max_shape})")
            self.context.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))  # (B, T, H) or (B, labels)
            out[name] = torch.empty(shape, dtype=self.dtypes[name], device=device)
            self.context.set_tensor_address(name, out[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SlimkitError(f"TensorRT failed to run the engine ({short_reason(_last_error(_logger()))}): "
                               "export the model again on this machine")
        return out


class EngineSession:
    """An Engine behind ONNX Runtime's session calls, for `onnx.check_parity`."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def get_inputs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(name=n, type="tensor(int64)") for n in self.engine.inputs]

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.engine({k: torch.from_numpy(v) for k, v in feeds.items()})
        torch.cuda.current_stream().synchronize()
        return [out[n].float().cpu().numpy() for n in (output_names or self.engine.outputs)]


class TrtModel(nn.Module):
    """A TensorRT engine called like a Hugging Face encoder or classifier (see `runtime.OrtModel`)."""

    def __init__(self, engine: Path, spec: GraphSpec, config, dtype: str):
        super().__init__()
        if spec.kind == CAUSAL_LM:
            raise SlimkitError("TensorRT engines serve encoders and classifiers here: export a causal LM with --format ort-genai")
        self.spec, self.config = spec, config
        self.slimkit_dtype = dtype  # what benchmark reports instead of a parameter dtype
        self.slimkit_device = torch.device("cuda", torch.cuda.current_device())  # where evaluate and benchmark put inputs
        self.engine = Engine(engine)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **unused):
        from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

        if input_ids is None:
            raise SlimkitError("an exported model needs input_ids (inputs_embeds is not supported)")
        feeds = {"input_ids": input_ids,
                 "attention_mask": attention_mask if attention_mask is not None else torch.ones_like(input_ids)}
        if "token_type_ids" in self.spec.inputs:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        parts = [self.engine({k: v[rows] for k, v in feeds.items()})[self.spec.outputs[0]]
                 for rows in batch_slices(*input_ids.shape, self.engine.max_shape)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # (B, T, H) or (B, labels)
        return SequenceClassifierOutput(logits=out) if self.spec.kind == CLASSIFIER else BaseModelOutput(last_hidden_state=out)


def load_engine(path: Path, manifest: dict) -> TrtModel:
    """The TrtModel of an exported directory, refused (one line) where it cannot run."""
    ok, why = available()
    if not ok:
        raise SlimkitError(f"{path} is a TensorRT engine and cannot run here: {why}; "
                           "export the model with --format onnxruntime to run it on CPU")
    export = manifest.get("export") or {}
    try:
        spec = GraphSpec.from_dict(export["graph_spec"])
        recorded = export["tensorrt"]
    except (KeyError, TypeError) as exc:
        raise SlimkitError(f"{path / 'slimkit.json'} has no engine description: export the model again") from exc
    mismatch = built_here(recorded, device_info())
    if mismatch:
        raise SlimkitError(f"{path} holds a TensorRT engine that cannot run here ({mismatch}): "
                           f"export the model again on this machine (slimkit export {manifest.get('source', 'MODEL')} "
                           "--format tensorrt)")
    return TrtModel(path / export.get("engine", ENGINE), spec, read_config(path), export.get("precision", "float32"))


serve_with("tensorrt", load_engine)
