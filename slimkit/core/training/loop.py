"""The loop itself: one optimizer step after another, on Hugging Face Accelerate.

Determinism and exact resume. Everything the loop does is a function of the
optimizer step: micro-batch m (= step · grad_accum + a) is the m-th entry of
a permutation of the training batches seeded by (seed, epoch), each process
takes rows rank::world of it, and the learning rate is computed from the step
(`budget.lr_factor`). A checkpoint (`checkpoint.py`) holds everything else, so
resuming from one continues bit-exactly as if the run had not stopped.

A step: set the rate, forward and backward of each micro-batch (the teacher's
outputs under no_grad, from the cache when there is one), clip the gradients'
norm, step the optimizer, run the caller's `after_step` (recovery re-applies
its pruning masks there, before anything reads the weights), log, evaluate
every `eval_every` steps (early stopping keeps the best weights), checkpoint,
and stop on the plan's last step, on patience, or when the clock runs out.

What the loop does for every user, so none of them does it differently:
  * freezing: `frozen` parameters get no gradient; all flags come back after;
  * mode: train mode (dropout as the model has it), or `eval_mode` (no dropout:
    a step is a function of the weights and the batch); modes come back after;
  * mixed precision through Accelerate (`auto`: bf16 where the hardware runs it
    natively), fp32 master weights and optimizer;
  * attention: the student trains with `core.attention.training_attention`
    (SDPA computed in float32 on CPU where that pays; for fp32 training it
    changes nothing), or the eager implementation for both models when a loss
    reads attention maps; each model gets its own back after;
  * the time budget (`budget.py`) and the seed (the batch order).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from slimkit.core.attention import attention_implementation, training_attention
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import bf16_native
from slimkit.core.progress import track
from slimkit.core.training.budget import REPLAN_AT, anywhere, lr_factor, needs_plan, plan_steps, replan
from slimkit.core.training.checkpoint import load_checkpoint, read_best, save_checkpoint, snapshot
from slimkit.core.training.config import TrainConfig, TrainResult
from slimkit.core.training.freezing import frozen
from slimkit.core.training.outputs import Distiller, eval_metric_name, held_out_metric, model_outputs, shard
from slimkit.core.training.runlog import RunLog
from slimkit.core.training.teacher_cache import TeacherCache


def _fresh_state(cfg: TrainConfig) -> dict:
    """The loop's state before step 0; checkpoints save it and resume restores it."""
    return {"step": 0, "planned": cfg.steps, "elapsed": 0.0, "best": None, "bad_evals": 0,
            "eval_s": 0.0,  # seconds of one evaluation, kept for the final one
            "replans": 0, "mark": None,  # time-budget re-plans done; (step, elapsed) of the last plan
            "tokens": 0}


def _accelerator(cfg: TrainConfig, device: str | None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    mp = cfg.mixed_precision
    cpu = device == "cpu"
    if mp == "auto":  # bf16 where the hardware runs it natively (CUDA, or CPUs with AVX-512 BF16 / AMX)
        mp = "bf16" if bf16_native("cpu" if cpu or not torch.cuda.is_available() else "cuda") else "no"
    state, partial = AcceleratorState._shared_state, PartialState._shared_state
    if partial and partial.get("num_processes", 1) == 1:
        # Accelerate keeps one state per process and refuses a second precision or device; a
        # single process (a notebook, optimize) may train twice with different settings
        moved = partial["device"].type != "cpu" if cpu else bool(partial.get("_cpu")) and torch.cuda.is_available()
        if moved or (state and state.get("_mixed_precision") != mp):
            AcceleratorState._reset_state(reset_partial_state=moved)
    # find_unused_parameters: e.g. BERT's pooler gets no gradient from an embedding loss
    return Accelerator(mixed_precision=mp, cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def train(distiller: Distiller, teacher: nn.Module | None, train_batches: list[dict], eval_batches: list[dict],
          cfg: TrainConfig, *, seed: int = 0, fingerprint: dict | None = None, on_step: Callable[[int], None] | None = None,
          freeze: Iterable[nn.Parameter] = (), after_step: Callable[[], None] | None = None, eval_mode: bool = False,
          device: str | None = None, label: str = "Training") -> TrainResult:
    """Train `distiller` in place against `teacher` (None: a loss that needs none); return what happened.

    seed: orders the batches. fingerprint: what a teacher cache must have been made for.
    on_step(step): after each step (progress, interruption). freeze: parameters that do not
    train. after_step(): right after each optimizer step. eval_mode: no dropout.
    device: "cpu", or None for Accelerate's choice (a GPU where there is one).
    Without evaluation batches nothing is evaluated."""
    student = distiller.student
    impl = "eager" if "attentions" in distiller.loss.needs else None  # attention maps need the eager implementation
    modes = student.training, teacher is not None and teacher.training
    try:
        with frozen(distiller, freeze), attention_implementation(student, impl or training_attention(student)), \
                attention_implementation(teacher, impl):
            return _run(distiller, teacher, train_batches, eval_batches, cfg, seed, fingerprint, on_step, after_step,
                        eval_mode, device, label)
    finally:
        distiller.train(modes[0])
        if modes[1]:
            teacher.train()


def _run(distiller, teacher, train_batches, eval_batches, cfg, seed, fingerprint, on_step, after_step, eval_mode,
         device, label) -> TrainResult:
    acc = _accelerator(cfg, device)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    if cfg.batch_size % world:
        raise SlimkitError(f"batch size {cfg.batch_size} does not split over {world} processes: use a multiple of {world}")
    if not train_batches:
        raise SlimkitError("no training batches: give more calibration text or a smaller --seq-len / --batch-size")
    uses_teacher = distiller.loss.uses_teacher
    if teacher is not None:  # runs under no_grad; its requires_grad flags stay as the caller set them
        teacher.to(device).eval()
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = acc.prepare(distiller, optimizer)
    cache = TeacherCache(cfg.cache_teacher if uses_teacher else None, fingerprint or {}, rank, world)
    log = RunLog(cfg.log_dir, acc.is_main_process)
    result = TrainResult(eval_metric=eval_metric_name(distiller.kind), processes=world)
    state = _fresh_state(cfg)
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if cfg.resume and ckpt is not None and (ckpt / "last" / "state.json").exists():
        state = {**state, **load_checkpoint(ckpt / "last", acc, model, optimizer, rank, state.keys())}
        result.resumed_from = state["step"]
    start = time.perf_counter() - state["elapsed"]
    budget = cfg.minutes * 60 if cfg.minutes else math.inf

    def micro(m: int) -> tuple[int, dict]:
        n = len(train_batches)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + m // n))
        index = int(order[m % n])
        return index, shard(train_batches[index], rank, world, device)

    def teacher_out(index: int, batch: dict):
        if not uses_teacher:
            return None

        def compute():
            with torch.no_grad(), acc.autocast():
                return model_outputs(teacher, batch, distiller.loss.needs, distiller.kind)

        return cache.get(index, compute)

    def micro_step(index: int, batch: dict, sync: bool = True) -> tuple[float, dict]:
        """Forward and backward of one micro-batch (gradients accumulate; no update)."""
        t = teacher_out(index, batch)
        with contextlib.nullcontext() if sync else acc.no_sync(model), acc.autocast():
            loss, p = model(batch, t)
            acc.backward(loss / cfg.grad_accum)
        return loss.item(), p

    def forward_backward(step: int) -> tuple[float, dict]:
        total, parts = 0.0, {}
        for a in range(cfg.grad_accum):
            index, batch = micro(step * cfg.grad_accum + a)
            loss, p = micro_step(index, batch, sync=a == cfg.grad_accum - 1)
            state["tokens"] += train_batches[index]["input_ids"].numel()
            total += loss / cfg.grad_accum
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
        return total, parts

    def probe(index: int) -> float:
        """Seconds of one micro-batch's forward and backward, as `plan_steps` times it."""
        t0 = time.perf_counter()
        micro_step(index, shard(train_batches[index], rank, world, device))
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def evaluate() -> float | None:
        if not eval_batches:
            return None
        return held_out_metric(acc, distiller, teacher, eval_batches, rank, world, device)

    planning = needs_plan(cfg)
    if result.resumed_from is None:
        t0 = time.perf_counter()
        first = evaluate()
        state["eval_s"] = time.perf_counter() - t0 if eval_batches else 0.0
        result.initial_eval = first
        if first is not None:
            log.write({"event": "eval", "step": 0, result.eval_metric: first})
        if planning:  # plan the steps from timed probes
            state["planned"] = plan_steps(acc, probe, state["eval_s"], cfg, budget, start, [b["input_ids"].numel() for b in train_batches], cache)
    result.planned_steps = state["planned"]
    best_weights = read_best(ckpt / "last") if result.resumed_from is not None else None
    loss = None
    if state["mark"] is None:
        state["mark"] = [state["step"], state["elapsed"]]
    begun = state["step"]

    def plan() -> Iterator[int]:  # the steps of a plan that a time budget may revise; None: until the clock
        while state["planned"] is None or state["step"] < state["planned"]:
            yield state["step"]

    def remaining() -> int | None:
        return None if state["planned"] is None else state["planned"] - begun

    for step in track(plan(), label, total=remaining):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, state["planned"], cfg.warmup, cfg.schedule, cfg.warmup_steps)
        model.train(not eval_mode)
        loss, parts = forward_backward(step)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        result.losses.append(loss)
        state["step"] = step + 1
        state["elapsed"] = time.perf_counter() - start
        log.write({"event": "train", "step": step + 1, "loss": loss, **parts, "lr": optimizer.param_groups[0]["lr"], "seconds": round(state["elapsed"], 2)})
        stop = None
        if eval_batches and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and (state["planned"] is None or step + 1 < state["planned"]):
            metric = evaluate()
            log.write({"event": "eval", "step": step + 1, result.eval_metric: metric})
            if state["best"] is None or metric < state["best"] - 1e-6:
                state["best"], state["bad_evals"] = metric, 0
                best_weights = snapshot(acc, model)
            else:
                state["bad_evals"] += 1
                if cfg.patience and state["bad_evals"] >= cfg.patience:
                    stop = "early-stopping"
        if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt, acc, model, optimizer, state, rank, best_weights)
        if stop is None and anywhere(acc, state["elapsed"] > budget):
            stop = "time"
        if planning and stop is None and state["replans"] < len(REPLAN_AT) and anywhere(acc, state["elapsed"] >= REPLAN_AT[state["replans"]] * budget):
            replan(acc, state, budget, cfg)
        if on_step is not None:
            on_step(step + 1)
        if stop:
            result.stopped_by = stop
            break
    final = evaluate()
    if best_weights is not None and state["best"] is not None and state["best"] < final:
        acc.unwrap_model(model).load_state_dict(best_weights)
        final = state["best"]
    if final is not None:
        log.write({"event": "eval", "step": state["step"], result.eval_metric: final, "final": True})
    log.close()
    result.planned_steps = state["planned"]
    result.steps, result.train_loss, result.final_eval, result.history = state["step"], loss, final, log.evals
    result.tokens = state["tokens"]
    result.best_eval = final if state["best"] is None else min(state["best"], final)
    result.seconds = round(time.perf_counter() - start, 2)
    acc.wait_for_everyone()
    return result
