"""Pacing and backoff towards the CA for the ACME requests of a renewal session.

Every ACME request of the session's worker threads (new-order, authorizations, challenges,
finalize, downloads) goes through one :class:`AcmePacer`:

* a token bucket per CA (``--batch-acme-rate``, default 100 requests/s with bursts of 100:
  Let's Encrypt allows 250/s on /acme/* and 300/s on new-order per IP in production, 20/s on
  staging, where ``--dry-run`` goes);
* new orders go out one at a time in urgency order (the wave's OrderGate), so that a
  rate-limit answer stops the next one;
* a 503, or a 429 outside new-order/finalize, pauses that CA for every thread, honouring
  Retry-After (clamped to [1 s, 5 min]; exponential from 1 s without one), and the request
  is retried after the pause instead of failing its lineage (within a time budget);
* a 429 ``rateLimited`` answer to new-order or finalize is a real rate limit: it is not
  retried. The lineage gets the CA's Retry-After as its backoff (``backoff.py``); when the
  limit is per account (Let's Encrypt's "new orders per account"), no further order goes to
  that account in this run and the remaining lineages are deferred.

acme raises before its caller can see the response, so the status and Retry-After of the
last response of each thread are kept here (``_send_request`` is wrapped for that).
"""
from __future__ import annotations

import dataclasses
import email.utils
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from certbot import errors

from certbot_batch.scan.ratelimit import RateLimiter, key_for_url, parse_retry_after

logger = logging.getLogger(__name__)

DEFAULT_RATE = 100.0
MIN_PAUSE = 1.0
MAX_PAUSE = 300.0
#: How long one request may be retried across pauses before its lineage fails.
RETRY_BUDGET = 600.0
RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"


class Deferred(errors.Error):
    """Not sent to the CA: the account hit an account-wide rate limit earlier in this run."""

    def __init__(self, message: str, retry_after: Optional[float]) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass
class RateLimit:
    """A rate-limit answer of the CA, as the lineage's backoff needs it."""
    detail: str
    retry_after: Optional[float]
    account_wide: bool
    endpoint: str


def is_account_wide(detail: str) -> bool:
    """Let's Encrypt names the limit in the detail and links its documentation."""
    text = detail.lower()
    return ("new-orders-per-account" in text or "too many new orders" in text
            or "per account" in text or "orders per account" in text)


def _retry_after_seconds(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        seconds = parse_retry_after(value, datetime.now(timezone.utc))
    except (TypeError, ValueError):
        seconds = None
    if seconds is None:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
            seconds = max(0.0, parsed.timestamp() - time.time())
        except (TypeError, ValueError, IndexError):
            return None
    return seconds


def _problem_type(response: Any) -> str:
    try:
        ctype = response.headers.get("Content-Type", "")
        if "json" not in ctype:
            return ""
        body = response.json()
        return str(body.get("type", "")) if isinstance(body, dict) else ""
    except (ValueError, AttributeError):
        return ""


class AcmePacer:
    def __init__(self, rate: float = DEFAULT_RATE, burst: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = RateLimiter(rate=rate, burst=burst or max(1.0, rate), clock=clock)
        self.clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._consecutive: dict[str, int] = {}
        #: (CA key, account URI) -> the account-wide limit that stopped its orders
        self.account_limits: dict[tuple[str, str], RateLimit] = {}
        #: lineage -> the rate-limit answer it got
        self.rate_limited: dict[str, RateLimit] = {}
        self.pauses = 0
        self.retries = 0
        self.requests = 0

    # -- the per-thread view of the last response ----------------------------------------
    def last(self) -> tuple[Optional[int], Optional[float], str]:
        """(status, Retry-After seconds, problem type) of this thread's last response."""
        return getattr(self._local, "last", (None, None, ""))

    def _last_was_order_limit(self) -> bool:
        return bool(getattr(self._local, "order_limit", False))

    def _endpoint(self) -> str:
        return str(getattr(self._local, "endpoint", "") or "")

    # -- wrappers (installed by _certbot for the session) --------------------------------
    def send(self, orig: Callable[..., Any], net: Any, method: str, url: str, *args: Any,
             **kwargs: Any) -> Any:
        key = key_for_url(url)
        self.limiter.acquire(key)
        with self._lock:
            self.requests += 1
        self._local.last = (None, None, "")
        self._local.order_limit = False
        response = orig(net, method, url, *args, **kwargs)
        status = int(getattr(response, "status_code", 0) or 0)
        retry_after = _retry_after_seconds(response.headers.get("Retry-After")) \
            if status >= 400 else None
        problem = _problem_type(response) if status >= 400 else ""
        self._local.last = (status, retry_after, problem)
        # A rate-limit answer to new-order/finalize is a real limit: never retried.
        self._local.order_limit = status == 429 and self._is_order_limit(problem)
        if status == 503 or (status == 429 and not self._local.order_limit):
            self._pause(key, retry_after)
        elif status < 400:
            with self._lock:
                self._consecutive.pop(key, None)
        return response

    def _is_order_limit(self, problem: str) -> bool:
        return problem == RATE_LIMITED and self._endpoint() in ("newOrder", "finalize")

    def _pause(self, key: str, retry_after: Optional[float]) -> None:
        with self._lock:
            n = self._consecutive.get(key, 0) + 1
            self._consecutive[key] = n
            self.pauses += 1
        seconds = retry_after if retry_after is not None else 2.0 ** min(n - 1, 8)
        seconds = min(MAX_PAUSE, max(MIN_PAUSE, seconds))
        self.limiter.backoff(key, seconds)
        logger.warning("certbot-batch: the CA (%s) asks to slow down; pausing every request "
                       "to it for %.0f s", key, seconds)

    def retrying(self, orig: Callable[..., Any], stopping: Callable[[], bool],
                 *args: Any, **kwargs: Any) -> Any:
        """Call ``orig`` (one ACME request: acme's _post_once or get); after a pause (503,
        429 outside new-order/finalize) send it again, within a time budget."""
        from acme import errors as acme_errors
        from acme import messages

        deadline = self.clock() + RETRY_BUDGET
        while True:
            try:
                return orig(*args, **kwargs)
            except (messages.Error, acme_errors.ClientError):
                status, _, _ = self.last()
                retry = status == 503 or (status == 429 and not self._last_was_order_limit())
                if not retry or stopping() or self.clock() >= deadline:
                    raise
                with self._lock:
                    self.retries += 1
                logger.info("certbot-batch: the CA answered %s; the request is sent again "
                            "after the pause", status)

    # -- orders ------------------------------------------------------------------------------
    def new_order(self, orig: Callable[..., Any], client: Any, lineage: Optional[str],
                  *args: Any, **kwargs: Any) -> Any:
        from acme import messages

        url = _directory_url(client)
        account = _account_uri(client)
        key = (key_for_url(url), account)
        # (The wave's OrderGate decides when this lineage may order: one at a time, in
        # urgency order.)
        with self._lock:
            limit = self.account_limits.get(key)
        if limit is not None:
            raise Deferred(f"deferred: the CA's account-wide rate limit answered earlier "
                           f"in this run: {limit.detail}", limit.retry_after)
        self._local.endpoint = "newOrder"
        try:
            return orig(client, *args, **kwargs)
        except messages.Error as exc:
            self._note_rate_limit(exc, lineage, "newOrder", key)
            raise
        finally:
            self._local.endpoint = ""

    def finalize(self, orig: Callable[..., Any], client: Any, lineage: Optional[str],
                 *args: Any, **kwargs: Any) -> Any:
        from acme import messages

        self._local.endpoint = "finalize"
        try:
            return orig(client, *args, **kwargs)
        except messages.Error as exc:
            key = (key_for_url(_directory_url(client)), _account_uri(client))
            self._note_rate_limit(exc, lineage, "finalize", key)
            raise
        finally:
            self._local.endpoint = ""

    def _note_rate_limit(self, exc: Any, lineage: Optional[str], endpoint: str,
                         key: tuple[str, str]) -> None:
        if str(getattr(exc, "typ", "")) != RATE_LIMITED:
            return
        _, retry_after, _ = self.last()
        detail = str(getattr(exc, "detail", "") or exc)
        limit = RateLimit(detail=detail, retry_after=retry_after,
                          account_wide=endpoint == "newOrder" and is_account_wide(detail),
                          endpoint=endpoint)
        with self._lock:
            if lineage:
                self.rate_limited[lineage] = limit
            if limit.account_wide and key not in self.account_limits:
                self.account_limits[key] = limit
                logger.error("certbot-batch: the CA refused a new order with an account-wide "
                             "rate limit (%s); no further orders go to that account in this "
                             "run", detail)


def _directory_url(client: Any) -> str:
    """The CA's new-order URL (the key its pacing and limits are kept under)."""
    directory = getattr(client, "directory", None)
    try:
        return str(directory["newOrder"])  # type: ignore[index]
    except (KeyError, TypeError, AttributeError):
        return str(getattr(directory, "newOrder", "") or "")


def _account_uri(client: Any) -> str:
    net = getattr(client, "net", None)
    account = getattr(net, "account", None)
    return str(getattr(account, "uri", "") or "")
