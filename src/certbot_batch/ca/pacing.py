"""Pacing and backoff towards the CA for the ACME requests of a renewal session.

Every ACME request of the session's worker threads (new-order, authorizations, challenges,
finalize, downloads) goes through one :class:`AcmePacer`:

* a token bucket per CA (``--batch-acme-rate``, default 100 requests/s with bursts of 100:
  Let's Encrypt allows 250/s on /acme/* and 300/s on new-order per IP in production; 20/s
  by default on its staging CA, where ``--dry-run`` goes, which allows 20/s);
* new orders go out one at a time in urgency order (the wave's OrderGate), so that a
  rate-limit answer stops the next one;
* a 503, or a 429 outside new-order/finalize, pauses **that endpoint** of that CA for every
  thread, honouring Retry-After (clamped to [1 s, 5 min]; exponential from 1 s without
  one), and the request is sent again after the pause instead of failing its lineage. The
  endpoints are grouped as the CA's directory names them (:func:`AcmePacer.group`): its
  newOrder URL, newNonce (HEAD), newAccount, and everything else (the per-resource order,
  authorization, challenge, finalize and certificate URLs). A paused new-order therefore
  never stalls the authorizations, challenges, finalization and downloads of the orders
  already made, and a 503 on those pauses them (not new-order);
* an endpoint that keeps refusing (503, or 429 "slow down") is **unavailable for the rest of
  the run** once the streak of refusals would last longer than :data:`UNAVAILABLE_AFTER`
  (2 minutes from the first refusal of the streak: when the pause it asks for would end at
  or beyond that, it is declared unavailable at once instead of waiting). Every further
  request to it fails at once, without being sent, with :class:`CAUnavailable`: the session
  renews the due lineages expiring soon from ``--batch-fallback-server`` and defers the
  others with the CA's Retry-After (not a failed validation). A successful answer from the
  endpoint ends the streak;
* a 429 ``rateLimited`` answer to new-order or finalize is a real rate limit: it is not
  retried. The lineage gets the CA's Retry-After as its backoff (``backoff.py``); when the
  limit is per account (Let's Encrypt's "new orders per account"), no further order goes to
  that account in this run and the remaining lineages are deferred.

acme raises before its caller can see the response, so the status and Retry-After of the
last response of each thread are kept here (``_send_request`` is wrapped for that).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from certbot import errors

from certbot_batch import _certbot, retry
from certbot_batch.scan.ratelimit import RateLimiter, key_for_url

logger = logging.getLogger(__name__)

DEFAULT_RATE = 100.0
#: Let's Encrypt's staging CA, where ``--dry-run`` goes, allows one IP 20 requests/s on
#: /acme/* and new-order (FACTS.md): the default there, so that a dry run of thousands of
#: lineages is paced instead of answered 503.
STAGING_RATE = 20.0
STAGING_HOSTS = frozenset({"acme-staging-v02.api.letsencrypt.org"})
MIN_PAUSE = retry.ACME_PAUSE.low
MAX_PAUSE = retry.ACME_PAUSE.high
#: How long one request may be retried across pauses before its lineage fails.
RETRY_BUDGET = 600.0
#: How long (seconds) an endpoint of a CA may keep refusing requests (503, or 429 "slow
#: down"), from the first refusal of the streak, before it is unavailable for the rest of
#: the run. Two minutes: Let's Encrypt's per-IP overload answers ask for seconds, so a
#: streak this long is an outage (or a pause longer than the run should wait), and due
#: lineages expiring soon must reach the fallback CA within a stated time (a wave's other
#: orders, already made, finish meanwhile).
UNAVAILABLE_AFTER = 120.0
RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"

#: Endpoint groups (:meth:`AcmePacer.group`).
NEW_ORDER, NEW_NONCE, NEW_ACCOUNT, OTHER = "newOrder", "newNonce", "newAccount", "other"
_GROUP_WORDS = {NEW_ORDER: "new-order", NEW_NONCE: "new-nonce", NEW_ACCOUNT: "new-account",
                OTHER: "ACME (authorization, challenge, finalize, certificate)"}


def default_rate(server: Optional[str]) -> float:
    """The ACME request rate when ``--batch-acme-rate`` is not given, for the run's CA."""
    try:
        host = urlsplit(server or "").hostname or ""
    except ValueError:
        host = ""
    return STAGING_RATE if host.lower() in STAGING_HOSTS else DEFAULT_RATE


class Deferred(errors.Error):
    """Not sent to the CA: the account hit an account-wide rate limit earlier in this run."""

    def __init__(self, message: str, retry_after: Optional[float]) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CAUnavailable(Deferred):
    """An endpoint of the lineage's CA kept refusing requests for longer than
    :data:`UNAVAILABLE_AFTER`: not sent (again) in this run. ``retry_after``: the CA's last
    Retry-After (or the pause it would have meant)."""


def deferral(exc: Optional[BaseException], depth: int = 0) -> Optional[Deferred]:
    """The :class:`Deferred` that ``exc`` is or was caused by (certbot may wrap it)."""
    if exc is None or depth > 5:
        return None
    if isinstance(exc, Deferred):
        return exc
    return deferral(exc.__cause__ or exc.__context__, depth + 1)


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
    return retry.retry_after_seconds(value)


def _problem_type(response: Any) -> str:
    try:
        ctype = response.headers.get("Content-Type", "")
        if "json" not in ctype:
            return ""
        body = response.json()
        return str(body.get("type", "")) if isinstance(body, dict) else ""
    except (ValueError, AttributeError):
        return ""


@dataclasses.dataclass
class _Endpoint:
    """The pause state of one endpoint group of one CA."""
    paused_until: float = 0.0
    #: clock time of the first refusal of the current streak (None: no streak)
    streak_start: Optional[float] = None
    consecutive: int = 0
    #: the last pause asked for (the CA's Retry-After, clamped) and the status it came with
    pause: float = 0.0
    status: int = 0
    #: why it is unavailable for the rest of the run (None: it is not)
    unavailable: Optional[str] = None


class AcmePacer:
    def __init__(self, rate: float = DEFAULT_RATE, burst: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic,
                 wait: Optional[Callable[[float], None]] = None,
                 unavailable_after: float = UNAVAILABLE_AFTER) -> None:
        """``clock`` and ``wait`` (``wait(seconds)``, called with the pacer's lock held;
        default: a condition wait) drive both the token bucket and the pauses, so tests
        can run them on a fake clock."""
        self.limiter = RateLimiter(rate=rate, burst=burst or max(1.0, rate), clock=clock,
                                   wait=wait)
        self.clock = clock
        self.unavailable_after = unavailable_after
        self._local = threading.local()
        self._lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._wait = wait if wait is not None else self._cond.wait
        #: (CA key, endpoint group) -> its pauses
        self._endpoints: dict[tuple[str, str], _Endpoint] = {}
        #: URL -> endpoint group, from the directories of the CAs of this run
        self._groups: dict[str, str] = {}
        #: (CA key, account URI) -> the account-wide limit that stopped its orders
        self.account_limits: dict[tuple[str, str], RateLimit] = {}
        #: lineage -> the rate-limit answer it got
        self.rate_limited: dict[str, RateLimit] = {}
        self.pauses = 0
        self.retries = 0
        self.requests = 0
        #: requests refused here, without being sent, because their endpoint is unavailable
        self.not_sent = 0

    # -- the per-thread view of the last response ----------------------------------------
    def last(self) -> tuple[Optional[int], Optional[float], str]:
        """(status, Retry-After seconds, problem type) of this thread's last response."""
        return getattr(self._local, "last", (None, None, ""))

    def _last_was_order_limit(self) -> bool:
        return bool(getattr(self._local, "order_limit", False))

    def _endpoint(self) -> str:
        return str(getattr(self._local, "endpoint", "") or "")

    # -- endpoints ---------------------------------------------------------------------------
    def learn(self, directory: Any) -> None:
        """Remember which URLs of a CA's directory are newOrder, newNonce, newAccount."""
        for name in (NEW_ORDER, NEW_NONCE, NEW_ACCOUNT):
            try:
                url = directory[name]
            except (KeyError, TypeError, AttributeError):
                url = getattr(directory, name, None)
            if isinstance(url, str) and url:
                with self._lock:
                    self._groups[url] = name

    def group(self, method: str, url: str) -> str:
        """The endpoint group of a request: acme asks newNonce with HEAD and nothing else;
        newOrder and newAccount by their directory URLs; every per-resource URL (orders,
        authorizations, challenges, finalize, certificates, the account) and the directory
        itself is "other"."""
        if method.upper() == "HEAD":
            return NEW_NONCE
        with self._lock:
            return self._groups.get(url, OTHER)

    def unavailable(self, ca: str, group: str) -> Optional[str]:
        """Why that endpoint of that CA is unavailable for the rest of the run, or None."""
        with self._cond:
            ep = self._endpoints.get((key_for_url(ca), group))
            return ep.unavailable if ep is not None else None

    def _error(self, ep: _Endpoint) -> CAUnavailable:
        return CAUnavailable(str(ep.unavailable), ep.pause or None)

    def _await(self, key: tuple[str, str]) -> None:
        """Wait out the endpoint's pause; raise CAUnavailable (nothing sent) when it is
        unavailable, also when that is decided while waiting."""
        with self._cond:
            while True:
                ep = self._endpoints.get(key)
                if ep is None:
                    return
                if ep.unavailable is not None:
                    with self._lock:
                        self.not_sent += 1
                    raise self._error(ep)
                now = self.clock()
                if ep.paused_until <= now:
                    return
                self._wait(ep.paused_until - now)

    # -- wrappers (installed by _certbot for the session) --------------------------------
    def send(self, orig: Callable[..., Any], net: Any, method: str, url: str, *args: Any,
             **kwargs: Any) -> Any:
        ca = key_for_url(url)
        key = (ca, self.group(method, url))
        self._local.key = key
        self._await(key)
        self.limiter.acquire(ca)
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
            self._refused(key, status, retry_after)
        elif status < 400:
            self._answered(key)
        return response

    def _is_order_limit(self, problem: str) -> bool:
        return problem == RATE_LIMITED and self._endpoint() in ("newOrder", "finalize")

    def _answered(self, key: tuple[str, str]) -> None:
        with self._cond:
            ep = self._endpoints.get(key)
            if ep is not None and ep.unavailable is None:
                ep.streak_start = None
                ep.consecutive = 0

    def _refused(self, key: tuple[str, str], status: int,
                 retry_after: Optional[float]) -> None:
        ca, group = key
        what = _GROUP_WORDS.get(group, group)
        with self._cond:
            ep = self._endpoints.setdefault(key, _Endpoint())
            now = self.clock()
            if now >= ep.paused_until:
                # A refusal during a pause answers a request sent before the pause (requests
                # wait for pauses): many threads refused at once are one refusal, not an
                # exponent that declares the endpoint unavailable at once.
                ep.consecutive += 1
            if ep.streak_start is None:
                ep.streak_start = now
            seconds = retry.acme_pause(ep.consecutive, retry_after)
            ep.pause, ep.status = seconds, status
            with self._lock:
                self.pauses += 1
            if ep.unavailable is not None:
                return
            if now + seconds >= ep.streak_start + self.unavailable_after:
                # The streak would outlast the bound: stop asking now, not after the pause.
                ep.unavailable = (
                    f"the CA ({ca}) has refused its {what} requests for "
                    f"{now - ep.streak_start:.0f} s and asks to wait {seconds:.0f} s more "
                    f"(HTTP {status}): more than the {self.unavailable_after:.0f} s "
                    "certbot-batch waits for an endpoint; unavailable for the rest of this "
                    "run")
                self._cond.notify_all()
                logger.error("certbot-batch: %s; due certificates expiring soon go to the "
                             "fallback CA (--batch-fallback-server), the others are deferred",
                             ep.unavailable)
                return
            ep.paused_until = max(ep.paused_until, now + seconds)
            self._cond.notify_all()
        logger.warning("certbot-batch: the CA (%s) asks to slow down (HTTP %s); pausing its "
                       "%s requests for %.0f s", ca, status, what, seconds)

    def retrying(self, orig: Callable[..., Any], stopping: Callable[[], bool],
                 *args: Any, **kwargs: Any) -> Any:
        """Call ``orig`` (one ACME request: acme's _post_once or get); after a pause (503,
        429 outside new-order/finalize) send it again, within a time budget; once the
        endpoint is unavailable, raise CAUnavailable (from the CA's answer)."""
        from acme import errors as acme_errors
        from acme import messages

        deadline = self.clock() + RETRY_BUDGET
        while True:
            try:
                return orig(*args, **kwargs)
            except (messages.Error, acme_errors.ClientError) as exc:
                status, _, _ = self.last()
                retry = status == 503 or (status == 429 and not self._last_was_order_limit())
                if not retry or stopping() or self.clock() >= deadline:
                    raise
                key = getattr(self._local, "key", None)
                with self._cond:
                    ep = self._endpoints.get(key) if key is not None else None
                    if ep is not None and ep.unavailable is not None:
                        raise self._error(ep) from exc
                with self._lock:
                    self.retries += 1
                logger.info("certbot-batch: the CA answered %s; the request is sent again "
                            "after the pause", status)

    # -- orders ------------------------------------------------------------------------------
    def new_order(self, orig: Callable[..., Any], client: Any, lineage: Optional[str],
                  *args: Any, **kwargs: Any) -> Any:
        from acme import messages

        self.learn(getattr(client, "directory", None))
        url = _directory_url(client)
        account = _certbot.account_uri(client)
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
            key = (key_for_url(_directory_url(client)), _certbot.account_uri(client))
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
