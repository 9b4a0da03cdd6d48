"""When a lineage is renewed: RFC 9773 section 4.2 for runs that come from a timer.

A timer run cannot wake up at the exact renewal time a lineage's ARI window calls for; it
runs every so often. RFC 9773 section 4.2, step 4: when the chosen time falls before the
client's next normal wake-up, renew now. So every run knows (roughly) when the next one
comes (:func:`next_run_interval`: ``--batch-run-interval``, or the cadence learned from the
recent runs kept in the state database), and :func:`decide` renews in this run every lineage
whose renewal time comes before the next run:

* with an ARI window: the uniform random time chosen in it (kept between runs while the
  window stays), but never before the window opens;
* without one: ``renew_before_expiry`` when the renewal conf sets it, else certbot 4.x's
  rule on every certbot version: with 1/3 of the lifetime left, 1/2 for certificates that
  live less than 10 days (certbot 2.1 has no such rule; the scan decides, so it applies
  there too);
* whatever ARI says, a certificate that would be inside its safety margin at the next run is
  renewed now: the margin scales with the lifetime (:func:`safety_margin`), so that a
  24-hour certificate is not renewed on every run.

Pure functions of the stored facts and the clock: ``engine.py`` calls them, ``status``
shows their outcome ("renew at", "because").
"""
from __future__ import annotations

import datetime
import re
import statistics
from typing import Iterable, Optional, Sequence

__all__ = [
    "CADENCE_RUNS",
    "SAFETY_FRACTION",
    "SAFETY_MAX",
    "Decision",
    "decide",
    "default_renewal_time",
    "fmt_span",
    "fmt_time",
    "learned_interval",
    "parse_interval",
    "safety_margin",
]

UTC = datetime.timezone.utc

#: The safety margin: renew whatever ARI says once less than this is left. 24 hours at most
#: (Let's Encrypt's 90-day certificates: as before), a tenth of the lifetime below that, so a
#: 24-hour certificate gets 2.4 h and a 160-hour one 16 h: the margin only catches a CA
#: window that is wrong or missing, it must never be the rule that renews every run. A tenth
#: leaves the ARI window (Let's Encrypt: around 2/3 of the lifetime) and the default rule
#: (1/2 or 2/3) well before it, and still gives several hourly runs to retry a failure.
SAFETY_MAX = 24 * 3600.0
SAFETY_FRACTION = 0.1
#: How many recent timer runs the cadence is learned from.
CADENCE_RUNS = 12


class Decision:
    """What the scan decided for one lineage: due or not, when it is renewed, why."""

    __slots__ = ("due", "renew_at", "reason", "because")

    def __init__(self, due: bool, renew_at: Optional[float], reason: str,
                 because: str) -> None:
        self.due = due
        #: when a run renews it (None: never, e.g. autorenew off)
        self.renew_at = renew_at
        #: the full sentence (logs, certbot's "Renewing" line)
        self.reason = reason
        #: the rule, in a few words (``status``'s "because" column)
        self.because = because


def fmt_time(ts: Optional[float]) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def fmt_span(seconds: float) -> str:
    """A duration for people: 90 s, 12 min, 6.0 h, 3.5 days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {"": 86400, "s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
          "h": 3600, "hour": 3600, "d": 86400, "day": 86400, "w": 604800, "week": 604800,
          "month": 30 * 86400, "mon": 30 * 86400, "y": 365 * 86400, "year": 365 * 86400}


def parse_interval(text: str) -> Optional[float]:
    """certbot's renew_before_expiry ("30 days", "2 weeks", "12 hours"), in seconds."""
    m = _INTERVAL.match(text)
    if not m:
        return None
    unit = m.group(2).lower()
    if unit.endswith("s") and unit[:-1] in _UNITS:
        unit = unit[:-1]
    if unit not in _UNITS:
        return None
    return float(m.group(1)) * _UNITS[unit]


def safety_margin(lifetime: Optional[float]) -> float:
    """min(24 h, lifetime / 10): see :data:`SAFETY_MAX`."""
    if lifetime is None or lifetime <= 0:
        return SAFETY_MAX
    return min(SAFETY_MAX, lifetime * SAFETY_FRACTION)


def default_renewal_time(not_before: Optional[float],
                         not_after: Optional[float]) -> Optional[float]:
    """certbot 4.x's default: 1/3 of the lifetime left, 1/2 for certs living under 10 days."""
    if not_before is None or not_after is None:
        return None
    lifetime = not_after - not_before
    if lifetime < 10 * 86400:
        return not_before + lifetime / 2
    return not_before + lifetime * 2 / 3


def learned_interval(starts: Sequence[float]) -> Optional[float]:
    """The time between two timer runs, from the start times of the recent ones (oldest
    first): the longest recent gap, but at most twice the median gap (a machine switched
    off for a week is not the cadence). None with fewer than three runs."""
    if len(starts) < 3:
        return None
    ordered = sorted(starts)[-CADENCE_RUNS:]
    gaps = [b - a for a, b in zip(ordered, ordered[1:]) if b > a]
    if len(gaps) < 2:
        return None
    return min(max(gaps), 2 * statistics.median(gaps))


def next_run_interval(explicit: Optional[float], starts: Iterable[float]) -> Optional[float]:
    """``--batch-run-interval`` when given, else the learned cadence (None: unknown, then a
    run renews only what is due now, as before)."""
    if explicit:
        return float(explicit)
    return learned_interval(list(starts))


def decide(*, now: float, not_before: Optional[float], not_after: Optional[float],
           window_start: Optional[float], window_end: Optional[float],
           chosen_time: Optional[float], ocsp_status: Optional[str],
           renew_before_expiry: Optional[str], interval: Optional[float],
           name: str = "", warn: Optional[object] = None) -> Decision:
    """The renewal decision of one lineage (autorenew on, certificate readable).

    ``interval``: seconds until the next expected run (None: unknown). ``warn(msg, *args)``
    gets the one warning this can give (an unreadable renew_before_expiry)."""
    horizon = now + interval if interval else now
    if not_after is None:
        return Decision(True, now, "certificate unreadable", "certificate unreadable")
    lifetime = not_after - not_before if not_before is not None else None
    margin = safety_margin(lifetime)
    deadline = not_after - margin
    if deadline <= now:
        return Decision(True, now, f"expires {fmt_time(not_after)}",
                        f"less than {fmt_span(margin)} (safety margin) left")
    if chosen_time is not None and now >= chosen_time:
        return Decision(True, now, (f"ARI: renewal time {fmt_time(chosen_time)} in window "
                                    f"{fmt_time(window_start)} .. {fmt_time(window_end)}"),
                        "ARI window")
    if ocsp_status == "revoked":
        return Decision(True, now, "revoked (OCSP)", "revoked (OCSP)")
    if deadline <= horizon:
        # It would be inside its safety margin (or expired) by the next run: now.
        return Decision(True, now, (f"expires {fmt_time(not_after)}: the next run "
                                    f"(~{fmt_time(horizon)}) would be within the "
                                    f"{fmt_span(margin)} safety margin"),
                        f"safety margin ({fmt_span(margin)}) before the next run")
    if chosen_time is not None and chosen_time < horizon and \
            (window_start is None or now >= window_start):
        # RFC 9773 4.2 step 4: the chosen time falls before the next wake-up; the window is
        # open already, so renewing now is inside it.
        return Decision(True, now, (f"ARI: renewal time {fmt_time(chosen_time)} comes before "
                                    f"the next run (~{fmt_time(horizon)}); window "
                                    f"{fmt_time(window_start)} .. {fmt_time(window_end)}"),
                        "ARI window, before the next run")
    if renew_before_expiry:
        seconds = parse_interval(renew_before_expiry)
        if seconds is not None:
            when = not_after - seconds
            if when < now:
                return Decision(True, now, f"less than {renew_before_expiry} before expiry",
                                f"renew_before_expiry = {renew_before_expiry}")
            if when < horizon:
                return Decision(True, now, (f"less than {renew_before_expiry} before expiry "
                                            f"by the next run (~{fmt_time(horizon)})"),
                                f"renew_before_expiry = {renew_before_expiry}, before the "
                                "next run")
            return Decision(False, min(when, deadline) - (interval or 0.0),
                            (f"not due until {fmt_time(when)} "
                             f"(renew_before_expiry = {renew_before_expiry})"),
                            f"renew_before_expiry = {renew_before_expiry}")
        if callable(warn):
            warn("Lineage %s: renew_before_expiry = %r is not an interval certbot-batch "
                 "understands (e.g. '30 days'); using the default rule.",
                 name, renew_before_expiry)
    if chosen_time is None:
        default = default_renewal_time(not_before, not_after)
        short = lifetime is not None and lifetime < 10 * 86400
        rule = "1/2 of the lifetime left (< 10 days)" if short else "1/3 of the lifetime left"
        if default is not None and now > default:
            return Decision(True, now, "less than 1/3 of its lifetime left" if not short
                            else "less than 1/2 of its lifetime left", rule)
        if default is not None and default < horizon:
            return Decision(True, now, (f"{rule} by the next run (~{fmt_time(horizon)})"),
                            f"{rule}, before the next run")
        target = min(default, deadline) if default is not None else deadline
        return Decision(False, target - (interval or 0.0),
                        f"not due until {fmt_time(default)} (default rule)", rule)
    # ARI decides: the first run that finds the chosen time before the run after it, but
    # not before the window opens.
    when = min(chosen_time, deadline) - (interval or 0.0)
    if window_start is not None and chosen_time < deadline:
        when = max(when, window_start)
    return Decision(False, when, f"not due until {fmt_time(chosen_time)} (ARI)", "ARI window")
