"""The report: plots, tables, recommendation; opened in a real headless Chromium."""

import json
import shutil
import subprocess

import pytest

from slimkit.report import recommendation, write_report
from slimkit.report.pareto import dominates, pareto_front


def _results(winner="int8-dynamic"):
    def cand(name, tps, drop, passed, size):
        return {
            "name": name,
            "recipe": {"steps": [{"method": name}]},
            "metrics": {"decode_tokens_per_s": tps, "quality_drop": drop, "quality_value": 11.6 * (1 + drop),
                        "latency_ms_p50": 200 / (tps / 24), "size_on_disk_mb": size, "peak_memory_mb": 700.0},
            "passed": passed,
            "reason": "within budget" if passed else "perplexity +4.10% > 1.0%",
        }

    return {
        "model": "smollm2-135m", "kind": "causal-lm", "target": "latency", "target_metric": "decode_tokens_per_s",
        "target_label": "decode tokens/s", "higher_is_better": True, "quality_metric": "perplexity",
        "quality_label": "perplexity", "max_quality_drop": 0.01,
        "baseline": {"decode_tokens_per_s": 24.0, "quality_value": 11.6, "latency_ms_p50": 200.0, "size_on_disk_mb": 516.0, "peak_memory_mb": 999.0},
        "candidates": [cand("bf16", 30.0, 0.001, True, 260.0), cand("int8-dynamic", 55.0, 0.006, True, 170.0),
                       cand("int4-wo", 70.0, 0.041, False, 110.0), cand("fp16", 20.0, 0.002, True, 260.0)],
        "winner": winner,
        "sensitivity": [{"layer": f"model.layers.{i}.mlp.down_proj", "delta": 0.001 * i} for i in range(12)],
        "environment": {"cpu": "test", "threads": 2},
    }


def _classifier_results():
    """A classifier's run on the embedded-free path: quality is prediction agreement with the original."""
    speed = {"latency_ms_p50": 20.0, "throughput_tokens_per_s": 900.0, "size_on_disk_mb": 87.0, "peak_memory_mb": 500.0}
    return {
        "model": "tiny-bert", "kind": "classifier", "target": "latency", "target_metric": "latency_ms_p50",
        "target_label": "p50 latency (ms)", "higher_is_better": False, "quality_metric": "agreement",
        "quality_label": "1 - agreement", "max_quality_drop": 0.02,
        "baseline": {**speed, "runtime": "eager", "quality_value": 1.0, "quality_on": "full"},
        "baseline_compiled": {**speed, "latency_ms_p50": 12.5, "runtime": "torch.compile", "compile_seconds": 30.0},
        "candidates": [{"name": "int8-dynamic", "recipe": {"steps": [{"method": "int8-dynamic"}]}, "passed": True, "reason": "confirmed",
                        "metrics": {**speed, "latency_ms_p50": 10.0, "size_on_disk_mb": 23.0, "runtime": "torch.compile",
                                    "quality_value": 0.985, "quality_drop": 0.015, "proxy_quality_drop": 0.01, "full_quality_drop": 0.015}}],
        "winner": "int8-dynamic", "environment": {"cpu": "test"},
    }


def _tables(md: str, page: str) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """The candidates table of report.md and of report.html, each as {row name: {column header: cell}}."""
    import html as H
    import re

    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    from_md = {r[0]: dict(zip(head, r)) for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])}
    table = page[page.index("<table id=\"candidates\">"):page.index("</table>")]
    head = [H.unescape(h) for h in re.findall(r"<th>(.*?)</th>", table)]
    rows = [[H.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)] for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table)[1:]]
    return from_md, {r[0]: dict(zip(head, r)) for r in rows}


def test_the_original_rows_show_the_original_against_itself(tmp_path):
    """The original agrees with itself (agreement 1.000, drop +0.00%), eager and compiled, in every summary."""
    paths = write_report(_classifier_results(), tmp_path)
    for rows in _tables(paths["markdown"].read_text(), paths["html"].read_text()):
        assert "1 - agreement" not in rows["original"]  # the column holds the agreement itself, and says so
        for name in ("original", "original, torch.compile"):
            assert (rows[name]["agreement"], rows[name]["quality drop"]) == ("1.000", "+0.00%"), name
        assert (rows["int8-dynamic"]["agreement"], rows["int8-dynamic"]["quality drop"]) == ("0.985", "+1.50%")
        assert rows["original"]["p50 latency (ms)"] == "20.0" and rows["original, torch.compile"]["p50 latency (ms)"] == "12.5"
        assert rows["original"]["runtime"] == "eager" and rows["original, torch.compile"]["runtime"] == "torch.compile (30 s)"
        assert rows["original"]["size MiB"] == rows["original, torch.compile"]["size MiB"] == "87.0"
    proxy = _classifier_results()
    proxy["baseline"]["quality_on"], proxy["winner"] = "proxy", None  # no winner confirmed: the proxy slice's value, marked so
    paths = write_report(proxy, tmp_path / "proxy")
    md, page = _tables(paths["markdown"].read_text(), paths["html"].read_text())
    assert md["original"]["agreement"] == md["original, torch.compile"]["agreement"] == "1.000 (proxy)"
    assert page["original, torch.compile"]["agreement"] == "1.000 (proxy)"


def _size_plot(page: str) -> str:
    """The SVG of the plot whose y axis is the size on disk (matplotlib writes each text as a comment)."""
    import re

    return next(svg for svg in re.findall(r"<svg.*?</svg>", page, re.S) if "<!-- size on disk (MiB) -->" in svg)


def test_speed_is_shown_on_the_target_metric_with_prefill_and_decode_side_by_side(tmp_path):
    """A causal LM's search ranks by compiled decode tokens/s: int4 decodes 4.58x faster though its eager prefill is slower."""
    r = _results(winner="int4")
    r["baseline"].update(latency_ms_p50=133.0, runtime="eager")
    r["baseline_compiled"] = {**r["baseline"], "decode_tokens_per_s": 30.0, "runtime": "torch.compile", "compile_seconds": 40.0}
    r["candidates"] = [{"name": "int4", "recipe": {"steps": [{"method": "int4"}]}, "passed": True, "reason": "confirmed",
                        "metrics": {"quality_value": 11.64, "quality_drop": 0.003, "decode_tokens_per_s": 110.0, "latency_ms_p50": 210.0,
                                    "size_on_disk_mb": 94.0, "peak_memory_mb": 600.0, "runtime": "torch.compile", "compile_seconds": 11.0}}]
    paths = write_report(r, tmp_path)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    for rows in _tables(md, page):
        head = list(rows["original"])
        speed = head.index("speed-up (decode tokens/s)")
        assert head[speed - 1] == "decode tokens/s" and head[speed + 1] == "prefill p50 ms (first token)"  # side by side
        assert [rows[n]["speed-up (decode tokens/s)"] for n in ("original", "original, torch.compile", "int4")] == ["1.00x", "1.25x", "4.58x"]
        assert rows["original"]["prefill p50 ms (first token)"] == "133.0" and rows["int4"]["prefill p50 ms (first token)"] == "210.0 (eager)"
    assert "compiles decoding only, so its prefill ran eagerly" in md and "compiles decoding only" in page
    plot = _size_plot(page)
    assert "<!-- decode tokens/s (higher is faster) -->" in plot and "latency" not in plot
    assert "<!-- Size vs decode tokens/s -->" in plot and "<!-- original, torch.compile -->" in plot


def test_perplexities_show_the_changes_the_budget_is_about(tmp_path):
    """A 1% budget on a perplexity of 11.6 needs more than one decimal: 11.6 and 11.7 hide a +0.6% change."""
    paths = write_report(_results(), tmp_path)
    for rows in _tables(paths["markdown"].read_text(), paths["html"].read_text()):
        assert [rows[n]["perplexity"] for n in ("original", "bf16", "int8-dynamic")] == ["11.600", "11.612", "11.670"]


def test_an_encoder_speeds_up_on_its_p50_latency(tmp_path):
    paths = write_report(_classifier_results(), tmp_path)
    for rows in _tables(paths["markdown"].read_text(), paths["html"].read_text()):
        assert [rows[n]["speed-up (p50 latency)"] for n in ("original", "original, torch.compile", "int8-dynamic")] == ["1.00x", "1.60x", "2.00x"]
        assert "prefill p50 ms (first token)" not in rows["original"] and "decode tokens/s" not in rows["original"]
    assert "<!-- p50 latency (ms) (lower is faster) -->" in _size_plot(paths["html"].read_text())


Q4_1 = {"format": "gguf", "weights": "Q4_1", "bits": 4, "types": ["Q4_1", "Q8_0"]}
FLATTERED = "source was Q4_1 GGUF: 4-bit results on it are optimistic"


@pytest.mark.parametrize("source", [Q4_1, None, {"format": "gguf", "weights": "F16", "bits": 16, "types": ["F16"]}])
def test_four_bit_results_on_a_four_bit_source_are_marked_optimistic(tmp_path, source):
    """SmolLM2 ships as Q4_1: a 4-bit method on it finds that grid again; a safetensors (float) source flatters nothing."""
    r = _results(winner="int4")
    r["source_format"] = source
    steps = {"int4": [{"method": "int4", "group_size": 32}], "awq-g64": [{"method": "awq", "bits": 4, "group_size": 64}],
             "int8": [{"method": "int8", "bits": 8}], "int4 + rollback": [{"method": "mixed", "low": "int4", "high": "int8-wo"}],
             "ort-genai int4": [], "bf16": [{"method": "bf16"}]}
    r["candidates"] = [{"name": n, "recipe": {"steps": s}, "passed": True, "reason": "within budget",
                        "metrics": {"decode_tokens_per_s": 50.0, "quality_drop": 0.003, "quality_value": 11.63}} for n, s in steps.items()]
    r["candidates"][4]["export"] = {"format": "ort-genai", "quantize": "int4"}
    paths = write_report(r, tmp_path)
    md, page = _tables(paths["markdown"].read_text(), paths["html"].read_text())
    flagged = {"int4", "awq-g64", "int4 + rollback", "ort-genai int4"} if source is Q4_1 else set()
    for rows in (md, page):
        assert {n for n, row in rows.items() if FLATTERED in row["note"]} == flagged
    text = paths["markdown"].read_text() + paths["html"].read_text()
    assert ("Source: a Q4_1 GGUF file (4-bit weights" in text) == (source is Q4_1)
    assert ("4-bit already" in recommendation(r)) == (source is Q4_1)  # the winner, int4, is one of them


def test_pareto_front():
    pts = [(1, 5), (2, 2), (3, 1), (3, 3), (2, 2), (0, 9)]
    assert pareto_front(pts) == [0, 1, 2, 4, 5]
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (1, 2))


def test_report_files_and_content(tmp_path):
    paths = write_report(_results(), tmp_path)
    data = json.loads(paths["results"].read_text())
    frontier = {c["name"] for c in data["candidates"] if c["on_frontier"]}
    assert frontier == {"bf16", "int8-dynamic", "int4-wo"}  # fp16 is dominated by bf16
    md = paths["markdown"].read_text()
    assert "Use int8-dynamic" in md and "2.29x better" in md and "| int4-wo | no |" in md
    page = paths["html"].read_text()
    assert page.count("<svg") == 3 and "<script" not in page
    assert 'src="http' not in page and 'href="http' not in page  # self-contained: nothing fetched


def test_the_report_ends_with_how_to_serve_the_model(tmp_path):
    r = _results()
    r["serve"] = [{"runtime": "vLLM server", "language": "shell", "lines": ["vllm serve out/model"], "requires": "pip install vllm"},
                  {"runtime": "slimkit", "language": "python", "lines": ["import slimkit", 'lm = slimkit.load("out/model")'], "requires": ""}]
    paths = write_report(r, tmp_path)
    md = paths["markdown"].read_text()
    assert md.rstrip().endswith('## Serve it\n\nvLLM server (`pip install vllm`):\n\n```bash\nvllm serve out/model\n```\n\n'
                                'slimkit:\n\n```python\nimport slimkit\nlm = slimkit.load("out/model")\n```')
    page = paths["html"].read_text()
    assert "<pre>import slimkit\nlm = slimkit.load(&quot;out/model&quot;)</pre>" in page
    assert page.index("id='serve'") > page.index("<h2>Environment</h2>")
    assert json.loads(paths["results"].read_text())["serve"] == r["serve"]


def test_recommendation_when_nothing_passes():
    r = _results(winner=None)
    text = recommendation(r)
    assert "original model is kept" in text and "int4-wo: perplexity +4.10% > 1.0%" in text


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium, chromium-browser or google-chrome on PATH: install one to run this test "
                "(Debian/Ubuntu: apt-get install chromium; CI does so in .ci/run)")


def test_report_renders_in_headless_chromium(tmp_path):
    import numpy as np
    from PIL import Image

    browser = _chromium()
    page = write_report(_results(), tmp_path)["html"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars"]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=120).stdout
    # the browser parsed three inline SVG plots with drawn paths, and the table
    assert dom.count("<svg") == 3 and dom.count("<path") > 30 and "id=\"candidates\"" in dom
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[0] >= 1900 and img.shape[1] >= 1100
    # the plot colours (blue points/frontier, red failures) are on screen: the SVGs were drawn
    blue = (abs(img[..., 0] - 0x2A) < 30) & (abs(img[..., 1] - 0x7A) < 30) & (abs(img[..., 2] - 0xB9) < 30)
    red = (abs(img[..., 0] - 0xC4) < 30) & (abs(img[..., 1] - 0x4E) < 30) & (abs(img[..., 2] - 0x52) < 30)
    assert blue.sum() > 500 and red.sum() > 50
    shutil.copy(shot, tmp_path.parent / "report-screenshot.png")
