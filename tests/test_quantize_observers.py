"""Calibration observers on tensors alone: ranges, clipping, streaming, quantization error."""

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.quantization.observers import (
    OBSERVERS,
    Histogram,
    Observer,
    entropy_threshold,
    fake_quantize,
    mse_threshold,
    percentile_threshold,
    qparams,
    quantize_weight,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _laplace(n=100_000, seed=0):
    """Laplace(0, 1): exponential tails, heavier than a Gaussian's, like many activations."""
    u = torch.rand(n, generator=_gen(seed)) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def _outliers(n=100_000, seed=0):
    """A Laplace bulk with 10 injected outliers at +-60."""
    x = _laplace(n, seed)
    x[torch.randperm(n, generator=_gen(seed + 1))[:10]] = torch.tensor([60.0, -60.0]).repeat(5)
    return x


def _mse(x, observer):
    scale, zero = observer.qparams()
    return float((fake_quantize(x, scale, zero, observer.symmetric) - x).pow(2).mean())


def _observe(method, x, **kw):
    o = Observer(method, **kw)
    o.update(x)
    return o


def test_minmax_is_exact_per_tensor_and_per_channel():
    x = torch.randn(7, 33, 16, generator=_gen())
    lo, hi = _observe("minmax", x, symmetric=False).range()
    assert float(lo) == float(x.min()) and float(hi) == float(x.max())
    lo, hi = _observe("minmax", x, per_channel=True).range()
    flat = x.reshape(-1, 16)
    assert torch.equal(lo, flat.amin(0).clamp(max=0)) and torch.equal(hi, flat.amax(0).clamp(min=0))
    scale, zero = _observe("minmax", x).qparams()
    assert float(scale) == pytest.approx(float(x.abs().max()) / 127) and int(zero) == 0


def test_percentile_ignores_a_few_outliers():
    x = _outliers()
    t = float(_observe("percentile", x, percentile=99.9).range()[1])
    true = float(torch.quantile(x.abs(), 0.999))
    assert abs(t - true) < 0.05 * true  # histogram interpolation, within 5%
    assert t < 15  # the outliers at 60 do not set the range
    assert float(_observe("percentile", x, percentile=100).range()[1]) == 60.0  # 100: the exact max


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_searched_thresholds_clip_heavy_tails_and_lower_the_error(method):
    x = _laplace()
    observer = _observe(method, x)
    assert float(observer.range()[1]) < 0.9 * float(x.abs().max())
    assert _mse(x, observer) < 0.9 * _mse(x, _observe("minmax", x))


def test_mse_threshold_keeps_the_max_when_clipping_costs_more():
    uniform = torch.rand(50_000, generator=_gen()) * 2 - 1  # nothing to clip
    assert float(_observe("mse", uniform).range()[1]) > 0.97 * float(uniform.abs().max())
    spike = torch.randn(50_000, generator=_gen())
    spike[7] = 1000.0  # clipping it costs 1000^2 / n; its step only rounds the bulk to 0 (error ~ variance 1)
    observer = _observe("mse", spike)
    assert float(observer.range()[1]) > 900
    assert _mse(spike, observer) <= 1.01 * _mse(spike, _observe("minmax", spike))


@pytest.mark.parametrize("method", OBSERVERS)
def test_streaming_in_chunks_equals_one_shot(method):
    """Chunks that grow the range (small values first) re-bin exactly."""
    x = torch.cat([torch.randn(30_000, generator=_gen()) * 0.01, _outliers(30_000, seed=3)])
    one = _observe(method, x, symmetric=False)
    chunked = Observer(method, symmetric=False)
    for chunk in x.split(7_000):
        chunked.update(chunk)
    if one.hist is not None:
        assert one.hist.limit == chunked.hist.limit == 64.0
        assert torch.equal(one.hist.pos, chunked.hist.pos) and torch.equal(one.hist.neg, chunked.hist.neg)
    assert all(torch.equal(a, b) for a, b in zip(one.range(), chunked.range()))


def test_histogram_counts_every_value_once():
    h = Histogram(256)
    x = torch.tensor([0.0, 0.5, -0.5, 3.0, -7.9, 8.0])
    h.update(x[:3])
    h.update(x[3:])
    assert h.limit == 16.0  # smallest power of two above 8.0
    assert int(h.pos.sum()) == 4 and int(h.neg.sum()) == 2
    assert int(h.pos[int(8.0 / h.width)]) == 1 and int(h.neg[int(7.9 / h.width)]) == 1


def test_asymmetric_grid_fits_a_one_sided_range():
    x = torch.rand(20_000, generator=_gen()) * 6  # post-ReLU-like: all >= 0
    sym, asym = _observe("minmax", x), _observe("minmax", x, symmetric=False)
    scale, zero = asym.qparams()
    assert int(zero) == -128 and float(scale) == pytest.approx(float(x.max()) / 255)
    assert _mse(x, asym) < 0.3 * _mse(x, sym)
    lo, hi = torch.tensor(-1.0), torch.tensor(3.0)
    scale, zero = qparams(lo, hi, symmetric=False)
    assert float(fake_quantize(torch.zeros(1), scale, zero, False)) == 0.0  # zero is exact


def test_pure_thresholds_on_a_hand_made_histogram():
    hist = torch.zeros(2048, dtype=torch.int64)
    hist[:400] = (10_000 * torch.exp(-torch.arange(400) / 40.0)).long()  # a decaying bulk
    hist[1500] = 1  # one far outlier
    total = int(hist.sum())
    assert percentile_threshold(hist, 1.0, 100) == 1501.0
    half = int((hist.cumsum(0) < total / 2).sum())  # the bin holding the median
    assert half <= percentile_threshold(hist, 1.0, 50) <= half + 1
    assert 128 <= entropy_threshold(hist, 1.0) < 400
    assert 200 < mse_threshold(hist, 1.0) < 1501  # clipping the lone outlier costs (1501 - t)^2
    assert entropy_threshold(torch.ones(100, dtype=torch.int64), 0.5) == 50.0  # fewer bins than levels


def test_weight_granularity():
    w = torch.randn(32, 64, generator=_gen())
    w[0] *= 20  # one loud output channel
    q, s = quantize_weight(w, per_channel=True)
    qt, st = quantize_weight(w, per_channel=False)
    assert s.shape == (32,) and st.shape == (1,) and q.dtype == qt.dtype == torch.int8
    err = lambda q, s: float((q.float() * s[:, None] - w)[1:].pow(2).mean())
    assert err(q, s) < 0.05 * err(qt, st)  # per tensor: the loud row sets every row's step


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"method": "kl"}, "observer='kl' is unknown: use one of minmax, percentile, entropy, mse"),
        ({"method": "percentile", "percentile": 0}, "percentile=0 is out of range: use a value in (0, 100]"),
        ({"method": "percentile", "percentile": 101}, "percentile=101 is out of range"),
        ({"method": "entropy", "per_channel": True}, "per-channel statistics are kept by the minmax observer only"),
        ({"method": "mse", "bins": 1000}, "bins=1000 must be a power of two"),
    ],
)
def test_bad_observer_settings(kwargs, fragment):
    with pytest.raises(SlimkitError) as info:
        Observer(**kwargs)
    assert fragment in str(info.value)


def test_an_observer_that_saw_nothing_says_so():
    with pytest.raises(SlimkitError, match="saw no activations"):
        Observer("mse").range()
