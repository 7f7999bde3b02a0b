"""Peak resident memory (`core.memory.peak_rss_mb`, what `slimkit bench` and optimize's results
report) in MiB on every platform: `ru_maxrss` is bytes on macOS, KiB elsewhere."""

import resource
import sys
from types import SimpleNamespace

import pytest

from slimkit.core.memory import peak_rss_mb


@pytest.mark.parametrize("platform,ru_maxrss", [("darwin", 512 * 2**20), ("freebsd14", 512 * 2**10)])
def test_peak_rss_is_mib_whatever_unit_the_platform_counts_in(monkeypatch, platform, ru_maxrss):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=ru_maxrss))
    assert peak_rss_mb() == 512.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_peak_rss_on_linux_is_the_high_water_mark():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    assert peak_rss_mb() >= int(status["VmRSS"].split()[0]) / 1024 > 0
    assert peak_rss_mb() == pytest.approx(int(status["VmHWM"].split()[0]) / 1024, rel=0.05)
