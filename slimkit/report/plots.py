"""Plots for the report, rendered by matplotlib to inline SVG strings.

SVG keeps `report.html` self-contained (no image files, no scripts, no network)
and sharp when pasted into a design review.
"""

from __future__ import annotations

import io

from slimkit.report.axes import speed_axis
from slimkit.report.pareto import pareto_front

PASS, FAIL, FRONT, WIN, BASE = "#2a7ab9", "#c44e52", "#2a7ab9", "#e3a21a", "#555555"


def _figure(width: float = 6.4, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=True)
    matplotlib.rcParams["svg.hashsalt"] = "slimkit"  # stable element ids: same results, same bytes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _svg(plt, fig) -> str:
    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG is inlined in HTML


def quality_vs_target(results: dict) -> str:
    """Quality drop (%) against the target metric, with the Pareto frontier and the budget."""
    plt, fig, ax = _figure()
    target, label = results["target_metric"], results["target_label"]
    cands = [c for c in results["candidates"] if c["metrics"].get(target) is not None and c["metrics"].get("quality_drop") is not None]
    xs = [c["metrics"][target] for c in cands]
    ys = [100 * c["metrics"]["quality_drop"] for c in cands]
    for c, x, y in zip(cands, xs, ys):
        ax.scatter(x, y, s=40, color=PASS if c["passed"] else FAIL, zorder=3)
        ax.annotate(c["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    sign = -1 if results["higher_is_better"] else 1
    front = sorted(pareto_front([(sign * x, y) for x, y in zip(xs, ys)]), key=lambda i: xs[i])
    if len(front) > 1:
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color=FRONT, lw=1.5, ls="--", label="Pareto frontier", zorder=2)
    base = results["baseline"].get(target)
    if base is not None:
        ax.scatter([base], [0.0], marker="s", s=50, color=BASE, label="original", zorder=4)
    compiled = (results.get("baseline_compiled") or {}).get(target)
    if compiled is not None:
        ax.scatter([compiled], [0.0], marker="s", s=50, facecolors="none", edgecolors=BASE, label="original, torch.compile", zorder=4)
    ax.axhline(100 * results["max_quality_drop"], color=FAIL, lw=1, ls=":", label="quality budget")
    winner = next((c for c in cands if c["name"] == results.get("winner")), None)
    if winner is not None:
        ax.scatter([winner["metrics"][target]], [100 * winner["metrics"]["quality_drop"]], marker="*", s=220, color=WIN, label="winner", zorder=5)
    ax.set_xlabel(label)
    ax.set_ylabel(f"quality drop (% {results['quality_label']})")
    ax.set_title("Quality vs " + label)
    ax.legend(fontsize=7, loc="best")
    return _svg(plt, fig)


def size_vs_speed(results: dict) -> str:
    """Size on disk against the speed the search ranked by (`axes.speed_axis`): for a causal LM, decode tokens/s."""
    axis = speed_axis(results)
    plt, fig, ax = _figure()
    rows = [("original", results["baseline"], BASE), ("original, torch.compile", results.get("baseline_compiled") or {}, BASE)]
    rows += [(c["name"], c["metrics"], PASS if c["passed"] else FAIL) for c in results["candidates"]]
    for name, m, color in rows:
        if m.get(axis.metric) is None or m.get("size_on_disk_mb") is None:
            continue
        x, y = m[axis.metric], m["size_on_disk_mb"]
        if name.startswith("original"):
            hollow = name != "original"
            ax.scatter(x, y, s=50, marker="s", facecolors="none" if hollow else color, edgecolors=color, zorder=3)
        else:
            ax.scatter(x, y, s=40, color=color, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(axis.label + (" (higher is faster)" if axis.higher_is_better else " (lower is faster)"))
    ax.set_ylabel("size on disk (MiB)")
    ax.set_title(f"Size vs {axis.label}")
    return _svg(plt, fig)


def per_layer_bars(rows: list[dict], value_key: str, title: str, xlabel: str, top: int = 25) -> str:
    rows = sorted(rows, key=lambda r: -abs(r[value_key]))[:top][::-1]
    plt, fig, ax = _figure(6.4, max(2.5, 0.22 * len(rows) + 1))
    ax.barh([r["layer"] for r in rows], [r[value_key] for r in rows], color=PASS)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _svg(plt, fig)
