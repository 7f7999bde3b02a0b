"""How far the block-local sensitivity ranking (block-mse, what a lazy model gets) agrees with
the whole-model one (KL of the output, a full pass per unit).

Both rank the same units of the same model for the same method on the same probe
windows; the script prints each unit's two scores and ranks, the Spearman rank
correlation, and how many of the top-k units the two share, with the environment.

    python benchmarks/sensitivity_agreement.py [--model smollm2-135m] [--method int4-wo] [-o group_size=64]
                                               [--granularity block] [--samples 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import slimkit
from slimkit.core.hardware import environment
from slimkit.core.options import parse_options


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho of two score lists (no ties expected in measured floats)."""
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0] * len(xs)
        for r, i in enumerate(order):
            out[i] = r
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="int4-wo")
    ap.add_argument("-o", "--option", action="append", default=[])
    ap.add_argument("--granularity", default="block")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    options = parse_options(args.method, args.option, "quantize")
    probe = {"granularity": args.granularity, "calibration_samples": args.samples, "seq_len": args.seq_len}
    t = time.perf_counter()
    local = slimkit.sensitivity(slimkit.load(args.model, lazy=True), args.method, options, metric="block-mse", **probe)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    whole = slimkit.sensitivity(slimkit.load(args.model), args.method, options, metric="auto", **probe)
    t_whole = time.perf_counter() - t
    a = {u.name: u.score for u in local.units}
    b = {u.name: u.score for u in whole.units}
    names = [u.name for u in whole.units]
    rank_a = {u.name: i + 1 for i, u in enumerate(local.units)}
    print(f"# {args.model}, {args.method} {options}, {args.granularity}s, {local.tokens} probe tokens\n")
    print(f"| unit | {whole.metric} | rank | block-mse | rank |\n|---|---|---|---|---|")
    for i, n in enumerate(names):
        print(f"| {n} | {b[n]:.5f} | {i + 1} | {a[n]:.5f} | {rank_a[n]} |")
    rho = spearman([a[n] for n in names], [b[n] for n in names])
    print(f"\nSpearman rho: {rho:.3f} over {len(names)} units")
    for k in (3, 5, 10):
        if k < len(names):
            shared = len({u.name for u in local.units[:k]} & {u.name for u in whole.units[:k]})
            print(f"top-{k} shared: {shared}")
    print(f"\nseconds: block-mse (lazy, block by block) {t_local:.0f}, {whole.metric} (whole model per unit) {t_whole:.0f}")
    print("environment:", json.dumps(environment(torch.get_num_threads())))


if __name__ == "__main__":
    main()
