"""The time budget's decisions, on numbers worked out by hand."""

from slimkit.search.budget import REPORT_SECONDS, TimeBudget, rescaled_reserve


def _budget() -> TimeBudget:
    # a 100 s run: measuring the original took 20 s, its proxy 8 s; 30 s kept for the confirmation
    return TimeBudget(deadline=100.0, first=20.0, reserve=30.0, original_proxy_s=8.0)


def test_a_candidate_fits_while_it_and_the_confirmation_fit():
    b = _budget()
    assert b.expected(rollback=False) == 20.0 and b.expected(rollback=True) == 40.0
    assert b.refusal(rollback=False, now=50.0) is None  # 20 + 30 = 50 left: just fits
    reason = b.refusal(rollback=False, now=50.5)  # 49.5 s left
    assert reason == ("not tried: the time budget left (50 s) would not cover it (about 20 s) "
                      "and the final confirmation (about 30 s): raise --time-budget")
    assert b.refusal(rollback=True, now=30.0) is None and b.refusal(rollback=True, now=30.5) is not None  # 40 + 30 = 70
    assert "budget left (0 s)" in b.refusal(rollback=False, now=120.0)  # past the deadline: never negative


def test_the_slowest_candidate_sets_the_next_estimate():
    b = _budget()
    b.record(12.0, [])
    assert b.expected(rollback=False) == 12.0  # measured now: no longer the original's 20 s
    b.record(25.0, [])
    b.record(5.0, [])
    assert b.expected(rollback=False) == 25.0 and b.expected(rollback=True) == 50.0
    assert b.covers(45.0, now=25.0) and not b.covers(45.5, now=25.0)  # 45 + 30 = 75 left


def test_the_reserve_grows_with_a_slow_passing_proxy_and_never_shrinks():
    b = _budget()  # 30 s: 15 s of report, 7.5 s for the original's full evaluation, 7.5 s for the candidate's
    b.record(10.0, [16.0])  # a passing candidate's proxy took twice the original's: its half doubles
    assert b.reserve == REPORT_SECONDS + 7.5 + 15.0 == 37.5
    b.record(10.0, [16.0, 4.0])  # the slowest that passed counts
    assert b.reserve == 37.5
    assert b.refusal(rollback=False, now=52.5) is None and b.refusal(rollback=False, now=53.0) is not None  # 10 + 37.5
    fast = _budget()
    fast.record(10.0, [4.0])
    assert rescaled_reserve(30.0, 8.0, [4.0]) == 26.25 and fast.reserve == 30.0  # kept: the first estimate is a floor
