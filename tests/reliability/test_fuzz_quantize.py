"""Property-based tests of the quantization math (slimkit.quantize.formats).

Weights are drawn over the whole float range of their dtype (hypothesis favours
the edges: 0, subnormals, the largest finite value, mixed signs), in fp32,
bf16 and fp16, with shapes that fit each function's contract.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from slimkit.core.errors import SlimkitError
from slimkit.quantization import formats as F
from slimkit.quantization import nf4 as N
from slimkit.quantization.modules import WeightOnlyLinear

FMAX = float(torch.finfo(torch.float32).max)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def weights(draw, blocks=(32, 64), max_rows=4, max_blocks=2, dtypes=DTYPES, magnitude=None):
    """(w (N, K) in one of `dtypes`, block) with K a multiple of block."""
    dtype = draw(st.sampled_from(dtypes))
    block = draw(st.sampled_from(blocks))
    n, k = draw(st.integers(1, max_rows)), block * draw(st.integers(1, max_blocks))
    top = magnitude or float(torch.finfo(dtype).max)  # every value is finite in `dtype`
    values = st.floats(-top, top, width=32, allow_subnormal=True)
    kind = draw(st.sampled_from(["any", "constant rows", "scaled normal"]))
    if kind == "constant rows":
        a = np.repeat(draw(arrays(np.float32, (n, 1), elements=values)), k, axis=1)
    elif kind == "scaled normal":  # realistic weights, one magnitude per row from 1e-30 to the top of the range
        seed, exps = draw(st.integers(0, 2**16)), draw(arrays(np.float32, (n, 1), elements=st.floats(-30, np.log10(top) - 1)))
        a = (np.random.default_rng(seed).standard_normal((n, k)) * 10.0**exps).astype(np.float32)
    else:
        a = draw(arrays(np.float32, (n, k), elements=values))
    return torch.from_numpy(a).to(dtype), block


def _slack(*terms: torch.Tensor) -> torch.Tensor:
    """Float32 rounding of the division, the product and the sum, relative to the magnitudes involved."""
    return 2**-20 * sum(t.abs() for t in terms) + 1e-44


@settings(max_examples=300, deadline=None)
@given(weights(), st.sampled_from([4, 8]), st.booleans(), st.booleans())
def test_int_dequant_is_within_half_a_step(wb, bits, per_channel, symmetric):
    w, block = wb
    group = None if per_channel else block
    ref = w.float()
    try:
        qt = F.quantize_int(w, bits, group, symmetric)
    except SlimkitError as exc:  # only an asymmetric range past float32's maximum is refused
        assert not symmetric and "spans more than float32" in str(exc)
        groups = ref.reshape(ref.shape[0], -1, group or ref.shape[1]).double()
        assert (groups.amax(-1) - groups.amin(-1)).max() > FMAX * (1 - 2**-20)
        return
    lo, hi = F.qrange(bits)
    assert qt.q.dtype == torch.int8 and qt.q.shape == w.shape
    assert int(qt.q.min()) >= lo and int(qt.q.max()) <= hi
    d = qt.dequantize()
    assert torch.isfinite(d).all()
    step = qt.scale.repeat_interleave(qt.group_size, dim=1)  # (N, K)
    offset = torch.zeros_like(step) if qt.offset is None else qt.offset.repeat_interleave(qt.group_size, dim=1)
    err = (d - ref).abs()
    assert (err <= step / 2 + _slack(step * (hi - lo), ref, offset)).all(), float((err - step / 2).max())
    zero_groups = (ref.reshape(ref.shape[0], -1, qt.group_size) == 0).all(-1).repeat_interleave(qt.group_size, dim=1)
    assert (d[zero_groups] == 0).all()  # an all-zero group stays exactly zero
    assert torch.isfinite(qt.dequantize(w.dtype)).all()  # back in the weight's own dtype too


@settings(max_examples=100, deadline=None)
@given(weights(max_blocks=1), st.sampled_from([4, 8]), st.booleans(), st.sampled_from(["inf", "-inf", "nan"]),
       st.integers(0, 2**16))
def test_int_and_nf4_refuse_nan_and_inf(wb, bits, symmetric, bad, where):
    w, block = wb
    w = w.clone()
    w.view(-1)[where % w.numel()] = float(bad)
    with pytest.raises(SlimkitError, match="NaN or Inf"):
        F.quantize_int(w, bits, block, symmetric)
    with pytest.raises(SlimkitError, match="NaN or Inf"):
        N.quantize_nf4(w, block)


@settings(max_examples=200, deadline=None)
@given(weights(), st.booleans())
def test_nf4_picks_the_nearest_level(wb, double_quant):
    w, block = wb
    ref = w.float()
    try:
        qt = N.quantize_nf4(w, block, double_quant)
    except SlimkitError as exc:  # only scales near float32's maximum
        assert double_quant and "double_quant=false" in str(exc)
        assert ref.abs().max() > FMAX * (1 - 2**-7)  # second-level rounding: up to 1/508 of the range
        return
    n = w.shape[0]
    scales = qt.scales()  # (N, B)
    d = qt.dequantize()
    assert torch.isfinite(d).all()
    if not double_quant:  # a double-quantized scale may overshoot the block's absmax (see formats' docstring)
        assert torch.isfinite(qt.dequantize(w.dtype)).all()
    # every level of the block's grid, (N, B, b, 16): the stored one is the nearest to the weight / absmax
    normed = ref.reshape(n, -1, block) / N.quantize_nf4(w, block).absmax[..., None]
    dist = (normed[..., None] - N.nf4_code()).abs()
    chosen = F.unpack_int4(qt.codes).long().reshape(n, -1, block)
    assert (dist.gather(-1, chosen[..., None])[..., 0] <= dist.min(-1).values + 1e-6).all()
    assert (d.reshape(n, -1, block).abs() <= scales.abs()[..., None] * (1 + 2**-20)).all()  # double quant: a small scale can come back negative
    if double_quant:  # int8 scales around their mean: within half a second-level step of the fp32 scales
        plain = N.quantize_nf4(w, block).absmax.reshape(-1)
        step = qt.absmax_scale.repeat_interleave(N.DQ_BLOCK)[: plain.numel()]
        assert ((scales.reshape(-1) - plain).abs() <= step / 2 + _slack(step * 254, plain, qt.absmax_mean)).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=3), st.integers(0, 20), st.integers(0, 2**16))
def test_pack_unpack_round_trip_is_exact(lead, half_k, seed):
    shape = (*lead, 2 * half_k)
    q = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = F.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, half_k)
    assert torch.equal(F.unpack_int4(packed), q)
    if q.numel():
        assert torch.equal(packed & 0x0F, q[..., 0::2])  # low nibble first


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=2), st.integers(0, 10), st.integers(16, 255))
def test_pack_refuses_odd_columns_and_values_past_15(lead, half_k, big):
    with pytest.raises(SlimkitError, match="even number of columns"):
        F.pack_int4(torch.zeros(*lead, 2 * half_k + 1, dtype=torch.uint8))
    q = torch.zeros(*lead, 2 * half_k + 2, dtype=torch.uint8)
    q.view(-1)[-1] = big
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        F.pack_int4(q)


@settings(max_examples=100, deadline=None)
@given(weights(blocks=(32,), max_rows=2, dtypes=(torch.float32,), magnitude=6e4), st.sampled_from([4, 8]),
       st.booleans(), st.booleans())
def test_weight_only_module_matches_the_format(wb, bits, per_channel, symmetric):
    """The module stores group scales in fp16: its weights are the format's, with the scale rounded."""
    w, block = wb
    group = None if per_channel else block
    layer = WeightOnlyLinear(w.shape[1], w.shape[0], False, bits, group, symmetric)
    layer.set_weight(w)
    qt = F.quantize_int(w, bits, group, symmetric)
    lo, hi = F.qrange(bits)
    d = layer.dequantize()
    step = qt.scale.repeat_interleave(qt.group_size, dim=1)
    stored = layer.scale.float().repeat_interleave(qt.group_size, dim=1)
    offset_err = 0 if qt.offset is None else (layer.offset.float() - qt.offset).abs().repeat_interleave(qt.group_size, dim=1)
    bound = step / 2 + (hi - lo) * (stored - step).abs() + offset_err + _slack(step * (hi - lo), w)
    assert torch.isfinite(d).all() and ((d - w).abs() <= bound).all()


def test_weight_only_group_scales_past_fp16_are_refused():
    w = torch.full((2, 64), 1e6)
    layer = WeightOnlyLinear(64, 2, False, 4, 32)
    with pytest.raises(SlimkitError, match="overflow float16.*group_size=None"):
        layer.set_weight(w)
    per_channel = WeightOnlyLinear(64, 2, False, 4, None)  # fp32 scales hold it
    per_channel.set_weight(w)
    assert torch.allclose(per_channel.dequantize(), w)


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_largest_float_round_trips(symmetric):
    """127 * (3.4e38 / 127) rounds to Inf in float32: the scale steps down one ulp instead."""
    w = torch.zeros(2, 32)
    w[0] = FMAX
    w[1, 0] = -FMAX
    for bits in (4, 8):
        d = F.quantize_int(w, bits, 32, symmetric).dequantize()
        assert torch.isfinite(d).all() and (d - w).abs().max() <= FMAX * 2**-20
    w[1, 1] = FMAX  # a range of 2 * 3.4e38
    if symmetric:
        assert torch.isfinite(F.quantize_int(w, 8, 32, True).dequantize()).all()
    else:
        with pytest.raises(SlimkitError, match="symmetric=true"):
            F.quantize_int(w, 8, 32, False)
