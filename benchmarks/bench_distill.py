"""Knowledge distillation, side by side in one run (CPU, fixed threads).

1. SmolLM2-135M (30 layers) -> 15-layer student initialised from every other
   teacher layer. KD (logit KD, alpha, T) trains for `--lm-minutes`; the same
   student is then trained with cross-entropy only (no teacher) for exactly as
   many steps, capped by the same budget. Held-out perplexity of teacher, KD
   and CE students; decode tokens/s of teacher and KD student (`slimkit.benchmark`).
2. all-MiniLM-L6-v2 (6 layers) -> 3-layer student trained with the embedding
   (cosine) loss for `--enc-minutes`. Cosine to the teacher on the evaluation
   passages, before and after training; p50 latency of teacher and student.

Issue 5 targets: KD held-out perplexity >= 15% lower than CE; decode >= 1.7x
the teacher; encoder cosine >= 0.95; encoder >= 1.8x faster. Full budgets are
25 and 10 minutes:

    python benchmarks/bench_distill.py --lm-minutes 25 --enc-minutes 10

prints a markdown table and writes the raw numbers as JSON (`--json-out`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

import slimkit
from slimkit.core.data import TextSource
from slimkit.core.hardware import environment
from slimkit.measure.quality import EvalConfig
from slimkit.measure.speed import BenchConfig


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lm_part(args) -> dict:
    teacher = slimkit.load(args.lm_teacher)
    common = dict(student_layers=args.lm_layers, layer_choice=args.layer_choice, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, eval_batches=2, seed=0)
    log(f"KD for {args.lm_minutes} min")
    kd = slimkit.distill(teacher, minutes=args.lm_minutes, temperature=args.temperature, alpha=args.alpha, **common)
    steps = kd.manifest["training"]["steps"]
    log(f"KD ran {steps} steps; CE for the same steps")
    ce = slimkit.distill(teacher, loss="ce", steps=steps, minutes=args.lm_minutes, **common)
    heldout = TextSource.parse(None, "heldout")
    cfg = EvalConfig(max_tokens=args.eval_tokens, window=512, stride=256)
    res = {"kd_training": kd.manifest["training"], "ce_training": ce.manifest["training"]}
    for name, lm in (("teacher", teacher), ("kd", kd), ("ce", ce)):
        log(f"held-out perplexity: {name}")
        res[f"{name}_heldout_ppl"] = slimkit.evaluate(lm, data=heldout, config=cfg).perplexity
    bench = BenchConfig(seq_len=128, batch_sizes=(1,), new_tokens=args.new_tokens, threads=args.threads, measure_size=False)
    log("decode speed, teacher and KD student in turn")
    speeds = interleaved({"teacher": teacher, "kd": kd}, bench, args.rounds, lambda r: r.decode_tokens_per_s)
    for name, values in speeds.items():
        res[f"{name}_decode_tok_s"] = statistics.median(values)
        res[f"{name}_decode_rounds"] = values
    return res


def interleaved(models: dict, bench: BenchConfig, rounds: int, metric) -> dict[str, list[float]]:
    """`metric` of each model's benchmark, every model taking a turn each round, so the
    host's drift hits all alike; the caller takes the median of the rounds."""
    out = {name: [] for name in models}
    for _ in range(rounds):
        for name, lm in models.items():
            out[name].append(metric(slimkit.benchmark(lm, bench)))
    return out


def encoder_part(args) -> dict:
    teacher = slimkit.load(args.enc_teacher)
    log(f"MiniLM embedding distillation for {args.enc_minutes} min")
    with tempfile.TemporaryDirectory(prefix="slimkit-teacher-cache-") as cache:
        last = [[args.enc_layers - 1, teacher.model.config.num_hidden_layers - 1]]  # student's last block <-> teacher's
        tokens = dict(hidden_weight=args.enc_token_weight, hidden_loss="cosine", layer_map=last) if args.enc_token_weight else {}
        student = slimkit.distill(teacher, student_layers=args.enc_layers, layer_choice=args.layer_choice, minutes=args.enc_minutes,
                                  batch_size=args.enc_batch, seq_len=args.enc_seq_len, lr=args.enc_lr, eval_batches=2, text_views=args.enc_views,
                                  cache_teacher=cache if args.enc_cache else None, freeze=args.enc_freeze, dropout=args.enc_dropout, **tokens)
    init = slimkit.distill.make_student(teacher, student.manifest["training"]["teacher_layers"])
    res = {"training": student.manifest["training"]}
    for name, lm in (("init", init), ("kd", student)):
        r = slimkit.evaluate(lm, teacher)
        res[f"{name}_cosine"], res[f"{name}_top10"] = r.cosine_to_reference, r.retrieval_top10_overlap
    bench = BenchConfig(seq_len=128, batch_sizes=(1,), threads=args.threads, measure_size=False)
    speeds = interleaved({"teacher": teacher, "kd": student}, bench, args.rounds, lambda r: r.latency_ms.p50)
    for name, values in speeds.items():
        res[f"{name}_p50_ms"] = statistics.median(values)
        res[f"{name}_p50_rounds"] = values
    return res


def speed_only(args) -> None:
    """Decode tokens/s and encoder p50 of teacher and student, interleaved, on students rebuilt from `--speed-only`."""
    previous = json.loads(open(args.speed_only).read())
    rows = ["| model | metric | teacher | student | ratio | target |", "|---|---|---|---|---|---|"]
    parts = []  # the parts the previous run had
    if previous.get("lm"):
        parts.append((args.lm_teacher, previous["lm"]["kd_training"]["teacher_layers"], "decode tok/s", lambda r: r.decode_tokens_per_s, 1.7))
    if previous.get("encoder"):
        parts.append((args.enc_teacher, previous["encoder"]["training"]["teacher_layers"], "p50 ms (128 tokens)", lambda r: r.latency_ms.p50, 1.8))
    for name, layers, label, metric, target in parts:
        teacher = slimkit.load(name)
        student = slimkit.distill.make_student(teacher, layers)
        bench = BenchConfig(seq_len=128, batch_sizes=(1,), new_tokens=args.new_tokens, threads=args.threads, measure_size=False)
        log(f"{name}: teacher and {len(layers)}-layer student in turn, {args.rounds} rounds")
        speeds = {k: statistics.median(v) for k, v in interleaved({"teacher": teacher, "student": student}, bench, args.rounds, metric).items()}
        ratio = speeds["student"] / speeds["teacher"] if "tok/s" in label else speeds["teacher"] / speeds["student"]
        rows.append(f"| {name} → {len(layers)} layers | {label} | {speeds['teacher']:.1f} | {speeds['student']:.1f} | {ratio:.2f}x | ≥ {target}x |")
    print("\n".join(rows) + f"\n\nrounds {args.rounds}, threads {args.threads}\n\nenvironment: {json.dumps(environment(args.threads))}")


def render(lm: dict | None, enc: dict | None, args, env: dict, seconds: float) -> str:
    rows = ["| experiment | metric | teacher | CE-only student | KD student | result | target |",
            "|---|---|---|---|---|---|---|"]
    if lm:
        ppl_gain = 1 - lm["kd_heldout_ppl"] / lm["ce_heldout_ppl"]
        decode = lm["kd_decode_tok_s"] / lm["teacher_decode_tok_s"]
        k, c = lm["kd_training"], lm["ce_training"]
        rows += [
            f"| {args.lm_teacher} → {args.lm_layers} layers | held-out perplexity | {lm['teacher_heldout_ppl']:.2f} | {lm['ce_heldout_ppl']:.2f} | {lm['kd_heldout_ppl']:.2f} | KD {ppl_gain:.1%} lower than CE | ≥ 15% lower |",
            f"| | decode tok/s (batch 1, {args.new_tokens} tokens) | {lm['teacher_decode_tok_s']:.1f} | | {lm['kd_decode_tok_s']:.1f} | {decode:.2f}x | ≥ 1.7x |",
            f"| | training steps / seconds | | {c['steps']} / {c['seconds']:.0f} | {k['steps']} / {k['seconds']:.0f} | same steps | |",
        ]
    if enc:
        speed = enc["teacher_p50_ms"] / enc["kd_p50_ms"]
        e = enc["training"]
        rows += [
            f"| {args.enc_teacher} → {args.enc_layers} layers | cosine to teacher (evaluation passages) | 1.000 | untrained: {enc['init_cosine']:.3f} | {enc['kd_cosine']:.3f} | | ≥ 0.95 |",
            f"| | retrieval top-10 overlap | 1.000 | untrained: {enc['init_top10']:.3f} | {enc['kd_top10']:.3f} | | |",
            f"| | p50 latency ms (128 tokens) | {enc['teacher_p50_ms']:.1f} | | {enc['kd_p50_ms']:.1f} | {speed:.2f}x | ≥ 1.8x |",
            f"| | training steps / seconds | | | {e['steps']} / {e['seconds']:.0f} | | |",
        ]
    settings = (f"budgets: LM {args.lm_minutes} min, encoder {args.enc_minutes} min; threads {args.threads}; LM seq_len {args.seq_len}, "
                f"batch {args.batch_size}, lr {args.lr}, T {args.temperature}, alpha {args.alpha}; held-out tokens {args.eval_tokens}; "
                f"encoder lr {args.enc_lr}, batch {args.enc_batch}, seq_len {args.enc_seq_len}, text views {args.enc_views}, teacher cache {'on' if args.enc_cache else 'off'}, "
                f"token loss weight {args.enc_token_weight}, frozen {args.enc_freeze or 'nothing'}, dropout {'as the model' if args.enc_dropout is None else args.enc_dropout}; "
                f"total {seconds / 60:.1f} min")
    return "\n".join(rows) + f"\n\n{settings}\n\nenvironment: {json.dumps(env)}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm-minutes", type=float, default=25)
    ap.add_argument("--enc-minutes", type=float, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--enc-lr", type=float, default=2e-4)
    ap.add_argument("--enc-seq-len", type=int, default=256, help="encoder: training truncation (the evaluation cuts passages at 256 tokens)")
    ap.add_argument("--enc-batch", type=int, default=32, help="encoder: passages per optimizer step")
    ap.add_argument("--enc-views", type=int, default=1, help="encoder: cut the calibration passages this many ways (text_views)")
    ap.add_argument("--enc-cache", action="store_true", help="encoder: cache the teacher's outputs for repeated epochs")
    ap.add_argument("--enc-token-weight", type=float, default=0.0,
                    help="encoder: weight of a per-token cosine loss between the student's last block and the teacher's (0: off)")
    ap.add_argument("--enc-freeze", nargs="*", default=[], help="encoder: student modules kept as copied, e.g. embeddings")
    ap.add_argument("--enc-dropout", type=float, default=None, help="encoder: the student's dropout while training (default: BERT's own 0.1)")
    ap.add_argument("--only", choices=["all", "lm", "encoder"], default="all", help="run one part")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored per model")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="speed rounds, teacher and student in turn; median reported")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--lm-teacher", default="smollm2-135m")
    ap.add_argument("--lm-layers", type=int, default=15)
    ap.add_argument("--enc-teacher", default="minilm-l6")
    ap.add_argument("--enc-layers", type=int, default=3)
    ap.add_argument("--layer-choice", default="similarity", choices=["similarity", "spread"])
    ap.add_argument("--speed-only", metavar="JSON", help="re-measure only the speeds, of students built from the teacher "
                    "layers a previous run's --json-out recorded (speed does not depend on trained weights)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed_only:
        return speed_only(args)
    started = time.time()
    lm = lm_part(args) if args.only in ("all", "lm") else None
    enc = encoder_part(args) if args.only in ("all", "encoder") else None
    table = render(lm, enc, args, environment(args.threads), time.time() - started)
    print(table)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"lm": lm, "encoder": enc, "args": vars(args)}, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
