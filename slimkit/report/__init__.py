"""The report of an optimization run: report.html, report.md and results.json.

`write_report(results, out_dir)` takes the plain results dictionary of a run:

    model, source_format (optional: what a GGUF source was stored as, {format, weights, bits}),
    kind, target, target_metric, target_label, higher_is_better,
    quality_metric, quality_label, max_quality_drop,
    baseline:   {metric: value}                      the original model
    baseline_compiled (optional): {metric: value}    the original through torch.compile
    candidates: [{name, recipe, metrics, passed, reason}]
                metrics hold the target metric, quality_drop (a fraction),
                latency_ms_p50, size_on_disk_mb, peak_memory_mb, runtime
                (eager, torch.compile, onnxruntime, ort-genai), compile_seconds,
                proxy_quality_drop and full_quality_drop, ...
    winner:     a candidate name, or None (the original is kept)
    serve (optional): [{runtime, language, lines, requires}]   how to load OUT/model
                                                     (`slimkit.io.serving.how_to_serve`)
    sensitivity (optional): [{layer, delta}]         per-layer quality change
    sparsity (optional):    [{layer, sparsity}]
    environment, timings

The table's speeds are those the search ranked by: a speed-up column against the
original on the target metric (`axes.speed_axis`; decode tokens/s for a causal LM's
latency target), and for a causal LM decode and prefill side by side, prefill being the
time to the first token. The size plot uses the same speed. The HTML is one
self-contained file: inline CSS and inline SVG plots, no scripts, nothing fetched.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from slimkit.report import plots
from slimkit.report.axes import speed_axis, speedup
from slimkit.report.origin import source_caveat, source_line, winner_caveat
from slimkit.report.pareto import pareto_front


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mark_frontier(results)
    paths = {
        "results": _atomic_write(out / "results.json", json.dumps(results, indent=2, default=str) + "\n"),
        "markdown": _atomic_write(out / "report.md", render_markdown(results)),
        "html": _atomic_write(out / "report.html", render_html(results)),
    }
    return paths


def mark_frontier(results: dict) -> None:
    """Set candidates' `on_frontier` (quality drop vs the target metric)."""
    target = results["target_metric"]
    sign = -1 if results["higher_is_better"] else 1
    cands = [c for c in results["candidates"] if c["metrics"].get(target) is not None and c["metrics"].get("quality_drop") is not None]
    front = set(pareto_front([(sign * c["metrics"][target], c["metrics"]["quality_drop"]) for c in cands]))
    for i, c in enumerate(cands):
        c["on_frontier"] = i in front


def recommendation(results: dict) -> str:
    base = results["baseline"]
    target, label = results["target_metric"], results["target_label"]
    winner = next((c for c in results["candidates"] if c["name"] == results.get("winner")), None)
    if winner is None:
        tried = "; ".join(f"{c['name']}: {c['reason']}" for c in results["candidates"]) or "no candidate could be built"
        return (
            f"No candidate met the quality budget (at most {100 * results['max_quality_drop']:.1f}% worse "
            f"{results['quality_label']}), so the original model is kept. Tried: {tried}."
        )
    m = winner["metrics"]
    ratio = _ratio(results, m)
    runtime = m.get("runtime")
    measured = base_runtime = ""
    if results["target"] in ("latency", "throughput") and runtime and runtime != base.get("runtime", "eager"):
        measured, base_runtime = f" ({runtime})", f" ({base.get('runtime', 'eager')})"
    compiled = results.get("baseline_compiled")
    alone = ""
    if runtime == "torch.compile" and compiled and compiled.get(target) is not None:
        alone = f"; the original through torch.compile alone: {_ratio(results, compiled):.2f}x"
    serve = ""
    if runtime == "torch.compile":
        how_compiled = ("`slimkit generate --compile`, or torch.compile with a static KV cache" if results.get("kind") == "causal-lm"
                        else "wrap the model in torch.compile")
        serve = f" Serve it compiled to get this speed ({how_compiled})."
    proxy, full = m.get("proxy_quality_drop"), m.get("full_quality_drop")
    checks = f" (proxy {100 * proxy:+.2f}%, full evaluation split {100 * full:+.2f}%)" if proxy is not None and full is not None else ""
    size = ""
    if target != "size_on_disk_mb" and m.get("size_on_disk_mb") and base.get("size_on_disk_mb"):
        size = f" It is {_num(m['size_on_disk_mb'])} MiB on disk against {_num(base['size_on_disk_mb'])} MiB."
    how = "`slimkit run` on the recipe below (also in the model's manifest)"
    if winner.get("export"):
        e = winner["export"]
        flags = f"--format {e['format']}" + (f" --quantize {e['quantize']}" if e.get("quantize") else "")
        how = f"`slimkit export MODEL {flags}`"
        if winner.get("recipe", {}).get("steps"):  # a recipe, then its export
            how = f"`slimkit run` on the recipe below, then `slimkit export` of its output with `{flags}`"
    return (
        f"Use {winner['name']}: {label} {_num(m[target])}{measured} against {_num(base[target])}{base_runtime} for the original "
        f"({ratio:.2f}x better{alone}), with {results['quality_label']} {100 * m['quality_drop']:+.2f}%{checks} "
        f"(budget {100 * results['max_quality_drop']:.1f}%).{winner_caveat(results, winner)}{size}{serve} Reproduce it with {how}."
    )


def _ratio(results: dict, m: dict) -> float:
    base, target = results["baseline"][results["target_metric"]], m[results["target_metric"]]
    return target / base if results["higher_is_better"] else base / target


# --------------------------------------------------------------------------- markdown


def _columns(results: dict) -> list[tuple[str, str]]:
    """(metrics key, header): quality, the target, the speed-up on the speed the search ranked by, then
    the other speeds (a causal LM's decode and prefill side by side: its time to the first token), runtime, size, memory."""
    target = results["target_metric"]
    speeds = ([("decode_tokens_per_s", "decode tokens/s"), ("latency_ms_p50", "prefill p50 ms (first token)")]
              if results.get("kind") == "causal-lm" else [("latency_ms_p50", "p50 latency ms")])
    rest = [*speeds, ("runtime", "runtime"), ("size_on_disk_mb", "size MiB"), ("peak_memory_mb", "peak RSS MiB")]
    return [
        ("quality_value", results.get("quality_metric", results["quality_label"])),  # the value itself: agreement, not 1 - agreement
        ("quality_drop", "quality drop"),
        ("proxy_vs_full", "proxy → full drop"),
        (target, results["target_label"]),
        ("speedup", f"speed-up ({speed_axis(results).short})"),
        *[(key, label) for key, label in rest if key != target],
    ]


def _cell(key: str, m: dict, results: dict) -> str:
    """One table cell of metrics `m`."""
    if key == "speedup":
        ratio = speedup(results, m)
        return "-" if ratio is None else f"{ratio:.2f}x"
    if key == "proxy_vs_full":
        proxy, full = m.get("proxy_quality_drop"), m.get("full_quality_drop")
        if proxy is None:
            return "-"
        return f"{100 * proxy:+.2f}% → {100 * full:+.2f}%" if full is not None else f"{100 * proxy:+.2f}% (proxy)"
    value = m.get(key)
    if value is None:
        return "-"
    if key == "quality_value":  # three decimals at any size: a +0.3% perplexity change is 11.641 -> 11.677
        proxy = m.get("full_quality_drop") is None and (m.get("proxy_quality_drop") is not None or m.get("quality_on") == "proxy")
        return f"{value:,.3f}" + (" (proxy)" if proxy else "")  # the proxy slice's value is not comparable with full-split ones
    if key == "runtime" and m.get("compile_seconds") is not None:
        return f"{value} ({m['compile_seconds']:.0f} s)"
    if key == "quality_drop":
        return f"{100 * value:+.2f}%"
    if key == "latency_ms_p50" and results.get("kind") == "causal-lm" and m.get("runtime") == "torch.compile":
        return f"{_num(value)} (eager)"  # `slimkit bench --compile` compiles a causal LM's decoding, not its prefill
    return _num(value)


def speed_legend(results: dict) -> str:
    """What the speed-up is measured on, and how a causal LM's prefill was run."""
    axis = speed_axis(results)
    ranked = "what the search ranked by" if axis.metric == results["target_metric"] else f"the speed of a {results['target']} search"
    text = f"Speed-up: times faster than the original (eager) on {axis.label}, {ranked}."
    if results.get("kind") == "causal-lm":
        text += (" Prefill: one prompt's p50, the time to the first token; a torch.compile row compiles decoding only,"
                 " so its prefill ran eagerly.")
    return text


def _note(c: dict, results: dict) -> str:
    """A candidate's reason, where a rollback came from or why there was none, and whether its source flatters it."""
    rb = c.get("rollback") or {}
    parts = [c.get("reason", "")]
    if rb.get("kept_high"):
        parts.append(f"rollback of {rb['of']}: {rb['kept_high']} at {rb['high']}")
    elif rb.get("skipped"):
        parts.append(rb["skipped"])
    return "; ".join(p for p in (*parts, source_caveat(results, c)) if p)


def _rows(results: dict) -> list[tuple[str, dict, str]]:
    """(name, metrics, note) of the baseline rows: the original, and compiled where measured."""
    base = {**results["baseline"], "quality_drop": 0.0}  # the original against itself
    rows = [("original", base, "baseline")]
    compiled = results.get("baseline_compiled")
    if compiled:  # the same weights: the original's quality, on the same slice
        same = {k: base[k] for k in ("quality_value", "quality_drop", "quality_on") if k in base}
        rows.append(("original, torch.compile", {**compiled, **same}, "reference: compiling alone"))
    return rows


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def render_markdown(results: dict) -> str:
    cols = _columns(results)
    lines = [
        f"# slimkit report: {results['model']}",
        "",
        f"Target: **{results['target']}** ({results['target_label']}); quality budget: at most "
        f"{100 * results['max_quality_drop']:.1f}% worse {results['quality_label']}." + (f" {source_line(results)}" if source_line(results) else ""),
        "",
        "## Recommendation",
        "",
        recommendation(results),
        "",
        "## Candidates",
        "",
        "| candidate | passed | " + " | ".join(c[1] for c in cols) + " | frontier | note |",
        "|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for name, m, note in _rows(results):
        lines.append(f"| {name} | - | " + " | ".join(_cell(k, m, results) for k, _ in cols) + f" | - | {note} |")
    for c in results["candidates"]:
        cells = " | ".join(_cell(k, c["metrics"], results) for k, _ in cols)
        lines.append(f"| {c['name']} | {'yes' if c['passed'] else 'no'} | {cells} | {'yes' if c.get('on_frontier') else ''} | {_note(c, results)} |")
    lines += ["", speed_legend(results)]
    recipe = winner_recipe(results)
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", recipe.rstrip(), "```"]
    if results.get("timings"):
        lines += ["", "## Time", "", timing_line(results)]
    env = results.get("environment", {})
    if env:
        lines += ["", "## Environment", "", ", ".join(f"{k}: {v}" for k, v in env.items())]
    if results.get("serve"):
        lines += ["", "## Serve it", ""]
        for w in results["serve"]:
            lines += [f"{w['runtime']}" + (f" (`{w['requires']}`)" if w.get("requires") else "") + ":", "",
                      f"```{'bash' if w['language'] == 'shell' else w['language']}", *w["lines"], "```", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def winner_recipe(results: dict) -> str:
    """The winner's recipe as YAML for `slimkit run` (empty without a winner, or without steps: a plain export).

    An exported winner's export is not in it: the recommendation names the `slimkit export` that follows.
    """
    import yaml

    winner = next((c for c in results["candidates"] if c["name"] == results.get("winner")), None)
    if winner is None or not winner.get("recipe", {}).get("steps"):
        return ""
    return yaml.safe_dump({"model": results["model"], **winner["recipe"]}, sort_keys=False)


def timing_line(results: dict) -> str:
    """Where the run's wall time went, against its budget."""
    t = results["timings"]
    if "seconds" not in t:
        return ""
    parts = [f"{label} {t[k]:.0f} s" for k, label in (("baseline_s", "measuring the original"), ("proxy_s", "its proxy quality"),
                                                       ("reference_s", "the original compiled"), ("confirm_s", "confirmation")) if t.get(k)]
    parts += [f"{c['name']} {c['seconds']:.0f} s" for c in results["candidates"] if c.get("seconds") is not None]
    budget = f" of a {t['time_budget_s']:.0f} s budget" if t.get("time_budget_s") else ""
    line = f"{t['seconds']:.0f} s{budget}" + (f": {', '.join(parts)}." if parts else ".")
    m = results.get("memory")
    if m:
        line += (f" Peak resident memory of the search's process: {m['peak_rss_mib']:.0f} MiB "
                 f"({m['peak_rss_mib'] / m['fp32_model_mib']:.1f}x the fp32 model's {m['fp32_model_mib']:.0f} MiB).")
    return line


# --------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
.rec{background:#f3f8fc;border-left:4px solid #2a7ab9;padding:.8rem 1rem}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plot{flex:1 1 480px;max-width:540px}.plot svg{width:100%;height:auto}
table{border-collapse:collapse;width:100%;font-size:.85rem}th,td{border-bottom:1px solid #eee;padding:.35rem .5rem;text-align:right}
th:first-child,td:first-child,th:last-child,td.note{text-align:left}tr.win{background:#fff6df}td.fail{color:#c44e52}td.pass{color:#2a7ab9}
.env{font-size:.8rem;color:#666}
pre{background:#f6f6f6;padding:.6rem .8rem;overflow-x:auto;font-size:.82rem}h3{font-size:1rem;margin-bottom:.2rem}
"""


def render_html(results: dict) -> str:
    esc = html.escape
    figures = [("quality-vs-target", plots.quality_vs_target(results)), ("size-vs-speed", plots.size_vs_speed(results))]
    if results.get("sensitivity"):
        figures.append(("sensitivity", plots.per_layer_bars(results["sensitivity"], "delta", "Per-layer sensitivity", f"{results['quality_label']} change when only this layer is compressed")))
    if results.get("sparsity"):
        figures.append(("sparsity", plots.per_layer_bars(results["sparsity"], "sparsity", "Per-layer sparsity", "fraction of weights removed")))
    cols = _columns(results)
    head = "".join(f"<th>{esc(label)}</th>" for _, label in cols)
    rows = [
        f"<tr><td>{esc(name)}</td><td>-</td>" + "".join(f"<td>{esc(_cell(k, m, results))}</td>" for k, _ in cols) + f"<td></td><td class='note'>{esc(note)}</td></tr>"
        for name, m, note in _rows(results)
    ]
    for c in results["candidates"]:
        cls = " class='win'" if c["name"] == results.get("winner") else ""
        ok = "<td class='pass'>yes</td>" if c["passed"] else "<td class='fail'>no</td>"
        cells = "".join(f"<td>{esc(_cell(k, c['metrics'], results))}</td>" for k, _ in cols)
        rows.append(f"<tr{cls}><td>{esc(c['name'])}</td>{ok}{cells}<td>{'&#9733;' if c.get('on_frontier') else ''}</td><td class='note'>{esc(_note(c, results))}</td></tr>")
    env = results.get("environment", {})
    plots_html = "".join(f"<div class='plot' id='{fid}'>{svg}</div>" for fid, svg in figures)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slimkit report: {esc(results['model'])}</title>
<style>{_CSS}</style></head><body>
<h1>slimkit report: {esc(results['model'])}</h1>
<p>Target: <b>{esc(results['target'])}</b> ({esc(results['target_label'])}); quality budget: at most
{100 * results['max_quality_drop']:.1f}% worse {esc(results['quality_label'])}. {esc(source_line(results))}</p>
<h2>Recommendation</h2><p class="rec" id="recommendation">{esc(recommendation(results))}</p>
<h2>Plots</h2><div class="plots">{plots_html}</div>
<h2>Candidates</h2><table id="candidates"><thead><tr><th>candidate</th><th>passed</th>{head}<th>frontier</th><th>note</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<p class="env" id="speed-legend">{esc(speed_legend(results))}</p>
{f"<h2>Recipe</h2><pre id='recipe'>{esc(winner_recipe(results))}</pre>" if winner_recipe(results) else ""}
<h2>Time</h2><p class="env" id="time">{esc(timing_line(results)) if results.get('timings') else ''}</p>
<h2>Environment</h2><p class="env">{esc(', '.join(f'{k}: {v}' for k, v in env.items()))}</p>
{_serve_html(results.get("serve") or [])}
</body></html>
"""


def _serve_html(ways: list[dict]) -> str:
    """The lines that load the model in each runtime (`slimkit.io.serving`), one block each."""
    if not ways:
        return ""
    esc = html.escape
    blocks = "".join(f"<h3>{esc(w['runtime'])}" + (f" <small>({esc(w['requires'])})</small>" if w.get("requires") else "")
                     + f"</h3><pre>{esc(chr(10).join(w['lines']))}</pre>" for w in ways)
    return f"<h2>Serve it</h2><div id='serve'>{blocks}</div>"


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
