"""The one retry policy of certbot-batch: Retry-After parsing, clamp bounds, back-off schedules.

Every place that decides "when do we ask again" reads its numbers and its arithmetic here:

* the status scan (``scan/engine.py``, ``scan/ari.py``, ``scan/ocsp.py``, the limiter of
  ``scan/ratelimit.py``): when to ask ARI/OCSP again after an answer or a failure;
* the ACME pacing of a renewal session (``ca/pacing.py``): how long an endpoint pauses;
* the per-lineage renewal back-off (``ca/backoff.py``): when a failed renewal is tried again.

The policies differ (a paused ACME endpoint waits seconds, a failed lineage a day) but each
is stated once, below, as a :class:`Bounds` (clamp of a server's Retry-After) and, where the
client picks the delay itself, an exponential schedule with jitter.

Pure functions and constants only: no clock is read here unless the caller passes none.
"""
from __future__ import annotations

import dataclasses
import email.utils
import math
import random
from datetime import datetime, timezone
from typing import Optional

__all__ = [
    "ACME_PAUSE",
    "ARI_ANSWER",
    "CHECK_BACKOFF",
    "DEFAULT_ARI_RETRY_AFTER",
    "LIMITER",
    "LINEAGE_RETRY",
    "LINEAGE_SCHEDULE",
    "LINEAGE_JITTER",
    "NO_ARI_RECHECK",
    "OCSP_FAILURE_RECHECK",
    "OCSP_GOOD_MAX",
    "UNAVAILABLE_START",
    "Bounds",
    "exponential",
    "jittered",
    "parse_retry_after",
    "retry_after_seconds",
    "scheduled",
]


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Clamp bounds (seconds) for a delay a server asked for or a schedule computed."""

    low: float
    high: float

    def clamp(self, seconds: float) -> float:
        if math.isnan(seconds):
            return self.low
        return min(self.high, max(self.low, float(seconds)))


# -- the numbers ---------------------------------------------------------------------------

#: Retry-After of a successful ARI answer: absent -> 6 h (Let's Encrypt's own value);
#: clamped to [1 min, 1 day] (RFC 9773 section 4.3: a client may clamp; Let's Encrypt's
#: integration guide: at least twice a day).
DEFAULT_ARI_RETRY_AFTER = 6 * 3600.0
ARI_ANSWER = Bounds(60.0, 86400.0)

#: The scan's own back-off after a failed ARI/OCSP check of one lineage: 1 min, doubling,
#: at most 6 h (a CA's normal Retry-After), with +-10% jitter.
CHECK_BACKOFF = Bounds(60.0, 6 * 3600.0)
CHECK_JITTER = 0.1
#: A CA without ARI (no renewalInfo in its directory): ask again after this long.
NO_ARI_RECHECK = 6 * 3600.0
#: An OCSP check that failed: ask again after this long.
OCSP_FAILURE_RECHECK = 3600.0
#: The longest an OCSP "good" is believed by a timer run (also when nextUpdate is later:
#: responders say up to 7 days, certbot asks on every run): a revocation is seen within 6 h,
#: the Retry-After of an ARI answer (Let's Encrypt), so both checks age alike.
OCSP_GOOD_MAX = 6 * 3600.0

#: A whole CA (or OCSP responder) answering 503/429: without Retry-After the back-off starts
#: at 1 min and doubles per further refusal; every back-off of the shared limiter is clamped
#: to [1 s, 1 day].
UNAVAILABLE_START = 60.0
LIMITER = Bounds(1.0, 86400.0)

#: An ACME endpoint pausing during a renewal session (503, 429 "slow down"): the CA's
#: Retry-After clamped to [1 s, 5 min]; without one 1 s, doubling, 256 s at most.
ACME_PAUSE = Bounds(1.0, 300.0)

#: A lineage whose renewal failed: 1 min, 10 min, 100 min, then daily (RFC 9773 section 4.3,
#: Let's Encrypt's integration guide), +-10% jitter; a CA's Retry-After (rate limit)
#: clamped to [1 min, 1 day].
LINEAGE_SCHEDULE = (60.0, 600.0, 6000.0, 86400.0)
LINEAGE_JITTER = 0.1
LINEAGE_RETRY = Bounds(60.0, 86400.0)


# -- Retry-After ---------------------------------------------------------------------------

def parse_retry_after(value: Optional[str], now: datetime) -> Optional[float]:
    """Seconds to wait according to a ``Retry-After`` header value.

    Supports both forms of RFC 9110 section 10.2.3: delta-seconds (``"120"``) and an
    HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``).  ``now`` is the current wall-clock
    time (aware; a naive value is taken as UTC) used for the HTTP-date form.  Returns
    ``None`` for a missing or unparseable value; a date in the past gives ``0.0``.
    No clamping is done here: callers apply their own :class:`Bounds`.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        seconds = float(text)  # lenient: "1.5", tolerated although not in the RFC
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return max(0.0, seconds)
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return max(0.0, (when - now).total_seconds())


def retry_after_seconds(value: Optional[str], now: Optional[datetime] = None) -> Optional[float]:
    """:func:`parse_retry_after` against the current time (or ``now``); ``None`` for an
    empty or unreadable value."""
    if not value:
        return None
    return parse_retry_after(value, now or datetime.now(timezone.utc))


# -- schedules -------------------------------------------------------------------------------

def exponential(attempt: int, start: float, bounds: Bounds, *, cap_exponent: int = 20) -> float:
    """``start * 2**(attempt-1)`` (attempt >= 1), clamped to ``bounds``."""
    exponent = min(max(attempt, 1) - 1, cap_exponent)
    return bounds.clamp(start * 2.0 ** exponent)


def jittered(seconds: float, jitter: float, rng: Optional[random.Random] = None) -> float:
    """``seconds`` spread uniformly over +-``jitter`` (a fraction), so that thousands of
    lineages failing together do not come back together."""
    r = (rng or random).random()
    return seconds * (1.0 - jitter + 2.0 * jitter * r)


def scheduled(attempt: int, schedule: tuple[float, ...]) -> float:
    """The ``attempt``-th delay (1-based) of a fixed schedule; its last entry repeats."""
    return schedule[min(max(attempt, 1), len(schedule)) - 1]


def check_backoff(failures: int, retry_after: Optional[float],
                  rng: Optional[random.Random] = None) -> float:
    """The scan's delay before asking again about a lineage whose check failed
    ``failures`` times in a row; a longer Retry-After from the CA wins."""
    delay = exponential(failures, CHECK_BACKOFF.low, CHECK_BACKOFF, cap_exponent=12)
    if retry_after:
        delay = max(delay, float(retry_after))
    return jittered(delay, CHECK_JITTER, rng)


def lineage_delay(failures: int, rng: Optional[random.Random] = None) -> float:
    """A failed lineage's delay before its next renewal attempt (without Retry-After)."""
    return jittered(scheduled(failures, LINEAGE_SCHEDULE), LINEAGE_JITTER, rng)


def acme_pause(consecutive: int, retry_after: Optional[float]) -> float:
    """How long an ACME endpoint pauses after its ``consecutive``-th refusal."""
    if retry_after is not None:
        return ACME_PAUSE.clamp(retry_after)
    return exponential(consecutive, ACME_PAUSE.low, ACME_PAUSE, cap_exponent=8)


def unavailable_backoff(strikes: int, retry_after: Optional[float]) -> float:
    """How long a whole CA (ARI) is backed off after its ``strikes``-th 503/429."""
    if retry_after is not None:
        return LIMITER.clamp(retry_after)
    return exponential(strikes, UNAVAILABLE_START, LIMITER)
