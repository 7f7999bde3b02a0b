"""Pure tensor math of pruning: criteria, masks, N:M, the cubic schedule, losses."""

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.losses import embedding_loss, kd_loss, mean_pool
from slimkit.pruning import importance
from slimkit.pruning.schedule import cubic_sparsity
from slimkit.pruning.semi_structured import nm_mask
from slimkit.pruning.unstructured import global_masks, layer_mask, row_mask


def test_criteria_formulas():
    w = torch.tensor([[1.0, -2.0], [0.5, -0.25]])
    g = torch.tensor([[0.1, 0.3], [-2.0, 4.0]])
    act_sq = torch.tensor([4.0, 9.0])  # norms 2 and 3
    assert torch.equal(importance.get("magnitude-l1").scores(w), w.abs())
    assert torch.equal(importance.get("magnitude-l2").scores(w), w**2)
    assert torch.allclose(importance.get("taylor").scores(w, grad=g), torch.tensor([[0.1, 0.6], [1.0, 1.0]]))
    assert torch.allclose(importance.get("fisher").scores(w, grad_sq=g**2), 0.5 * g**2 * w**2)
    assert torch.allclose(importance.get("activation").scores(w, act_sq=act_sq), torch.tensor([[2.0, 6.0], [1.0, 0.75]]))


def test_activation_criterion_keeps_small_weight_on_large_input():
    w = torch.tensor([[1.0, 0.1]])
    scores = importance.get("activation").scores(w, act_sq=torch.tensor([1.0, 10_000.0]))
    assert torch.equal(row_mask(scores, 0.5), torch.tensor([[False, True]]))  # |w| alone would keep the other


def test_unknown_criterion_names_the_choices():
    with pytest.raises(SlimkitError, match="did you mean 'taylor'.*magnitude-l1"):
        importance.get("taylr")


def test_layer_mask_prunes_exact_count_of_lowest():
    s = torch.randn(16, 32)
    m = layer_mask(s, 0.3)
    k = round(0.3 * s.numel())
    assert int((~m).sum()) == k
    assert s[~m].max() < s[m].min()
    assert layer_mask(s, 0.0).all()


def test_row_mask_prunes_exact_count_per_row():
    s = torch.randn(8, 20)
    m = row_mask(s, 0.5)
    assert ((~m).sum(1) == 10).all()
    for r in range(8):
        assert s[r][~m[r]].max() < s[r][m[r]].min()


def test_global_mask_uses_one_threshold():
    small, large = torch.rand(10, 10) * 0.1, torch.rand(10, 10) + 1.0
    masks = global_masks({"a": small, "b": large}, 0.5)
    assert not masks["a"].any() and masks["b"].all()  # all of the small layer goes first


def test_nm_mask_keeps_n_largest_of_every_m():
    s = torch.randn(6, 16)
    m = nm_mask(s, 2, 4)
    groups, sg = m.reshape(6, 4, 4), s.reshape(6, 4, 4)
    assert (groups.sum(-1) == 2).all()
    kept_min = torch.where(groups, sg, torch.inf).min(-1).values
    dropped_max = torch.where(~groups, sg, -torch.inf).max(-1).values
    assert (dropped_max < kept_min).all()
    assert (nm_mask(s, 1, 4).reshape(6, 4, 4).sum(-1) == 1).all()


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 4, 0.8) == 0.0
    assert cubic_sparsity(4, 4, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(1, 2, 0.5) == pytest.approx(0.4375)  # 0.5 * (1 - 0.5^3)
    values = [cubic_sparsity(t, 10, 0.9, 0.1) for t in range(11)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(x > y for x, y in zip(steps, steps[1:]))  # fast first, slow at the end
    assert values[0] == pytest.approx(0.1)


def test_recovery_losses_pool_in_fp32_under_bf16():
    """Recovery's encoder loss is 1 - cosine of a few hundredths: pooled in bf16 it would be
    rounding noise, so token states are pooled in fp32 whatever their dtype."""
    torch.manual_seed(0)
    h = torch.randn(2, 128, 384).to(torch.bfloat16)
    near = (h.float() + 0.01 * torch.randn(2, 128, 384)).to(torch.bfloat16)
    mask = torch.ones(2, 128)
    pooled = mean_pool(h, mask)
    assert pooled.dtype == torch.float32
    exact = 1 - torch.nn.functional.cosine_similarity(h.double().mean(1), near.double().mean(1), dim=-1).mean()
    assert embedding_loss(pooled, mean_pool(near, mask)).item() == pytest.approx(exact.item(), rel=2e-2)
    t = torch.randn(2, 5, 11)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
