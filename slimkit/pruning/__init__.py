"""Pruning: make a model sparse (zeros) or really smaller (fewer units).

Three questions in three places:
  what matters      `importance.py`: one class per criterion (magnitude L1/L2,
                    Taylor |w*grad|, Fisher, activation), on calibration data;
  what is coupled   `structured.py`: the architecture's blocks, GQA head groups,
                    MLP channel rows/columns that must go together;
  how to remove it  masks written into weights (`unstructured.py`,
                    `semi_structured.py`), or sliced tensors (`structured.py`).

Methods (each a frozen Config + apply(model, config, ctx), registered by name):
  magnitude   unstructured, per layer or global          no speed without sparse kernels
  wanda       |W| x activation norm per output row        no speed without sparse kernels
  2:4         N:M semi-structured                         sparse kernels on CUDA only
  structured  remove heads / MLP channels / layers        smaller matrices, measured speed
  gradual     cubic schedule + recovery between steps     no speed without sparse kernels

    pruned = slimkit.prune(lm, "wanda", sparsity=0.5)
"""

from __future__ import annotations

import re

from slimkit.core.data import TextSource, calibration_source
from slimkit.core.errors import SlimkitError
from slimkit.core.hardware import resolve_device
from slimkit.core.options import apply, make_config
from slimkit.core.registry import Context
from slimkit.io.blockwise import read_whole
from slimkit.io.loader import load
from slimkit.io.model import LoadedModel, on_device
from slimkit.pruning import schedule, semi_structured, shapes, structured, unstructured  # noqa: F401  (they register)
from slimkit.pruning.semi_structured import parse_nm


def prune(model: LoadedModel | str, method: str, *, data: TextSource | str | None = None, seed: int = 0,
          device: str | None = None, on_step=None, tokenizer=None, stream: bool | str = False, **options) -> LoadedModel:
    """Prune `model` with a registered method; options are the method's Config fields.
    Returns a new model; the caller's is untouched. `data`: calibration text (its
    calibration split), as `slimkit.quantize` takes it; `model`, `tokenizer`, `device`
    and `stream` as there: with a lazy model (`load(path, lazy=True)`) on the CPU, wanda
    and magnitude (per layer, |W| or the activation criterion, no recovery) go block by
    block and, streaming, write each finished block to disk; the other methods, and
    those with one threshold across layers, gradients or recovery training, read the
    model whole first."""
    device = resolve_device(device)
    ctx = Context(calibration_source(data), seed, device, on_step, stream)
    make_config(method, options, "prune")  # a bad option fails before the model is copied to the device
    pruned = apply(on_device(read_whole(load(model, tokenizer=tokenizer), method, device), device), method, options, ctx, "prune")
    if device is not None and pruned.staged is None:
        pruned.model.to(device)
    return pruned


def cli_options(method: str, sparsity: float | None, recover_minutes: float, of: str | None = None) -> tuple[str, dict]:
    """The registered technique and its options for `slimkit prune --method M [--sparsity S] [--of model|blocks]`.
    An N:M pattern such as 2:4 or 1:4 selects the semi-structured method."""
    options: dict = {}
    if of is not None:
        if method != "structured":
            raise SlimkitError(f"--of says what structured pruning's --sparsity counts; {method} zeroes a fraction of each layer's weights: drop --of")
        options["of"] = of
    if re.fullmatch(r"\d+:\d+", method):
        n, m = parse_nm(method)
        options.update(n=n, m=m)
        if sparsity is not None and (m <= 0 or abs(sparsity - (1 - n / m)) > 1e-9):
            raise SlimkitError(f"{method} sparsity is fixed by the pattern; drop --sparsity (got {sparsity})")
        method = "2:4"
    elif sparsity is not None:
        options["sparsity"] = sparsity
    if recover_minutes:
        options["recover_minutes"] = recover_minutes
    return method, options


def summary(lm: LoadedModel, before: int) -> dict:
    """What a prune did, for the CLI and reports."""
    report = lm.manifest.get("prune_report", {})
    out = {"method": report.get("method"), "parameters_before": before, "parameters_after": lm.num_parameters(),
           "speed": report.get("speed")}
    if "sparsity" in report:
        out["sparsity"] = report["sparsity"]["overall"]
    if "removed_fraction" in report:
        out["removed_fraction"] = report["removed_fraction"]
        out["removed_fraction_of_blocks"] = report.get("removed_fraction_of_blocks")
        out["layers"] = report.get("layers")
    return out

