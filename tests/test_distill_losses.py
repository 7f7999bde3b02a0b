"""Distillation losses on hand-computed tensors: no model anywhere."""

import math

import pytest
import torch

from slimkit.core import losses as L
from slimkit.core.errors import SlimkitError


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computation_at_t1():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher p = (0.75, 0.25)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert L.kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_temperature_softens_and_scales_by_t_squared():
    s, t = [0.5, -1.0, 2.0], [2.0, 0.0, -1.0]
    for temp in (0.5, 2.0, 4.0):
        expected = temp**2 * _kl(_softmax([x / temp for x in t]), _softmax([x / temp for x in s]))
        got = L.kd_loss(torch.tensor([s]), torch.tensor([t]), temp).item()
        assert got == pytest.approx(expected, rel=1e-5), temp


def test_kd_loss_is_zero_for_equal_logits_and_skips_masked_positions():
    t = torch.randn(2, 3, 7)
    assert L.kd_loss(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    s = t.clone()
    s[1, 2, 0] += 50  # a padding position: wildly wrong, but masked out
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert L.kd_loss(s, t, 2.0, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert L.kd_loss(s, t, 2.0).item() > 1.0


def test_kd_loss_mismatched_vocabularies_is_a_user_error():
    with pytest.raises(SlimkitError, match="one vocabulary.*teacher's tokenizer"):
        L.kd_loss(torch.zeros(1, 5), torch.zeros(1, 6))


def test_hard_loss_ignores_ignore_index():
    logits = torch.tensor([[[0.0, math.log(3.0)], [9.0, -9.0]]])  # (1, 2, 2)
    labels = torch.tensor([[1, L.IGNORE_INDEX]])
    assert L.hard_loss(logits, labels).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_logit_kd_mixes_kd_and_shifted_ce_by_alpha():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    batch = {"labels": ids, "attention_mask": torch.ones(2, 5)}
    kd = L.kd_loss(s, t, 2.0).item()
    ce = L.hard_loss(s[:, :-1], ids[:, 1:]).item()
    term = L.LogitKD(temperature=2.0, alpha=0.3)
    assert term({"logits": s}, {"logits": t}, batch).item() == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-5)
    ce_only = L.LogitKD(alpha=0.0)
    assert not ce_only.uses_teacher
    assert ce_only({"logits": s}, None, batch).item() == pytest.approx(ce, rel=1e-6)


def test_hidden_loss_mse_and_cosine_with_mask():
    s = torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])  # (1, 2, 2)
    t = torch.tensor([[[0.0, 1.0], [-5.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    assert L.hidden_loss(s, t, mask, "mse").item() == pytest.approx(1.0)  # ((1)^2 + (1)^2) / 2
    assert L.hidden_loss(s, t, mask, "cosine").item() == pytest.approx(1.0)  # orthogonal


def test_attention_loss_averages_heads_when_counts_differ():
    s = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    t4 = torch.cat([s, s], dim=1)  # 4 heads whose mean equals the student's mean
    assert L.attention_loss(s, t4, kind="mse").item() == pytest.approx(0.0, abs=1e-7)
    t = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    expected = ((s - t) ** 2).mean().item()
    assert L.attention_loss(s, t, kind="mse").item() == pytest.approx(expected, rel=1e-5)
    kl = (t * (t.log() - s.log())).sum(-1).mean().item()
    assert L.attention_loss(s, t, kind="kl").item() == pytest.approx(kl, rel=1e-4)


def test_embedding_loss_cosine_and_mean_pooling_respects_padding():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]])  # last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert L.mean_pool(hidden, mask).tolist() == [[0.5, 0.5]]
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert L.embedding_loss(a, b).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    with pytest.raises(SlimkitError, match="one width"):
        L.embedding_loss(torch.zeros(1, 3), torch.zeros(1, 4))


def test_projection_is_created_once_and_receives_gradients():
    term = L.HiddenStateLoss([(0, 1), (1, 3)], n_student=2, n_teacher=4, student_width=8, teacher_width=16)
    loss = L.DistillLoss([term])
    projections = [p for p in loss.parameters()]
    assert [tuple(p.shape) for p in projections] == [(16, 8), (16, 8)]
    s = {"hidden_states": tuple(torch.randn(2, 3, 8) for _ in range(3))}
    t = {"hidden_states": tuple(torch.randn(2, 3, 16) for _ in range(5))}
    for _ in range(2):
        total, parts = loss(s, t, {"attention_mask": torch.ones(2, 3)})
        total.backward()
    assert list(loss.parameters()) == projections  # the same objects: not re-created per step
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections)
    assert set(parts) == {"hidden"}
    assert "terms.0.projections.0.weight" in loss.state_dict()


def test_equal_widths_need_no_projection():
    term = L.HiddenStateLoss([(0, 0)], 1, 2, 8, 8)
    assert term.projections is None and not list(term.parameters())


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: L.LogitKD(temperature=0), "temperature must be > 0"),
        (lambda: L.LogitKD(alpha=1.5), "alpha must be in [0, 1]"),
        (lambda: L.HiddenStateLoss([(0, 9)], 2, 4, 8, 8), "teacher layer 9 is out of range 0..3"),
        (lambda: L.HiddenStateLoss([(2, 0)], 2, 4, 8, 8), "student layer 2 is out of range 0..1"),
        (lambda: L.AttentionLoss([], 2, 4), "layer map is empty"),
        (lambda: L.AttentionLoss([(0, 0)], 2, 4, kind="l1"), "use mse or kl"),
        (lambda: L.DistillLoss([]), "at least one"),
    ],
)
def test_bad_loss_settings_are_one_line_errors(build, fragment):
    with pytest.raises(SlimkitError) as info:
        build()
    assert fragment in str(info.value) and "\n" not in str(info.value)
