"""A full disk while saving: one-line error naming the fix, nothing left behind."""

import subprocess

import pytest

import slimkit
from slimkit.core.errors import SlimkitError


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_during_save(tiny, small_disk):
    lm = slimkit.load(tiny("llama"))  # about 400 KB of weights: cannot fit in 128 KB
    with pytest.raises(SlimkitError, match="free disk space"):
        slimkit.save(lm, small_disk / "artifact")
    assert list(small_disk.iterdir()) == []
