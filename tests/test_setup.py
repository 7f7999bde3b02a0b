"""The README's two commands and CI's preparation: `make test` leaves the host's system
packages alone, and `.ci/run` is where CI installs the browser the report test opens.
Run with stand-ins for apt-get and make, so nothing is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def _fake_python(tmp_path: Path, version: str) -> tuple[Path, Path]:
    """A copy of the Makefile (and what its setup depends on) and a 'python' that only reports `version`."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "python.log"}\necho "Python {version}"\n')
    fake.chmod(0o755)
    return work, fake


@pytest.mark.parametrize("version", ["3.9.18", "3.10.12"])
def test_setup_refuses_an_old_python_in_one_line_before_making_the_venv(tmp_path, version):
    work, fake = _fake_python(tmp_path, version)
    proc = subprocess.run(["make", "setup", f"PY={fake}"], cwd=work, capture_output=True, text=True)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make")]
    assert ours == [f"slimkit needs Python 3.11 or newer, and {fake} gives 'Python {version}': install one and name it, e.g. make PY=python3.12"]
    assert (tmp_path / "python.log").read_text().split("\n")[:-1] == ["--version"]  # asked its version, nothing else
    assert not (work / ".venv").exists()


@pytest.mark.parametrize("version", ["3.11.7", "3.13.0"])
def test_setup_makes_the_venv_with_a_new_enough_python(tmp_path, version):
    work, fake = _fake_python(tmp_path, version)
    subprocess.run(["make", "setup", f"PY={fake}"], cwd=work, capture_output=True, text=True)  # stops where the fake made no venv
    assert (tmp_path / "python.log").read_text().split("\n")[:-1] == ["--version", "-m venv .venv"]


def test_torch_index_url_applies_to_torch_alone():
    def pip_lines(*args):
        dry = subprocess.run(["make", "-n", "-B", "setup", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [line for line in dry.splitlines() if "pip install" in line]

    cpu = "https://download.pytorch.org/whl/cpu"
    plain, chosen = pip_lines(), pip_lines(f"TORCH_INDEX_URL={cpu}")
    assert plain[0].endswith("pip install -q --disable-pip-version-check torch==2.13.0")
    assert chosen[0] == plain[0] + f" --index-url {cpu}"
    assert chosen[1:] == plain[1:] and not any("index-url" in line for line in plain)


def test_an_old_python_is_refused_on_import_in_one_line():
    code = "import sys; sys.version_info = (3, 9, 18, 'final', 0); import slimkit"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: slimkit needs Python 3.11 or newer, and this is Python 3.9.18: install 3.11+ and reinstall slimkit with it")
