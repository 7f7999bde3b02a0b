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
