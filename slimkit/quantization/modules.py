"""Quantized replacements for linear layers (the embeddings' are in `embedding.py`).

Each module keeps its compressed weight in buffers marked `_slimkit_weight`
(so `LoadedModel.num_parameters()` counts them and `state_dict()` saves the
small tensors, not fp32 ones), describes itself with `spec()` (what the
artifact manifest records), and can be rebuilt empty from that spec with
`from_spec()` before a state dict is loaded into it.

Compute, measured on a 2-core AVX-512 VNNI/BF16 CPU with torch 2.13 (decode,
one token, SmolLM2 shapes): the CPU kernels `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` are fast with bf16 activations and 10-100x
slower with fp32 ones, so the weight-only modules cast activations to bf16 for
the matmul and back. `torch._int_mm` (int8 x int8 -> int32) serves dynamic
and static int8 (`int8_matmul`: any shape on CPU; on CUDA it needs more than
16 rows and K, N multiples of 8, so short inputs are padded with zero rows
and other shapes take an exact float64 matmul). Formats without a CPU kernel (NF4, grouped int8, per-channel int4)
dequantize the weight on every call: they save memory and disk, not time.

On a CUDA device (see cuda_layout.py): int4 in groups of 32..256 runs
`_weight_int4pack_mm` (tinygemm, bf16 tensor cores) on a copy of the codes
repacked when the module moves there; int8 per channel runs
`_weight_int8pack_mm` for a few rows (decode: the int8 weight is read once, at
half the bytes of bf16) and, for more rows, casts the int8 weight to bf16 for a
cuBLAS matmul and scales the output columns (that kernel computes one output per
thread, without tensor cores, so it loses to cuBLAS once rows grow;
benchmarks/gpu_check.py measures where). The saved layout is the CPU one on
every device: the CUDA copies live in `_kernel`, not in the state dict.
Moving a module (`.to`, `.cuda`, `.cpu`) drops what `_kernel` held for the old
device and builds the new device's layout at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.selection import linear_weight
from slimkit.quantization import cuda_layout as C
from slimkit.quantization import formats as Q
from slimkit.quantization import nf4 as N
from slimkit.quantization import observers as O

KERNEL_DTYPE = torch.bfloat16


def weight_buffer(module: nn.Module, name: str, tensor: torch.Tensor, per_element: int = 1) -> None:
    """A buffer that holds weights: LoadedModel.num_parameters() counts `per_element` per entry."""
    module.register_buffer(name, tensor)
    getattr(module, name)._slimkit_weight = per_element


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exact on every device.

    The CPU kernel takes any M, K, N (checked on torch 2.13: M = 0, 1, 17;
    K, N = 1, 7, 13). cuBLAS refuses M <= 16 and K or N not a multiple of 8.
    """
    m, k = a.shape
    n = b.shape[1]
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    if k % 8 or n % 8 or m == 0:
        return (a.double() @ b.double()).to(torch.int32)  # exact: |sums| < 2^53
    if m <= 16:
        padded = torch.cat([a, a.new_zeros(17 - m, k)])  # (17, K): zero rows add nothing
        return torch._int_mm(padded, b)[:m]
    return torch._int_mm(a, b)


ROWS_AT_ONCE = 4096


def int8_rows(w: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) of any float dtype, its columns first multiplied by `column_scale` (K,) where given, as
    symmetric int8 rows: (q (N, K) int8, one scale per row (N,)). Rows are independent, so they are done
    a slice at a time in fp32: a 7B model's embedding is 0.8 GB in fp32, and its temporaries as much again."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], device=w.device)
    for start in range(0, w.shape[0], ROWS_AT_ONCE):
        part = w[start:start + ROWS_AT_ONCE].float()
        if column_scale is not None:
            part = part * column_scale[None, :]
        qt = Q.quantize_int(part, 8, None, symmetric=True)
        q[start:start + ROWS_AT_ONCE], scale[start:start + ROWS_AT_ONCE] = qt.q, qt.scale[:, 0]
    return q, scale


class QuantLinear(nn.Module):
    """Common shape handling: subclasses implement `matmul(x2d) -> (M, N)`."""

    fmt = "base"

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def _apply(self, fn, recurse=True):
        """Every move or cast (`.to`, `.cuda`, `.half`) drops the kernel layouts built for the old
        device and builds the new device's, so a forward never mixes devices."""
        kernel = getattr(self, "_kernel", None)
        if kernel is not None:
            kernel.clear()
        module = super()._apply(fn, recurse)
        self.prepare()
        return module

    def prepare(self) -> None:
        """Build what this device's kernel reads (subclasses); nothing by default."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]))  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def spec(self) -> dict:
        return {"format": self.fmt, "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_float(cls, layer: nn.Module, **options) -> "QuantLinear":
        w = linear_weight(layer).detach()
        bias = getattr(layer, "bias", None)
        module = cls(w.shape[1], w.shape[0], bias is not None, **options)
        module.set_weight(w.float())
        if bias is not None:
            module.bias.data.copy_(bias.detach().float())
        return module

    @classmethod
    def from_spec(cls, spec: dict) -> "QuantLinear":
        options = {k: v for k, v in spec.items() if k not in ("format", "in_features", "out_features", "bias")}
        return cls(spec["in_features"], spec["out_features"], spec["bias"], **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "format")


class Int8DynamicLinear(QuantLinear):
    """int8 weights per output channel x int8 activations per token, int32 accumulate.

    Each token's activation row gets its own scale (absmax / 127), so one
    outlier token cannot crush the resolution of the others, and the full
    8-bit range is used (no 7-bit `reduce_range`). With `smooth`, input
    channel j is divided by s_j before quantization and the weight's column j
    multiplied by it (SmoothQuant), moving outlier channels' range into the
    weights, which quantize per output channel and absorb it better.
    """

    fmt = "int8-dynamic"

    def __init__(self, in_features: int, out_features: int, bias: bool, smooth: bool = False):
        super().__init__(in_features, out_features, bias)
        weight_buffer(self, "weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("inv_smooth", torch.ones(in_features) if smooth else None)

    def spec(self) -> dict:
        return {**super().spec(), "smooth": self.inv_smooth is not None}

    def set_weight(self, w: torch.Tensor, smooth: torch.Tensor | None = None) -> None:
        """w (N, K); smooth (K,) per-input-channel factors, or None."""
        if smooth is not None:
            self.inv_smooth.copy_(1 / smooth)
        q, scale = int8_rows(w, smooth)
        self.weight_q.copy_(q)
        self.weight_scale.copy_(scale)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        xq, x_scale = Q.quantize_tokens(x)  # (M, K) int8, (M, 1)
        acc = int8_matmul(xq, self.weight_q.t())  # (M, N) int32
        return acc.float() * x_scale * self.weight_scale


class StaticInt8Linear(QuantLinear):
    """int8 weights x int8 activations with a scale (and zero point) fixed at calibration.

    y = s_x s_w (X_q W_q^T - z rowsum(W_q)) + b, accumulated in int32: with a
    fixed zero point z the correction is a constant per output channel,
    computed once (`_kernel`). `weight_granularity`: one weight scale per
    output channel ("per_channel") or one for the matrix ("per_tensor").
    With `smooth`, inputs are divided by SmoothQuant factors first (as in
    Int8DynamicLinear); the fixed range was observed on the divided inputs.
    """

    fmt = "int8-static"

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_granularity: str = "per_channel", symmetric_activations: bool = True, smooth: bool = False):
        super().__init__(in_features, out_features, bias)
        if weight_granularity not in ("per_channel", "per_tensor"):
            raise ValueError(f"unknown weight_granularity {weight_granularity!r}")
        self.weight_granularity, self.symmetric_activations = weight_granularity, symmetric_activations
        weight_buffer(self, "weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features if weight_granularity == "per_channel" else 1))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("inv_smooth", torch.ones(in_features) if smooth else None)
        self._kernel: dict = {}

    def spec(self) -> dict:
        return {**super().spec(), "weight_granularity": self.weight_granularity, "symmetric_activations": self.symmetric_activations, "smooth": self.inv_smooth is not None}

    def set_weight(self, w: torch.Tensor, smooth: torch.Tensor | None = None) -> None:
        """w (N, K); smooth (K,) per-input-channel factors, or None."""
        if smooth is not None:
            w = w * smooth[None, :]
            self.inv_smooth.copy_(1 / smooth)
        q, scale = O.quantize_weight(w, self.weight_granularity == "per_channel")
        self.weight_q.copy_(q)
        self.weight_scale.copy_(scale)
        self._kernel.clear()

    def set_input_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        if self.symmetric_activations and int(zero_point) != 0:
            raise ValueError("a symmetric activation grid has zero point 0")
        self.input_scale.copy_(scale)
        self.input_zero_point.copy_(zero_point)
        self._kernel.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _constants(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N,) output scale s_x s_w and (N,) zero-point correction (None when z = 0)."""
        if "scale" not in self._kernel:
            out_scale = (self.input_scale * self.weight_scale).expand(self.out_features).contiguous()  # (N,)
            z = int(self.input_zero_point)
            rowsum = self.weight_q.sum(1, dtype=torch.int32).float()  # (N,)
            self._kernel["scale"] = out_scale
            self._kernel["offset"] = -(out_scale * z * rowsum) if z else None
        return self._kernel["scale"], self._kernel["offset"]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        xq = O.quantize_activation(x, self.input_scale, self.input_zero_point, self.symmetric_activations)  # (M, K)
        acc = int8_matmul(xq, self.weight_q.t())  # (M, N) int32
        scale, offset = self._constants()
        y = acc.float() * scale
        return y + offset if offset is not None else y


class WeightOnlyLinear(QuantLinear):
    """int8 or int4 weights (group-wise, symmetric or asymmetric), activations in float.

    Stored: `qweight` int8 (N, K) for 8 bits, uint8 (N, K // 2) packed for 4;
    `scale` (N, K // group) fp16 (fp32 per channel); asymmetric, either
    `offset` likewise (float offset) or `zero_point` uint8 (N, K // group),
    the integer zero points of `zero_point="integer"` (see formats.py).
    Kernels: int8 symmetric per channel -> _weight_int8pack_mm; int4 with
    groups of 32..256 -> _weight_int4pack_mm_for_cpu; otherwise dequantize.
    With `input_scale` (AWQ where the scale cannot be folded into the layer
    before), the stored weight is W diag(s) and inputs are multiplied by
    `inv_input_scale` = 1 / s (K,) first.
    """

    fmt = "weight-only"

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 8, group_size: int | None = None, symmetric: bool = True, input_scale: bool = False, zero_point: str = "float"):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("inv_input_scale", torch.ones(in_features) if input_scale else None)
        Q.qrange(bits)
        Q.check_zero_point(zero_point, symmetric)
        self.bits, self.symmetric, self.zero_point_kind = bits, symmetric, zero_point
        self.group_size = group_size
        g = Q.check_group(in_features, self.group_size)
        n_groups = in_features // g
        scale_dtype = Q.scale_dtype(self.group_size)
        cols = in_features if bits == 8 else in_features // 2
        weight_buffer(self, "qweight", torch.zeros(out_features, cols, dtype=torch.int8 if bits == 8 else torch.uint8), 8 // bits)
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=scale_dtype))
        integer = zero_point == "integer"
        self.register_buffer("offset", torch.zeros(out_features, n_groups, dtype=scale_dtype) if not symmetric and not integer else None)
        self.register_buffer("zero_point", torch.zeros(out_features, n_groups, dtype=torch.uint8) if integer else None)
        self._kernel: dict = {}

    def spec(self) -> dict:
        extra = {"input_scale": True} if self.inv_input_scale is not None else {}  # absent: as before AWQ
        if self.zero_point is not None:
            extra["zero_point"] = "integer"  # absent: float offsets, as before
        return {**super().spec(), "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, **extra}

    def set_weight(self, w: torch.Tensor, scale_search: bool = False, importance: torch.Tensor | None = None) -> None:
        """Round w (N, K) to this module's grid; scale_search and importance (K,): see `formats.quantize_int`
        (the search chooses other scales of the same grid, so nothing about the storage changes)."""
        self.set_quantized(Q.quantize_int(w, self.bits, self.group_size, self.symmetric, self.zero_point_kind, scale_search, importance))

    def set_quantized(self, qt: Q.QuantizedInt) -> None:
        """Store an already quantized weight (round-to-nearest, GPTQ, ...) of this module's grid."""
        if (qt.zero_point is not None) != (self.zero_point is not None) or (qt.offset is None) != (self.offset is None):
            raise ValueError("the quantized weight's grid (symmetric / float offset / integer zero point) is not this module's")
        q = qt.q if self.bits == 8 else Q.pack_int4((qt.q + 8).to(torch.uint8))  # int4 stored offset to [0, 15]
        self.qweight.copy_(q)
        self.scale.copy_(Q.stored_scales(qt.scale, self.scale.dtype))
        if self.offset is not None:
            self.offset.copy_(Q.stored_scales(qt.offset, self.offset.dtype))
        if self.zero_point is not None:
            self.zero_point.copy_(qt.zero_point)
        self._kernel.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def q_values(self) -> torch.Tensor:
        """(N, K) int8 grid values, unpacked."""
        if self.bits == 8:
            return self.qweight
        return Q.unpack_int4(self.qweight).to(torch.int8) - 8

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        g = Q.check_group(self.in_features, self.group_size)
        offset = None if self.offset is None else self.offset.float()
        return Q.dequantize_int(self.q_values(), self.scale.float(), offset, g, self.bits, dtype, self.zero_point)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), K) fp32: the dequantized weight rows `ids` (1-D), without dequantizing the rest."""
        q = self.qweight[ids]
        q = q if self.bits == 8 else Q.unpack_int4(q).to(torch.int8) - 8
        offset = None if self.offset is None else self.offset[ids].float()
        zero = None if self.zero_point is None else self.zero_point[ids]
        group = Q.check_group(self.in_features, self.group_size)
        return Q.dequantize_int(q, self.scale[ids].float(), offset, group, self.bits, torch.float32, zero)

    def kernel(self, device: torch.device | str = "cpu") -> str:
        """The kernel a forward on `device` runs: int8pack / int4pack (CPU), int8pack-cuda /
        int4-tinygemm (CUDA), or dequantize (the weight rebuilt in float on each call)."""
        device = torch.device(device)
        per_channel_int8 = self.bits == 8 and self.symmetric and self.group_size is None
        if device.type == "cpu":
            if per_channel_int8:
                return "int8pack"
            if self.bits == 4 and self.group_size is not None and self.out_features % 16 == 0:
                return "int4pack"
        elif device.type == "cuda":
            if per_channel_int8:
                return "int8pack-cuda"
            if self.bits == 4 and C.tinygemm_supported(self.out_features, self.in_features, self.group_size) and C.tinygemm_device(device):
                return "int4-tinygemm"
        return "dequantize"

    def prepare(self) -> None:
        """On a CUDA device, build the kernel's layout now (once per move), not in the first forward."""
        if self.qweight.device.type == "cuda":
            self._cuda_layout(self.qweight.device)

    def _cuda_layout(self, device: torch.device) -> None:
        kind = self.kernel(device)
        if kind == "int8pack-cuda" and "cuda_s" not in self._kernel:
            self._kernel["cuda_s"] = self.scale[:, 0].float()
        elif kind == "int4-tinygemm" and "cuda_w" not in self._kernel:
            tiles = C.inner_k_tiles(self.in_features)
            self._kernel["cuda_w"] = torch.ops.aten._convert_weight_to_int4pack(C.high_nibble_first(self.qweight).contiguous(), tiles)
            self._kernel["cuda_sz"] = C.scales_and_zeros(self.scale, self.offset, self.zero_point).to(KERNEL_DTYPE)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_input_scale is not None:
            x = x.float() * self.inv_input_scale  # (M, K)
        kind = self._kernel.get(("kind", x.device))
        if kind is None:  # once per device: a forward that decodes one token is short, so keep it lean
            kind = self._kernel[("kind", x.device)] = self.kernel(x.device)
        if kind == "int8pack":
            if "s" not in self._kernel:
                self._kernel["s"] = self.scale[:, 0].to(KERNEL_DTYPE)
            return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.qweight, self._kernel["s"])
        if kind == "int4pack":
            if "w" not in self._kernel:
                self._kernel["w"], self._kernel["sz"] = self._int4pack()
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), self._kernel["w"], self.group_size, self._kernel["sz"])
        if kind == "int8pack-cuda":
            self._cuda_layout(x.device)
            return C.int8_weight_matmul(x, self.qweight, self._kernel["cuda_s"])
        if kind == "int4-tinygemm":
            self._cuda_layout(x.device)
            return torch.ops.aten._weight_int4pack_mm(x.to(KERNEL_DTYPE).contiguous(), self._kernel["cuda_w"], self.group_size, self._kernel["cuda_sz"])
        w = self.dequantize(KERNEL_DTYPE if x.dtype == torch.float32 else x.dtype)
        return F.linear(x.to(w.dtype), w)

    def _int4pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU kernel's layout, built once: it computes (u - 8) * s + b for u in [0, 15]
        (b from `cuda_layout.scales_and_zeros`, which the CUDA kernel shares)."""
        u = Q.unpack_int4(self.qweight).to(torch.int32)  # (N, K) in [0, 15]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        return packed, C.scales_and_zeros(self.scale, self.offset, self.zero_point).to(KERNEL_DTYPE)


class NF4Linear(QuantLinear):
    """NF4 code-book weights (optionally double-quantized scales); dequantized per call."""

    fmt = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: bool, block_size: int = 64, double_quant: bool = False):
        super().__init__(in_features, out_features, bias)
        self.block_size, self.double_quant = Q.check_group(in_features, block_size), double_quant
        n_blocks = in_features // block_size
        weight_buffer(self, "codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8), 2)
        if double_quant:
            n_dq = -(-out_features * n_blocks // N.DQ_BLOCK)
            self.register_buffer("absmax_q", torch.zeros(out_features, n_blocks, dtype=torch.int8))
            self.register_buffer("absmax_scale", torch.ones(n_dq))
            self.register_buffer("absmax_mean", torch.zeros(()))
        else:
            self.register_buffer("absmax", torch.ones(out_features, n_blocks))

    def spec(self) -> dict:
        return {**super().spec(), "block_size": self.block_size, "double_quant": self.double_quant}

    def set_weight(self, w: torch.Tensor) -> None:
        qt = N.quantize_nf4(w, self.block_size, self.double_quant)
        self.codes.copy_(qt.codes)
        for name in ("absmax", "absmax_q", "absmax_scale", "absmax_mean"):
            if getattr(qt, name) is not None:
                getattr(self, name).copy_(getattr(qt, name))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        scales = self.absmax if not self.double_quant else N.dequantize_scales(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return N.dequantize_nf4(self.codes, scales, self.block_size, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize(KERNEL_DTYPE if x.dtype == torch.float32 else x.dtype)
        return F.linear(x.to(w.dtype), w)


LINEAR_FORMATS = {cls.fmt: cls for cls in (Int8DynamicLinear, StaticInt8Linear, WeightOnlyLinear, NF4Linear)}
