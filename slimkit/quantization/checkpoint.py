"""compressed-tensors checkpoints: quantized layers in the layout llm-compressor writes and
transformers and vLLM read, wherever its numbers are exactly slimkit's.

    slimkit module                               compressed-tensors scheme (format)
    WeightOnlyLinear, symmetric                  int weights, symmetric, group or channel (pack-quantized)
                                                 q in [-2^(b-1), 2^(b-1) - 1], w = q * s
    WeightOnlyLinear, asymmetric                 int weights with zero points (int-quantized: one int8
                                                 per weight), w = (q - zp) * s; float offsets
                                                 (w = (q - lo) * s + m) are float zero points
                                                 zp = lo - m / s, integer ones zp = lo + z
    Int8Embedding and the head tied to it        int8 rows, symmetric per row (int-quantized); the
                                                 head is written as its own copy of the rows
    Int8DynamicLinear without smoothing          int8 weights per channel x dynamic per-token
                                                 symmetric int8 activations, W8A8 (int-quantized)

Writing encodes slimkit's tensors shard by shard (`encode`), so a model larger than memory
is written as it is produced, and `finish` puts the quantization_config that
compressed-tensors' own `ModelCompressor` derives from the schemes into config.json. The
codes are slimkit's integers themselves, signed, as compressed-tensors stores them (packed
8 to an int32 with its own `pack_to_int32` where symmetric). Scales and zero points are
written in fp32 (slimkit keeps fp16 per group; widening is exact), because
compressed-tensors dequantizes in the scale's dtype: so its decompressed weight is
slimkit's fp32 dequantized weight to float rounding. Each shard is read back into
slimkit's layout and compared with what it was made from before the artifact is published;
transformers' own loading of these files is checked against slimkit's logits in the tests.

Why asymmetric grids are int-quantized, not packed: compressed-tensors 0.20 packs zero
points 8 to an int32 along the output channels when it writes, and transformers 5.25
expects them unpacked (a size mismatch at load; known upstream as llm-compressor issue
1618); float zero points cannot be packed at all. The price is disk: one byte per 4-bit
weight. `--layout slimkit` keeps slimkit's packed layout instead. Why a tied head is
written twice: transformers ties the head to the embedding's parameter before
compressed-tensors decompresses it, so a head without its own tensors would read int8.

Reading back (`read`) turns the same tensors into slimkit's modules, which keep their
CPU kernels (int4pack, int8pack, int8 x int8).

Kept in slimkit's own layout (its config.json makes plain loaders fail, naming
slimkit.load), with the reason in the manifest, where there is no exact equivalent:
AWQ input or column scales left in a layer, SmoothQuant's per-layer factors (q, k and v
read one norm with three different factors, so they cannot fold into it), static int8
activations (slimkit's symmetric grid stops at -127, compressed-tensors' at -128), NF4,
a 4-bit embedding read from its tied head's codes, and GPT-2's Conv1D layers, which
compressed-tensors does not quantize, so transformers would load them as missing
weights, at random.

Activations: compressed-tensors' own fake quantization (what transformers runs) scales a
token by absmax / 127.5, vLLM and slimkit by absmax / 127; the stored tensors are the
same either way.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.io.artifacts import Layout, register_layout
from slimkit.quantization import formats as Q
from slimkit.quantization.embedding import Int8Embedding, TiedInt8Head
from slimkit.quantization.modules import Int8DynamicLinear, WeightOnlyLinear

NAME = "compressed-tensors"
ROWS = (Int8Embedding.fmt, TiedInt8Head.fmt)  # int8 rows, the head tied to them reads the same


def _why_not(module: nn.Module) -> str | None:
    if isinstance(module, WeightOnlyLinear):
        return "AWQ input scales kept in a layer" if module.inv_input_scale is not None else None
    if isinstance(module, Int8DynamicLinear):
        return "SmoothQuant factors (smooth_alpha)" if module.inv_smooth is not None else None
    if isinstance(module, Int8Embedding):
        return "AWQ column scales on a tied embedding" if module.inv_column_scale is not None else None
    if isinstance(module, TiedInt8Head):
        return _why_not(module.embedding)
    if module.fmt == "tied-embedding":
        return "a 4-bit embedding read from its tied head's codes (quantize with embedding_bits=8)"
    return f"{module.fmt} modules"


def unfit(model: nn.Module) -> str | None:
    """Why `model`'s quantized modules have no exact compressed-tensors equivalent, or None.

    Besides the numbers, the layer a loader builds from config.json must be an nn.Linear
    (nn.Embedding for embeddings): compressed-tensors quantizes nothing else, so GPT-2's
    Conv1D layers would load as missing weights, at random."""
    if importlib.util.find_spec("compressed_tensors") is None:
        return "the compressed-tensors package is not installed (pip install compressed-tensors)"
    reasons = {r for m in model.modules() if hasattr(m, "fmt") and (r := _why_not(m))}
    with torch.device("meta"):
        built = dict(type(model)(copy.deepcopy(model.config)).named_modules())  # what from_pretrained builds, no memory
    wanted = {n: nn.Embedding if isinstance(m, Int8Embedding) else nn.Linear for n, m in model.named_modules() if hasattr(m, "fmt") and not _why_not(m)}
    if any(type(built.get(n)) is not kind for n, kind in wanted.items()):
        reasons.add("layers that are not nn.Linear in transformers (GPT-2's Conv1D), which compressed-tensors does not quantize")
    return "; ".join(sorted(reasons)) or None


def _scheme_key(spec: dict) -> tuple:
    if spec["format"] == Int8DynamicLinear.fmt:
        return ("w8a8",)
    if spec["format"] in ROWS:
        return ("rows",)
    zero = "none" if spec["symmetric"] else "integer" if spec.get("zero_point") == "integer" else "float"
    return ("weight-only", spec["bits"], spec["group_size"], zero)


def _scheme(key: tuple, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if key[0] == "w8a8":
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        tokens = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        return QuantizationScheme(targets=targets, weights=weights, input_activations=tokens, format="int-quantized")
    if key[0] == "rows":
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        return QuantizationScheme(targets=targets, weights=weights, format="int-quantized")
    _, bits, group, zero = key
    strategy = dict(strategy="group", group_size=group) if group else dict(strategy="channel")
    if zero == "none":
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, **strategy)
        return QuantizationScheme(targets=targets, weights=weights, format="pack-quantized")
    zp_dtype = torch.float32 if zero == "float" else torch.int8
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, zp_dtype=zp_dtype, **strategy)
    return QuantizationScheme(targets=targets, weights=weights, format="int-quantized")


def quantization_config(specs: dict[str, dict]) -> dict:
    """config.json's quantization_config for the quantized modules `specs` (name -> spec), as compressed-tensors writes it."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    groups: dict[tuple, list[str]] = {}
    for name, spec in specs.items():
        groups.setdefault(_scheme_key(spec), []).append(name)
    schemes = {f"group_{i}": _scheme(key, names) for i, (key, names) in enumerate(groups.items())}
    formats = {s.format for s in schemes.values()}
    config = QuantizationConfig(config_groups=schemes, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status=QuantizationStatus.COMPRESSED)
    return config.model_dump(mode="json") if hasattr(config, "model_dump") else config.dict()


def finish(out: Path, specs: dict[str, dict]) -> None:
    """Put the quantization_config into the config.json written beside the weights."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    path = out / "config.json"
    config = json.loads(path.read_text())
    ModelCompressor(quantization_config=QuantizationConfig.model_validate(quantization_config(specs))).update_config(str(out))
    written = json.loads(path.read_text())
    written["dtype"] = config.get("dtype", written.get("dtype"))  # the model's own, not the stand-in float layers'
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def encode(tensors: dict[str, torch.Tensor], specs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """One shard's tensors, slimkit's own layout -> compressed-tensors', checked by reading them back.

    A module's tensors are always in one shard (they are written together); a head tied
    to int8 embedding rows gets its own copy of them, in the embedding's shard."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = dict(tensors)
    for name, spec in specs.items():
        fmt = spec["format"]
        if fmt == TiedInt8Head.fmt:
            if f"{spec['tied_to']}.weight_q" in tensors:
                out[f"{name}.weight"] = tensors[f"{spec['tied_to']}.weight_q"].clone()
                out[f"{name}.weight_scale"] = tensors[f"{spec['tied_to']}.weight_scale"].float()[:, None].clone()
            continue
        if fmt in (Int8DynamicLinear.fmt, Int8Embedding.fmt):
            if f"{name}.weight_q" in tensors:
                out[f"{name}.weight"] = out.pop(f"{name}.weight_q")
                out[f"{name}.weight_scale"] = out.pop(f"{name}.weight_scale").float()[:, None]
            continue
        if fmt != WeightOnlyLinear.fmt or f"{name}.qweight" not in tensors:
            continue
        bits, lo = spec["bits"], Q.qrange(spec["bits"])[0]
        packed = out.pop(f"{name}.qweight")
        q = packed if bits == 8 else (Q.unpack_int4(packed).to(torch.int16) - 8).to(torch.int8)  # (N, K) in [lo, hi]
        scale = out.pop(f"{name}.scale").float()  # (N, G)
        out[f"{name}.weight_scale"] = scale
        if spec["symmetric"]:
            out[f"{name}.weight_packed"] = pack_to_int32(q, bits)
            out[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
        elif spec.get("zero_point") == "integer":
            out[f"{name}.weight"] = q
            out[f"{name}.weight_zero_point"] = (lo + out.pop(f"{name}.zero_point").to(torch.int16)).to(torch.int8)  # (q - lo - z) * s
        else:
            out[f"{name}.weight"] = q
            out[f"{name}.weight_zero_point"] = lo - out.pop(f"{name}.offset").float() / scale  # (q - lo) * s + m = (q - zp) * s
        if f"{name}.bias" in out:
            out[f"{name}.bias"] = out[f"{name}.bias"].float()
    _check_exact(tensors, out, specs)
    return out


def _check_exact(tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor], specs: dict[str, dict]) -> None:
    """Read `out` back module by module (a whole shard read back at once would double its memory) and
    compare with the slimkit tensors it came from."""
    stored = _by_module(out)
    for module, names in _by_module(tensors).items():
        back = read({n: out[n] for n in stored.get(module, [])}, {"modules": {module: specs[module]} if module in specs else {}})
        for name in names:
            if name not in back or not torch.equal(back[name].to(tensors[name].dtype), tensors[name]):
                raise SlimkitError(f"compressed-tensors did not store {name} exactly (compressed-tensors "
                                   f"{_ct_version()}): save it with layout slimkit (--layout slimkit) and report this")


def _by_module(names) -> dict[str, list[str]]:
    """Tensor names grouped by the module that owns them."""
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(name.rpartition(".")[0], []).append(name)
    return out


def _ct_version() -> str:
    import compressed_tensors

    return compressed_tensors.__version__


def read(state: dict, manifest: dict) -> dict:
    """The compressed-tensors tensors of the manifest's quantized modules, in slimkit's names and layout.
    `state` may be one shard: modules whose tensors are in other shards are left to those."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    except ImportError as exc:
        raise SlimkitError("this artifact is stored as compressed-tensors: pip install 'compressed-tensors>=0.20' to load it") from exc

    state = dict(state)
    for name, spec in manifest.get("modules", {}).items():
        fmt = spec.get("format")
        if f"{name}.weight" not in state and f"{name}.weight_packed" not in state:
            continue  # in another shard (a module's tensors are never split)
        if fmt == Int8DynamicLinear.fmt:
            state[f"{name}.weight_q"] = state.pop(f"{name}.weight")
            state[f"{name}.weight_scale"] = state.pop(f"{name}.weight_scale").float().reshape(-1)
        elif fmt == Int8Embedding.fmt:
            state[f"{name}.weight_q"] = state.pop(f"{name}.weight")
            state[f"{name}.weight_scale"] = state.pop(f"{name}.weight_scale").float().reshape(-1)
        elif fmt == TiedInt8Head.fmt:
            state.pop(f"{name}.weight"), state.pop(f"{name}.weight_scale")  # the embedding's rows again
        elif fmt == WeightOnlyLinear.fmt:
            _weight_only(state, name, spec, unpack_from_int32)
        else:
            raise SlimkitError(f"module {name} ({fmt}) cannot be stored as compressed-tensors: the artifact is damaged; save it again")
    return state


def _weight_only(state: dict, name: str, spec: dict, unpack_from_int32) -> None:
    """A WeightOnlyLinear's tensors in slimkit's layout: packed codes, fp16/fp32 scales, offsets or zero points."""
    bits, dtype = spec["bits"], Q.scale_dtype(spec["group_size"])
    if f"{name}.weight_packed" in state:  # symmetric, pack-quantized
        shape = state.pop(f"{name}.weight_shape")
        q = unpack_from_int32(state.pop(f"{name}.weight_packed"), bits, shape)  # (N, K) int8 in [-2^(b-1), 2^(b-1) - 1]
    else:  # asymmetric, int-quantized
        q = state.pop(f"{name}.weight")
    state[f"{name}.qweight"] = q if bits == 8 else Q.pack_int4((q + 8).to(torch.uint8))  # int4 stored offset to [0, 15]
    scale = state.pop(f"{name}.weight_scale").float()  # (N, G)
    state[f"{name}.scale"] = scale.to(dtype)
    if not spec.get("symmetric", True):
        zero, lo = state.pop(f"{name}.weight_zero_point"), Q.qrange(bits)[0]
        if spec.get("zero_point") == "integer":
            state[f"{name}.zero_point"] = (zero.to(torch.int16) - lo).to(torch.uint8)
        else:
            state[f"{name}.offset"] = ((lo - zero.float()) * scale).to(dtype)


register_layout(Layout(NAME, unfit, encode, finish, read))
