"""Per-CA rate limiting and back-off for the status scan.

One :class:`RateLimiter` is shared by every worker thread of a scan.  Each CA (keyed by
``scheme://host[:port]`` of the URL asked) gets a token bucket of ``rate`` requests per
second with room for ``burst`` requests, and a *global* back-off: once a CA answers
503/429 with (or without) ``Retry-After``, nobody asks it again until the back-off ends.
A caller that cannot wait that long (its deadline comes first) is told so at once, so a
503 storm makes the rest of the run stop asking that CA instead of hammering it.

Waiting uses a :class:`threading.Condition` (no busy-wait).  Both the clock and the wait
are injectable, so tests can drive the limiter with a fake clock and never really sleep.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable, Dict, Optional
from urllib.parse import urlsplit

# parse_retry_after is part of this module's interface (one implementation: retry.py).
from certbot_batch.retry import LIMITER, parse_retry_after

__all__ = [
    "MIN_BACKOFF",
    "MAX_BACKOFF",
    "RateLimiter",
    "key_for_url",
    "parse_retry_after",
]

#: Bounds applied to every back-off (seconds): certbot_batch.retry.LIMITER.
MIN_BACKOFF = LIMITER.low
MAX_BACKOFF = LIMITER.high

_EPSILON = 1e-9
_DEFAULT_PORTS = {"http": 80, "https": 443}


def key_for_url(url: str) -> str:
    """The rate-limit key of ``url``: ``scheme://host[:port]``, lower-cased.

    The default port of the scheme is dropped, so ``https://ca.example:443/dir`` and
    ``https://CA.example/acme/renewal-info/x`` share one key.  Idempotent: a key maps to
    itself.  A string that is not a URL is returned stripped and lower-cased.
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        host = parts.hostname
        port = parts.port
    except ValueError:  # e.g. a port that is not a number
        return text.lower()
    if not parts.scheme or not host:
        return text.lower()
    scheme = parts.scheme.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is not None and _DEFAULT_PORTS.get(scheme) != port:
        return f"{scheme}://{host.lower()}:{port}"
    return f"{scheme}://{host.lower()}"


class _Bucket:
    __slots__ = ("tokens", "stamp", "backoff_until")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.backoff_until: Optional[float] = None


class RateLimiter:
    """Thread-safe per-key token bucket with a per-key global back-off.

    :param rate: tokens (requests) per second per key; ``None``, ``0`` or ``inf`` means no
        rate limit (back-off still applies).
    :param burst: bucket size (the most requests that may go out at once); at least 1.
    :param clock: monotonic clock in seconds; deadlines and :meth:`backed_off_until` use it.
    :param wait: ``wait(seconds)`` called *with the limiter's lock held* to block; the
        default waits on the limiter's Condition (which releases the lock meanwhile).  A
        fake for tests typically just advances its fake clock.
    """

    def __init__(
        self,
        rate: Optional[float] = 50.0,
        burst: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Optional[Callable[[float], None]] = None,
    ) -> None:
        if rate is not None and (rate < 0 or math.isnan(rate)):
            raise ValueError(f"rate must be >= 0 (or None for no limit), got {rate!r}")
        self.rate: Optional[float] = None if not rate or math.isinf(rate) else float(rate)
        self.burst = max(1.0, float(burst))
        self.clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._wait = wait if wait is not None else self._cond_wait
        self._buckets: Dict[str, _Bucket] = {}

    # -- internals -----------------------------------------------------------------------
    def _cond_wait(self, seconds: float) -> None:
        self._cond.wait(seconds)

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        return bucket

    def _refill(self, bucket: _Bucket, now: float) -> None:
        if self.rate is None:
            bucket.tokens = self.burst
        elif now > bucket.stamp:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = max(bucket.stamp, now)

    # -- public API ----------------------------------------------------------------------
    def now(self) -> float:
        """The limiter's clock (use it to build ``deadline`` values)."""
        return self.clock()

    def acquire(self, key: str, deadline: Optional[float] = None) -> bool:
        """Take one token for ``key``, blocking until one is available.

        ``deadline`` is an absolute time on :attr:`clock` (``limiter.now() + 30``), or
        ``None`` to wait as long as it takes.  Returns ``False`` without waiting when the
        key is backed off beyond the deadline, and ``False`` when no token can be had by
        the deadline; ``True`` once a token was taken.
        """
        key = key_for_url(key)
        with self._cond:
            while True:
                now = self.clock()
                bucket = self._bucket(key, now)
                until = bucket.backoff_until
                if until is not None:
                    if until <= now:
                        bucket.backoff_until = None
                    else:
                        if deadline is not None and until > deadline:
                            return False
                        self._wait(until - now)
                        continue
                self._refill(bucket, now)
                if bucket.tokens >= 1.0 - _EPSILON:
                    bucket.tokens = max(0.0, bucket.tokens - 1.0)
                    return True
                assert self.rate is not None  # unlimited buckets are always full
                need = (1.0 - bucket.tokens) / self.rate
                if deadline is not None:
                    if now >= deadline or now + need > deadline:
                        return False
                self._wait(need)

    def try_acquire(self, key: str) -> bool:
        """Take a token only if one is available right now (never blocks)."""
        return self.acquire(key, deadline=self.clock())

    def backoff(self, key: str, seconds: float) -> float:
        """Stop handing out tokens for ``key`` for ``seconds`` (clamped to [1 s, 1 day]).

        An existing, longer back-off is kept.  Returns the clamped number of seconds.
        Waiting threads are woken up so that those whose deadline comes first can give up.
        """
        seconds = LIMITER.clamp(seconds)
        key = key_for_url(key)
        with self._cond:
            now = self.clock()
            bucket = self._bucket(key, now)
            until = now + seconds
            if bucket.backoff_until is None or bucket.backoff_until < until:
                bucket.backoff_until = until
            # Do not let a full bucket burst out the moment the back-off ends.
            self._refill(bucket, now)
            bucket.tokens = min(bucket.tokens, 1.0)
            bucket.stamp = max(bucket.stamp, until)
            self._cond.notify_all()
        return seconds

    def backed_off_until(self, key: str) -> Optional[float]:
        """When the back-off of ``key`` ends (on :attr:`clock`), or ``None`` if not backed off."""
        key = key_for_url(key)
        with self._cond:
            bucket = self._buckets.get(key)
            if bucket is None or bucket.backoff_until is None:
                return None
            if bucket.backoff_until <= self.clock():
                bucket.backoff_until = None
                return None
            return bucket.backoff_until

    def clear_backoff(self, key: str) -> None:
        """Forget the back-off of ``key`` (e.g. after a successful answer)."""
        key = key_for_url(key)
        with self._cond:
            bucket = self._buckets.get(key)
            if bucket is not None and bucket.backoff_until is not None:
                bucket.backoff_until = None
                bucket.stamp = min(bucket.stamp, self.clock())
                self._cond.notify_all()
