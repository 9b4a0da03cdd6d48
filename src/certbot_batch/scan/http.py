"""The HTTP transport of the status scan, shared by the ARI and OCSP clients.

* :class:`SessionPool`: one ``requests.Session`` per worker thread;
* :func:`http_exchange`: one request with bounded time and size; every transport failure is
  one error type, :class:`HttpFailure` (``kind``: ``timeout``, ``connection``,
  ``malformed``); plain sessions take a urllib3 fast path with requests' own CA-bundle and
  proxy rules;
* :func:`take_slot`: the per-CA rate limiter as both clients use it (wait for a token
  within a deadline, or say why nothing was sent).

Policy (what a status or a failure means, when to ask again) stays with the clients and
``certbot_batch.retry``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_environ_proxies

from certbot_batch import __version__, run
from certbot_batch.retry import parse_retry_after
from certbot_batch.scan.ratelimit import RateLimiter, key_for_url

__all__ = [
    "DEFAULT_MAX_WAIT",
    "DEFAULT_USER_AGENT",
    "MAX_BODY_BYTES",
    "HttpFailure",
    "HttpReply",
    "SessionPool",
    "Timeout",
    "http_exchange",
    "take_slot",
]

#: How long a request may wait for the rate limiter when the caller gives no deadline.
DEFAULT_MAX_WAIT = 30.0

DEFAULT_USER_AGENT = f"certbot-batch/{__version__} python-requests/{requests.__version__}"

#: Default size cap of a response body (a directory is small, ARI/OCSP answers tiny).
MAX_BODY_BYTES = 1 << 20

Timeout = Union[float, Tuple[float, float]]


def take_slot(limiter: Optional[RateLimiter], url: str, deadline: Optional[float],
              max_wait: float) -> Optional[Tuple[str, Optional[float]]]:
    """Take a rate-limit token for ``url``'s CA within ``deadline`` (on the limiter's clock;
    default ``max_wait`` from now). ``None`` when one was taken (or there is no limiter),
    else ``(why, wait)``: nothing may be sent, ``wait`` is how long the CA stays backed off
    (``None`` when it is not backed off, only out of tokens before the deadline)."""
    if limiter is None:
        return None
    key = key_for_url(url)
    if deadline is None:
        deadline = limiter.now() + max_wait
    if limiter.acquire(key, deadline):
        return None
    until = limiter.backed_off_until(key)
    wait = max(0.0, until - limiter.now()) if until is not None else None
    if wait is not None:
        why = f"{key} is backed off for another {wait:.0f} s after answering 503/429"
    else:
        why = f"rate limit for {key} reached and no slot free before the deadline"
    return why, wait


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


def timeouts(timeout: Timeout) -> Tuple[float, float]:
    if isinstance(timeout, tuple):
        return float(timeout[0]), float(timeout[1])
    return float(timeout), float(timeout)


def http_exchange(session: requests.Session, method: str, url: str, *, timeout: Timeout,
                  total_timeout: Optional[float] = None, max_bytes: int = MAX_BODY_BYTES,
                  headers: Optional[Mapping[str, str]] = None,
                  data: Optional[bytes] = None) -> HttpReply:
    """One HTTP request with bounded time and size; any transport error -> :class:`HttpFailure`.

    ``timeout`` is requests' (connect, read) pair; ``total_timeout`` (default
    connect + read) bounds the whole exchange, so a server dribbling bytes cannot hold a
    worker thread for long.  Bodies larger than ``max_bytes`` are refused.
    """
    connect, read = timeouts(timeout)
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
# anything else goes through requests unchanged. (The pools and the per-origin verdicts
# are process-wide caches: run.PROCESS.)


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
    verdicts = run.PROCESS.direct_origins
    with run.PROCESS.lock:
        if key not in verdicts:
            proxies = get_environ_proxies(url) if session.trust_env else {}
            verdicts[key] = None if proxies else "ok"
        if verdicts[key] is None:
            return None
    bundle = _ca_bundle(session)
    local = run.PROCESS.http_pools
    pools: Dict[Optional[str], urllib3.PoolManager] = getattr(local, "pools", None) or {}
    local.pools = pools
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
