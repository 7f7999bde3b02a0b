"""ONNX Runtime: offline transformer fusions and int8 / int4 quantization of the graph.

Steps, each checked before the next:
  1. export the fp32 graph (`onnx.py`) and check parity with PyTorch
     (max difference, padded batches, a KV-cached decode step);
  2. optimize (`--format onnxruntime`): ONNX Runtime's transformer optimizer
     fuses LayerNorm, GELU and bias adds in traced BERT and GPT-2 style
     graphs (its patterns are written against TorchScript traces;
     `torch.export` graphs, the default for decoders, are already folded by
     onnxscript's optimizer, and every graph gets the fusions ONNX Runtime
     applies when it loads it). Checked again, as strictly: fusions must not
     change the numbers. Attention is fused with the raw 2-D mask (the
     default mask index assumes right padding and failed parity on a
     left-padded batch, max difference 2.6); once quantized it becomes
     QAttention. SkipLayerNormalization is left out, here and when ONNX
     Runtime loads an encoder graph (`onnx.SLOW_FUSIONS`): its CPU kernel is
     slower than the Add and LayerNormalization it replaces. Encoders are
     traced with eager attention (the SDPA trace guards every softmax with
     IsNaN/Where, and does not match the attention pattern). Measured on
     all-MiniLM-L6-v2 int8, batch 1 x 128, 2 threads, each graph in its own
     process, in turns: 10.4 -> 7.3 ms per sequence;
  3. quantize, then check parity by relative L2 error (a quantized graph
     differs a little everywhere; the quality is what `slimkit eval` measures):
       int8         dynamic: int8 weights per output channel, activations
                    quantized per tensor at run time (MatMulInteger; the
                    VNNI fast path on x86). Per-tensor uint8 activations are
                    coarse where a few channels hold outliers, so encoders
                    are first smoothed (`smoothquant.py`: outlier range moved
                    into the weights, calibrated on the calibration split,
                    padded rows zeroed; the smoothed fp32 graph is checked
                    for parity before quantizing) and a decoder's lm_head
                    stays fp32. Measured on all-MiniLM-L6-v2: embedding
                    cosine 0.9936 -> 0.9970, top-10 overlap 0.923 -> 0.947,
                    for about 5% more CPU time than unsmoothed int8.
                    SmolLM2-135M fails the parity check (relative L2 error
                    0.41 > 0.25), the per-tensor activation problem the
                    design notes saw in PyTorch; use int4 for decoders.
       int8-static  QDQ: activation ranges fixed ahead of time from the
                    calibration split (never the evaluation split); no
                    run-time range computation, but a range that is wrong for
                    some input costs accuracy.
       int4         weight-only, block-wise: each block of `block_size`
                    weights along the input dimension gets its own fp scale
                    (symmetric); MatMulNBits kernels unpack on the fly and,
                    at accuracy level 4, multiply in int8 with VNNI. Weights
                    shrink about 7x; activations stay fp32.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from slimkit.core import data as D
from slimkit.core.arch import CAUSAL_LM, ENCODER
from slimkit.core.errors import SlimkitError, short_reason
from slimkit.core.hardware import int8_pairs_saturate
from slimkit.exporters.onnx import GRAPH, GraphSpec, check_parity, export_graph, graph_spec, onnx_modules, positions, prune_unused, save_single_file
from slimkit.exporters.smoothquant import SAMPLES as SMOOTH_SAMPLES
from slimkit.exporters.smoothquant import smooth
from slimkit.io.model import LoadedModel

FP32_TOLERANCE = 1e-3  # of max(1, |reference|): fp32 graphs must match PyTorch
QUANT_TOLERANCE = {"int8": 0.25, "int8-static": 0.5, "int4": 0.5}  # relative L2 error; quality is measured by eval
OPTIMIZER_TYPES = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert", "electra": "bert",
                   "gpt2": "gpt2"}


def build(lm: LoadedModel, out: Path, config) -> dict:
    """Write model.onnx (and nothing else but it) into `out`; return manifest fields."""
    onnx_modules()
    spec = graph_spec(lm)
    final = out / GRAPH
    work = out / ".work"
    work.mkdir()
    graph = work / "fp32.onnx"
    dynamo = config.exporter == "dynamo" or (config.exporter == "auto" and spec.kind == CAUSAL_LM)
    tol = config.tolerance or FP32_TOLERANCE
    key = (id(lm.model), dynamo, config.opset, tol)
    if _reuse is not None and key in _reuse:
        shutil.copyfile(_reuse[key][0], graph)
        parity = {"fp32": dict(_reuse[key][1])}
    else:
        export_graph(lm, graph, spec, opset=config.opset, dynamo=dynamo)
        save_single_file(graph, graph)  # weights inline: the graph is one file to copy and quantize
        parity = {"fp32": check_parity(lm, graph, spec, tol).to_dict()}
        if _reuse is not None:
            _reuse[key] = (Path(shutil.copy(graph, _reuse["dir"] / f"{len(_reuse)}.onnx")), parity["fp32"])
    fusions = {}
    if config.format == "onnxruntime" and config.optimize and not dynamo:  # the fusion patterns match traced graphs
        graph, fusions = optimize(lm, graph, work / "optimized.onnx")
        if fusions:
            parity["optimized"] = check_parity(lm, graph, spec, tol, what="optimized ONNX").to_dict()
    precision = "float32"
    smoothing = {}
    if config.quantize == "int8" and spec.kind == ENCODER:  # smoothquant.py says why only encoders
        feeds = calibration_feeds(lm, spec, SMOOTH_SAMPLES, config.calibration_seq_len)
        try:
            smoothing = smooth(graph, work / "smoothed.onnx", feeds)
        except SlimkitError:
            raise
        except Exception as exc:  # ONNX Runtime raises its own types
            raise SlimkitError(f"SmoothQuant calibration failed on {lm.name} ({short_reason(exc)}): "
                               "try --quantize int8-static") from exc
        if smoothing:
            graph = work / "smoothed.onnx"
            parity["smoothed"] = check_parity(lm, graph, spec, tol, what="smoothed ONNX").to_dict()
    if config.quantize:
        graph = quantize(lm, spec, graph, work / f"{config.quantize}.onnx", config)
        qtol = config.tolerance or QUANT_TOLERANCE[config.quantize]
        parity[config.quantize] = check_parity(lm, graph, spec, qtol, metric="rel_l2",
                                               what=f"{config.quantize} ONNX").to_dict()
        precision = config.quantize
    save_single_file(graph, final)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    export = {"format": config.format, "graph": GRAPH, "graph_spec": spec.to_dict(), "precision": precision,
              "quantize": config.quantize, "optimized": bool(fusions), "fusions": fusions, "parity": parity,
              "exporter": "dynamo" if dynamo else "torchscript", "opset": config.opset}
    if config.quantize == "int4":
        export["block_size"] = config.block_size
    if smoothing:
        export["smoothing"] = smoothing | {"samples": SMOOTH_SAMPLES}
    return {"runtime": "onnxruntime", "export": export, "weights": [GRAPH], "precision": precision}


_reuse: dict | None = None


@contextmanager
def reuse_graphs():
    """Within the block, each model's checked fp32 graph is exported once and reused.

    For benchmarks that export one model several ways; the model must not
    change inside the block (graphs are keyed by the model object).
    """
    global _reuse
    tmp = Path(tempfile.mkdtemp(prefix="slimkit-graphs-"))
    _reuse = {"dir": tmp}
    try:
        yield
    finally:
        _reuse = None
        shutil.rmtree(tmp, ignore_errors=True)


def seed_graph(lm: LoadedModel, exported: Path) -> None:
    """Inside `reuse_graphs()`, take an fp32 export of `lm` (already parity-checked) as its graph."""
    import json

    manifest = json.loads((exported / "slimkit.json").read_text())
    info = manifest["export"]
    if _reuse is None or info.get("precision") != "float32" or info.get("optimized"):
        raise SlimkitError(f"{exported} is not an unoptimized fp32 export inside reuse_graphs(): export it again")
    key = (id(lm.model), info["exporter"] == "dynamo", info["opset"], info["parity"]["fp32"]["tolerance"])
    _reuse[key] = (exported / info["graph"], info["parity"]["fp32"])


# --------------------------------------------------------------------------- fusions


def optimize(lm: LoadedModel, src: Path, dst: Path) -> tuple[Path, dict]:
    """Transformer fusions for graph types the optimizer knows; (graph, fused op counts)."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = OPTIMIZER_TYPES.get(lm.model.config.model_type)
    if model_type is None:
        return src, {}
    from onnxruntime.transformers.fusion_options import FusionOptions

    cfg = lm.model.config
    options = FusionOptions(model_type)
    # ORT's CPU SkipLayerNormalization is slower than the Add + LayerNormalization it replaces (onnx.SLOW_FUSIONS)
    options.enable_skip_layer_norm = False
    options.use_raw_attention_mask(True)  # exact for any padding; the default mask index assumes right padding
    try:
        opt = optimize_model(str(src), model_type=model_type, num_heads=int(getattr(cfg, "num_attention_heads", 0) or 0),
                             hidden_size=int(getattr(cfg, "hidden_size", 0) or 0), opt_level=0,
                             optimization_options=options)
    except Exception as exc:
        raise SlimkitError(f"ONNX Runtime's optimizer failed on {lm.name} ({short_reason(exc)}): export with --no-optimize") from exc
    fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(dst))
    return dst, fused


# --------------------------------------------------------------------------- quantization


def lm_head_nodes(path: Path, spec: GraphSpec) -> list[str]:
    """Names of the MatMul/Gemm nodes that produce a decoder's logits."""
    import onnx

    if spec.kind != CAUSAL_LM:
        return []
    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    name, seen = spec.outputs[0], 0
    while name in producer and seen < 8:  # walk back through reshapes/casts to the projection
        node = producer[name]
        if node.op_type in ("MatMul", "Gemm"):
            return [node.name]
        name, seen = node.input[0], seen + 1
    return []


def quantize(lm: LoadedModel, spec: GraphSpec, src: Path, dst: Path, config, *, method: str | None = None,
             symmetric: bool = False) -> Path:
    """Quantize the graph at `src` by `method` (default: `config.quantize`) into `dst`.

    `symmetric` (int8-static): signed int8 activations with zero point 0, the
    only Q/DQ form TensorRT reads; ONNX Runtime's default is uint8 with a zero point.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    method = method or config.quantize
    keep_fp = lm_head_nodes(src, spec)
    # the quantizers log every node at INFO and warn about every untyped tensor
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    # fused contrib ops defeat ONNX shape inference; their outputs are fp32 here
    extra = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    # without VNNI, x86 int8 kernels saturate int16 pair sums of full-range weights: 7-bit weights there
    # (measured on an AVX2-only CPU: MiniLM cosine 0.9941 with 8-bit weights)
    reduce_range = int8_pairs_saturate() and not symmetric  # symmetric Q/DQ is TensorRT's, read on a GPU
    try:
        if method == "int8":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                             op_types_to_quantize=["MatMul", "Attention"], nodes_to_exclude=keep_fp,
                             extra_options=extra)
        elif method == "int8-static":
            reader = CalibrationReader(lm, spec, config.calibration_samples, config.calibration_seq_len)
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_fp,
                            extra_options=extra | ({"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}))
        else:
            int4(src, dst, config.block_size, [])  # lm_head too: at fp32 it would outweigh the rest
    except SlimkitError:
        raise
    except Exception as exc:  # the quantizers raise many types
        raise SlimkitError(f"ONNX Runtime could not quantize {lm.name} to {method} ({short_reason(exc)}): "
                           "try another --quantize method") from exc
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return dst


def fold_transposed_weights(model) -> int:
    """Replace MatMul(x, Transpose(W)) with MatMul(x, W^T) for initializers W; return how many.

    Tied embeddings export as a Transpose of the embedding matrix feeding the
    lm_head; quantizers only touch MatMuls whose weight is a constant.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    folded = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        t = producer.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{t.input[0]}_transposed"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(w.T), name)
            model.graph.initializer.append(inits[name])
        node.input[1] = name
        folded += 1
    return folded


def int4(src: Path, dst: Path, block_size: int, exclude: list[str]) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    fold_transposed_weights(model)
    quant = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                 accuracy_level=4, nodes_to_exclude=exclude,
                                 op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    with np.errstate(invalid="ignore", divide="ignore"):  # all-zero blocks (padding rows) have scale 0
        quant.process()
    prune_unused(quant.model.model.graph)
    quant.model.save_model_to_file(str(dst), use_external_data_format=False)


class CalibrationReader:
    """Feeds for static quantization from the calibration split (never evaluation)."""

    def __init__(self, lm: LoadedModel, spec: GraphSpec, samples: int, seq_len: int):
        self.feeds = list(calibration_feeds(lm, spec, samples, seq_len))
        if not self.feeds:
            raise SlimkitError("the calibration split gave no text to calibrate on: pass more calibration samples")
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


def calibration_feeds(lm: LoadedModel, spec: GraphSpec, samples: int, seq_len: int):
    import torch

    if spec.kind == CAUSAL_LM:
        for ids in D.calibration_batches(lm.tokenizer, seq_len=seq_len, calibration_samples=samples, batch_size=1):
            mask = torch.ones_like(ids)
            feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions(mask, ids.shape[1]).numpy()}
            for name in spec.past_names:
                feeds[name] = np.zeros((1, spec.kv_heads, 0, spec.head_dim), dtype=np.float32)
            yield feeds
        return
    texts = D.passages(D.TextSource.parse(None, "calibration").texts(), limit=samples)
    for batch in D.batched(texts, 4):  # padded batches: calibrate on real masks too
        enc = lm.tokenizer(batch, padding=True, truncation=True, max_length=seq_len, return_tensors="np")
        yield {k: enc[k].astype(np.int64) for k in spec.inputs if k in enc} | (
            {"token_type_ids": np.zeros_like(enc["input_ids"], dtype=np.int64)}
            if "token_type_ids" in spec.inputs and "token_type_ids" not in enc else {})
