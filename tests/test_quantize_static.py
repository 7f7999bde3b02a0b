"""int8-static on tiny random models: quality per observer, the module, round trip, errors."""

import json

import pytest
import torch
from torch import nn

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.io.artifacts import save
from slimkit.quantization import formats as F
from slimkit.quantization.modules import StaticInt8Linear, int8_matmul
from slimkit.quantization.observers import qparams

CAL = {"calibration_samples": 2, "seq_len": 64}  # small calibration: the tiny models need little


def _out(lm, ids=None):
    ids = torch.arange(5, 45)[None] if ids is None else ids
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


@pytest.mark.parametrize("observer", ["minmax", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_observers_keep_outputs_close(tiny, arch, observer):
    lm = slimkit.load(tiny(arch))
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    q = slimkit.quantize(lm, "int8-static", observer=observer, **CAL)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # caller untouched
    assert any(isinstance(m, StaticInt8Linear) for m in q.model.modules())
    assert F.sqnr_db(_out(lm), _out(q)) > 20
    assert q.manifest["recipe"][-1] == {**q.manifest["recipe"][-1], "method": "int8-static", "observer": observer}


@pytest.mark.parametrize("options", [{"symmetric_activations": False}, {"weight_granularity": "per_tensor"}, {"smooth_alpha": 0.5}])
def test_variants_keep_outputs_close(tiny, options):
    lm = slimkit.load(tiny("llama"))
    q = slimkit.quantize(lm, "int8-static", **options, **CAL)
    assert F.sqnr_db(_out(lm), _out(q)) > 18


def test_static_per_tensor_loses_more_than_dynamic_per_token(tiny):
    """One fixed scale must cover every token; a per-token scale fits each (the measured LLM gap)."""
    lm = slimkit.load(tiny("llama"))
    static = slimkit.quantize(lm, "int8-static", observer="minmax", targets=["mlp.*"], **CAL)
    dynamic = slimkit.quantize(lm, "int8-dynamic", targets=["mlp.*"])
    ids = torch.arange(5, 69)[None]
    ref = _out(lm, ids)
    assert F.sqnr_db(ref, _out(dynamic, ids)) > F.sqnr_db(ref, _out(static, ids))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("options", [{"observer": "entropy"}, {"symmetric_activations": False, "weight_granularity": "per_tensor", "smooth_alpha": 0.5}])
def test_save_and_reload_is_exact(tiny, tmp_path, arch, options):
    q = slimkit.quantize(tiny(arch), "int8-static", **options, **CAL)
    out = save(q, tmp_path / "q")
    back = slimkit.load(str(out))
    assert torch.equal(_out(q), _out(back))
    modules = json.loads((out / "slimkit.json").read_text())["modules"]
    assert {spec["format"] for spec in modules.values()} == {"int8-static"}
    some = next(n for n, m in back.model.named_modules() if isinstance(m, StaticInt8Linear))
    assert torch.equal(q.model.get_submodule(some).input_scale, back.model.get_submodule(some).input_scale)


def test_module_matches_its_dequantized_meaning():
    """The int32 path computes exactly what the stored integers and scales mean."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64) + 0.5  # off-centre: the zero point matters
    for symmetric in (True, False):
        m = StaticInt8Linear(64, 48, True, "per_channel", symmetric)
        m.set_weight(layer.weight.detach())
        m.bias.data.copy_(layer.bias.detach())
        m.set_input_qparams(*qparams(x.min(), x.max(), symmetric))
        s, z = m.input_scale, m.input_zero_point
        lo, hi = (-127, 127) if symmetric else (-128, 127)
        x_deq = (torch.round(x / s) + z).clamp(lo, hi).sub(z) * s
        expected = x_deq @ (m.weight_q.float() * m.weight_scale[:, None]).T + layer.bias.detach()
        assert torch.allclose(m(x), expected, atol=1e-4)
        assert F.sqnr_db(layer(x).detach(), m(x)) > 30


@pytest.mark.parametrize("m,k,n", [(0, 64, 32), (1, 64, 32), (5, 13, 7), (33, 64, 48)])
def test_int8_matmul_is_exact_for_any_shape(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).t()
    assert torch.equal(int8_matmul(a, b), a.int() @ b.int())


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"observer": "kl"}, "observer='kl' is unknown: use one of minmax, percentile, entropy, mse"),
        ({"percentile": 0.0}, "percentile=0.0 is out of range: use a value in (0, 100]"),
        ({"percentile": 100.5}, "percentile=100.5 is out of range"),
        ({"calibration_samples": 0}, "calibration needs calibration_samples >= 1"),
        ({"batch_size": 0}, "batch_size >= 1"),
        ({"weight_granularity": "per_group"}, "weight_granularity='per_group' is unknown: use one of per_channel, per_tensor"),
        ({"smooth_alpha": 1.0}, "smooth_alpha=1.0 is out of range"),
        ({"targets": ["nope*"]}, "none matches targets ['nope*']"),
    ],
)
def test_bad_options_name_the_fix(tiny, options, fragment):
    with pytest.raises(SlimkitError) as info:
        slimkit.quantize(tiny("llama"), "int8-static", **options)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_lm_head_is_left_in_float(tiny):
    q = slimkit.quantize(tiny("gpt2"), "int8-static", **CAL)
    assert isinstance(q.model.lm_head, nn.Linear)
    assert type(q.model.transformer.h[0].attn.c_attn) is StaticInt8Linear
