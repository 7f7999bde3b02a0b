"""The report of an optimization run: report.html, report.md and results.json.

`write_report(results, out_dir)` takes the plain results dictionary of a run:

    model, kind, target, target_metric, target_label, higher_is_better,
    quality_metric, quality_label, max_quality_drop,
    baseline:   {metric: value}                      the original model
    candidates: [{name, recipe, metrics, passed, reason}]
                metrics hold the target metric, quality_drop (a fraction),
                latency_ms_p50, size_on_disk_mb, peak_memory_mb, ...
    winner:     a candidate name, or None (the original is kept)
    sensitivity (optional): [{layer, delta}]         per-layer quality change
    sparsity (optional):    [{layer, sparsity}]
    environment, timings

The HTML is one self-contained file: inline CSS and inline SVG plots, no
scripts, nothing fetched.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from slimkit.pareto import pareto_front
from slimkit.report import plots


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
    ratio = m[target] / base[target] if results["higher_is_better"] else base[target] / m[target]
    size = ""
    if m.get("size_on_disk_mb") and base.get("size_on_disk_mb"):
        size = f" It is {m['size_on_disk_mb']:.0f} MiB on disk against {base['size_on_disk_mb']:.0f} MiB."
    return (
        f"Use {winner['name']}: {label} {_num(m[target])} against {_num(base[target])} for the original "
        f"({ratio:.2f}x better), with {results['quality_label']} {100 * m['quality_drop']:+.2f}% "
        f"(budget {100 * results['max_quality_drop']:.1f}%).{size} Reproduce it with "
        f"`slimkit run` on the recipe saved next to the model."
    )


# --------------------------------------------------------------------------- markdown


def _columns(results: dict) -> list[tuple[str, str]]:
    return [
        ("quality_value", results["quality_label"]),
        ("quality_drop", "quality drop"),
        (results["target_metric"], results["target_label"]),
        ("latency_ms_p50", "p50 latency ms"),
        ("size_on_disk_mb", "size MiB"),
        ("peak_memory_mb", "peak RSS MiB"),
    ]


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "quality_drop":
        return f"{100 * value:+.2f}%"
    return _num(value)


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
        f"{100 * results['max_quality_drop']:.1f}% worse {results['quality_label']}.",
        "",
        "## Recommendation",
        "",
        recommendation(results),
        "",
        "## Candidates",
        "",
        "| candidate | passed | " + " | ".join(c[1] for c in cols) + " | frontier | note |",
        "|---|---|" + "---|" * len(cols) + "---|---|",
        "| original | - | " + " | ".join(_cell(k, results["baseline"].get(k)) for k, _ in cols) + " | - | baseline |",
    ]
    for c in results["candidates"]:
        cells = " | ".join(_cell(k, c["metrics"].get(k)) for k, _ in cols)
        lines.append(f"| {c['name']} | {'yes' if c['passed'] else 'no'} | {cells} | {'yes' if c.get('on_frontier') else ''} | {c.get('reason', '')} |")
    env = results.get("environment", {})
    if env:
        lines += ["", "## Environment", "", ", ".join(f"{k}: {v}" for k, v in env.items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
.rec{background:#f3f8fc;border-left:4px solid #2a7ab9;padding:.8rem 1rem}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plot{flex:1 1 480px;max-width:540px}.plot svg{width:100%;height:auto}
table{border-collapse:collapse;width:100%;font-size:.85rem}th,td{border-bottom:1px solid #eee;padding:.35rem .5rem;text-align:right}
th:first-child,td:first-child,td.note{text-align:left}tr.win{background:#fff6df}td.fail{color:#c44e52}td.pass{color:#2a7ab9}
.env{font-size:.8rem;color:#666}
"""


def render_html(results: dict) -> str:
    esc = html.escape
    figures = [("quality-vs-target", plots.quality_vs_target(results)), ("size-vs-latency", plots.size_vs_latency(results))]
    if results.get("sensitivity"):
        figures.append(("sensitivity", plots.per_layer_bars(results["sensitivity"], "delta", "Per-layer sensitivity", f"{results['quality_label']} change when only this layer is compressed")))
    if results.get("sparsity"):
        figures.append(("sparsity", plots.per_layer_bars(results["sparsity"], "sparsity", "Per-layer sparsity", "fraction of weights removed")))
    cols = _columns(results)
    head = "".join(f"<th>{esc(label)}</th>" for _, label in cols)
    rows = [
        "<tr><td>original</td><td>-</td>" + "".join(f"<td>{esc(_cell(k, results['baseline'].get(k)))}</td>" for k, _ in cols) + "<td></td><td class='note'>baseline</td></tr>"
    ]
    for c in results["candidates"]:
        cls = " class='win'" if c["name"] == results.get("winner") else ""
        ok = "<td class='pass'>yes</td>" if c["passed"] else "<td class='fail'>no</td>"
        cells = "".join(f"<td>{esc(_cell(k, c['metrics'].get(k)))}</td>" for k, _ in cols)
        rows.append(f"<tr{cls}><td>{esc(c['name'])}</td>{ok}{cells}<td>{'&#9733;' if c.get('on_frontier') else ''}</td><td class='note'>{esc(c.get('reason', ''))}</td></tr>")
    env = results.get("environment", {})
    plots_html = "".join(f"<div class='plot' id='{fid}'>{svg}</div>" for fid, svg in figures)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slimkit report: {esc(results['model'])}</title>
<style>{_CSS}</style></head><body>
<h1>slimkit report: {esc(results['model'])}</h1>
<p>Target: <b>{esc(results['target'])}</b> ({esc(results['target_label'])}); quality budget: at most
{100 * results['max_quality_drop']:.1f}% worse {esc(results['quality_label'])}.</p>
<h2>Recommendation</h2><p class="rec" id="recommendation">{esc(recommendation(results))}</p>
<h2>Plots</h2><div class="plots">{plots_html}</div>
<h2>Candidates</h2><table id="candidates"><thead><tr><th>candidate</th><th>passed</th>{head}<th>frontier</th><th>note</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Environment</h2><p class="env">{esc(', '.join(f'{k}: {v}' for k, v in env.items()))}</p>
</body></html>
"""


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
