"""benchmarks/gpu_check.py, the one script run on a lent GPU, works end to end before a GPU is there.

--dry-run takes every row that can run on the CPU (the quantize, evaluate and decode paths with
device="cpu", the module checks on the CPU kernels) and skips those that need CUDA, saying why.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_goes_end_to_end_on_the_cpu(tiny, tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--model", str(tiny("llama")),
                           "--skip-pytest", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["section"], r["row"]): r for r in report["rows"]}
    assert report["device"] == "cpu" and report["dry_run"]
    assert all(r["status"] != "error" for r in report["rows"])
    assert rows[("kernels", "int4 packer tiles=2")]["status"] == "skipped"  # needs CUDA
    assert rows[("kernels", "int4 g32 sym m=1")]["kernel"] == "int4pack" and rows[("kernels", "int4 g32 sym m=1")]["sqnr_db"] > 35
    for method in ("int4-wo", "int8-wo", "gptq", "awq"):
        row = rows[("quantize", method)]
        assert row["status"] == "ok" and row["quantized_on"] == "cpu"
        assert 0.9 < row["ratio"] < 1.1  # the CPU kernels and the dequantized fp32 copy agree
    assert rows[("quantize", "int4-wo")]["kernels"] == {"int4pack": 14}  # 2 blocks x 7 linears
    assert rows[("decode", "int4-wo")]["tokens_per_s"] > 0 and "vs_bf16" in rows[("decode", "int4-wo")]
    assert rows[("vllm", "gpu_vllm.py")]["status"] == "skipped"


def test_without_a_gpu_it_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
