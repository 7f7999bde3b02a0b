"""Peak memory of a whole `slimkit optimize` run, against the bound of 3x the fp32 model.

Runs `slimkit optimize [ARGS] --out DIR --overwrite` and samples, every
`--interval` seconds, the resident (RSS) and proportional (PSS: shared pages
split between the processes that map them) memory of the search process and
of every process it starts (the benchmark processes, the compile workers),
from /proc/PID/smaps_rollup. The peaks are printed as a table with their
ratio to the fp32 model's size (`results.json` -> `memory.fp32_model_mib`).
Sampling misses spikes shorter than the interval; the search process's own
`ru_maxrss`, which misses nothing, is printed beside it.

    python benchmarks/optimize_memory.py [--interval 0.25] [--json mem.json] [-- OPTIMIZE ARGS...]

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slimkit.core.hardware import environment


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        kids = []
        for t in tasks:
            kids += [int(c) for c in (t / "children").read_text().split()]
        return kids
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--json", default=None)
    ap.add_argument("optimize_args", nargs="*", help="arguments for slimkit optimize (after --)")
    args = ap.parse_args()
    slimkit_cli = str(Path(sys.executable).with_name("slimkit"))
    with tempfile.TemporaryDirectory(prefix="slimkit-optmem-") as tmp:
        out = Path(tmp) / "out"
        cmd = [slimkit_cli, "optimize", *args.optimize_args, "--out", str(out), "--overwrite"]
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = {"search_rss": 0, "search_pss": 0, "child_rss": 0, "tree_rss": 0, "tree_pss": 0}
        while proc.poll() is None:
            pids = _tree(proc.pid)
            samples = {p: _rollup(p) for p in pids}
            own = samples.get(proc.pid, (0, 0))
            peak["search_rss"] = max(peak["search_rss"], own[0])
            peak["search_pss"] = max(peak["search_pss"], own[1])
            peak["child_rss"] = max([peak["child_rss"]] + [v[0] for p, v in samples.items() if p != proc.pid])
            peak["tree_rss"] = max(peak["tree_rss"], sum(v[0] for v in samples.values()))
            peak["tree_pss"] = max(peak["tree_pss"], sum(v[1] for v in samples.values()))
            time.sleep(args.interval)
        err = proc.stderr.read()
        if proc.returncode != 0:
            sys.exit(f"slimkit optimize failed (exit {proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}")
        results = json.loads((out / "results.json").read_text())
    seconds = time.time() - started
    fp32 = results["memory"]["fp32_model_mib"]
    bound = 3 * fp32
    rows = [
        ("search process, peak RSS (sampled)", peak["search_rss"] / 1024),
        ("search process, peak RSS (ru_maxrss)", results["memory"]["peak_rss_mib"]),
        ("search process, peak PSS", peak["search_pss"] / 1024),
        ("largest child process, peak RSS", peak["child_rss"] / 1024),
        ("whole process tree, peak PSS", peak["tree_pss"] / 1024),
        ("whole process tree, peak RSS (shared pages counted twice)", peak["tree_rss"] / 1024),
    ]
    print(f"slimkit optimize {' '.join(args.optimize_args)}: winner {results['winner']}, {seconds:.0f} s")
    print(f"fp32 model {fp32:.0f} MiB; bound 3x = {bound:.0f} MiB\n")
    print("| measurement | MiB | x fp32 model | under 3x |")
    print("|---|---|---|---|")
    for label, mib in rows:
        print(f"| {label} | {mib:,.0f} | {mib / fp32:.2f}x | {'yes' if mib <= bound else 'no'} |")
    env = results.get("environment") or environment(None)  # what the search recorded, threads included
    print(f"\nenvironment: {json.dumps(env)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks_mib": {k: v / 1024 for k, v in peak.items()}, "results_memory": results["memory"],
                                               "winner": results["winner"], "seconds": seconds, "timings": results["timings"],
                                               "candidates": [(c["name"], c["stage"], c["reason"]) for c in results["candidates"]],
                                               "environment": env}, indent=2))


if __name__ == "__main__":
    main()
