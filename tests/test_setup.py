"""The README's two commands and CI's preparation: `make test` leaves the host's system
packages alone, and `.ci/run` is where CI installs the browser the report test opens.
Run with stand-ins for apt-get and make, so nothing is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("bash") is None, reason="needs make and bash")


def _stand_ins(tmp_path: Path, *names: str) -> tuple[Path, Path]:
    """A PATH of scripts that only log how they were called, plus dirname; and the log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        (bin_dir / name).chmod(0o755)
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    return bin_dir, log


def _ci_run(bin_dir: Path, **env) -> list[str]:
    subprocess.run([shutil.which("bash"), str(ROOT / ".ci" / "run")], env={"PATH": str(bin_dir), **env}, check=True, capture_output=True)
    log = bin_dir.parent / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_make_test_installs_no_system_package():
    dry = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pytest" in dry
    assert "apt-get" not in dry and "sudo" not in dry


def test_ci_installs_chromium_before_the_tests_where_it_is_missing(tmp_path):
    bin_dir, _ = _stand_ins(tmp_path, "apt-get", "make")
    assert _ci_run(bin_dir, CI="true") == ["apt-get update -qq", "apt-get install -y -qq chromium", "make test"]


def test_ci_run_installs_nothing_outside_ci_or_where_chromium_is_there(tmp_path):
    bin_dir, log = _stand_ins(tmp_path, "apt-get", "make", "chromium")
    assert _ci_run(bin_dir, CI="true") == ["make test"]
    log.unlink()
    (bin_dir / "chromium").unlink()
    assert _ci_run(bin_dir) == ["make test"]
