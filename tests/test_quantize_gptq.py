"""GPTQ: the math on tensors (lower output error than rounding), and the method on tiny models."""

import pytest
import torch

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.io.artifacts import save
from slimkit.quantization import formats as F
from slimkit.quantization.gptq_math import gptq_quantize, layer_loss
from slimkit.quantization.modules import WeightOnlyLinear


def _problem(n=64, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(1024, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.1 * torch.randn(1024, k, generator=g)
    x[:, 3] *= 20  # an outlier input channel
    return w, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 64, True), (4, None, True), (8, None, True)])
def test_gptq_beats_round_to_nearest_on_output_error(bits, group, sym):
    w, h = _problem()
    g = gptq_quantize(w, h, bits, group, sym)
    r = F.quantize_int(w, bits, group, sym)
    lo, hi = F.qrange(bits)
    assert g.q.dtype == torch.int8 and int(g.q.min()) >= lo and int(g.q.max()) <= hi
    assert g.scale.shape == r.scale.shape
    assert layer_loss(w, g.dequantize(), h) < 0.5 * layer_loss(w, r.dequantize(), h)


def test_dead_input_channels_are_zeroed():
    w, h = _problem()
    h[7, :] = 0
    h[:, 7] = 0
    g = gptq_quantize(w, h, 4, 32, False)
    assert torch.isfinite(g.dequantize()).all()


def test_gptq_on_tiny_llama_is_closer_than_rtn(tiny, tmp_path):
    lm = slimkit.load(tiny("llama"))
    ids = torch.arange(5, 69)[None]
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
        g = slimkit.quantize(lm, "gptq", group_size=32, symmetric=True, calibration_samples=4, seq_len=64, embeddings=False)
        r = slimkit.quantize(lm, "int4-wo", group_size=32, symmetric=True, embeddings=False)
        out_g, out_r = g.model(input_ids=ids).logits, r.model(input_ids=ids).logits
    assert isinstance(g.model.model.layers[0].mlp.up_proj, WeightOnlyLinear)
    assert F.sqnr_db(ref, out_g) > F.sqnr_db(ref, out_r) - 0.5  # random weights: at least as good
    back = slimkit.load(str(save(g, tmp_path / "g")))
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, out_g)
    assert g.manifest["recipe"][-1]["method"] == "gptq"


def test_gptq_on_gpt2_conv1d(tiny):
    q = slimkit.quantize(tiny("gpt2"), "gptq", group_size=32, calibration_samples=2, seq_len=32)
    assert isinstance(q.model.transformer.h[0].attn.c_attn, WeightOnlyLinear)


@pytest.mark.parametrize(
    "options,fragment",
    [({"bits": 3}, "bits=3 is not supported by gptq"), ({"damp": 2.0}, "damp=2.0 is out of range"), ({"group_size": 128}, "does not divide the input dimension 64")],
)
def test_bad_gptq_options(tiny, options, fragment):
    with pytest.raises(SlimkitError, match=fragment):
        slimkit.quantize(tiny("llama"), "gptq", calibration_samples=1, seq_len=16, **options)


def test_calibrates_on_the_users_file(tiny, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + "the quick brown fox jumps over the lazy dog " * 30 for i in range(40)))
    q = slimkit.quantize(tiny("llama"), "gptq", data=str(text), group_size=32, calibration_samples=2, seq_len=32)
    assert isinstance(q.model.model.layers[1].self_attn.o_proj, WeightOnlyLinear)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(SlimkitError, match="shorter than one sequence of 32 tokens"):
        slimkit.quantize(tiny("llama"), "gptq", data=str(empty), group_size=32, calibration_samples=2, seq_len=32)


def test_gptq_with_integer_zero_points():
    w, h = _problem()
    g = gptq_quantize(w, h, 4, 32, False, zero_point="integer")
    r = F.quantize_int(w, 4, 32, False, "integer")
    assert g.offset is None and g.zero_point.shape == g.scale.shape and int(g.zero_point.max()) <= 15
    assert layer_loss(w, g.dequantize(), h) < 0.5 * layer_loss(w, r.dequantize(), h)
    module = WeightOnlyLinear(128, 64, False, 4, 32, False, zero_point="integer")
    module.set_quantized(g)
    stored = F.dequantize_int(g.q, g.scale.half().float(), None, 32, 4, zero_point=g.zero_point)  # scales kept in fp16
    assert torch.equal(module.dequantize(), stored)


@pytest.mark.parametrize("group", [32, 64])
def test_scale_search_lowers_gptq_output_error_on_the_full_grid(group):
    w, h = _problem()
    plain = gptq_quantize(w, h, 4, group, True)
    found = gptq_quantize(w, h, 4, group, True, scale_search=True)
    assert int(found.q.min()) == -8 and int(found.q.max()) <= 7
    assert torch.equal(found.scale.half().float(), found.scale)  # the codes were rounded with the stored scales
    assert layer_loss(w, found.dequantize(), h) < 0.85 * layer_loss(w, plain.dequantize(), h)
    with pytest.raises(SlimkitError, match="set symmetric=true"):
        gptq_quantize(w, h, 4, group, False, scale_search=True)
