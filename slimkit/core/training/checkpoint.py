"""Checkpoints that resume a run bit-exactly, and the RNG states they carry.

A checkpoint (`<checkpoint_dir>/last`) holds the trained module's weights
(student and loss projections, safetensors), the optimizer state, the loop's
state (step, planned steps, elapsed time, early-stopping state), the best
weights so far when evaluation keeps them, and every process's RNG states.
Since everything the loop does is a function of the step (`loop.py`), a run
resumed from it continues as if it had not stopped. It is written to a
temporary sibling and renamed, so a crash mid-write leaves the previous one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimkit.core.errors import SlimkitError


def snapshot(acc, model) -> dict:
    """A CPU copy of the trained module's weights."""
    return {k: v.detach().cpu().clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def read_best(ckpt: Path | None) -> dict | None:
    f = ckpt / "best.safetensors" if ckpt else None
    return load_file(f) if f and f.exists() else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, acc, model, optimizer, state: dict, rank: int, best: dict | None) -> None:
    """Write root/last atomically: a temporary sibling, then a rename by the main process."""
    tmp = root / "last.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in snapshot(acc, model).items()}, tmp / "weights.safetensors")
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


def load_checkpoint(path: Path, acc, model, optimizer, rank: int, keys) -> dict:
    """Restore weights, optimizer and this process's RNG from `path`; return the loop state's `keys`."""
    state = json.loads((path / "state.json").read_text())
    if state.get("processes", 1) != acc.num_processes:
        raise SlimkitError(f"checkpoint {path} was written by {state['processes']} processes: resume with the same number")
    acc.unwrap_model(model).load_state_dict(load_file(path / "weights.safetensors"))
    # weights_only: tensors and plain containers, never arbitrary pickled objects
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-{rank}.pt", weights_only=True))
    return {k: state[k] for k in keys if k in state}
