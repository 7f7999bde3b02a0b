"""The shared training loop's own behaviour: freezing, modes, the after-step hook, the
attention policy, the schedule, and a time budget that needs no plan.

Distillation's use of it (exact resume, planning, caches, several processes) is in
test_distill.py; QAT's in test_quantize_qat.py; recovery's in test_prune.py."""

import json

import pytest
import torch

import slimkit
from slimkit.core.attention import FLOAT32_SDPA
from slimkit.core.errors import SlimkitError
from slimkit.core.losses import DistillLoss, LogitKD
from slimkit.core.training import Distiller, TrainConfig, all_but, frozen, lr_factor, train
from slimkit.core.training.budget import needs_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n: int = 3, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 500, (2, seq), generator=g)  # (B, T)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _ce(lm) -> Distiller:
    return Distiller(lm.model, DistillLoss([LogitKD(alpha=0.0)]), lm.kind)  # next-token cross-entropy, no teacher


def test_frozen_gives_every_flag_back_even_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)  # the caller's own choice survives
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="stop"), frozen(model, model[0].parameters()):
        assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True, False]
        for p in model.parameters():
            p.requires_grad_(True)  # whatever happens inside
        raise RuntimeError("stop")
    assert [p.requires_grad for p in model.parameters()] == before
    assert [id(p) for p in all_but(model, model[1].parameters())] == [id(p) for i in (0, 2) for p in model[i].parameters()]


@pytest.mark.parametrize("was_training", [False, True])
def test_loop_freezes_trains_in_eval_mode_and_restores_flags_and_mode(tiny, was_training):
    lm = slimkit.load(str(tiny("llama")))
    lm.model.train(was_training)
    emb = lm.model.model.embed_tokens.weight  # tied to the LM head
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    modes = []
    result = train(_ce(lm), None, _batches(), [], TrainConfig(steps=3, lr=1e-2, mixed_precision="no"), freeze=[emb],
                   eval_mode=True, after_step=lambda: modes.append(lm.model.training))
    assert result.steps == 3 and result.stopped_by == "steps" and len(result.losses) == 3 and result.tokens == 3 * 32
    assert result.initial_eval is None and result.final_eval is None  # no evaluation batches, no evaluation
    assert modes == [False] * 3 and lm.model.training is was_training
    after = dict(lm.model.named_parameters())
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert all(p.requires_grad for p in lm.model.parameters())


def test_loop_trains_the_student_with_training_attention_and_gives_its_own_back(tiny):
    lm = slimkit.load(str(tiny("llama")))
    assert lm.model.config._attn_implementation == "sdpa"
    seen = []
    train(_ce(lm), None, _batches(), [], TrainConfig(steps=2, mixed_precision="no"), after_step=lambda: seen.append(lm.model.config._attn_implementation))
    assert seen == [FLOAT32_SDPA] * 2 and lm.model.config._attn_implementation == "sdpa"


def test_after_step_hook_runs_after_each_optimizer_step(tiny):
    """A hook that zeroes a weight after each step (as recovery re-applies pruning masks) has the last word."""
    lm = slimkit.load(str(tiny("llama")))
    w = lm.model.model.layers[0].mlp.up_proj.weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    cfg = TrainConfig(steps=3, lr=1e-2, mixed_precision="no")

    def keep_zeros():
        with torch.no_grad():
            w.mul_(mask)

    keep_zeros()
    train(_ce(lm), None, _batches(), [], cfg, after_step=keep_zeros)
    assert torch.count_nonzero(w[~mask]) == 0 and torch.count_nonzero(w[mask]) == mask.sum()
    train(_ce(lm), None, _batches(), [], cfg)  # without it, training fills the zeros in
    assert torch.count_nonzero(w[~mask]) > 0


def test_schedules():
    assert [lr_factor(s, 10, 0.2, "cosine") for s in (0, 1, 2)] == [1 / 3, 2 / 3, 1.0]  # warmup: 2 steps of 10
    assert lr_factor(6, 10, 0.2, "cosine") == pytest.approx(0.5) and lr_factor(6, 10, 0.2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0.0, "linear") == pytest.approx(0.1)
    # warmup counted in steps: the same ramp whatever the length, and a constant rate needs no length
    assert [lr_factor(s, None, 0.1, "constant", warmup_steps=3) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(3, 1000, 0.1, "constant", warmup_steps=3) == 1.0
    assert needs_plan(TrainConfig(minutes=1)) and needs_plan(TrainConfig(minutes=1, schedule="constant"))
    assert not needs_plan(TrainConfig(minutes=1, schedule="constant", warmup_steps=0)) and not needs_plan(TrainConfig(steps=5))


def test_a_constant_rate_on_a_budget_trains_until_the_clock(tiny, tmp_path):
    lm = slimkit.load(str(tiny("llama")))
    cfg = TrainConfig(minutes=0.02, schedule="constant", warmup_steps=2, lr=1e-3, mixed_precision="no", log_dir=str(tmp_path))
    result = train(_ce(lm), None, _batches(), [], cfg)
    assert result.planned_steps is None and result.stopped_by == "time" and result.steps >= 3
    assert 1.2 <= result.seconds < 1.2 + 10  # the budget, and one step past it at most (start-up slack)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]
    assert lrs[:4] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    capped = train(_ce(lm), None, _batches(), [], TrainConfig(minutes=1, steps=2, schedule="constant", warmup_steps=0))
    assert capped.steps == 2 and capped.stopped_by == "steps" and capped.seconds < 30  # steps stop it first


def test_a_budget_plan_never_exceeds_steps(tiny):
    lm = slimkit.load(str(tiny("llama")))
    result = train(_ce(lm), None, _batches(), [], TrainConfig(minutes=0.5, steps=3, mixed_precision="no"))
    assert result.planned_steps == 3 and result.steps == 3 and result.stopped_by == "steps"


def test_bad_warmup_steps_name_the_fix():
    with pytest.raises(SlimkitError, match=r"warmup_steps must be a whole number >= 0, got -1") as info:
        TrainConfig(steps=1, warmup_steps=-1)
    assert "\n" not in str(info.value)
