"""RFC 9773 section 4.2 for timer runs and the lifetime rules (scan/schedule.py): pure
decisions on stored facts, the clock passed in."""
from __future__ import annotations

from typing import Any, Optional

import pytest

from certbot_batch.scan import schedule

H = 3600.0
D = 86400.0
NOW = 1_800_000_000.0


def decide(*, age: float, lifetime: float, interval: Optional[float] = None,
           window: Optional[tuple[float, float]] = None, chosen: Optional[float] = None,
           **kw: Any) -> schedule.Decision:
    """A certificate ``age`` seconds old living ``lifetime`` seconds; window/chosen relative
    to NOW."""
    start, end = (NOW + window[0], NOW + window[1]) if window else (None, None)
    return schedule.decide(now=NOW, not_before=NOW - age, not_after=NOW - age + lifetime,
                           window_start=start, window_end=end,
                           chosen_time=NOW + chosen if chosen is not None else None,
                           ocsp_status=kw.get("ocsp"),
                           renew_before_expiry=kw.get("rbe"), interval=interval)


def test_safety_margin_scales_with_the_lifetime() -> None:
    assert schedule.safety_margin(90 * D) == 24 * H      # as before for 90-day certs
    assert schedule.safety_margin(160 * H) == 16 * H     # shortlived
    assert schedule.safety_margin(24 * H) == pytest.approx(2.4 * H)  # step-ca's default
    assert schedule.safety_margin(300.0) == 30.0
    assert schedule.safety_margin(None) == 24 * H


def test_a_day_long_certificate_is_not_renewed_on_every_run() -> None:
    # Hourly runs, 24-hour certificates, an ARI window at 2/3: 5 hours old is not due
    # (before, "less than 24 h left" renewed it on every run).
    d = decide(age=5 * H, lifetime=24 * H, interval=H, window=(10 * H, 12 * H), chosen=11 * H)
    assert not d.due and d.because == "ARI window"
    assert d.renew_at == pytest.approx(NOW + 10 * H)  # the first run after 10 h renews it


def test_default_rule_is_certbot_4s_on_every_certbot() -> None:
    assert not decide(age=50 * D, lifetime=90 * D).due               # 1/3 left at day 60
    assert decide(age=61 * D, lifetime=90 * D).due
    assert not decide(age=2 * D, lifetime=6 * D).due                 # under 10 days: 1/2
    d = decide(age=3.1 * D, lifetime=6 * D)
    assert d.due and "1/2" in d.because


def test_default_rule_looks_ahead_to_the_next_run() -> None:
    # Due at day 60; a run at day 59.9 with daily runs renews now, not a day late.
    d = decide(age=59.9 * D, lifetime=90 * D, interval=D)
    assert d.due and "before the next run" in d.because
    assert not decide(age=58 * D, lifetime=90 * D, interval=D).due


def test_chosen_time_before_the_next_run_renews_now_but_never_before_the_window() -> None:
    assert decide(age=10 * D, lifetime=90 * D, interval=6 * H, window=(-H, 5 * H),
                  chosen=3 * H).due
    assert not decide(age=10 * D, lifetime=90 * D, interval=6 * H, window=(H, 5 * H),
                      chosen=3 * H).due  # window not open yet
    assert not decide(age=10 * D, lifetime=90 * D, interval=6 * H, window=(-H, 20 * H),
                      chosen=7 * H).due  # after the next run
    assert not decide(age=10 * D, lifetime=90 * D, window=(-H, 5 * H), chosen=3 * H).due


def test_safety_margin_before_the_next_run_beats_a_late_window() -> None:
    # A CA window after expiry - margin: the run before the margin is reached renews.
    d = decide(age=88 * D, lifetime=90 * D, interval=D, window=(1.9 * D, 2 * D),
               chosen=1.95 * D)
    assert d.due and "safety margin" in d.because


def test_renew_before_expiry_and_revocation() -> None:
    assert decide(age=10 * D, lifetime=90 * D, rbe="85 days").due
    d = decide(age=10 * D, lifetime=90 * D, rbe="30 days", interval=D)
    assert not d.due and d.renew_at == pytest.approx(NOW + 49 * D)
    assert decide(age=1 * D, lifetime=90 * D, ocsp="revoked").due


def test_learned_interval() -> None:
    assert schedule.learned_interval([]) is None
    assert schedule.learned_interval([0.0, 3600.0]) is None  # one gap is no cadence
    assert schedule.learned_interval([0.0, 3600.0, 7200.0]) == 3600.0
    # cron's random delay: the longest recent gap, bounded by twice the median
    starts = [0.0, 3000.0, 7000.0, 10800.0, 14000.0]
    assert schedule.learned_interval(starts) == 4000.0
    # a machine off for a week is not the cadence
    assert schedule.learned_interval([0.0, H, 2 * H, 3 * H, 3 * H + 7 * D]) == 2 * H
    assert schedule.next_run_interval(900.0, [0.0, H, 2 * H]) == 900.0
