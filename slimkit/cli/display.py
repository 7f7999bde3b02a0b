"""Readable tables of results for the terminal."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from slimkit.measure.quality import EvalResult
from slimkit.measure.speed import BenchResult


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def eval_rows(r: EvalResult) -> list[tuple[str, str]]:
    rows = [
        ("perplexity", fmt(r.perplexity)),
        ("reference perplexity", fmt(r.reference_perplexity)),
        ("KL divergence to reference (nats/token)", fmt(r.kl_divergence, 5)),
        ("top-1 agreement with reference", fmt(r.top1_agreement, 4)),
        ("embedding cosine to reference", fmt(r.cosine_to_reference, 4)),
        ("retrieval top-10 overlap", fmt(r.retrieval_top10_overlap, 4)),
        ("accuracy", fmt(r.accuracy, 4)),
        ("macro F1", fmt(r.f1_macro, 4)),
        ("prediction agreement with reference", fmt(r.agreement_with_reference, 4)),
        ("tokens scored" if r.tokens is not None else "samples", fmt(r.tokens if r.tokens is not None else r.samples)),
        ("data", r.data),
    ]
    return [(k, v) for k, v in rows if v != "-"]


def bench_rows(r: BenchResult) -> list[tuple[str, str]]:
    rows = [
        (f"latency p50 / p90 / p99 (ms, {r.seq_len} tokens)", f"{fmt(r.latency_ms.p50, 2)} / {fmt(r.latency_ms.p90, 2)} / {fmt(r.latency_ms.p99, 2)}"),
        ("prefill tokens/s", fmt(r.prefill_tokens_per_s, 1)),
        (f"decode tokens/s ({r.new_tokens} new tokens, {r.decode_runtime})", fmt(r.decode_tokens_per_s, 1)),
        ("compile seconds", fmt(r.compile_seconds, 1)),
    ]
    rows += [(f"throughput, batch {t['batch_size']} (sequences/s)", fmt(t["sequences_per_s"], 2)) for t in r.throughput]
    rows += [
        ("peak memory (MiB RSS)", fmt(r.peak_memory_mb, 0)),
        ("CUDA peak memory (MiB)", fmt(r.cuda_peak_memory_mb, 0)),
        ("size on disk (MiB)", fmt(r.size_on_disk_mb, 1)),
        ("parameters", fmt(r.parameters)),
        ("dtype / device / threads", f"{r.dtype} / {r.device} / {r.threads}"),
        ("cpu", str(r.environment.get("cpu", "-"))),
    ]
    return [(k, v) for k, v in rows if not v.startswith("-")]


def table(title: str, rows: list[tuple[str, str]], columns: tuple[str, str] = ("metric", "value")) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column(columns[0])
    t.add_column(columns[1], justify="right")
    for k, v in rows:
        t.add_row(escape(k), escape(v))
    return t
