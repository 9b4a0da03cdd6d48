"""Per-lineage renewal failure backoff, kept in the state database.

RFC 9773 section 4.3 and Let's Encrypt's integration guide ask clients run from cron to
store failures and back off: after a failed renewal attempt (validation failed, order
refused, finalization failed, CA unreachable) the next attempt waits 1 min, 10 min,
100 min, then once a day (each with +-10% jitter); a success resets it. Let's Encrypt allows
5 failed authorizations per name per account per hour and pauses the account for a name
after 1,152 consecutive ones: without a backoff, a dead domain checked every 15 minutes
costs 96 failed validations a day.

A rate-limit answer is not a failed validation: the lineage waits the CA's Retry-After and
its failure count does not grow. ``--force-renewal``, ``--cert-name`` and a change of the
lineage's renewal conf (the admin fixed it) bypass the backoff.
"""
from __future__ import annotations

import random
from typing import Any, Optional

from certbot_batch import retry
from certbot_batch.scan.engine import fmt_time
from certbot_batch.scan.state import LineageState

#: seconds before the 1st, 2nd, 3rd, and every later retry (the numbers: retry.py)
SCHEDULE = retry.LINEAGE_SCHEDULE
JITTER = retry.LINEAGE_JITTER
MIN_RETRY_AFTER = retry.LINEAGE_RETRY.low
MAX_RETRY_AFTER = retry.LINEAGE_RETRY.high


def delay_after(failures: int, rng: Optional[random.Random] = None) -> float:
    return retry.lineage_delay(failures, rng)


def record_failure(state: LineageState, now: float, error: str,
                   retry_after: Optional[float] = None, counts: bool = True,
                   rng: Optional[random.Random] = None) -> None:
    """A renewal attempt of ``state`` failed (``counts``: a real attempt that the CA saw
    fail, not a rate-limit answer or a deferral)."""
    if counts:
        state.renew_failures += 1
    if state.renew_failing_since is None:
        state.renew_failing_since = now
    state.renew_last_error = error[:2000]
    if retry_after is not None:
        wait = retry.LINEAGE_RETRY.clamp(float(retry_after))
    else:
        wait = delay_after(state.renew_failures, rng)
    state.renew_next_attempt = now + wait
    state.renew_fail_conf_sig = state.conf_sig


def record_success(state: LineageState) -> None:
    state.renew_failures = 0
    state.renew_failing_since = None
    state.renew_last_error = None
    state.renew_next_attempt = None
    state.renew_fail_conf_sig = None


def backing_off(state: LineageState, now: float, config: Any) -> bool:
    """Must this due lineage wait for its next attempt?"""
    if state.renew_next_attempt is None or state.renew_next_attempt <= now:
        return False
    if getattr(config, "renew_by_default", False) is True:  # --force-renewal
        return False
    if getattr(config, "certname", None):
        return False
    if state.renew_fail_conf_sig is not None and state.conf_sig != state.renew_fail_conf_sig:
        return False  # the renewal conf changed since the failure: the admin fixed it
    return True


def describe(state: LineageState) -> str:
    attempts = state.renew_failures
    what = f"{attempts} failed attempt(s)" if attempts else "rate limited"
    return (f"{state.name}: failing since {fmt_time(state.renew_failing_since)}, {what}, "
            f"last error: {state.renew_last_error or '-'}; next attempt "
            f"{fmt_time(state.renew_next_attempt)}")
