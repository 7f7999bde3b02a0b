"""Progress: rich bars on a terminal, timed plain lines in a log, nothing under SLIMKIT_QUIET."""

import io
import re
import time

import pytest
from conftest import assert_user_error, run_cli
from rich.console import Console

from slimkit.core import progress
from slimkit.core.errors import SlimkitError

STAMP = r"\d\d:\d\d:\d\d "


def slow(n, seconds=0.02):
    for i in range(n):
        time.sleep(seconds)
        yield i


@pytest.fixture
def logging_on(monkeypatch):
    """stderr is pytest's capture (not a terminal); quiet off; a line at most every 0.05 s."""
    monkeypatch.delenv("SLIMKIT_QUIET", raising=False)
    monkeypatch.setenv("SLIMKIT_LOG_EVERY", "0.05")


def test_a_log_gets_timed_lines_with_count_elapsed_and_time_left(logging_on, capsys):
    assert list(progress.track(slow(20, 0.01), "Calibrating", total=20)) == list(range(20))
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 12, lines  # about one per 0.05 s of the 0.2 s, not one per item
    assert re.fullmatch(STAMP + r"Calibrating: \d+/20 \(\d+%\), \d\.\d s elapsed, about \d\.\d s left", lines[0]), lines
    assert re.fullmatch(STAMP + r"Calibrating: done, 20 in \d\.\d s", lines[-1]), lines


def test_a_list_gives_its_length_and_a_callable_total_is_read_again(logging_on, capsys):
    for _ in progress.track([1, 2, 3, 4], "Sized"):
        time.sleep(0.03)
    assert "/4 (" in capsys.readouterr().err  # no total passed: the list's length
    totals = iter([8, 6, 6, 6, 6, 6])
    list(progress.track(slow(6, 0.06), "Revised", total=lambda: next(totals)))
    err = capsys.readouterr().err
    assert "/6 (" in err and "/8 (" not in err.splitlines()[-2]


def test_short_work_prints_nothing(capsys, monkeypatch):
    monkeypatch.delenv("SLIMKIT_QUIET", raising=False)
    monkeypatch.setenv("SLIMKIT_LOG_EVERY", "10")
    list(progress.track(range(100), "Fast"))
    with progress.status("Measuring"):
        pass
    assert capsys.readouterr().err == ""


def test_status_and_the_search_repeat_the_current_work_every_interval(logging_on, capsys):
    with progress.status("Measuring latency"):
        time.sleep(0.18)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(re.fullmatch(STAMP + r"Measuring latency: \d\.\d s elapsed", line) for line in lines), lines
    with progress.search_progress() as update:
        update(event="candidate", name="int8", index=0, total=3, left=120.0, best=None)
        time.sleep(0.18)
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(STAMP + r"candidate 1/3: int8  \|  120 s left  \|  best: none yet", lines[0]), lines
    assert len(lines) >= 3 and re.search(r"\| {2}best: none yet \(0\.\d s on it\)$", lines[-1]), lines


def test_quiet_silences_everything(monkeypatch, capsys):
    monkeypatch.setenv("SLIMKIT_QUIET", "1")
    monkeypatch.setenv("SLIMKIT_LOG_EVERY", "0.01")
    list(progress.track(slow(5), "Quiet"))
    with progress.status("Quiet"):
        time.sleep(0.05)
    with progress.search_progress() as update:
        update(event="reference", name="x")
    progress.note("a notice")
    assert capsys.readouterr().err == ""


def test_a_terminal_still_gets_rich_bars(monkeypatch, capsys):
    monkeypatch.delenv("SLIMKIT_QUIET", raising=False)
    monkeypatch.setenv("SLIMKIT_LOG_EVERY", "0.01")
    screen = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=screen, force_terminal=True, width=100))
    list(progress.track(slow(5), "Barred", total=5))
    drawn = screen.getvalue()
    assert "Barred" in drawn and "5/5" in drawn and "\x1b[" in drawn  # rich's bar, redrawn with escape codes
    assert capsys.readouterr().err == ""  # no plain lines besides


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
def test_a_bad_interval_names_the_fix(monkeypatch, value):
    monkeypatch.setenv("SLIMKIT_LOG_EVERY", value)
    with pytest.raises(SlimkitError, match="positive number of seconds"):
        progress.log_every()


def test_the_cli_logs_a_real_quantization_and_still_ends_with_how_to_serve(tiny, tmp_path):
    proc = run_cli("--log-every", "0.05", "quantize", str(tiny("llama")), "--method", "gptq", "--out", str(tmp_path / "q"),
                   env={"SLIMKIT_QUIET": ""})  # stderr is a pipe here, as in `make run > log 2>&1`
    assert proc.returncode == 0, proc.stderr
    timed = [line for line in proc.stderr.splitlines() if re.match(STAMP + r"(Calibrating|Quantizing) \(GPTQ\): ", line)]
    assert any(re.search(r": \d+/\d+ \(\d+%\), [\d.]+ s elapsed, about [\d.]+ s left$", line) for line in timed), proc.stderr
    assert any(line.endswith(" s") and ": done, " in line for line in timed), proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1] == f'lm = slimkit.load("{tmp_path / "q"}")'
    assert_user_error(run_cli("--log-every", "-1", "models"), "--log-every", "positive number of seconds")
