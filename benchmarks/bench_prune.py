"""Pruning side by side in one run (CPU, fixed threads), as ratios to the original.

  1. SmolLM2-135M, 50% unstructured: magnitude vs Wanda, perplexity increase
     over fp32 on the evaluation split (target: Wanda's at most half of magnitude's).
  2. SmolLM2-135M, structured removal of 25% of parameters (GQA head groups +
     MLP channels) + recovery fine-tuning on the calibration split: perplexity
     vs fp32 (target <= +30%) and prefill tokens/s (target >= 1.25x).
  3. all-MiniLM-L6-v2, structured removal of 30% of MLP channels + recovery
     (matching the original's embeddings): cosine to the original (target
     >= 0.97) and latency (target >= 1.2x faster).

Speed is measured in this process with the same settings for each model,
original and pruned alternately (`--rounds` times; the best p50 of each is
kept, which tames noise from other work on a shared machine).

    python benchmarks/bench_prune.py [--recover-minutes 20] \
        [--minilm-recover-minutes 5] [--max-tokens 4096] [--threads 2]

prints a markdown table and the environment (benchmarks/RESULTS-prune.md holds the latest).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import slimkit
from slimkit.core.data import TextSource
from slimkit.core.hardware import environment
from slimkit.measure.quality import EvalConfig, evaluate
from slimkit.measure.speed import BenchConfig, benchmark
from slimkit.pruning.recovery import RecoveryConfig, recover


def best_latency(models: dict, config: BenchConfig, rounds: int) -> dict:
    """name -> best p50 latency (ms) and prefill tokens/s over alternating rounds."""
    best = {}
    for _ in range(rounds):
        for name, lm in models.items():
            r = benchmark(lm, config)
            if name not in best or r.latency_ms.p50 < best[name]["p50_ms"]:
                best[name] = {"p50_ms": r.latency_ms.p50, "prefill_tok_s": r.prefill_tokens_per_s}
    return best


def smollm2_part(args, quality, speed_lm, rows, raw, log) -> None:
    lm = slimkit.load("smollm2-135m")
    base = evaluate(lm, config=quality).perplexity
    log(f"fp32 perplexity {base:.3f}")
    ppl = {}
    for method in ("magnitude", "wanda"):
        ppl[method] = evaluate(slimkit.prune(lm, method, sparsity=0.5), config=quality).perplexity
        log(f"{method} 50% perplexity {ppl[method]:.3f}")
    inc = {m: ppl[m] - base for m in ppl}
    ratio = inc["wanda"] / inc["magnitude"]
    rows += [
        ("SmolLM2 fp32 perplexity", f"{base:.3f}", "", ""),
        ("SmolLM2 50% magnitude perplexity", f"{ppl['magnitude']:.3f}", f"+{inc['magnitude']:.3f} ({ppl['magnitude'] / base:.2f}x)", ""),
        ("SmolLM2 50% Wanda perplexity", f"{ppl['wanda']:.3f}", f"+{inc['wanda']:.3f} ({ppl['wanda'] / base:.2f}x)", ""),
        ("Wanda increase / magnitude increase", f"{ratio:.3f}", "target <= 0.5", "pass" if ratio <= 0.5 else "FAIL"),
        ("unstructured 50% speed", "not faster", "no speed without sparse kernels (dense zeros)", ""),
    ]
    raw["unstructured"] = {"fp32": base, **ppl}

    one_shot = slimkit.prune(lm, "structured", sparsity=0.25)
    shot_ppl = evaluate(one_shot, config=quality).perplexity
    log(f"structured 25% one-shot perplexity {shot_ppl:.3f}; recovering {args.recover_minutes} min")
    rec = recover(one_shot, lm, RecoveryConfig(minutes=args.recover_minutes, mode=args.recovery, lr=args.lr, warmup_steps=2))
    rec_ppl = evaluate(one_shot, config=quality).perplexity
    if args.heldout:
        held = TextSource.parse(None, "heldout")
        held_base = evaluate(lm, data=held, config=quality).perplexity
        held_rec = evaluate(one_shot, data=held, config=quality).perplexity
    report = one_shot.manifest["prune_report"]
    log(f"recovered perplexity {rec_ppl:.3f} after {rec}")
    sp = best_latency({"fp32": lm, "pruned": one_shot}, speed_lm, args.rounds)
    speedup = sp["pruned"]["prefill_tok_s"] / sp["fp32"]["prefill_tok_s"]
    log(f"prefill {sp}")
    rows += [
        ("SmolLM2 structured: parameters removed", f"{report['removed_fraction']:.3f}",
         f"{report['parameters_before']:,} -> {report['parameters_after']:,}; {report['amounts']} per layer", ""),
        ("SmolLM2 structured one-shot perplexity", f"{shot_ppl:.3f}", f"{shot_ppl / base:.2f}x fp32", ""),
        (f"SmolLM2 structured + {rec['seconds'] / 60:.1f} min recovery ({args.recovery}, {rec['tokens']:,} tokens)",
         f"{rec_ppl:.3f}", f"{rec_ppl / base:.3f}x fp32 (target <= 1.30)", "pass" if rec_ppl / base <= 1.30 else "FAIL"),
    ]
    if args.heldout:
        rows.append(("  same on the held-out split (never trained on)", f"{held_rec:.3f}", f"{held_rec / held_base:.3f}x fp32 ({held_base:.3f})", ""))
    rows += [
        ("SmolLM2 structured prefill tokens/s (128 tokens, batch 1)", f"{sp['pruned']['prefill_tok_s']:.1f}",
         f"{speedup:.2f}x fp32 {sp['fp32']['prefill_tok_s']:.1f} (target >= 1.25)", "pass" if speedup >= 1.25 else "FAIL"),
    ]
    raw["structured_llm"] = {"one_shot": shot_ppl, "recovered": rec_ppl, "recovery": rec, "speed": sp, "report": {k: v for k, v in report.items() if k != "layers"}}
    del lm, one_shot


def minilm_part(args, rows, raw, log) -> None:
    enc = slimkit.load("minilm-l6")
    channels = enc.model.config.intermediate_size
    pruned = slimkit.prune(enc, "structured", units=["mlp"], mlp_channels=round(0.3 * channels),
                           calibration_samples=args.minilm_calibration, seq_len=128, batch_size=16)
    cos_shot = evaluate(pruned, enc).cosine_to_reference
    log(f"MiniLM one-shot cosine {cos_shot:.4f}; recovering {args.minilm_recover_minutes} min")
    rec_enc = recover(pruned, enc, RecoveryConfig(minutes=args.minilm_recover_minutes, lr=args.minilm_lr, batch_size=16, seq_len=128))
    ev = evaluate(pruned, enc)
    ev_held = evaluate(pruned, enc, data=TextSource.parse(None, "heldout"), config=EvalConfig(max_passages=128))
    speed_enc = BenchConfig(seq_len=128, batch_sizes=(1,), min_seconds=3.0, threads=args.threads, measure_size=False)
    se = best_latency({"fp32": enc, "pruned": pruned}, speed_enc, args.rounds)
    lat = se["fp32"]["p50_ms"] / se["pruned"]["p50_ms"]
    log(f"MiniLM cosine {ev.cosine_to_reference:.4f}, latency {se}")
    rows += [
        ("MiniLM structured: MLP channels removed", f"{round(0.3 * channels)} of {channels} per layer",
         f"{pruned.manifest['prune_report']['removed_fraction']:.3f} of all parameters", ""),
        ("MiniLM one-shot embedding cosine", f"{cos_shot:.4f}", "", ""),
        (f"MiniLM + {rec_enc['seconds'] / 60:.1f} min recovery: embedding cosine", f"{ev.cosine_to_reference:.4f}",
         "target >= 0.97", "pass" if ev.cosine_to_reference >= 0.97 else "FAIL"),
        ("  held-out cosine / retrieval top-10 overlap", f"{ev_held.cosine_to_reference:.4f}", f"{ev_held.retrieval_top10_overlap:.3f}", ""),
        ("MiniLM latency p50 (128 tokens, batch 1)", f"{se['pruned']['p50_ms']:.2f} ms",
         f"{lat:.2f}x faster than fp32 {se['fp32']['p50_ms']:.2f} ms (target >= 1.2)", "pass" if lat >= 1.2 else "FAIL"),
    ]
    raw["structured_encoder"] = {"one_shot": cos_shot, "recovered": ev.cosine_to_reference, "recovery": rec_enc, "speed": se}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recover-minutes", type=float, default=20.0, help="SmolLM2 structured recovery budget")
    ap.add_argument("--minilm-recover-minutes", type=float, default=5.0)
    ap.add_argument("--recovery", default="finetune", choices=["finetune", "distill"])
    ap.add_argument("--lr", type=float, default=2e-4, help="SmolLM2 recovery learning rate")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens for perplexity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--heldout", action="store_true", help="also score the recovered LM on the held-out split")
    ap.add_argument("--json", help="also write the raw numbers to this file")
    ap.add_argument("--only", choices=["all", "smollm2", "minilm"], default="all", help="run one model's part")
    ap.add_argument("--minilm-calibration", type=int, default=1024,
                    help="calibration passages for MiniLM's channel choice and refit (the split has about 900: all of them)")
    ap.add_argument("--minilm-lr", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    quality = EvalConfig(max_tokens=args.max_tokens)
    speed_lm = BenchConfig(seq_len=128, batch_sizes=(1,), new_tokens=8, decode_repeats=1, min_seconds=3.0,
                           threads=args.threads, measure_size=False)
    rows, raw = [], {"settings": vars(args)}

    def log(msg):
        print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)

    if args.only in ("all", "smollm2"):
        smollm2_part(args, quality, speed_lm, rows, raw, log)
    if args.only in ("all", "minilm"):
        minilm_part(args, rows, raw, log)
    env = environment(args.threads)
    print("\n| measurement | value | vs original / target | |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nEnvironment: {json.dumps(env)}\nSettings: {json.dumps(vars(args))}\nTotal time: {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**raw, "environment": env}, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
