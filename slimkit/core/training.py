"""The distillation training loop, on Hugging Face Accelerate.

One loop runs on one CPU, one GPU, or many processes (`accelerate launch
--num_processes N`, on GPUs or `--cpu`): Accelerate wraps the student (and the
loss module's projections) for data parallelism and mixed precision; the
frozen teacher runs beside it in each process, unwrapped.

Launching several processes:

    torchrun --nproc_per_node 2 train.py                 # CPU: Accelerate sees the torchrun
                                                         # environment and uses gloo
    accelerate launch --num_processes 8 train.py         # GPUs (or --multi_gpu, configs, nodes)
    torchrun --nproc_per_node 2 -m slimkit.cli distill smollm2-135m --student-layers 15 --steps 100 --out s

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI
is set up, so use torchrun on CPU. The global batch (`batch_size`) is split
across processes (rows rank::world) and gradients are averaged, so N processes
train the same model as one process with the same batch size
(`tests/test_distill.py::test_two_processes_on_cpu_match_one`). Only the main
process writes logs, checkpoints and the artifact.

Determinism and exact resume. Everything the loop does is a function of the
optimizer step: micro-batch m (= step · grad_accum + a) is the m-th entry of
a permutation of the training batches seeded by (seed, epoch), each process
takes rows rank::world of it, and the learning rate is computed from the step
(linear warmup, then cosine or linear decay, or constant). A checkpoint holds
the weights (student + projections, safetensors), the optimizer state, the
step, the planned number of steps, elapsed time, early-stopping state and
every process's RNG states; resuming from it continues bit-exactly as if the
run had not stopped.

Budgets. `steps` fixes the number of optimizer steps. With only `minutes`,
timing probes (forward + backward without an update, on the batch of median
size; RNG restored, so nothing changes) and one evaluation are timed first,
and the step count is planned to fill the budget, so the LR schedule
completes: steps are scaled from the probe by the batches' mean size, and a
cached teacher's first pass is counted once (`_plan_steps`). At a quarter,
half and three quarters of the budget the plan is re-fitted to the pace the
steps actually kept (`_replan`), so the schedule ends with the budget, not
before it or cut off by it. Training also stops when the wall clock runs out,
whatever the plan.

Evaluation runs every `eval_every` steps on the evaluation split (never the
calibration split that training reads): student cross-entropy for causal LMs
(the same number for KD and CE-only runs, so they compare fairly), 1 - cosine
to the teacher's embeddings for encoders, the KD loss for classifiers. With
`patience`, training stops after that many evaluations without improvement
and the best weights are restored.

Teacher outputs can be cached to disk (one safetensors file per micro-batch)
so repeated epochs skip the teacher; full-vocabulary logits are large
(seq_len x vocab x 4 bytes per sequence), so this pays off for big teachers and
small vocabularies or encoders.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.core.arch import CAUSAL_LM, ENCODER
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import bf16_native
from slimkit.core.losses import DistillLoss, hard_loss, mean_pool
from slimkit.core.progress import track

SCHEDULES = ("cosine", "linear", "constant")
REPLAN_AT = (0.25, 0.5, 0.75)  # budget fractions where a time-budgeted plan is re-fitted to the measured pace
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None  # optimizer steps; None: plan them from `minutes`
    minutes: float | None = None  # wall-clock budget, evaluation included
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps
    schedule: str = "cosine"
    batch_size: int = 4  # sequences per micro-batch, all processes together
    grad_accum: int = 1
    seq_len: int = 256
    max_samples: int | None = None  # cap on training sequences (None: the whole split)
    eval_every: int = 0  # steps; 0: evaluate only before and after training
    eval_batches: int = 4
    patience: int = 0  # evaluations without improvement before stopping; 0: never
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    log_dir: str | None = None
    cache_teacher: str | None = None
    mixed_precision: str = "auto"
    max_grad_norm: float = 1.0

    def __post_init__(self):
        def fail(what: str):
            raise SlimkitError(what)

        if self.steps is None and self.minutes is None:
            fail("give a training length: steps (--steps) or a wall-clock budget (--minutes)")
        if self.steps is not None and self.steps < 1:
            fail(f"steps must be at least 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            fail(f"minutes must be > 0, got {self.minutes}")
        if not self.lr > 0:
            fail(f"learning rate must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            fail(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.schedule not in SCHEDULES:
            fail(f"unknown schedule '{self.schedule}': use one of {', '.join(SCHEDULES)}")
        if self.mixed_precision not in PRECISIONS:
            fail(f"unknown mixed precision '{self.mixed_precision}': use one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                fail(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.checkpoint_every and not self.checkpoint_dir:
            fail("checkpoint_every needs a checkpoint_dir: say where checkpoints go")
        if self.resume and not self.checkpoint_dir:
            fail("resume needs a checkpoint_dir: point it at the interrupted run's checkpoints")
        if self.patience and not self.eval_every:
            fail("early stopping (patience) needs periodic evaluation: set eval_every")
        if self.max_samples is not None and self.max_samples < 1:
            fail(f"max_samples must be at least 1, got {self.max_samples}")


def _fresh_state(cfg: TrainConfig) -> dict:
    """The loop's state before step 0; checkpoints save it and resume restores it."""
    return {"step": 0, "planned": cfg.steps or 0, "elapsed": 0.0, "best": None, "bad_evals": 0,
            "eval_s": 0.0,  # seconds of one evaluation, kept for the final one
            "replans": 0, "mark": None}  # time-budget re-plans done; (step, elapsed) of the last plan


@dataclass
class TrainResult:
    steps: int = 0
    planned_steps: int = 0
    seconds: float = 0.0
    stopped_by: str = "steps"  # steps | time | early-stopping
    train_loss: float | None = None
    eval_metric: str = ""
    initial_eval: float | None = None
    final_eval: float | None = None
    best_eval: float | None = None
    resumed_from: int | None = None
    processes: int = 1
    history: list = field(default_factory=list)  # the evaluations: step and metric

    def to_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based) of `total`."""
    w = int(round(warmup * total))
    if step < w:
        return (step + 1) / (w + 1)
    if schedule == "constant" or total <= w:
        return 1.0
    progress = min(1.0, (step - w) / max(1, total - w))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- model outputs


def model_outputs(model: nn.Module, batch: dict, needs: frozenset, kind: str) -> dict:
    """Run `model` and keep only the outputs the losses read."""
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    if kind == CAUSAL_LM:
        kw.pop("token_type_ids", None)
        kw["use_cache"] = False
    if "hidden_states" in needs:
        kw["output_hidden_states"] = True
    if "attentions" in needs:
        kw["output_attentions"] = True
    out = model(**kw)
    res = {}
    if "logits" in needs:
        res["logits"] = out.logits  # (B, T, V) or (B, C)
    if "last_hidden_state" in needs:
        res["last_hidden_state"] = out.last_hidden_state  # (B, T, H)
    if "hidden_states" in needs:
        res["hidden_states"] = tuple(out.hidden_states)  # L + 1 of (B, T, H)
    if "attentions" in needs:
        if not out.attentions:
            raise SlimkitError("the model returned no attention maps: attention transfer needs attn_implementation='eager'")
        res["attentions"] = tuple(out.attentions)  # L of (B, heads, T, T)
    return res


class Distiller(nn.Module):
    """The trained module: the student and the loss terms' parameters (projections).

    The teacher is not a submodule: it is frozen, not wrapped for data parallelism,
    and not saved in checkpoints.
    """

    def __init__(self, student: nn.Module, loss: DistillLoss, kind: str):
        super().__init__()
        self.student, self.loss, self.kind = student, loss, kind

    def forward(self, batch: dict, teacher_out: dict | None):
        s = model_outputs(self.student, batch, self.loss.needs, self.kind)
        return self.loss(s, teacher_out, batch)


# --------------------------------------------------------------------------- teacher cache


class TeacherCache:
    """Teacher outputs per (micro-batch, process) in safetensors files under `root`."""

    def __init__(self, root: str | None, fingerprint: dict, rank: int, world: int):
        self.root = Path(root) if root else None
        self.suffix = f"r{rank}of{world}"
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "cache.json"
        if meta.exists():
            if json.loads(meta.read_text()) != fingerprint:
                raise SlimkitError(f"teacher cache {self.root} was made for another teacher, data or loss: delete it or choose another cache dir")
        elif rank == 0:
            meta.write_text(json.dumps(fingerprint, sort_keys=True))

    def _file(self, index: int) -> Path:
        return self.root / f"{index:06d}-{self.suffix}.safetensors"

    def has(self, index: int) -> bool:
        """Whether micro-batch `index`'s teacher outputs are on disk (never without a cache)."""
        return self.root is not None and self._file(index).exists()

    def get(self, index: int, compute) -> dict:
        if self.root is None:
            return compute()
        f = self._file(index)
        if f.exists():
            return _unflatten(load_file(f))
        out = compute()
        tmp = f.with_suffix(".tmp")
        save_file(_unshared(_flatten(out)), tmp)
        os.replace(tmp, f)
        return out


def _unshared(flat: dict) -> dict:
    """CPU tensors that safetensors can write: a tensor sharing memory with one before it
    (an encoder's last_hidden_state is hidden_states[-1]) is copied."""
    out, seen = {}, set()
    for k, v in flat.items():
        t = v.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _flatten(out: dict) -> dict:
    flat = {}
    for k, v in out.items():
        if isinstance(v, tuple):
            flat.update({f"{k}.{i}": t for i, t in enumerate(v)})
        else:
            flat[k] = v
    return flat


def _unflatten(flat: dict) -> dict:
    out, seqs = {}, {}
    for k, v in flat.items():
        name, _, idx = k.partition(".")
        if idx:
            seqs.setdefault(name, {})[int(idx)] = v
        else:
            out[name] = v
    for name, items in seqs.items():
        out[name] = tuple(items[i] for i in sorted(items))
    return out


# --------------------------------------------------------------------------- the loop


def _shard(batch: dict, rank: int, world: int, device) -> dict:
    return {k: v[rank::world].to(device) for k, v in batch.items()}


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    mp = cfg.mixed_precision
    if mp == "auto":  # bf16 where the hardware runs it natively (CUDA, or CPUs with AVX-512 BF16 / AMX)
        mp = "bf16" if bf16_native("cuda" if torch.cuda.is_available() else "cpu") else "no"
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mp and state.get("num_processes", 1) == 1:
        # Accelerate keeps one state per process and refuses a second precision; a
        # single process (a notebook, optimize) may train twice with different settings
        AcceleratorState._reset_state()
    # find_unused_parameters: e.g. BERT's pooler gets no gradient from an embedding loss
    return Accelerator(mixed_precision=mp, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def train(distiller: Distiller, teacher: nn.Module | None, train_batches: list[dict], eval_batches: list[dict],
          cfg: TrainConfig, *, seed: int = 0, fingerprint: dict | None = None, on_step=None) -> TrainResult:
    """Train `distiller` in place; return what happened. `seed` orders the batches; `on_step(step)` runs after each step."""
    acc = _accelerator(cfg)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    if cfg.batch_size % world:
        raise SlimkitError(f"batch size {cfg.batch_size} does not split over {world} processes: use a multiple of {world}")
    if not train_batches:
        raise SlimkitError("no training batches: give more calibration text or a smaller --seq-len / --batch-size")
    uses_teacher = distiller.loss.uses_teacher
    teacher_was_training = teacher is not None and teacher.training
    if teacher is not None:  # runs under no_grad; its requires_grad flags stay as the caller set them
        teacher.to(device).eval()
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = acc.prepare(distiller, optimizer)
    cache = TeacherCache(cfg.cache_teacher if uses_teacher else None, fingerprint or {}, rank, world)
    log = _Log(cfg.log_dir, acc.is_main_process)
    result = TrainResult(eval_metric=_metric_name(distiller.kind), processes=world)
    state = _fresh_state(cfg)
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if cfg.resume and ckpt is not None and (ckpt / "last" / "state.json").exists():
        state = {**state, **_load_checkpoint(ckpt / "last", acc, model, optimizer, rank, state.keys())}
        result.resumed_from = state["step"]
    start = time.perf_counter() - state["elapsed"]
    budget = cfg.minutes * 60 if cfg.minutes else math.inf

    def micro(m: int) -> tuple[int, dict]:
        n = len(train_batches)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + m // n))
        index = int(order[m % n])
        return index, _shard(train_batches[index], rank, world, device)

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
            loss, p = micro_step(*micro(step * cfg.grad_accum + a), sync=a == cfg.grad_accum - 1)
            total += loss / cfg.grad_accum
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
        return total, parts

    def probe(index: int) -> float:
        """Seconds of one micro-batch's forward and backward, as `plan_steps` times it."""
        t0 = time.perf_counter()
        micro_step(index, _shard(train_batches[index], rank, world, device))
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def evaluate() -> float:
        return _evaluate(acc, distiller, teacher, eval_batches, rank, world, device)

    if result.resumed_from is None:
        t0 = time.perf_counter()
        first = evaluate()
        state["eval_s"] = time.perf_counter() - t0
        result.initial_eval = first
        log.write({"event": "eval", "step": 0, result.eval_metric: first})
        if cfg.steps is None:  # plan the steps from timed probes
            state["planned"] = _plan_steps(acc, probe, state["eval_s"], cfg, budget, start, [b["input_ids"].numel() for b in train_batches], cache)
    result.planned_steps = state["planned"]
    best_weights = _read_best(ckpt / "last") if result.resumed_from is not None else None
    loss = None
    replan = cfg.steps is None and budget < math.inf
    if state["mark"] is None:
        state["mark"] = [state["step"], state["elapsed"]]
    begun = state["step"]

    def plan() -> Iterator[int]:  # the steps of a plan that a time budget may revise
        while state["step"] < state["planned"]:
            yield state["step"]

    for step in track(plan(), "Distilling", total=lambda: state["planned"] - begun):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, state["planned"], cfg.warmup, cfg.schedule)
        model.train()
        loss, parts = forward_backward(step)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["elapsed"] = time.perf_counter() - start
        log.write({"event": "train", "step": step + 1, "loss": loss, **parts, "lr": optimizer.param_groups[0]["lr"], "seconds": round(state["elapsed"], 2)})
        stop = None
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < state["planned"]:
            metric = evaluate()
            log.write({"event": "eval", "step": step + 1, result.eval_metric: metric})
            if state["best"] is None or metric < state["best"] - 1e-6:
                state["best"], state["bad_evals"] = metric, 0
                best_weights = _snapshot(acc, model)
            else:
                state["bad_evals"] += 1
                if cfg.patience and state["bad_evals"] >= cfg.patience:
                    stop = "early-stopping"
        if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, acc, model, optimizer, state, rank, best_weights)
        if stop is None and _any(acc, state["elapsed"] > budget):
            stop = "time"
        if replan and stop is None and state["replans"] < len(REPLAN_AT) and _any(acc, state["elapsed"] >= REPLAN_AT[state["replans"]] * budget):
            _replan(acc, state, budget)
        if on_step is not None:
            on_step(step + 1)
        if stop:
            result.stopped_by = stop
            break
    final = evaluate()
    if best_weights is not None and state["best"] is not None and state["best"] < final:
        acc.unwrap_model(model).load_state_dict(best_weights)
        final = state["best"]
    log.write({"event": "eval", "step": state["step"], result.eval_metric: final, "final": True})
    log.close()
    result.planned_steps = state["planned"]
    result.steps, result.train_loss, result.final_eval, result.history = state["step"], loss, final, log.evals
    result.best_eval = final if state["best"] is None else min(state["best"], final)
    result.seconds = round(time.perf_counter() - start, 2)
    if teacher_was_training:
        teacher.train()
    acc.wait_for_everyone()
    return result


def _metric_name(kind: str) -> str:
    return {CAUSAL_LM: "eval_loss", ENCODER: "eval_1_minus_cosine"}.get(kind, "eval_kd_loss")


def _least(acc, steps: int) -> int:
    """The smallest of every process's `steps` (they must plan alike)."""
    if acc.num_processes == 1:
        return steps
    return int(acc.gather(torch.tensor([float(steps)], device=acc.device)).min().item())


def _any(acc, flag: bool) -> bool:
    """True on every process when it is true on any (they must stop together)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.gather(torch.tensor([float(flag)], device=acc.device)).max() > 0)


@torch.no_grad()
def _evaluate(acc, distiller: Distiller, teacher, batches: list[dict], rank: int, world: int, device) -> float:
    """Mean eval metric over the evaluation batches (lower is better)."""
    distiller.eval()
    total = torch.zeros(2, device=device)  # sum, count
    for batch in batches:
        b = _shard(batch, rank, world, device)
        with acc.autocast():
            if distiller.kind == CAUSAL_LM:
                logits = model_outputs(distiller.student, b, frozenset({"logits"}), CAUSAL_LM)["logits"]
                labels = b["labels"][:, 1:]
                n = (labels != -100).sum()
                total += torch.stack([hard_loss(logits[:, :-1], labels) * n, n.float()])
            elif distiller.kind == ENCODER:
                s = model_outputs(distiller.student, b, frozenset({"last_hidden_state"}), ENCODER)["last_hidden_state"]
                t = model_outputs(teacher, b, frozenset({"last_hidden_state"}), ENCODER)["last_hidden_state"]
                mask = b["attention_mask"]
                cos = torch.nn.functional.cosine_similarity(mean_pool(s.float(), mask), mean_pool(t.float(), mask), dim=-1)
                total += torch.stack([(1 - cos).sum(), torch.tensor(float(cos.numel()), device=device)])
            else:
                t = model_outputs(teacher, b, distiller.loss.needs, distiller.kind)
                loss, _ = distiller(b, t)
                total += torch.stack([loss * len(b["input_ids"]), torch.tensor(float(len(b["input_ids"])), device=device)])
    if world > 1:
        total = acc.reduce(total, "sum")
    return (total[0] / total[1].clamp(min=1)).item()


def _plan_steps(acc, probe, eval_s: float, cfg: TrainConfig, budget: float, start: float, sizes: list[int], cache: TeacherCache) -> int:
    """Steps that fit the remaining budget, from timed probes and the evaluation's `eval_s`.

    Training batches differ in size (cut by length, a passage batch holds 20 to 256
    tokens a row), so a probe times the batch of median size and the plan scales it by
    the mean size, per token. With a teacher cache the first pass over the batches also
    runs the teacher, later passes read it from disk: the probe is timed twice on one
    uncached batch, and the difference is what each uncached batch costs once."""
    rng = _rng_state()
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    chosen = order[len(order) // 2]
    probe(order[0])  # warm-up: first-call allocations and kernel choices are not a step's cost
    caching = cache.root is not None
    cold = caching and not cache.has(chosen)
    first, steady = probe(chosen), probe(chosen)
    _set_rng_state(rng)
    scale = statistics.fmean(sizes) / sizes[chosen]
    step_s = steady * scale * cfg.grad_accum + (eval_s / cfg.eval_every if cfg.eval_every else 0.0)
    teacher_s = max(0.0, first - steady) * scale if cold else 0.0
    uncached = sum(not cache.has(i) for i in range(len(sizes))) if caching else 0
    remaining = budget - (time.perf_counter() - start) - eval_s  # the final evaluation
    return _least(acc, fit_steps(remaining * 0.97, step_s, teacher_s, uncached, cfg.grad_accum))


def _replan(acc, state: dict, budget: float) -> None:
    """Re-fit the planned steps to the pace measured since the last plan (`REPLAN_AT`).

    Probes time a few micro-batches; the run meets all of them, loads the teacher
    cache, steps the optimizer and shares the machine with whatever else runs. A
    plan that runs past the budget stops on the clock with the learning rate still
    high, one that runs short leaves the budget unused."""
    state["planned"] = _least(acc, refit_steps(state["step"], state["elapsed"], state["mark"], budget, state["eval_s"]))
    state["replans"] += 1
    state["mark"] = [state["step"], state["elapsed"]]


def refit_steps(step: int, elapsed: float, mark: Sequence[float], budget: float, final_eval_s: float) -> int:
    """The new plan's last step: `step` plus the steps that fit what is left of
    `budget` (less the final evaluation) at the pace kept since `mark` = (step, elapsed)."""
    pace = (elapsed - mark[1]) / max(1, step - mark[0])
    left = (budget - elapsed - final_eval_s) * 0.98
    return step + max(1, int(left / pace)) if pace > 0 else step + 1


def fit_steps(seconds: float, step_s: float, teacher_s: float, uncached: int, accum: int) -> int:
    """Optimizer steps that fit `seconds`: each costs `step_s`, and the `uncached`
    micro-batches (met once each in the first pass) cost `teacher_s` more."""
    first_pass = uncached / accum
    slow = step_s + accum * teacher_s
    if seconds <= first_pass * slow:
        return max(1, int(seconds / slow))
    return max(1, int(first_pass + (seconds - first_pass * slow) / step_s))


# --------------------------------------------------------------------------- checkpoints


def _snapshot(acc, model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def _read_best(ckpt: Path | None) -> dict | None:
    f = ckpt / "best.safetensors" if ckpt else None
    return load_file(f) if f and f.exists() else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(root: Path, acc, model, optimizer, state: dict, rank: int, best: dict | None) -> None:
    """Write root/last atomically: a temporary sibling, then a rename by the main process."""
    tmp = root / "last.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in _snapshot(acc, model).items()}, tmp / "weights.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, tmp / "best.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "processes": acc.num_processes}))
    acc.wait_for_everyone()
    if acc.is_main_process:
        old = root / "last.old"
        if (root / "last").exists():
            os.replace(root / "last", old)
        os.replace(tmp, root / "last")
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _load_checkpoint(path: Path, acc, model, optimizer, rank: int, keys) -> dict:
    state = json.loads((path / "state.json").read_text())
    if state.get("processes", 1) != acc.num_processes:
        raise SlimkitError(f"checkpoint {path} was written by {state['processes']} processes: resume with the same number")
    acc.unwrap_model(model).load_state_dict(load_file(path / "weights.safetensors"))
    # weights_only: tensors and plain containers, never arbitrary pickled objects
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    _set_rng_state(torch.load(path / f"rng-{rank}.pt", weights_only=True))
    return {k: state[k] for k in keys if k in state}


# --------------------------------------------------------------------------- logging


class _Log:
    """Metrics as JSON lines (metrics.jsonl), and to TensorBoard when it is installed."""

    def __init__(self, log_dir: str | None, main: bool):
        self.file = self.tb = None
        self.evals: list[dict] = []  # kept for TrainResult.history
        if not (log_dir and main):
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(log_dir) / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir)
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        if record["event"] == "eval":
            self.evals.append({k: v for k, v in record.items() if k != "event"})
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
