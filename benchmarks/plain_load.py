"""Does an artifact load in plain transformers, and does it score what slimkit says?

    python benchmarks/plain_load.py [DIR] [--max-tokens 4096] [--threads 2]

DIR (default `optimize-out/model`, the artifact `make run` writes) is scored twice
on the same evaluation windows: by `slimkit.evaluate` (what `slimkit eval DIR`
reports) and by `AutoModelForCausalLM.from_pretrained(DIR)` in a fresh process
that never imports slimkit (the same windows, the standard next-token loss).
Target: perplexities within 0.5% for an artifact in the `transformers` or
`compressed-tensors` layout. An artifact in slimkit's own layout must instead
make plain transformers fail with a message naming slimkit.load; the row says
which happened. Prints a markdown table and the environment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import slimkit
from slimkit.core import data as D
from slimkit.core.hardware import environment
from slimkit.measure.quality import EvalConfig, evaluate

PLAIN = """
import json, math, sys, time
import torch
from transformers import AutoModelForCausalLM
path, windows_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
start = time.perf_counter()
try:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
loaded = time.perf_counter() - start
nll, n = 0.0, 0
with torch.inference_mode():
    for ids, scored in json.load(open(windows_file)):
        ids = torch.tensor([ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, -scored - 1 : -1].float()  # (scored, V)
        nll += torch.nn.functional.cross_entropy(logits, ids[0, -scored:], reduction="sum").item()
        n += scored
assert "slimkit" not in sys.modules
print(json.dumps({"perplexity": math.exp(nll / n), "tokens": n, "load_s": loaded, "eval_s": time.perf_counter() - start - loaded}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="optimize-out/model")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on evaluation tokens (default: the whole split)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.path)
    manifest = json.loads((path / "slimkit.json").read_text())
    config = EvalConfig(max_tokens=args.max_tokens)

    start = time.perf_counter()
    lm = slimkit.load(str(path))
    ours = evaluate(lm, config=config)
    ours_s = time.perf_counter() - start
    windows = list(D.lm_windows(lm.tokenizer, D.TextSource.parse(None).texts(), config.window, config.stride, config.max_tokens))
    with tempfile.NamedTemporaryFile("w", suffix=".json") as fh:
        json.dump(windows, fh)
        fh.flush()
        proc = subprocess.run([sys.executable, "-c", PLAIN, str(path), fh.name, str(args.threads)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the plain transformers process crashed:\n{proc.stderr[-3000:]}")
    plain = json.loads(proc.stdout.strip().splitlines()[-1])

    layout = manifest.get("layout", "slimkit")
    print("| artifact | layout | slimkit eval ppl | plain transformers ppl | difference | target | result |")
    print("|---|---|---|---|---|---|---|")
    if "error" in plain:
        named = "slimkit.load" in plain["error"]
        verdict = "refused, names slimkit.load" if named and layout == "slimkit" else "FAILED: " + plain["error"].splitlines()[0][:120]
        print(f"| {path} | {layout} | {ours.perplexity:.4f} | refused | - | fail loudly | {verdict} |")
        print(f"\nWhy slimkit-only: {manifest.get('slimkit_only')}")
    else:
        diff = plain["perplexity"] / ours.perplexity - 1
        verdict = "ok" if abs(diff) <= 0.005 and layout != "slimkit" else "FAILED"
        print(f"| {path} | {layout} | {ours.perplexity:.4f} | {plain['perplexity']:.4f} | {diff:+.3%} | within 0.5% | {verdict} |")
        print(f"\nTokens {plain['tokens']} (slimkit {ours.tokens}); slimkit load+eval {ours_s:.1f} s, "
              f"plain load {plain['load_s']:.1f} s + eval {plain['eval_s']:.1f} s")
    print(f"\nEnvironment: {json.dumps(environment(args.threads))}")


if __name__ == "__main__":
    main()
