"""Tensor-level tests of the number formats: error bounds, SQNR, packing, edges."""

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.quantization import formats as F
from slimkit.quantization import nf4 as N


def _w(n=96, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


@pytest.mark.parametrize(
    "bits,group,sym,min_db",
    [(8, None, True, 38), (8, 64, False, 40), (4, None, True, 13), (4, 128, True, 16), (4, 32, True, 18), (4, 32, False, 19)],
)
def test_int_sqnr(bits, group, sym, min_db):
    w = _w()
    qt = F.quantize_int(w, bits, group, sym)
    lo, hi = F.qrange(bits)
    assert qt.q.dtype == torch.int8 and qt.q.shape == w.shape
    assert int(qt.q.min()) >= lo and int(qt.q.max()) <= hi
    assert qt.scale.shape == (96, 256 // (group or 256))
    assert F.sqnr_db(w, qt.dequantize()) > min_db


def test_smaller_groups_are_more_accurate():
    w = _w()
    dbs = [F.sqnr_db(w, F.quantize_int(w, 4, g).dequantize()) for g in (None, 128, 64, 32)]
    assert dbs == sorted(dbs)


def test_int_error_bounded_by_half_a_step():
    w = _w()
    qt = F.quantize_int(w, 8, 64, symmetric=False)
    step = qt.scale.repeat_interleave(64, dim=1)
    assert ((w - qt.dequantize()).abs() <= step / 2 + 1e-7).all()


def test_zeros_and_huge_values():
    w = torch.zeros(4, 64)
    w[1] = 1e30
    w[2, 3] = -3e38
    for sym in (True, False):
        qt = F.quantize_int(w, 8, 32, sym)
        d = qt.dequantize()
        assert torch.isfinite(d).all()
        assert torch.equal(d[0], torch.zeros(64))  # an all-zero row stays exactly zero
        assert d[1, 0] == pytest.approx(1e30, rel=1e-2)
        assert d[2, 3] == pytest.approx(-3e38, rel=1e-2)
    nf = N.quantize_nf4(w, 32).dequantize()
    assert torch.isfinite(nf).all() and torch.equal(nf[0], torch.zeros(64))


def test_pack_unpack_round_trip_is_exact():
    q = torch.randint(0, 16, (7, 40), dtype=torch.uint8)
    packed = F.pack_int4(q)
    assert packed.shape == (7, 20) and packed.dtype == torch.uint8
    assert torch.equal(F.unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)  # low nibble first


def test_pack_refuses_out_of_range():
    with pytest.raises(SlimkitError, match="even number"):
        F.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        F.pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))


def test_nf4_code_book():
    code = N.nf4_code()
    assert code.shape == (16,) and code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1
    assert (code.diff() > 0).all()
    assert code[7] == 0  # 7 negative levels, then 0, then 8 positive


def test_nf4_beats_int4_on_normal_weights():
    w = _w(k=512)
    nf4 = F.sqnr_db(w, N.quantize_nf4(w, 64).dequantize())
    int4 = F.sqnr_db(w, F.quantize_int(w, 4, 64, True).dequantize())
    assert nf4 > 19 and nf4 > int4


def test_nf4_double_quant_is_close_and_smaller():
    w = _w(n=256, k=512)
    plain = N.quantize_nf4(w, 64)
    dq = N.quantize_nf4(w, 64, double_quant=True)
    assert dq.absmax is None and dq.absmax_q.dtype == torch.int8
    assert torch.equal(plain.codes, dq.codes)
    rel = ((dq.scales() - plain.scales()).abs() / plain.scales()).max()
    assert rel < 0.02
    assert F.sqnr_db(w, dq.dequantize()) > F.sqnr_db(w, plain.dequantize()) - 0.3
    bytes_plain = plain.absmax.numel() * 4
    bytes_dq = dq.absmax_q.numel() + dq.absmax_scale.numel() * 4 + 4
    assert bytes_dq < bytes_plain / 3


def test_scales_double_quant_round_trip():
    s = torch.rand(1000) + 0.5
    q, s2, m = N.quantize_scales(s)
    assert q.shape == s.shape and s2.shape == (4,)
    assert (N.dequantize_scales(q, s2, m) - s).abs().max() < 0.01


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: F.quantize_int(_w(), 3), "bits=3 is not supported"),
        (lambda: F.quantize_int(_w(), 4, 48), "group_size=48 is not supported"),
        (lambda: F.quantize_int(_w(k=96), 4, 64), "does not divide the input dimension 96"),
        (lambda: F.quantize_int(torch.zeros(3), 8), "2-D weight"),
        (lambda: N.quantize_nf4(_w(k=96), 64), "does not divide"),
    ],
)
def test_bad_arguments_name_the_fix(call, fragment):
    with pytest.raises(SlimkitError, match=fragment):
        call()


def test_integer_zero_point_reproduces_a_weight_on_its_grid():
    u = torch.arange(32) % 16  # every level 0..15 used
    w = ((u - 5) * 0.125).float()[None, :]  # (1, 32): w = (u - 5) * s, s a power of two
    qt = F.quantize_int(w, 4, 32, symmetric=False, zero_point="integer")
    assert qt.offset is None and qt.zero_point.dtype == torch.uint8
    assert int(qt.zero_point) == 5 and float(qt.scale) == 0.125
    assert torch.equal(qt.q.long() + 8, u[None])  # stored signed: u = q - lo
    assert torch.equal(qt.dequantize(), w)


def test_integer_zero_point_grid_holds_zero_and_stays_in_range():
    w = _w()
    w[0, :32] = torch.linspace(1.0, 2.0, 32)  # a group that does not straddle 0
    w[1, :32] = -torch.linspace(1.0, 2.0, 32)
    qt = F.quantize_int(w, 4, 32, symmetric=False, zero_point="integer")
    assert int(qt.zero_point[0, 0]) == 0 and int(qt.zero_point[1, 0]) == 15
    assert int(qt.zero_point.max()) <= 15 and int(qt.q.min()) >= -8 and int(qt.q.max()) <= 7
    deq = qt.dequantize()
    lo = F.qrange(4)[0]
    explicit = (qt.q.float() - lo - qt.zero_point.float().repeat_interleave(32, 1)) * qt.scale.repeat_interleave(32, 1)
    assert torch.equal(deq, explicit)
    assert F.sqnr_db(w[:2, :32], deq[:2, :32]) > 25
    assert torch.equal(F.quantize_int(torch.zeros(2, 64), 4, 32, False, "integer").dequantize(), torch.zeros(2, 64))


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64)])
def test_integer_zero_point_is_as_accurate_as_the_float_offset(bits, group):
    w = _w()
    integer = F.sqnr_db(w, F.quantize_int(w, bits, group, False, "integer").dequantize())
    assert integer > F.sqnr_db(w, F.quantize_int(w, bits, group, False).dequantize()) - 0.5
    assert integer > F.sqnr_db(w, F.quantize_int(w, bits, group, True).dequantize())


def test_integer_zero_point_options_name_the_fix():
    with pytest.raises(SlimkitError, match="use 'float'.*or 'integer'"):
        F.quantize_int(_w(), 4, 32, False, "int")
    with pytest.raises(SlimkitError, match="set symmetric=false"):
        F.quantize_int(_w(), 4, 32, True, "integer")


@pytest.mark.parametrize("sym,zp,group", [(True, "float", None), (False, "float", 32), (False, "integer", 32), (True, "float", 64)])
def test_row_chunks_quantize_exactly_as_the_whole(monkeypatch, sym, zp, group):
    w = torch.randn(37, 128, generator=torch.Generator().manual_seed(3))
    whole = F.quantize_int(w, 8 if group is None else 4, group, sym, zp)
    monkeypatch.setattr(F, "ROWS_PER_CHUNK", 5)  # 37 rows: 7 full chunks and a short one
    chunked = F.quantize_int(w, 8 if group is None else 4, group, sym, zp)
    for field in ("q", "scale", "offset", "zero_point"):
        a, b = getattr(whole, field), getattr(chunked, field)
        assert (a is None and b is None) or torch.equal(a, b), field


def _importance(k=256, seed=1):
    return torch.rand(k, generator=torch.Generator().manual_seed(seed)).pow(4) * 10  # a few columns matter much more


def _weighted_error(w, deq, c):
    return float(((w - deq).pow(2) * c).sum())


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 32), (4, None)])
def test_scale_search_lowers_the_weighted_error_and_holds_its_codes(bits, group):
    w, c = _w(), _importance()
    absmax = F.quantize_int(w, bits, group, True)
    found = F.quantize_int(w, bits, group, True, scale_search=True, importance=c)
    lo, hi = F.search_levels(bits)
    assert int(found.q.min()) >= lo and int(found.q.max()) <= hi
    if bits == 4:  # the level absmax / 7 never reaches
        assert int(absmax.q.min()) == -7 and int(found.q.min()) == -8
    else:
        assert lo == -127
    assert (found.scale < 0).any()  # the largest weight of a group may sit at either end
    stored = F.scale_dtype(group)
    assert torch.equal(found.scale.to(stored).float(), found.scale)  # the scales are already the stored numbers
    ratio = _weighted_error(w, found.dequantize(), c) / _weighted_error(w, absmax.dequantize(), c)
    assert ratio < {4: 0.85, 8: 0.95}[bits]
    plain = F.quantize_int(w, bits, group, True, scale_search=True)  # unweighted: the plain squared error
    assert float((w - plain.dequantize()).pow(2).sum()) < float((w - absmax.dequantize()).pow(2).sum())


def test_scale_search_is_never_worse_than_absmax_and_keeps_zeros():
    w = _w(n=64, k=64)
    w[0] = 0
    w[1, :32] = torch.linspace(-0.07, 0.07, 32)  # already on a symmetric grid of 15 levels
    found = F.quantize_int(w, 4, 32, True, scale_search=True)
    absmax = F.quantize_int(w, 4, 32, True)
    err = lambda qt: (w - qt.dequantize()).pow(2).reshape(64, 2, 32).sum(-1)  # noqa: E731
    assert (err(found) <= err(absmax) + 1e-12).all()  # group by group
    assert torch.equal(found.dequantize()[0], torch.zeros(64)) and torch.isfinite(found.scale).all()


def test_scale_search_needs_the_symmetric_grid():
    with pytest.raises(SlimkitError, match="set symmetric=true"):
        F.quantize_int(_w(), 4, 32, False, scale_search=True)


def test_scale_search_row_chunks_quantize_exactly_as_the_whole(monkeypatch):
    w, c = torch.randn(37, 128, generator=torch.Generator().manual_seed(3)), _importance(128)
    whole = F.quantize_int(w, 4, 32, True, scale_search=True, importance=c)
    monkeypatch.setattr(F, "ROWS_PER_CHUNK", 5)
    chunked = F.quantize_int(w, 4, 32, True, scale_search=True, importance=c)
    assert torch.equal(whole.q, chunked.q) and torch.equal(whole.scale, chunked.scale)
