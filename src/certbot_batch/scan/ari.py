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
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

import requests
import urllib3
from cryptography import x509
from requests.adapters import HTTPAdapter
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_environ_proxies

from certbot_batch import __version__
from certbot_batch.scan.ratelimit import RateLimiter, key_for_url, parse_retry_after

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

#: Retry-After of a successful ARI answer: default when absent, and clamp bounds (seconds).
DEFAULT_RETRY_AFTER = 6 * 3600.0
MIN_RETRY_AFTER = 60.0
MAX_RETRY_AFTER = 86400.0

#: Back-off after a 503/429 without Retry-After; doubles on each further one, up to a day.
DEFAULT_UNAVAILABLE_BACKOFF = 60.0
MAX_UNAVAILABLE_BACKOFF = 86400.0

#: How long a request may wait for the rate limiter when the caller gives no deadline.
DEFAULT_MAX_WAIT = 30.0

DEFAULT_USER_AGENT = f"certbot-batch/{__version__} python-requests/{requests.__version__}"

#: Size caps on response bodies (a directory is small, an ARI answer tiny).
MAX_DIRECTORY_BYTES = 1 << 20
MAX_ARI_BYTES = 64 << 10

Timeout = Union[float, Tuple[float, float]]


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
    return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, value))


# ----------------------------------------------------------------------------------------
# HTTP plumbing shared with the OCSP client
# ----------------------------------------------------------------------------------------
class SessionPool:
    """One ``requests.Session`` per thread, each with a roomy keep-alive pool.

    Worker threads reuse their own connections (no lock on a shared cookie jar, no
    "connection pool is full" churn).  If ``factory`` hands out one shared session, it is
    configured once and shared.
    """

    def __init__(self, factory: Callable[[], requests.Session] = requests.Session,
                 user_agent: Optional[str] = DEFAULT_USER_AGENT, *,
                 pool_connections: int = 16, pool_maxsize: int = 64) -> None:
        self._factory = factory
        self._user_agent = user_agent
        self._pool_connections = pool_connections
        self._pool_maxsize = pool_maxsize
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: List[requests.Session] = []
        self._seen: Set[int] = set()

    def get(self) -> requests.Session:
        """The calling thread's session (created on first use)."""
        sess: Optional[requests.Session] = getattr(self._local, "session", None)
        if sess is None:
            sess = self._factory()
            with self._lock:
                if id(sess) not in self._seen:
                    self._seen.add(id(sess))
                    self._sessions.append(sess)
                    if isinstance(sess, requests.Session):
                        adapter = HTTPAdapter(pool_connections=self._pool_connections,
                                              pool_maxsize=self._pool_maxsize)
                        sess.mount("https://", adapter)
                        sess.mount("http://", adapter)
                    if self._user_agent:
                        sess.headers["User-Agent"] = self._user_agent
            self._local.session = sess
        return sess

    def close(self) -> None:
        """Close every session handed out so far."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
            self._seen.clear()
        self._local = threading.local()
        for sess in sessions:
            try:
                sess.close()
            except Exception:  # noqa: BLE001 - closing must not fail a run
                pass


@dataclass
class HttpReply:
    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    def retry_after(self) -> Optional[float]:
        return parse_retry_after(self.headers.get("Retry-After"), datetime.now(timezone.utc))

    def snippet(self, limit: int = 200) -> str:
        """A short, printable description of the body (``detail`` of a problem document)."""
        text = self.body[:4096].decode("utf-8", "replace")
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("detail"), str):
            text = str(doc.get("type", "")) + ": " + doc["detail"]
        text = " ".join(text.split())
        return text if len(text) <= limit else text[:limit] + "..."


class HttpFailure(Exception):
    """Transport-level failure: ``kind`` is ``timeout``, ``connection`` or ``malformed``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _is_timeout(exc: BaseException) -> bool:
    seen: Set[int] = set()
    todo: List[Any] = [exc]
    while todo:
        cur = todo.pop()
        if not isinstance(cur, BaseException) or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, (requests.exceptions.Timeout, socket.timeout, TimeoutError)):
            return True
        if type(cur).__name__ in ("ReadTimeoutError", "ConnectTimeoutError"):
            return True
        todo.extend(cur.args)
        todo.extend((cur.__cause__, cur.__context__, getattr(cur, "reason", None)))
    return False


def _timeouts(timeout: Timeout) -> Tuple[float, float]:
    if isinstance(timeout, tuple):
        return float(timeout[0]), float(timeout[1])
    return float(timeout), float(timeout)


def http_exchange(session: requests.Session, method: str, url: str, *, timeout: Timeout,
                  total_timeout: Optional[float] = None, max_bytes: int = MAX_DIRECTORY_BYTES,
                  headers: Optional[Mapping[str, str]] = None,
                  data: Optional[bytes] = None) -> HttpReply:
    """One HTTP request with bounded time and size; any transport error -> :class:`HttpFailure`.

    ``timeout`` is requests' (connect, read) pair; ``total_timeout`` (default
    connect + read) bounds the whole exchange, so a server dribbling bytes cannot hold a
    worker thread for long.  Bodies larger than ``max_bytes`` are refused.
    """
    connect, read = _timeouts(timeout)
    budget = total_timeout if total_timeout is not None else connect + read
    started = time.monotonic()
    pool = _direct_pool(session, url)
    if pool is not None:
        return _urllib3_exchange(pool, session, method, url, connect=connect, read=read,
                                 budget=budget, started=started, max_bytes=max_bytes,
                                 headers=headers, data=data)
    # verify=False per request, as acme does for certbot's --no-verify-ssl: requests lets
    # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE from the environment override session.verify=False.
    verify = False if session.verify is False else None
    try:
        resp = session.request(method, url, headers=dict(headers or {}), data=data,
                               timeout=(connect, read), stream=True, allow_redirects=True,
                               verify=verify)
    except requests.exceptions.SSLError as exc:
        raise HttpFailure("connection", f"TLS error talking to {url}: {exc}") from exc
    except requests.exceptions.RequestException as exc:
        if _is_timeout(exc):
            raise HttpFailure("timeout", f"no answer from {url} within {connect:g} s "
                              f"(connect) / {read:g} s (read)") from exc
        if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                            requests.exceptions.InvalidSchema)):
            raise HttpFailure("connection", f"invalid URL {url!r}: {exc}") from exc
        raise HttpFailure("connection", f"cannot connect to {url}: {exc}") from exc
    try:
        body = _read_body(resp.headers, resp.iter_content(16384),
                          requests.exceptions.RequestException, url=url, max_bytes=max_bytes,
                          started=started, budget=budget, read=read)
        return HttpReply(url=resp.url or url, status=resp.status_code,
                         headers=resp.headers, body=body)
    finally:
        resp.close()


def _read_body(headers: Mapping[str, str], chunks_iter: Any, transport_error: Any, *,
               url: str, max_bytes: int, started: float, budget: float, read: float) -> bytes:
    """Read a body within size and time bounds; transport errors -> :class:`HttpFailure`."""
    length = headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise HttpFailure("malformed", f"{url} sent a {int(length)}-byte body "
                          f"(more than the {max_bytes} bytes expected)")
    chunks: List[bytes] = []
    size = 0
    try:
        for chunk in chunks_iter:
            size += len(chunk)
            if size > max_bytes:
                raise HttpFailure("malformed", f"{url} sent more than the {max_bytes} "
                                  "bytes expected")
            chunks.append(chunk)
            if time.monotonic() - started > budget:
                raise HttpFailure("timeout", f"{url} did not finish its answer within "
                                  f"{budget:g} s")
    except transport_error as exc:
        if _is_timeout(exc):
            raise HttpFailure("timeout", f"{url} stopped sending its answer (read "
                              f"timeout {read:g} s)") from exc
        raise HttpFailure("connection", f"connection to {url} broke while reading the "
                          f"answer: {exc}") from exc
    return b"".join(chunks)


# Scans send tens of thousands of small requests; requests' per-request machinery (hooks,
# cookies, adapters, environment lookups) costs ~0.6 ms of CPU each, urllib3 underneath it
# about a third of that. A plain Session (no proxy for the URL, no auth, no client cert)
# therefore talks to urllib3 directly, with the same CA-bundle rules requests applies;
# anything else goes through requests unchanged.
_direct = threading.local()
_direct_ok: Dict[Tuple[str, Any], Optional[str]] = {}
_direct_lock = threading.Lock()


def _ca_bundle(session: requests.Session) -> Optional[str]:
    """The CA bundle (file or directory) requests would verify with for a request sent by
    :func:`http_exchange`; None means "do not verify" (certbot's --no-verify-ssl).

    As requests' ``merge_environment_settings``: a session that verifies (``verify`` True
    or a path) takes ``REQUESTS_CA_BUNDLE``, else ``CURL_CA_BUNDLE``, from the environment
    when it trusts the environment (the variables win over a path set on the session);
    ``verify=False`` is passed with each request, so it is never overridden."""
    if session.verify is False:
        return None
    if session.trust_env:
        for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            if os.environ.get(var):
                return os.environ[var]
    if isinstance(session.verify, str):
        return session.verify
    return str(DEFAULT_CA_BUNDLE_PATH)


def _direct_pool(session: requests.Session, url: str) -> Optional[urllib3.PoolManager]:
    if type(session) is not requests.Session or session.proxies or session.auth \
            or session.cert or session.hooks.get("response"):
        return None
    origin = url.split("/", 3)[:3]
    key = ("/".join(origin), session.trust_env)
    with _direct_lock:
        if key not in _direct_ok:
            proxies = get_environ_proxies(url) if session.trust_env else {}
            _direct_ok[key] = None if proxies else "ok"
        if _direct_ok[key] is None:
            return None
    bundle = _ca_bundle(session)
    pools: Dict[Optional[str], urllib3.PoolManager] = getattr(_direct, "pools", None) or {}
    _direct.pools = pools
    pool = pools.get(bundle)
    if pool is None:
        if bundle is None:
            pool = urllib3.PoolManager(num_pools=32, maxsize=4, cert_reqs="CERT_NONE")
        elif os.path.isdir(bundle):  # a c_rehash'd directory, as requests accepts
            pool = urllib3.PoolManager(num_pools=32, maxsize=4, cert_reqs="CERT_REQUIRED",
                                       ca_cert_dir=bundle)
        else:
            pool = urllib3.PoolManager(num_pools=32, maxsize=4, cert_reqs="CERT_REQUIRED",
                                       ca_certs=bundle)
        pools[bundle] = pool
    return pool


def _urllib3_exchange(pool: urllib3.PoolManager, session: requests.Session, method: str,
                      url: str, *, connect: float, read: float, budget: float, started: float,
                      max_bytes: int, headers: Optional[Mapping[str, str]],
                      data: Optional[bytes]) -> HttpReply:
    merged: Dict[str, str] = {
        k: v.decode("latin-1") if isinstance(v, bytes) else str(v)
        for k, v in session.headers.items() if v is not None}
    merged.update(headers or {})
    try:
        resp = pool.request(method, url, headers=merged, body=data,
                            timeout=urllib3.Timeout(connect=connect, read=read),
                            preload_content=False, redirect=True, retries=urllib3.Retry(
                                total=False, redirect=5, raise_on_redirect=False))
    except urllib3.exceptions.SSLError as exc:
        raise HttpFailure("connection", f"TLS error talking to {url}: {exc}") from exc
    except urllib3.exceptions.HTTPError as exc:
        if _is_timeout(exc):
            raise HttpFailure("timeout", f"no answer from {url} within {connect:g} s "
                              f"(connect) / {read:g} s (read)") from exc
        if isinstance(exc, urllib3.exceptions.LocationValueError):
            raise HttpFailure("connection", f"invalid URL {url!r}: {exc}") from exc
        raise HttpFailure("connection", f"cannot connect to {url}: {exc}") from exc
    except ValueError as exc:
        raise HttpFailure("connection", f"invalid URL {url!r}: {exc}") from exc
    try:
        body = _read_body(resp.headers, resp.stream(16384), urllib3.exceptions.HTTPError,
                          url=url, max_bytes=max_bytes, started=started, budget=budget,
                          read=read)
        final = resp.geturl() or ""
        # urllib3 may report only the path of the final URL: keep the absolute one.
        final = final if "://" in final else url
        return HttpReply(url=final, status=resp.status, headers=resp.headers, body=body)
    finally:
        resp.release_conn()


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
        self.timeout = _timeouts(timeout)
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
        limiter = self.rate_limiter
        key = key_for_url(url)
        if limiter is not None:
            if deadline is None:
                deadline = limiter.now() + self.max_wait
            if not limiter.acquire(key, deadline):
                self._count("not_sent")
                until = limiter.backed_off_until(key)
                wait = max(0.0, until - limiter.now()) if until is not None else None
                if wait is not None:
                    msg = (f"{key} is backed off for another {wait:.0f} s after answering "
                           "503/429 (overloaded); not asking it again until then - "
                           "certificates are re-checked after the back-off")
                else:
                    msg = (f"rate limit for {key} reached and no slot free before the "
                           "deadline; request not sent - lower the concurrency or raise "
                           "the rate limit")
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
            delay = min(MAX_UNAVAILABLE_BACKOFF, max(1.0, retry_after))
        else:
            with self._strike_lock:
                until = limiter.backed_off_until(key) if limiter is not None else None
                if until is not None:
                    # A concurrent request already backed off: do not grow again.
                    delay = max(1.0, until - limiter.now()) if limiter is not None else 1.0
                else:
                    strikes = self._strikes.get(key, 0) + 1
                    self._strikes[key] = strikes
                    delay = min(MAX_UNAVAILABLE_BACKOFF,
                                DEFAULT_UNAVAILABLE_BACKOFF * 2.0 ** min(strikes - 1, 20))
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
