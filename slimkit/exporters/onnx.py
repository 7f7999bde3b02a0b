"""ONNX export of encoders, sequence classifiers and causal LMs, with a parity check.

The graph. A thin wrapper module gives the Hugging Face model a flat tensor
signature that ONNX can name:

  encoder      input_ids, attention_mask[, token_type_ids]   -> last_hidden_state
  classifier   input_ids, attention_mask[, token_type_ids]   -> logits
  causal LM    input_ids, attention_mask (past + new tokens), position_ids,
               past_key_values.{i}.key / .value               -> logits,
                                                                present.{i}.key / .value

Batch and sequence axes are dynamic; the past length is dynamic too, and a
first (prefill) step feeds past tensors of length 0, so one graph serves
prefill and KV-cached decode. Position ids are an input (computed from the
attention mask by the runtime) so left- or right-padded batches get the same
positions as in PyTorch.

The exporter. `torch.export` (dynamo) for causal LMs: its graphs have about
a third of the nodes of a TorchScript trace (shape arithmetic is folded), and
SmolLM2-135M decodes about 2.4x faster through ONNX Runtime from them; the
export itself is slower (minutes for 135M parameters). The TorchScript tracer
for encoders and classifiers: it exports them in about a second and its
graphs are the ones ONNX Runtime's transformer fusions were written against.
`ExportConfig.exporter` overrides the choice. Tracing records one
path through the Python code, so a trace fed an all-ones mask can silently
drop the mask (it happened with all-MiniLM-L6-v2). The example inputs here
are padded with a real mask, and the parity check below would catch a graph
that ignores it anyway.

The parity check runs the ONNX graph in a real ONNX Runtime session and the
PyTorch model on several inputs: a single sequence, a right-padded batch and a
left-padded batch with real attention masks, and for causal LMs a decode step
fed the graph's own KV cache. Only positions the mask keeps are compared. It
raises `SlimkitError` with the measured maximum difference when the
difference exceeds the tolerance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimkit.core.arch import CAUSAL_LM, CLASSIFIER, ENCODER
from slimkit.core.attention import attention_implementation
from slimkit.core.errors import SlimkitError, short_reason
from slimkit.io.model import LoadedModel

GRAPH = "model.onnx"


@dataclass(frozen=True)
class GraphSpec:
    """What the runtime needs to know about an exported graph."""

    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layers: int = 0  # causal LMs: KV cache layers
    kv_heads: int = 0
    head_dim: int = 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim}

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        return cls(d["kind"], tuple(d["inputs"]), tuple(d["outputs"]), d.get("layers", 0), d.get("kv_heads", 0), d.get("head_dim", 0))

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]


def onnx_modules():
    """(onnx, onnxruntime), or a SlimkitError naming the extra."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise SlimkitError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): pip install 'slimkit[onnx]'") from exc
    return onnx, onnxruntime


# --------------------------------------------------------------------------- wrappers


class _EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return getattr(out, self.output)


class _DecoderGraph(nn.Module):
    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last `new` tokens from an attention mask (B, T): (B, new)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]


def graph_spec(lm: LoadedModel) -> GraphSpec:
    if lm.kind == CAUSAL_LM:
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([[1]]), use_cache=True)
        layers = getattr(out.past_key_values, "layers", None)
        if not layers or any(getattr(l, "keys", None) is None for l in layers):
            raise SlimkitError(f"{lm.name} keeps no key/value cache slimkit can export (not a standard attention decoder): "
                               "export encoders, classifiers or attention-based causal LMs")
        _, kv_heads, _, head_dim = layers[0].keys.shape
        names = GraphSpec(CAUSAL_LM, (), (), len(layers)).past_names
        return GraphSpec(CAUSAL_LM, ("input_ids", "attention_mask", "position_ids", *names),
                         ("logits", *[n.replace("past_key_values", "present") for n in names]),
                         len(layers), int(kv_heads), int(head_dim))
    if lm.kind not in (ENCODER, CLASSIFIER):
        raise SlimkitError(f"cannot export a {lm.kind}: slimkit exports encoders, classifiers and causal LMs")
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in getattr(lm.tokenizer, "model_input_names", []):
        names.append("token_type_ids")
    return GraphSpec(lm.kind, tuple(names), ("last_hidden_state" if lm.kind == ENCODER else "logits",))


def example_inputs(spec: GraphSpec, batch: int, new: int, past: int, pad: str = "right", seed: int = 0,
                   vocab: int = 100, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random ids with a real, padded attention mask (never all ones when batch > 1)."""
    g = torch.Generator().manual_seed(seed)
    total = past + new
    mask = torch.ones(batch, total, dtype=torch.long)
    for row in range(1, batch):  # rows shorter by 1, 2, ... tokens
        cut = min(row * max(1, new // 3), new - 1)
        if cut > 0:
            if pad == "right":
                mask[row, total - cut:] = 0
            else:
                mask[row, :cut] = 0
    ids = torch.randint(4, vocab, (batch, new), generator=g)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in spec.inputs:
        feeds["token_type_ids"] = torch.zeros_like(ids)
    if spec.kind == CAUSAL_LM:
        feeds["position_ids"] = positions(mask, new)
        for name in spec.past_names:
            feeds[name] = torch.randn(batch, spec.kv_heads, past, spec.head_dim, generator=g).to(dtype)
    return feeds


# --------------------------------------------------------------------------- export


def export_graph(lm: LoadedModel, path: Path, spec: GraphSpec, *, opset: int = 18, dynamo: bool = False) -> None:
    """Write `lm` as an ONNX graph at `path` (a file)."""
    onnx_modules()
    vocab = int(getattr(lm.model.config, "vocab_size", 100) or 100)
    if spec.kind == CAUSAL_LM:
        wrapper = _DecoderGraph(lm.model, spec.layers)
        feeds = example_inputs(spec, batch=2, new=5, past=3, vocab=vocab)
    else:
        wrapper = _EncoderGraph(lm.model, spec.outputs[0])
        feeds = example_inputs(spec, batch=2, new=8, past=0, vocab=vocab)
    args = tuple(feeds[n] for n in spec.inputs)
    axes = _dynamic_axes(spec)
    was_training = lm.model.training
    lm.model.eval()
    # a traced encoder takes eager attention: SDPA's trace guards every softmax with IsNaN/Where
    # (for fully masked rows), about 8% of all-MiniLM-L6-v2's int8 time in ONNX Runtime
    impl = "eager" if spec.kind != CAUSAL_LM and not dynamo else None
    try:
        with warnings.catch_warnings(), torch.no_grad(), attention_implementation(lm.model, impl):
            warnings.simplefilter("ignore")
            if dynamo:
                shapes = _dynamic_shapes(spec, axes)
                torch.onnx.export(wrapper, args, str(path), input_names=list(spec.inputs), output_names=list(spec.outputs),
                                  dynamic_shapes=shapes, dynamo=True, optimize=True, opset_version=opset,
                                  verbose=False)
            else:
                torch.onnx.export(wrapper, args, str(path), input_names=list(spec.inputs), output_names=list(spec.outputs),
                                  dynamic_axes=axes, dynamo=False, opset_version=opset)
    except SlimkitError:
        raise
    except Exception as exc:  # exporters raise many types for unsupported code
        raise SlimkitError(f"cannot export {lm.name} to ONNX ({short_reason(exc)}): try another --exporter") from exc
    finally:
        lm.model.train(was_training)


def _dynamic_axes(spec: GraphSpec) -> dict[str, dict[int, str]]:
    axes = {n: {0: "batch", 1: "sequence"} for n in spec.inputs if not n.startswith("past_key_values")}
    if spec.kind == CAUSAL_LM:
        axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
        for n in spec.past_names:
            axes[n] = {0: "batch", 2: "past_sequence"}
        for n in spec.outputs[1:]:
            axes[n] = {0: "batch", 2: "total_sequence"}
    axes[spec.outputs[0]] = {0: "batch"} if spec.kind == CLASSIFIER else {0: "batch", 1: "sequence"}
    return axes


def _dynamic_shapes(spec: GraphSpec, axes: dict) -> dict:
    """torch.export's form of the dynamic axes, keyed by the wrapper's argument names."""
    dims: dict[str, object] = {}

    def shape(name):
        return {ax: dims.setdefault(d, torch.export.Dim(d.replace("_", ""))) for ax, d in axes[name].items()}

    shapes = {n: shape(n) for n in spec.inputs if not n.startswith("past_key_values")}
    if spec.kind == CAUSAL_LM:
        shapes["past"] = tuple(shape(n) for n in spec.past_names)
    return shapes


# --------------------------------------------------------------------------- parity


@dataclass
class Parity:
    """How far a graph's outputs are from PyTorch's, over all parity cases.

    max_abs_diff is judged against `tolerance * max(1, reference_max_abs)`
    (lossless exports); rel_l2 = ||onnx - torch|| / ||torch|| against
    `tolerance` (quantized exports, where a few large outliers are expected).
    """

    max_abs_diff: float
    rel_l2: float
    reference_max_abs: float
    tolerance: float
    metric: str
    cases: int

    @property
    def ok(self) -> bool:
        if self.metric == "rel_l2":
            return self.rel_l2 <= self.tolerance
        return self.max_abs_diff <= self.tolerance * max(1.0, self.reference_max_abs)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("max_abs_diff", "rel_l2", "reference_max_abs", "tolerance", "metric", "cases")}

    @classmethod
    def of(cls, pairs, tolerance: float, metric: str) -> "Parity":
        """Over (exported output, PyTorch output) tensor pairs of any shape, one case each."""
        worst = scale = err2 = ref2 = 0.0
        cases = 0
        for got, want in pairs:
            got, want = got.float(), want.float()
            worst = max(worst, (got - want).abs().max().item())
            scale = max(scale, want.abs().max().item())
            err2 += (got - want).double().pow(2).sum().item()
            ref2 += want.double().pow(2).sum().item()
            cases += 1
        return cls(worst, (err2 / max(ref2, 1e-30)) ** 0.5, scale, tolerance, metric, cases)

    def check(self, what: str, fix: str) -> "Parity":
        """Itself when within tolerance; else a one-line error that says by how much, and `fix`."""
        if not self.ok:
            measured = f"relative L2 error {self.rel_l2:.3g}" if self.metric == "rel_l2" else f"max difference {self.max_abs_diff:.3g}"
            raise SlimkitError(f"{what} parity check failed: {measured} against PyTorch exceeds the tolerance "
                               f"{self.tolerance:.3g} (outputs up to {self.reference_max_abs:.3g}): {fix}")
        return self


# ONNX Runtime's load-time fusions that cost time on CPU for a kind of graph. all-MiniLM-L6-v2 int8, batch 1 x 128,
# 2 threads, each in its own process, in turns: 8.3 -> 7.3 ms per sequence without SkipLayerNormalization, whose CPU
# kernel is slower than the Add + LayerNormalization it replaces. Decoders were not measured and keep every fusion.
SLOW_FUSIONS = {ENCODER: ["SkipLayerNormFusion"], CLASSIFIER: ["SkipLayerNormFusion"]}


def session(path: Path, threads: int | None = None, kind: str | None = None):
    _, ort = onnx_modules()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=SLOW_FUSIONS.get(kind, []))
    except Exception as exc:
        raise SlimkitError(f"ONNX Runtime cannot open {path.name} ({short_reason(exc)}): export the model again") from exc


def _feeds(sess, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    wanted = {i.name: i.type for i in sess.get_inputs()}
    out = {}
    for name, t in feeds.items():
        if name in wanted:
            a = t.numpy()
            out[name] = a.astype(np.float16) if wanted[name] == "tensor(float16)" else a
    return out


def parity_cases(spec: GraphSpec, vocab: int) -> list[dict]:
    if spec.kind == CAUSAL_LM:
        return [example_inputs(spec, 1, 6, 0, vocab=vocab, seed=1),
                example_inputs(spec, 3, 9, 0, "right", vocab=vocab, seed=2),
                example_inputs(spec, 3, 7, 0, "left", vocab=vocab, seed=3)]
    return [example_inputs(spec, 1, 6, 0, vocab=vocab, seed=1),
            example_inputs(spec, 3, 17, 0, "right", vocab=vocab, seed=2),
            example_inputs(spec, 2, 11, 0, "left", vocab=vocab, seed=3)]


def check_parity(lm: LoadedModel, path: Path, spec: GraphSpec, tolerance: float, metric: str = "max_abs",
                 what: str = "ONNX", sess=None) -> Parity:
    """Compare the graph at `path` with `lm` on padded batches (and a decode step); raise beyond tolerance.

    `sess`: what runs the graph instead of an ONNX Runtime session on `path`, with
    the same `get_inputs()` and `run(None, feeds)` (a TensorRT engine's `EngineSession`).
    """
    sess = sess or session(path, kind=spec.kind)
    vocab = int(getattr(lm.model.config, "vocab_size", 100) or 100)
    pairs = []
    for feeds in parity_cases(spec, vocab):
        got = sess.run(None, _feeds(sess, feeds))
        ref = _torch_outputs(lm, spec, feeds)
        keep = feeds["attention_mask"][:, -feeds["input_ids"].shape[1]:].bool()
        outputs = [(got[0], ref[0], keep)]
        if spec.kind == CAUSAL_LM:  # one decode step on each side's own cache
            step = _decode_step(feeds, spec, got[1:], vocab)
            got2 = sess.run(None, _feeds(sess, step))
            ref2 = _torch_outputs(lm, spec, {**step, **dict(zip(spec.past_names, ref[1:]))})
            outputs.append((got2[0], ref2[0], torch.ones(step["input_ids"].shape, dtype=torch.bool)))
        for g, r, k in outputs:
            g = torch.from_numpy(np.asarray(g, dtype=np.float32))
            pairs.append((g, r) if spec.kind == CLASSIFIER else (g[k], r[k]))
    return Parity.of(pairs, tolerance, metric).check(what, "the graph does not reproduce the model; try another --exporter, "
                                                       "or raise --tolerance if the difference is expected")


def _torch_outputs(lm: LoadedModel, spec: GraphSpec, feeds: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        if spec.kind == CAUSAL_LM:
            out = _DecoderGraph(lm.model, spec.layers)(*(feeds[n] for n in spec.inputs))
            return list(out)
        return [_EncoderGraph(lm.model, spec.outputs[0])(*(feeds[n] for n in spec.inputs))]


def _decode_step(prev: dict, spec: GraphSpec, present: list, vocab: int) -> dict:
    batch = prev["input_ids"].shape[0]
    ids = torch.randint(4, vocab, (batch, 1), generator=torch.Generator().manual_seed(7))
    mask = torch.cat([prev["attention_mask"], torch.ones(batch, 1, dtype=torch.long)], dim=1)
    step = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask, 1)}
    step.update({n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in zip(spec.past_names, present)})
    return step


def save_single_file(src: Path, dst: Path) -> None:
    """Write a graph as one self-contained file (weights inline; graphs under 2 GB)."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    if model.ByteSize() >= 2**31 - 1:
        raise SlimkitError(f"the graph is {model.ByteSize() / 2**30:.1f} GB, over ONNX's 2 GB single-file limit: "
                           "quantize it (--quantize int4) or use --format ort-genai")
    for f in src.parent.glob(src.name + "*.data"):  # external data written by the exporter
        f.unlink()
    onnx.save_model(model, str(dst))


def prune_unused(graph) -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
