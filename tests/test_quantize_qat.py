"""QAT: the straight-through fake quantization on tensors, and the method on tiny models."""

import pytest
import torch
from conftest import invoke_cli

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.io.artifacts import save
from slimkit.measure.quality import EvalConfig, evaluate
from slimkit.quantization import formats as F
from slimkit.quantization.embedding import Int8Embedding
from slimkit.quantization.fake_quant import FakeQuantLinear, fake_quantize_tokens, fake_quantize_weight, straight_through
from slimkit.quantization.modules import Int8DynamicLinear, WeightOnlyLinear
from slimkit.quantization.qat import QATConfig, convert, prepare

FAST = {"seq_len": 64, "batch_size": 4, "calibration_samples": 32}
IDS = torch.arange(5, 69)[None]


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(lm, ids=IDS):
    with torch.no_grad():
        out = lm.model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


# --------------------------------------------------------------------------- tensors


def test_straight_through_takes_the_rounded_value_and_passes_the_gradient():
    x = torch.randn(5, 7, requires_grad=True)
    y = straight_through(x, torch.round(x * 4) / 4)
    assert torch.equal(y, torch.round(x.detach() * 4) / 4)
    upstream = torch.randn(5, 7)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)  # d round / dx := 1, not 0
    plain = torch.randn(5, 7, requires_grad=True)
    (torch.round(plain * 4) / 4).backward(upstream)
    assert torch.count_nonzero(plain.grad) == 0  # what the estimator replaces


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (8, None, True), (8, 32, False), (4, None, True)])
def test_fake_weight_is_exactly_what_the_packed_module_stores(bits, group, sym):
    w = (torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05).requires_grad_()
    fq = fake_quantize_weight(w, bits, group, sym)
    packed = WeightOnlyLinear(128, 48, False, bits, group, sym)
    packed.set_weight(w.detach())
    assert torch.equal(fq.detach(), packed.dequantize(torch.float32))
    assert 15 < F.sqnr_db(w, fq) < (45 if bits == 4 else 60)  # it is rounded, on the target grid
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_fake_tokens_are_int8_dynamic_grid_per_token():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    x[2] *= 100  # an outlier token does not coarsen the others' steps
    x.requires_grad_()
    fq = fake_quantize_tokens(x)
    q, scale = F.quantize_tokens(x.detach())
    assert torch.equal(fq.detach(), q.float() * scale)
    assert F.sqnr_db(x[0], fq[0]) > 35
    fq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_int8_dynamic_layer_matches_the_converted_one():
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(64, 32)
    layer.weight.data = torch.randn(32, 64, generator=g) * 0.05
    fake = FakeQuantLinear.from_float(layer, 8, None, True, int8_activations=True)
    real = fake.convert()
    assert isinstance(real, Int8DynamicLinear)
    x = torch.randn(3, 10, 64, generator=g)
    with torch.no_grad():
        # int32 accumulation vs float accumulation of the same products: only summation order differs
        assert torch.allclose(fake(x), real(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- method


def _lossy_llama(tiny):
    """A tiny llama whose layers matter and whose predictions are peaked, so RTN int4 is clearly lossy."""
    lm = slimkit.load(tiny("llama"))
    with torch.no_grad():
        lm.model.model.norm.weight.mul_(10)
        for name, module in lm.model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                module.weight.mul_(3)
    return lm


def test_qat_beats_rtn_on_held_out_text(tiny):
    lm = _lossy_llama(tiny)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    grid = {"bits": 4, "group_size": 32, "symmetric": True, "embeddings": False}
    rtn = slimkit.quantize(lm, "int4-wo", **{k: v for k, v in grid.items() if k != "bits"})
    qat = slimkit.quantize(lm, "qat", steps=60, lr=1e-4, **grid, **FAST)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # caller untouched
    assert grads == {n: p.requires_grad for n, p in lm.model.named_parameters()} and lm.model.training is False
    cfg = EvalConfig(window=128, stride=128, max_tokens=1024)  # evaluation split: QAT trained on calibration
    kl_rtn, kl_qat = (evaluate(q, reference=lm, config=cfg).kl_divergence for q in (rtn, qat))
    assert kl_rtn > 0.05  # RTN really is lossy here
    assert kl_qat < 0.75 * kl_rtn, (kl_qat, kl_rtn)
    training = qat.manifest["training"]
    assert training["steps"] == 60 and training["last_loss"] < 0.7 * training["first_loss"]
    assert {type(m) for m in qat.model.modules()} >= {WeightOnlyLinear}
    assert isinstance(qat.model.lm_head, torch.nn.Linear)  # ignored by default, left in float
    assert qat.manifest["recipe"][-1] == {"stage": "quantize", "method": "qat", **QATConfig(steps=60, lr=1e-4, **grid, **FAST).__dict__,
                                           "targets": ["*"], "ignore": ["lm_head"]}


def test_zero_steps_is_round_to_nearest(tiny):
    lm = slimkit.load(tiny("llama"))
    rtn = slimkit.quantize(lm, "int4-wo", group_size=64, symmetric=True)
    qat = slimkit.quantize(lm, "qat", steps=0, group_size=64, symmetric=True)
    assert torch.equal(_logits(rtn), _logits(qat))
    assert "training" not in qat.manifest


def test_same_seed_same_model_other_seed_other_model(tiny):
    lm = slimkit.load(tiny("llama"))
    a, b, c = (slimkit.quantize(lm, "qat", steps=6, seed=s, lr=1e-3, embeddings=False, **FAST) for s in (0, 0, 1))
    assert torch.equal(_logits(a), _logits(b))
    assert not torch.equal(_logits(a), _logits(c))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("options", [{"bits": 4, "group_size": 32, "symmetric": False}, {"bits": 8, "group_size": None, "symmetric": True}])
def test_converted_model_computes_what_was_trained(tiny, arch, options):
    """Convert a fake-quant model whose master weights moved off the float ones: same outputs, up to bf16 kernels."""
    lm = slimkit.load(tiny(arch))
    config = QATConfig(embeddings=False, **options)
    prepare(lm.model, config)  # lm is our own load here: changing it in place is fine
    fakes = [m for m in lm.model.modules() if isinstance(m, FakeQuantLinear)]
    assert fakes and all(m.weight.requires_grad for m in fakes)
    with torch.no_grad():
        for m in fakes:
            m.weight.add_(torch.randn_like(m.weight) * 0.01)
    fake_out = _logits(lm)
    fake_weights = {n: fake_quantize_weight(m.weight, m.bits, m.group_size, m.symmetric).detach() for n, m in lm.model.named_modules() if isinstance(m, FakeQuantLinear)}
    names = convert(lm.model)
    assert sorted(names) == sorted(fake_weights)
    for name in names:
        real = lm.model.get_submodule(name)
        assert isinstance(real, WeightOnlyLinear)
        assert torch.equal(real.dequantize(torch.float32), fake_weights[name])  # bit-exact weights
    assert F.sqnr_db(fake_out, _logits(lm)) > 35  # outputs: only the kernels' bf16 activations differ


@pytest.mark.parametrize("arch,options", [("llama", {}), ("gpt2", {"group_size": 64}), ("bert", {"activations": "int8-dynamic", "bits": 8, "group_size": None, "symmetric": True})])
def test_save_and_reload_is_exact(tiny, tmp_path, arch, options):
    q = slimkit.quantize(tiny(arch), "qat", steps=3, **FAST, **options)
    kinds = {type(m) for m in q.model.modules()}
    assert (Int8DynamicLinear if options.get("activations") else WeightOnlyLinear) in kinds
    assert Int8Embedding in kinds and FakeQuantLinear not in kinds
    back = slimkit.load(str(save(q, tmp_path / "q")))
    assert torch.equal(_logits(q), _logits(back))
    assert back.manifest["recipe"][-1]["method"] == "qat"


def test_encoder_trains_on_the_embedding_loss(tiny):
    q = slimkit.quantize(tiny("bert"), "qat", steps=4, **FAST)
    assert q.manifest["training"]["steps"] == 4 and q.manifest["training"]["loss"] == "kd"
    with pytest.raises(SlimkitError, match="loss=ce needs next-token labels, and a model of kind encoder predicts none: use loss=kd"):
        slimkit.quantize(tiny("bert"), "qat", loss="ce", steps=1, **FAST)


def test_cross_entropy_training_lowers_its_loss(tiny):
    q = slimkit.quantize(tiny("gpt2"), "qat", loss="ce", steps=20, lr=1e-3, **FAST)
    training = q.manifest["training"]
    assert training["loss"] == "ce" and training["last_loss"] < training["first_loss"] - 0.05


def test_minutes_plans_fewer_steps(tiny):
    q = slimkit.quantize(tiny("llama"), "qat", steps=100000, minutes=0.02, **FAST)
    training = q.manifest["training"]
    assert 1 <= training["planned_steps"] < 100000 and training["steps"] <= training["planned_steps"]
    assert training["seconds"] < 10


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"bits": 3}, "bits=3 is not supported by qat: use 4 or 8"),
        ({"group_size": 48}, "group_size=48 is not supported: use one of 32, 64, 128, 256 or None"),
        ({"group_size": 128}, "group_size=128 does not divide the input dimension 64"),
        ({"lr": 0.0}, "lr=0.0 must be > 0: use e.g. lr=1e-4"),
        ({"lr": -1e-3}, "lr=-0.001 must be > 0"),
        ({"steps": -1}, "steps=-1 is negative: use 0 (no training) or more"),
        ({"minutes": 0}, "minutes=0 must be > 0"),
        ({"loss": "mse"}, "unknown loss 'mse' for qat: use kd (distil from the float model) or ce"),
        ({"activations": "int4"}, "unknown activations 'int4' for qat: use none (weight-only) or int8-dynamic"),
        ({"activations": "int8-dynamic"}, "set bits=8, group_size=None, symmetric=true"),
        ({"warmup": 1.0}, "warmup=1.0 must be a fraction in [0, 1)"),
        ({"seq_len": 4}, "training needs seq_len >= 8"),
        ({"targets": ["nope*"]}, "none matches targets ['nope*']"),
    ],
)
def test_bad_options_name_the_fix(tiny, options, fragment):
    with pytest.raises(SlimkitError) as info:
        slimkit.quantize(tiny("llama"), "qat", **{"steps": 1, **options})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_cli_trains_and_saves(tiny, tmp_path):
    proc = invoke_cli("quantize", str(tiny("gpt2")), "--method", "qat", "-o", "steps=2", "-o", "seq_len=64", "-o", "calibration_samples=8",
                      "-o", "lr=2e-4", "-o", "group_size=none", "--out", str(tmp_path / "q"), "--json")
    assert proc.returncode == 0, proc.stderr
    back = slimkit.load(str(tmp_path / "q"))
    assert back.manifest["recipe"][-1]["lr"] == 2e-4 and back.manifest["recipe"][-1]["group_size"] is None
    assert back.manifest["metrics"]["training"]["steps"] == 2
