"""ACME Renewal Information (ARI, RFC 9773) client for the status scan.

* :func:`cert_id` builds the RFC 9773 certificate identifier.
* :class:`AriClient` reads each CA's directory once per run (``renewalInfo`` URL), then asks
  ``GET {renewalInfo}/{certID}`` for each certificate, from many threads at once, through a
  shared :class:`~certbot_batch.scan.ratelimit.RateLimiter`.
* Every failure is an :class:`AriError` with a machine-readable ``kind``.
* :func:`choose_time` picks the uniform random renewal time inside the suggested window.

Only ``requests``, ``cryptography`` and the standard library are used, and only APIs that
exist in cryptography 38 / requests 2.25 / Python 3.9 (Debian 12).
"""
from __future__ import annotations

import base64
import json
import random
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, Optional

import requests
from cryptography import x509

from certbot_batch import retry
from certbot_batch.scan.http import (
    DEFAULT_MAX_WAIT,
    DEFAULT_USER_AGENT,
    HttpFailure,
    HttpReply,
    SessionPool,
    Timeout,
    http_exchange,
    take_slot,
    timeouts,
)
from certbot_batch.scan.ratelimit import RateLimiter, key_for_url

__all__ = [
    "ARI_KINDS",
    "DEFAULT_RETRY_AFTER",
    "MIN_RETRY_AFTER",
    "MAX_RETRY_AFTER",
    "DEFAULT_USER_AGENT",
    "AriClient",
    "AriError",
    "AriResult",
    "HttpFailure",
    "HttpReply",
    "SessionPool",
    "cert_id",
    "choose_time",
    "http_exchange",
    "parse_rfc3339",
]

#: Every value :attr:`AriError.kind` can take.
ARI_KINDS = ("timeout", "http", "unavailable", "malformed", "bad_window", "no_ari",
             "connection")

#: Retry-After of a successful ARI answer: default when absent, and clamp bounds (seconds);
#: the numbers live in certbot_batch.retry (one policy for every retry of the suite).
DEFAULT_RETRY_AFTER = retry.DEFAULT_ARI_RETRY_AFTER
MIN_RETRY_AFTER = retry.ARI_ANSWER.low
MAX_RETRY_AFTER = retry.ARI_ANSWER.high

#: Back-off after a 503/429 without Retry-After; doubles on each further one, up to a day.
DEFAULT_UNAVAILABLE_BACKOFF = retry.UNAVAILABLE_START
MAX_UNAVAILABLE_BACKOFF = retry.LIMITER.high

#: Size caps on response bodies (a directory is small, an ARI answer tiny).
MAX_DIRECTORY_BYTES = 1 << 20
MAX_ARI_BYTES = 64 << 10

# ----------------------------------------------------------------------------------------
# Errors and results
# ----------------------------------------------------------------------------------------
class AriError(Exception):
    """An ARI check that gave no usable answer.

    ``kind`` is one of :data:`ARI_KINDS`:

    * ``timeout`` - connect/read timed out; ``connection`` - DNS, refused, TLS, reset;
    * ``http`` - an unexpected HTTP status (4xx, 5xx other than 503);
    * ``unavailable`` - 503/429 from the CA, or the CA is backed off for longer than the
      caller can wait (then nothing was sent); ``retry_after`` says when to ask again;
    * ``malformed`` - the answer is not the JSON RFC 9773 describes;
    * ``bad_window`` - ``suggestedWindow`` end is not after its start (no answer);
    * ``no_ari`` - the CA's directory has no ``renewalInfo`` URL, or the certificate has
      no Authority Key Identifier, so ARI cannot be used for it.

    ``retry_after`` (seconds, or ``None``) is the server's Retry-After, or for
    ``unavailable`` without one the back-off the client applied.
    """

    def __init__(self, kind: str, message: str, retry_after: Optional[float] = None, *,
                 url: Optional[str] = None, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.url = url
        self.status = status

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, message={self.message!r}, "
                f"retry_after={self.retry_after!r})")

    def __reduce__(self) -> Any:
        return (type(self), (self.kind, self.message, self.retry_after),
                {"url": self.url, "status": self.status})

    def copy(self, message: Optional[str] = None) -> AriError:
        """A fresh instance with the same fields (for re-raising a cached failure)."""
        return AriError(self.kind, self.message if message is None else message,
                        self.retry_after, url=self.url, status=self.status)


@dataclass
class AriResult:
    """A valid ARI answer. Datetimes are aware and in UTC."""

    window_start: datetime
    window_end: datetime
    retry_after_seconds: float = DEFAULT_RETRY_AFTER
    explanation_url: Optional[str] = None


# ----------------------------------------------------------------------------------------
# certID, RFC 3339, window choice
# ----------------------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _serial_der_content(serial: int) -> bytes:
    """The content octets of the DER INTEGER ``serial`` (minimal two's complement)."""
    if serial >= 0:
        length = (serial.bit_length() + 8) // 8
    else:
        length = ((~serial).bit_length() + 8) // 8
    return serial.to_bytes(length, "big", signed=True)


def cert_id(cert: x509.Certificate) -> str:
    """The RFC 9773 certID of ``cert``.

    ``base64url(AKI keyIdentifier) "." base64url(serial DER content bytes)``, both without
    padding.  Raises :class:`AriError` (kind ``no_ari``) when the certificate has no
    Authority Key Identifier with a keyIdentifier, since ARI cannot name it then.
    """
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        aki = None
    except ValueError as exc:  # unparsable extensions
        raise AriError("no_ari", f"cannot read the extensions of certificate serial "
                       f"{cert.serial_number:#x} ({exc}); ARI cannot be used for it, "
                       "OCSP/expiry rules apply instead") from exc
    key_id = aki.key_identifier if aki is not None else None
    if not key_id:
        raise AriError("no_ari", f"certificate serial {cert.serial_number:#x} (issuer "
                       f"{cert.issuer.rfc4514_string()}) has no Authority Key Identifier "
                       "keyIdentifier, so it has no ARI certID; OCSP/expiry rules apply "
                       "instead")
    return f"{_b64url(key_id)}.{_b64url(_serial_der_content(cert.serial_number))}"


_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$")


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp to an aware UTC datetime.

    Handles ``Z``/``z``, numeric offsets, any number of fractional digits (truncated to
    microseconds) and a leap second (``:60`` is read as ``:59``) on every Python >= 3.9.
    Raises ``ValueError`` for anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an RFC 3339 string, got {type(text).__name__}")
    m = _RFC3339.match(text.strip())
    if not m:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, offset = m.group(7), m.group(8)
    micro = int((frac or "0")[:6].ljust(6, "0"))
    if second == 60:
        second = 59
    if offset in ("Z", "z"):
        tz = timezone.utc
    else:
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError(f"bad UTC offset in {text!r}")
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz).astimezone(
        timezone.utc)


_SYSRAND = random.SystemRandom()


def choose_time(start: datetime, end: datetime,
                rng: Optional[random.Random] = None) -> datetime:
    """A uniformly random time in ``[start, end)``.

    The caller stores it and keeps it across runs (as RFC 9773 section 4.2 asks) as long
    as the window does not change.  Raises ``ValueError`` if ``end <= start``.
    """
    if end <= start:
        raise ValueError(f"empty ARI window: end {end.isoformat()} is not after start "
                         f"{start.isoformat()}")
    span = (end - start).total_seconds()
    offset = (rng if rng is not None else _SYSRAND).random() * span
    chosen = start + timedelta(seconds=offset)
    return chosen if chosen < end else start


def _clamp_retry_after(value: Optional[float]) -> float:
    if value is None:
        return DEFAULT_RETRY_AFTER
    return retry.ARI_ANSWER.clamp(value)


# ----------------------------------------------------------------------------------------
# The ARI client
# ----------------------------------------------------------------------------------------
class _DirSlot:
    __slots__ = ("lock", "done", "url", "error")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.url: Optional[str] = None
        self.error: Optional[AriError] = None


class AriClient:
    """Thread-safe ARI client; share one instance between all worker threads of a scan.

    :param session_factory: makes the per-thread ``requests.Session``.
    :param timeout: (connect, read) seconds, or one number for both.
    :param rate_limiter: shared per-CA limiter; on 503/429 the CA is backed off there, and
        requests are not sent while it is.  ``None``: no limiting at all.
    :param user_agent: User-Agent header of every request.
    :param max_wait: when :meth:`fetch` gets no deadline, how long it may wait for the
        limiter (a back-off that lasts longer fails at once with ``unavailable``).
    :param total_timeout: bound on a whole request (default connect + read).
    """

    def __init__(self, session_factory: Callable[[], requests.Session] = requests.Session,
                 timeout: Timeout = (5.0, 10.0),
                 rate_limiter: Optional[RateLimiter] = None,
                 user_agent: str = DEFAULT_USER_AGENT, *,
                 max_wait: float = DEFAULT_MAX_WAIT,
                 total_timeout: Optional[float] = None,
                 pool_maxsize: int = 64) -> None:
        self.timeout = timeouts(timeout)
        self.rate_limiter = rate_limiter
        self.user_agent = user_agent
        self.max_wait = max_wait
        self.total_timeout = total_timeout
        self.sessions = SessionPool(session_factory, user_agent, pool_maxsize=pool_maxsize)
        self._dir_lock = threading.Lock()
        self._dirs: Dict[str, _DirSlot] = {}
        self._strike_lock = threading.Lock()
        self._strikes: Dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self.stats: Dict[str, int] = {"directory": 0, "ari": 0, "not_sent": 0}

    # -- lifecycle -----------------------------------------------------------------------
    def session(self) -> requests.Session:
        """The calling thread's session (reusable for OCSP requests of the same thread)."""
        return self.sessions.get()

    def close(self) -> None:
        self.sessions.close()

    def __enter__(self) -> AriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ----------------------------------------------------------------------
    def renewal_info_url(self, server_directory_url: str, *,
                         deadline: Optional[float] = None) -> str:
        """The CA's ``renewalInfo`` base URL, fetched once per client and cached.

        Failures are cached too (for the life of the client), except "not sent because the
        CA is backed off", so thousands of lineages do not each refetch a broken directory.
        """
        key = server_directory_url.strip()
        with self._dir_lock:
            slot = self._dirs.get(key)
            if slot is None:
                slot = self._dirs[key] = _DirSlot()
        with slot.lock:
            if not slot.done:
                try:
                    slot.url = self._fetch_directory(key, deadline)
                except AriError as exc:
                    if exc.status is None and exc.kind == "unavailable":
                        raise  # nothing was asked: do not remember
                    slot.error = exc
                slot.done = True
        if slot.error is not None:
            err = slot.error
            raise err.copy(f"{err.message} [directory failure remembered for this run]")
        assert slot.url is not None
        return slot.url

    def forget_directory(self, server_directory_url: str) -> None:
        """Drop the cached directory answer (success or failure) for a server."""
        with self._dir_lock:
            self._dirs.pop(server_directory_url.strip(), None)

    def fetch(self, server_directory_url: str, cert: x509.Certificate, *,
              deadline: Optional[float] = None) -> AriResult:
        """Ask the CA for the renewal window of ``cert``.

        ``deadline`` is on the rate limiter's clock (``limiter.now() + seconds``); default
        ``max_wait`` from now.  Raises :class:`AriError`.
        """
        cid = cert_id(cert)
        base = self.renewal_info_url(server_directory_url, deadline=deadline)
        url = base.rstrip("/") + "/" + cid
        reply = self._get(url, deadline, "ari", MAX_ARI_BYTES)
        if reply.status != 200:
            self._raise_status(reply, "ARI request for certificate " + cid)
        return self._parse_ari(reply)

    # -- internals -----------------------------------------------------------------------
    def _count(self, what: str) -> None:
        with self._stats_lock:
            self.stats[what] = self.stats.get(what, 0) + 1

    def _get(self, url: str, deadline: Optional[float], what: str,
             max_bytes: int) -> HttpReply:
        refused = take_slot(self.rate_limiter, url, deadline, self.max_wait)
        if refused is not None:
            self._count("not_sent")
            why, wait = refused
            if wait is not None:
                msg = (f"{why} (overloaded); not asking it again until then - "
                       "certificates are re-checked after the back-off")
            else:
                msg = f"{why}; request not sent - lower the concurrency or raise the rate limit"
            raise AriError("unavailable", msg, wait, url=url)
        self._count(what)
        try:
            reply = http_exchange(self.session(), "GET", url, timeout=self.timeout,
                                  total_timeout=self.total_timeout, max_bytes=max_bytes,
                                  headers={"Accept": "application/json"})
        except HttpFailure as exc:
            advice = {
                "timeout": "the CA is slow or unreachable; it will be asked again later "
                           "(or raise the timeout)",
                "connection": "check DNS, network, proxy and TLS trust (REQUESTS_CA_BUNDLE) "
                              "for this host",
                "malformed": "this does not look like an ACME server",
            }.get(exc.kind, "")
            raise AriError(exc.kind, f"{exc.detail}; {advice}", url=url) from exc
        return reply

    def _raise_status(self, reply: HttpReply, what: str) -> None:
        status = reply.status
        key = key_for_url(reply.url)
        retry_after = reply.retry_after()
        if status in (429, 503):
            delay = self._on_unavailable(key, retry_after)
            raise AriError("unavailable",
                           f"{what}: {reply.url} answered HTTP {status} (overloaded / rate "
                           f"limited); backing off {key} for {delay:.0f} s - no further "
                           "requests go to it until then", delay, url=reply.url, status=status)
        if status == 404:
            hint = ("the CA does not know this certificate or the renewalInfo URL is wrong; "
                    "check the lineage's 'server' setting")
        elif status >= 500:
            hint = "the CA has a server-side problem; it will be asked again later"
        else:
            hint = "the request was refused; check the server URL and the certificate"
        body = reply.snippet()
        raise AriError("http", f"{what}: {reply.url} answered HTTP {status}"
                       f"{' (' + body + ')' if body else ''}; {hint}",
                       retry_after, url=reply.url, status=status)

    def _on_unavailable(self, key: str, retry_after: Optional[float]) -> float:
        limiter = self.rate_limiter
        if retry_after is not None:
            delay = retry.unavailable_backoff(0, retry_after)
        else:
            with self._strike_lock:
                until = limiter.backed_off_until(key) if limiter is not None else None
                if until is not None:
                    # A concurrent request already backed off: do not grow again.
                    delay = max(1.0, until - limiter.now()) if limiter is not None else 1.0
                else:
                    strikes = self._strikes.get(key, 0) + 1
                    self._strikes[key] = strikes
                    delay = retry.unavailable_backoff(strikes, None)
        if limiter is not None:
            delay = limiter.backoff(key, delay)
        return delay

    def _succeeded(self, key: str) -> None:
        if self._strikes:
            with self._strike_lock:
                self._strikes.pop(key, None)

    def _fetch_directory(self, url: str, deadline: Optional[float]) -> str:
        reply = self._get(url, deadline, "directory", MAX_DIRECTORY_BYTES)
        if reply.status != 200:
            self._raise_status(reply, "ACME directory")
        self._succeeded(key_for_url(reply.url))
        try:
            doc = json.loads(reply.body.decode("utf-8"))
        except ValueError as exc:
            raise AriError("malformed", f"ACME directory {url} is not JSON ({exc}); check "
                           "the lineage's 'server' URL", url=url, status=reply.status) from exc
        if not isinstance(doc, dict):
            raise AriError("malformed", f"ACME directory {url} is not a JSON object; check "
                           "the lineage's 'server' URL", url=url, status=reply.status)
        info = doc.get("renewalInfo")
        if info is None:
            raise AriError("no_ari", f"ACME directory {url} has no 'renewalInfo': this CA "
                           "does not offer ARI; OCSP/expiry rules are used instead",
                           url=url, status=reply.status)
        if not isinstance(info, str) or not re.match(r"^https?://", info, re.IGNORECASE):
            raise AriError("malformed", f"ACME directory {url} has an invalid 'renewalInfo' "
                           f"value {info!r}", url=url, status=reply.status)
        return info

    def _parse_ari(self, reply: HttpReply) -> AriResult:
        url = reply.url
        self._succeeded(key_for_url(url))
        try:
            doc = json.loads(reply.body.decode("utf-8"))
        except ValueError as exc:
            raise AriError("malformed", f"ARI answer from {url} is not JSON ({exc}); the CA "
                           "sent something else than RenewalInfo - it will be asked again "
                           "later", url=url, status=reply.status) from exc
        window = doc.get("suggestedWindow") if isinstance(doc, dict) else None
        if not isinstance(window, dict):
            raise AriError("malformed", f"ARI answer from {url} has no 'suggestedWindow' "
                           "object; it will be asked again later", url=url,
                           status=reply.status)
        try:
            for field in ("start", "end"):
                if not isinstance(window.get(field), str):
                    raise ValueError(f"'{field}' is missing or not a string")
            start = parse_rfc3339(window["start"])
            end = parse_rfc3339(window["end"])
        except ValueError as exc:
            raise AriError("malformed", f"ARI answer from {url} has an unreadable "
                           f"suggestedWindow ({exc}); it will be asked again later",
                           url=url, status=reply.status) from exc
        if end <= start:
            raise AriError("bad_window", f"ARI answer from {url} has a suggestedWindow whose "
                           f"end ({end.isoformat()}) is not after its start "
                           f"({start.isoformat()}); ignored as RFC 9773 requires, it will be "
                           "asked again later", reply.retry_after(), url=url,
                           status=reply.status)
        explanation = doc.get("explanationURL")
        return AriResult(window_start=start, window_end=end,
                         retry_after_seconds=_clamp_retry_after(reply.retry_after()),
                         explanation_url=explanation if isinstance(explanation, str) else None)
