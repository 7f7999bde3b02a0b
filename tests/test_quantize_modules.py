"""Quantized modules on their own: outputs close to the float layer, kernels equal to dequantize."""

import pytest
import torch
from torch import nn

from slimkit.quantization import formats as F
from slimkit.quantization.embedding import Int8Embedding, TiedInt8Head
from slimkit.quantization.modules import Int8DynamicLinear, NF4Linear, WeightOnlyLinear


def _linear(n=96, k=128, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    return layer


def _x(k=128, m=5):
    return torch.randn(2, m, k, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "make,min_db",
    [
        (lambda l: Int8DynamicLinear.from_float(l), 30),
        (lambda l: WeightOnlyLinear.from_float(l, bits=8), 30),
        (lambda l: WeightOnlyLinear.from_float(l, bits=8, group_size=64, symmetric=False), 30),
        (lambda l: WeightOnlyLinear.from_float(l, bits=4, group_size=32), 15),
        (lambda l: WeightOnlyLinear.from_float(l, bits=4, group_size=64, symmetric=False), 15),
        (lambda l: WeightOnlyLinear.from_float(l, bits=4), 11),
        (lambda l: NF4Linear.from_float(l, block_size=64), 15),
        (lambda l: NF4Linear.from_float(l, block_size=32, double_quant=True), 15),
    ],
)
def test_outputs_close_to_float(make, min_db):
    layer = _linear()
    q = make(layer)
    x = _x()
    with torch.no_grad():
        ref, out = layer(x), q(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert F.sqnr_db(ref, out) > min_db


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (4, 32, True), (4, 64, False), (4, 128, True)])
def test_kernel_matches_dequantized_reference(bits, group, sym):
    """The fast kernel computes what the stored format means (up to bf16 rounding)."""
    q = WeightOnlyLinear.from_float(_linear(n=64, k=256, bias=False), bits=bits, group_size=group, symmetric=sym)
    assert q.kernel() == ("int8pack" if bits == 8 else "int4pack")
    x = _x(k=256)[0]
    expected = x.bfloat16().float() @ q.dequantize().T
    assert F.sqnr_db(expected, q(x)) > 35


def test_buffers_are_small_and_counted():
    q = WeightOnlyLinear.from_float(_linear(n=64, k=256), bits=4, group_size=64, symmetric=False)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (64, 128)
    assert q.qweight._slimkit_weight and not hasattr(q, "weight")
    assert set(q.state_dict()) == {"bias", "qweight", "scale", "offset"}
    nf = NF4Linear.from_float(_linear(n=64, k=256), double_quant=True)
    assert nf.codes.shape == (64, 128) and nf.absmax_q.dtype == torch.int8


def test_state_dict_round_trip_is_exact():
    layer = _linear()
    for make in (
        lambda: WeightOnlyLinear.from_float(layer, bits=4, group_size=32, symmetric=False),
        lambda: Int8DynamicLinear.from_float(layer),
        lambda: NF4Linear.from_float(layer, double_quant=True),
    ):
        q = make()
        x = _x()
        q(x)  # builds any kernel cache before the reload
        fresh = type(q).from_spec(q.spec())
        fresh.load_state_dict(q.state_dict(), strict=True)
        assert torch.equal(fresh(x), q(x))


def test_dynamic_per_token_scales_isolate_an_outlier_token():
    layer = _linear(bias=False)
    q = Int8DynamicLinear.from_float(layer)
    x = _x()[0]
    x[0] *= 1000  # one huge token must not ruin the others
    with torch.no_grad():
        ref, out = layer(x), q(x)
    assert F.sqnr_db(ref[1:], out[1:]) > 30


def test_int8_embedding_and_tied_head():
    emb = nn.Embedding(100, 64)
    q = Int8Embedding.from_float(emb)
    ids = torch.tensor([[1, 5, 99]])
    assert F.sqnr_db(emb(ids), q(ids)) > 35
    head = TiedInt8Head(q, "embed")
    x = torch.randn(3, 64)
    assert F.sqnr_db(x @ emb.weight.T, head(x)) > 30
    assert list(head.state_dict()) == []  # the tie stores nothing twice


def test_integer_zero_point_module_round_trip_and_kernel():
    q = WeightOnlyLinear.from_float(_linear(n=64, k=256), bits=4, group_size=32, symmetric=False, zero_point="integer")
    assert q.spec()["zero_point"] == "integer" and q.offset is None and q.zero_point.dtype == torch.uint8
    assert set(q.state_dict()) == {"bias", "qweight", "scale", "zero_point"}
    assert q.kernel() == "int4pack"
    x = _x(k=256)[0]
    expected = x.bfloat16().float() @ q.dequantize().T + q.bias
    assert F.sqnr_db(expected, q(x)) > 35
    fresh = WeightOnlyLinear.from_spec(q.spec())
    fresh.load_state_dict(q.state_dict(), strict=True)
    assert torch.equal(fresh(x), q(x)) and torch.equal(fresh.dequantize(), q.dequantize())


@pytest.mark.parametrize("bits,group,sym,zero_point", [(8, None, True, "float"), (4, 32, False, "float"), (4, 32, False, "integer"), (4, 64, True, "float")])
def test_weight_only_rows_are_the_dequantized_rows(bits, group, sym, zero_point):
    """What a TiedEmbedding lookup returns: only the asked rows, dequantized as the whole weight would be."""
    torch.manual_seed(0)
    q = WeightOnlyLinear.from_float(torch.nn.Linear(64, 40, bias=False), bits=bits, group_size=group, symmetric=sym, zero_point=zero_point)
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.equal(q.rows(ids), q.dequantize()[ids])


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_searched_scales_are_held_exactly_by_the_module_and_its_kernel(bits, group):
    """Searched scales (some negative, the -8 level used) change no storage: the module holds the
    codes and scales quantize_int chose, and its CPU kernel computes their dequantized weight."""
    layer = _linear(n=64, k=256, bias=False)
    c = torch.rand(256, generator=torch.Generator().manual_seed(2)) * 5
    qt = F.quantize_int(layer.weight.detach(), bits, group, True, scale_search=True, importance=c)
    q = WeightOnlyLinear(256, 64, False, bits, group, True)
    q.set_weight(layer.weight.detach(), scale_search=True, importance=c)
    assert torch.equal(q.q_values(), qt.q) and torch.equal(q.scale.float(), qt.scale)
    assert torch.equal(q.dequantize(), qt.dequantize())
    assert (q.scale < 0).any() and (bits == 8 or int(q.q_values().min()) == -8)
    x = _x(k=256)[0]
    assert F.sqnr_db(x.bfloat16().float() @ q.dequantize().T, q(x)) > 35
    fresh = WeightOnlyLinear.from_spec(q.spec())
    fresh.load_state_dict(q.state_dict(), strict=True)
    assert torch.equal(fresh(x), q(x))
