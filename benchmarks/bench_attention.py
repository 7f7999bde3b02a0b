"""Training attention on CPU: PyTorch's SDPA in bfloat16 against SDPA computed in float32.

Under bfloat16 autocast, a model's attention inputs are bfloat16 and PyTorch's fused
CPU attention kernel runs in bfloat16; its backward is slow there. `slimkit.models.
training_attention` makes a CPU model train with SDPA computed in float32 instead
(`FLOAT32_SDPA`), casts included. Two measurements, side by side in one run, each
implementation taking a turn every round (median of the rounds):

1. attention alone, forward and backward, at MiniLM's shape (32 sequences, 12 heads
   of 32, padded) for several lengths, and at SmolLM2's (4 x 256 tokens, 9 heads of
   64, causal);
2. a whole training step (forward, backward, AdamW) of the 3-layer all-MiniLM-L6-v2
   student that `bench_distill.py` trains, over a sample of its length-sorted
   training batches, and of the 15-layer SmolLM2-135M student on 4 x 256 tokens.

    python benchmarks/bench_attention.py [--rounds 5] [--threads 2]

prints a markdown table of times and ratios (bfloat16 SDPA / `training_attention`, which
computes in float32 only for the shapes where it pays) and the environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import slimkit
from slimkit.core.attention import attention_implementation, training_attention
from slimkit.core.data import TextSource
from slimkit.core.hardware import environment
from slimkit.distillation.method import DistillConfig, frozen_parameters, make_batches, set_dropout
from slimkit.distillation.student import make_student


def attention_rows(rounds: int) -> list[str]:
    """Forward + backward of attention alone, at the shapes the two students train with."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    student = make_student(slimkit.load("minilm-l6"), [0, 4, 5]).model
    module = student.encoder.layer[0].attention.self
    float32, sdpa = ALL_ATTENTION_FUNCTIONS[training_attention(student)], ALL_ATTENTION_FUNCTIONS["sdpa"]
    rows = []
    shapes = [(32, 12, t, 32, False) for t in (40, 90, 128, 160, 256)] + [(4, 9, 256, 64, True)]
    for b, h, t, d, causal in shapes:
        q, k, v = (torch.randn(b, h, t, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        mask = None
        if not causal:  # half the rows padded by an eighth, as a length-sorted batch may be
            mask = torch.ones(b, 1, t, t, dtype=torch.bool)
            mask[: b // 2, ..., t - t // 8 :] = False
        module.is_causal = causal

        def step(fn):
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out, _ = fn(module, q, k, v, mask, scaling=d**-0.5, dropout=0.0)
                out.float().pow(2).mean().backward()

            return run

        times = interleave({"bf16": step(sdpa), "fp32": step(float32)}, rounds)
        what = f"{b} x {t} tokens, {h} heads of {d}" + (", causal" if causal else "")
        rows.append(row("attention fwd+bwd", what, times))
    module.is_causal = False
    return rows


def interleave(runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each run, every run taking a turn each round."""
    for fn in runs.values():
        fn()  # warm-up
    out = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in out.items()}


def row(what: str, shape: str, times: dict[str, float]) -> str:
    return f"| {what} | {shape} | {1000 * times['bf16']:.1f} | {1000 * times['fp32']:.1f} | {times['bf16'] / times['fp32']:.2f}x |"


def training_rows(rounds: int, sample: int) -> list[str]:
    """Whole training steps of the two students, bf16 autocast, with each attention; no
    dropout (with dropout, SDPA leaves the fused kernel for its unfused math path)."""
    rows = []
    for name, keep, cfg, n in (
        ("minilm-l6", [0, 4, 5], DistillConfig(student_layers=3, steps=1, batch_size=32, seq_len=256, text_views=4), sample),
        ("smollm2-135m", None, DistillConfig(student_layers=15, steps=1, batch_size=4, seq_len=256, max_samples=8), 2),  # one length
    ):
        teacher = slimkit.load(name)
        keep = keep or list(range(0, teacher.model.config.num_hidden_layers, 2))
        model = make_student(teacher, keep).model.train()
        for p in frozen_parameters(model, ["embeddings"] if name == "minilm-l6" else []):  # as bench_distill.py trains them
            p.requires_grad_(False)
        batches = make_batches(teacher, TextSource.parse(None, "calibration"), cfg, limit=None)
        batches = [batches[i * len(batches) // n] for i in range(n)]  # spread over the lengths
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def steps(impl):
            def run():
                with attention_implementation(model, impl), set_dropout(model, 0.0):
                    for b in batches:
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            out = model(**{k: v for k, v in b.items() if k != "labels"})
                        (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().pow(2).mean().backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)

            return run

        times = interleave({"bf16": steps("sdpa"), "fp32": steps(training_attention(model))}, rounds)
        times = {k: v / len(batches) for k, v in times.items()}
        tokens = statistics.mean(b["input_ids"].shape[1] for b in batches)
        rows.append(row(f"{name} → {len(keep)}-layer student, training step",
                        f"{len(batches)} batches of {cfg.batch_size}, mean {tokens:.0f} tokens", times))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample", type=int, default=8, help="MiniLM training batches per timed pass")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = ["| measured | shape | bf16 SDPA ms | training attention ms | speed-up |", "|---|---|---|---|---|"]
    rows += attention_rows(args.rounds) + training_rows(args.rounds, args.sample)
    env = environment(args.threads)
    print("\n".join(rows) + f"\n\nrounds {args.rounds}, threads {args.threads}; times are medians per call or per step\n\nenvironment: {json.dumps(env)}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"rows": rows, "args": vars(args), "environment": env}, fh, indent=2)


if __name__ == "__main__":
    main()
