"""A rate-limiting, fault-injecting ACME reverse proxy in front of one pebble.

Pebble has no rate limits and never fails on its own; Let's Encrypt answers 429
``rateLimited`` (with Retry-After) for its limits and 503 for per-IP request limits and
outages. This proxy sits between the ACME client and pebble and injects those answers::

    with AcmeProxy(pebble) as proxy:
        bot = Certbot("pypi", tmp_path, proxy)              # directory_url + ca_bundle
        proxy.rate_limit("newOrder", after=5, retry_after=60)   # 6th newOrder on: 429
        proxy.storm("newOrder", status=503, seconds=2.0, retry_after=1)
        proxy.fail("finalize", 500, count=1)
        proxy.down(); ...; proxy.up()                       # an unreachable CA
        assert proxy.count("newOrder") == 7 and proxy.forwarded("newOrder") == 5

How it works (measured against Debian's pebble 2.4.0):

* HTTPS on a free loopback port with a throw-away CA (:attr:`ca_bundle`, the proxy's CA
  only). Every request is forwarded to pebble **with the client's Host header**: pebble builds
  every URL it emits (directory, Location, Link, order/authz/challenge/finalize/certificate
  URLs) from the Host header and checks the JWS ``url`` against ``https://{Host}{path}``, so
  all of them point back at the proxy and the JWS check passes without any rewriting. Clients
  therefore never talk to pebble directly and need only the proxy's CA.
* Bodies are passed through byte for byte (``Content-Length`` bodies are streamed, others are
  re-chunked), except the directory when fields are injected (``directory_extra``,
  ``renewal_info``).
* Requests are classified by ACME endpoint kind (:data:`KINDS`) from pebble's paths and the
  upstream directory; counters and a log (:class:`LogEntry`) record every request, separately
  for *forwarded* (reached pebble) and *answered* (by the proxy: faults).
* Fault rules (:meth:`rate_limit`, :meth:`storm`, :meth:`fail`) are kept in the order they
  were added; for each request the first rule that fires answers it and the request is **not**
  forwarded; a rule never sees requests that an earlier rule answered. Faulted answers carry a
  fresh ``Replay-Nonce`` fetched from pebble's newNonce (HEAD), as ACME requires.
* :meth:`down` makes the CA unreachable (refused connections, resets, or hangs) until
  :meth:`up`; existing keep-alive connections are cut too.

Stdlib + cryptography only; Python 3.9+; cryptography 38.
"""
from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import datetime
import http.client
import json
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Protocol, Tuple, Type

from cryptography import x509

from tests.bed import certs, ports

__all__ = [
    "AcmeProxy",
    "LogEntry",
    "KINDS",
    "DOWN_MODES",
    "LE_NEW_ORDERS_DETAIL",
    "LE_EXACT_SET_DETAIL",
    "ACME_ERROR_PREFIX",
]

#: Endpoint kinds. ``account`` (POSTs to the account URL), ``keyChange``, ``revokeCert`` are
#: extra to the basic list; everything unknown is ``other``.
KINDS = ("directory", "newNonce", "newAccount", "newOrder", "order", "authz", "challenge",
         "finalize", "cert", "renewalInfo", "account", "keyChange", "revokeCert", "other")
#: ``kind`` of a rule that matches every request.
ALL = "all"
#: :meth:`AcmeProxy.down` modes: ``refuse`` (nothing listens: ECONNREFUSED), ``reset``
#: (connections are accepted and reset at once, before TLS), ``hang`` (accepted, then nothing
#: is sent until :meth:`AcmeProxy.up` / stop or ``hold`` seconds, then closed).
DOWN_MODES = ("refuse", "reset", "hang")

ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"
PROBLEM_CONTENT_TYPE = "application/problem+json"

#: Let's Encrypt's account-wide New Orders limit, as Boulder words it. ``{retry_after}`` is
#: replaced with the time of the Retry-After (``2026-12-01 12:00:00 UTC``).
LE_NEW_ORDERS_DETAIL = ("too many new orders (300) in the last 3h0m0s, retry after "
                        "{retry_after}: see "
                        "https://letsencrypt.org/docs/rate-limits/#new-orders-per-account")
#: Let's Encrypt's New Certificates per Exact Set of Identifiers limit.
LE_EXACT_SET_DETAIL = ("too many certificates (5) already issued for this exact set of "
                       "identifiers in the last 168h0m0s, retry after {retry_after}: see "
                       "https://letsencrypt.org/docs/rate-limits/"
                       "#new-certificates-per-exact-set-of-identifiers")

#: pebble 2.4's paths of per-object resources.
_PEBBLE_PREFIXES = (
    ("/my-order/", "order"),
    ("/authZ/", "authz"),
    ("/chalZ/", "challenge"),
    ("/finalize-order/", "finalize"),
    ("/certZ/", "cert"),
    ("/my-account/", "account"),
)
_DIRECTORY_KINDS = ("newNonce", "newAccount", "newOrder", "keyChange", "revokeCert",
                    "renewalInfo")
#: Path under which the proxy serves (forwards) ARI when ``renewal_info`` is given.
PROXY_ARI_PATH = "/renewal-info"

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                         "proxy-authorization", "te", "trailer", "trailers",
                         "transfer-encoding", "upgrade"})
_DEFAULT_TYPES = {400: "malformed", 401: "unauthorized", 403: "unauthorized",
                  404: "malformed", 429: "rateLimited"}
_CHUNK = 65536


class AcmeServer(Protocol):
    @property
    def directory_url(self) -> str: ...

    @property
    def ca_bundle(self) -> Path: ...


class LogEntry(NamedTuple):
    time: float          # time.time() when the request was received
    method: str
    kind: str
    path: str            # with the query string
    status: int          # status returned to the client
    forwarded: bool      # True: pebble (or the ARI upstream) answered; False: the proxy did


def _problem_type(value: Optional[str], status: int) -> str:
    if value is None:
        value = _DEFAULT_TYPES.get(status, "serverInternal")
    return value if ":" in value else ACME_ERROR_PREFIX + value


def _utc_text(seconds_from_now: Optional[float]) -> str:
    when = datetime.datetime.now(datetime.timezone.utc)
    if seconds_from_now:
        when += datetime.timedelta(seconds=seconds_from_now)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------------------------
# requests as the rules see them


class _Request:
    """One client request; JWS details are decoded lazily (only rules keyed by account or
    identifiers need them)."""

    def __init__(self, method: str, path: str, kind: str, body: bytes) -> None:
        self.received = time.time()
        self.method = method
        self.path = path
        self.kind = kind
        self.body = body
        self._jws: Optional[Tuple[Dict[str, Any], Any]] = None

    def _decoded(self) -> Tuple[Dict[str, Any], Any]:
        if self._jws is None:
            protected: Dict[str, Any] = {}
            payload: Any = None
            try:
                outer = json.loads(self.body)
                protected = json.loads(_unb64url(outer["protected"]))
                raw = outer.get("payload") or ""
                payload = json.loads(_unb64url(raw)) if raw else None
            except (ValueError, KeyError, TypeError, binascii.Error):
                pass
            self._jws = (protected if isinstance(protected, dict) else {}, payload)
        return self._jws

    @property
    def account(self) -> str:
        """The JWS ``kid`` (account URL); "" for newAccount / non-JWS requests."""
        return str(self._decoded()[0].get("kid") or "")

    @property
    def identifiers(self) -> Optional[Tuple[str, ...]]:
        """Sorted identifier values of a newOrder payload or of a finalize CSR."""
        payload = self._decoded()[1]
        if not isinstance(payload, dict):
            return None
        if isinstance(payload.get("identifiers"), list):
            return tuple(sorted(str(i.get("value", "")).lower()
                                for i in payload["identifiers"] if isinstance(i, dict)))
        if isinstance(payload.get("csr"), str):
            try:
                csr = x509.load_der_x509_csr(_unb64url(payload["csr"]))
                san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            except (ValueError, x509.ExtensionNotFound, binascii.Error):
                return None
            names = [str(v) for v in san.value.get_values_for_type(x509.DNSName)]
            names += [str(v) for v in san.value.get_values_for_type(x509.IPAddress)]
            return tuple(sorted(n.lower() for n in names))
        return None


# --------------------------------------------------------------------------------------------
# fault rules


@dataclasses.dataclass
class _Answer:
    status: int
    problem_type: Optional[str]  # None: plain text body
    detail: str
    retry_after: Optional[int]

    def body(self) -> Tuple[bytes, str]:
        if self.problem_type is None:
            text = self.detail or http.client.responses.get(self.status, "error")
            return (text + "\n").encode(), "text/plain; charset=utf-8"
        doc = {"type": self.problem_type, "detail": self.detail, "status": self.status}
        return json.dumps(doc).encode(), PROBLEM_CONTENT_TYPE


@dataclasses.dataclass
class _Rule:
    kind: str
    answer: _Answer

    def matches(self, req: _Request) -> bool:
        return self.kind == ALL or self.kind == req.kind

    def fire(self, req: _Request, now: float) -> Optional[_Answer]:  # pragma: no cover
        raise NotImplementedError

    def expired(self, now: float) -> bool:
        return False


@dataclasses.dataclass
class _FailRule(_Rule):
    remaining: Optional[int] = None  # None: until cleared

    def fire(self, req: _Request, now: float) -> Optional[_Answer]:
        if self.remaining is not None:
            if self.remaining <= 0:
                return None
            self.remaining -= 1
        return self.answer

    def expired(self, now: float) -> bool:
        return self.remaining is not None and self.remaining <= 0


@dataclasses.dataclass
class _StormRule(_Rule):
    seconds: float = 0.0
    started: Optional[float] = None  # monotonic; None: starts at the first matching request

    def fire(self, req: _Request, now: float) -> Optional[_Answer]:
        if self.started is None:
            self.started = now
        return self.answer if now < self.started + self.seconds else None

    def expired(self, now: float) -> bool:
        return self.started is not None and now >= self.started + self.seconds


@dataclasses.dataclass
class _RateLimitRule(_Rule):
    after: int = 0
    window: Optional[float] = None
    account_wide: bool = True
    passed: Dict[Any, Deque[float]] = dataclasses.field(default_factory=dict)

    def key(self, req: _Request) -> Any:
        if self.account_wide:
            return req.account
        ids = req.identifiers
        return ids if ids is not None else req.account

    def fire(self, req: _Request, now: float) -> Optional[_Answer]:
        times = self.passed.setdefault(self.key(req), collections.deque())
        if self.window is not None:
            while times and times[0] <= now - self.window:
                times.popleft()
        if len(times) < self.after:
            times.append(now)
            return None
        return self.answer


# --------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    proxy: AcmeProxy

    def server_bind(self) -> None:
        # SO_REUSEPORT: the proxy holds a second, non-listening socket on the port, so that
        # the port stays ours while down("refuse") has closed the listener.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = ports.LOOPBACK
        self.server_port = int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        import traceback

        self.proxy._note_error(f"{client_address}: {traceback.format_exc(limit=3)}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "certbot-batch-test-acmeproxy/1"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 120  # idle keep-alive connections are dropped after this
    server: _Server

    def setup(self) -> None:
        proxy = self.server.proxy
        self._dropped = proxy._drop_if_down(self.request)
        self._upstreams: Dict[Tuple[str, str, int], http.client.HTTPConnection] = {}
        self._used: set[Tuple[str, str, int]] = set()
        if self._dropped:
            return
        self.request.settimeout(self.timeout)
        self.request = proxy._server_context.wrap_socket(self.request, server_side=True)
        proxy._track(self.request, True)
        super().setup()

    def handle(self) -> None:
        if not self._dropped:
            super().handle()

    def finish(self) -> None:
        if self._dropped:
            return
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.request, False)
            for conn in self._upstreams.values():
                conn.close()
            self._upstreams.clear()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _any(self) -> None:
        self.server.proxy._handle(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _any

    # -- upstream connections (one per client connection and upstream) ------------------

    def upstream(self, scheme: str, host: str, port: int, fresh: bool = False
                 ) -> Tuple[http.client.HTTPConnection, bool]:
        """(connection, reused) to scheme://host:port."""
        key = (scheme, host, port)
        conn = self._upstreams.get(key)
        if conn is not None and fresh:
            conn.close()
            conn = None
            self._used.discard(key)
        if conn is None:
            timeout = self.server.proxy.upstream_timeout
            if scheme == "https":
                conn = http.client.HTTPSConnection(
                    host, port, timeout=timeout,
                    context=self.server.proxy._upstream_context)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            self._upstreams[key] = conn
        reused = key in self._used
        self._used.add(key)
        return conn, reused


class _UpstreamError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# the proxy


class AcmeProxy:
    """HTTPS reverse proxy on 127.0.0.1 in front of ``upstream`` (a started
    :class:`tests.bed.pebble.Pebble`, or anything with ``directory_url`` and ``ca_bundle``).

    :param renewal_info: an ARI base URL (e.g. ``Responder.renewal_info_url``): the directory
        gets ``renewalInfo = {proxy}/renewal-info`` and ``GET /renewal-info/{certID}`` is
        forwarded to ``{renewal_info}/{certID}`` (kind ``renewalInfo``, faultable like the
        rest).
    :param directory_extra: fields merged into (overriding) the upstream directory.
    :param upstream_timeout: seconds the proxy waits for pebble.
    """

    def __init__(self, upstream: AcmeServer, *, renewal_info: Optional[str] = None,
                 directory_extra: Optional[Dict[str, Any]] = None,
                 upstream_timeout: float = 60.0, base_dir: Optional[Path] = None) -> None:
        self.upstream_directory_url = upstream.directory_url
        self.upstream_ca_bundle = Path(upstream.ca_bundle)
        up = urllib.parse.urlsplit(self.upstream_directory_url)
        if up.scheme != "https" or not up.hostname:
            raise ValueError(f"upstream must be an https URL: {self.upstream_directory_url}")
        self._up_host = up.hostname
        self._up_port = int(up.port or 443)
        self._directory_path = up.path or "/"
        self.renewal_info_upstream = renewal_info.rstrip("/") if renewal_info else None
        self.directory_extra: Dict[str, Any] = dict(directory_extra or {})
        self.upstream_timeout = upstream_timeout

        self._own_dir = base_dir is None
        self.dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="bed-acmeproxy-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # the CA bundle must be readable by certbot run as another user
        #: The proxy's CA (the only one clients need: every URL they get points at the proxy).
        self.ca_bundle = self.dir / "ca.pem"
        self._cert_path = self.dir / "proxy-cert.pem"
        self._key_path = self.dir / "proxy-key.pem"

        self._lock = threading.Lock()
        self._order_payloads: List[Dict[str, Any]] = []
        self._changed = threading.Condition(self._lock)
        self._rules: List[_Rule] = []
        self._down: Optional[str] = None
        self._hold = 30.0
        self._wake = threading.Event()
        self._conns: set[ssl.SSLSocket] = set()
        self._errors: Deque[str] = collections.deque(maxlen=200)
        self._paths: Dict[str, str] = {}
        self._nonce_path = "/nonce-plz"
        self._reset_counters_locked()

        self.port = 0
        self._holder: Optional[socket.socket] = None
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._upstream_context = ssl.create_default_context(cafile=str(self.upstream_ca_bundle))

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> AcmeProxy:
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.cleanup()

    def start(self) -> AcmeProxy:
        if self._holder is not None:
            return self
        self._write_tls()
        self._learn_upstream_directory()
        self.port = ports.free_port()
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((ports.LOOPBACK, self.port))
        self._holder = holder
        self._down = None
        self._listen()
        return self

    def stop(self) -> None:
        self._unlisten()
        with self._lock:
            self._down = None
            old, self._wake = self._wake, threading.Event()
        old.set()
        self._cut_connections()
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    def cleanup(self) -> None:
        """stop() and remove the temp dir (if we made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _listen(self) -> None:
        server = _Server((ports.LOOPBACK, self.port), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"acmeproxy-{self.port}", daemon=True)
        self._thread.start()

    def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- addresses -----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"https://{ports.LOOPBACK}:{self.port}"

    @property
    def directory_url(self) -> str:
        return f"{self.base_url}{self._directory_path}"

    @property
    def renewal_info_url(self) -> Optional[str]:
        return f"{self.base_url}{PROXY_ARI_PATH}" if self.renewal_info_upstream else None

    def client_env(self) -> Dict[str, str]:
        """Environment for ACME clients (requests) talking to this proxy."""
        return {"REQUESTS_CA_BUNDLE": str(self.ca_bundle), "SSL_CERT_FILE": str(self.ca_bundle)}

    # -- faults --------------------------------------------------------------------------

    def rate_limit(self, kind: str, *, after: int, retry_after: Optional[int] = 60,
                   detail: Optional[str] = None, account_wide: bool = True,
                   window: Optional[float] = None, status: int = 429,
                   problem_type: str = "rateLimited") -> None:
        """The first ``after`` requests of ``kind`` (counted from now) pass, the (after+1)-th
        and later ones are answered 429 ``rateLimited`` with ``Retry-After: retry_after``.

        ``account_wide``: one count per account (JWS kid); else one per exact identifier set
        (newOrder identifiers, finalize CSR names; other kinds fall back to the account).
        ``detail`` defaults to :data:`LE_NEW_ORDERS_DETAIL` (account-wide) or
        :data:`LE_EXACT_SET_DETAIL`; ``{retry_after}`` in it becomes the UTC time of
        now + retry_after. ``window``: a sliding window in seconds (requests that passed longer
        ago stop counting, as LE's limits refill); None: never refills until cleared.
        """
        if after < 0:
            raise ValueError("after must be >= 0")
        if detail is None:
            detail = LE_NEW_ORDERS_DETAIL if account_wide else LE_EXACT_SET_DETAIL
        self._add(_RateLimitRule(self._kind(kind),
                                 _Answer(status, _problem_type(problem_type, status), detail,
                                         retry_after),
                                 after=after, window=window, account_wide=account_wide))

    def storm(self, kind: str, *, status: int = 503, seconds: float = 2.0,
              retry_after: Optional[int] = 1, from_now: bool = False, problem: bool = True,
              problem_type: Optional[str] = None,
              detail: str = "service unavailable (injected storm)") -> None:
        """Every request of ``kind`` is answered ``status`` (with Retry-After) for ``seconds``.

        The storm starts at the **first matching request** (so a test can arm it before the
        client runs and the client sees exactly ``seconds`` of it), or now with ``from_now``.
        ``problem``: problem+json (``serverInternal`` unless ``problem_type``), else a plain
        text body.
        """
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        ptype = _problem_type(problem_type, status) if problem else None
        rule = _StormRule(self._kind(kind), _Answer(status, ptype, detail, retry_after),
                          seconds=seconds, started=time.monotonic() if from_now else None)
        self._add(rule)

    def fail(self, kind: str, status: int = 500, *, count: Optional[int] = 1,
             retry_after: Optional[int] = None, problem_type: Optional[str] = None,
             detail: str = "injected failure", problem: bool = True) -> None:
        """The next ``count`` requests of ``kind`` (None: all, until cleared) are answered
        ``status``. The problem type defaults by status: 400/404 malformed, 401/403
        unauthorized, 429 rateLimited, else serverInternal; ``problem_type`` may be a short
        code (``badNonce``) or a URN. ``problem=False``: plain text body."""
        if count is not None and count <= 0:
            raise ValueError("count must be positive (or None)")
        ptype = _problem_type(problem_type, status) if problem else None
        self._add(_FailRule(self._kind(kind), _Answer(status, ptype, detail, retry_after),
                            remaining=count))

    def clear(self, kind: Optional[str] = None) -> None:
        """Remove the fault rules (of ``kind``, or all of them); without ``kind`` also
        :meth:`up`."""
        with self._lock:
            if kind is None:
                self._rules.clear()
            else:
                self._rules = [r for r in self._rules if r.kind != kind]
        if kind is None:
            self.up()

    def rules(self) -> List[str]:
        """Active rules, for messages: ``["rate_limit newOrder after=5", ...]``."""
        now = time.monotonic()
        with self._lock:
            out = []
            for r in self._rules:
                if r.expired(now):
                    continue
                name = {"_FailRule": "fail", "_StormRule": "storm",
                        "_RateLimitRule": "rate_limit"}[type(r).__name__]
                out.append(f"{name} {r.kind} {r.answer.status}")
            return out

    def down(self, mode: str = "refuse", *, hold: float = 30.0) -> None:
        """Make the CA unreachable until :meth:`up`: see :data:`DOWN_MODES`. Open keep-alive
        connections are cut (their in-flight request, if any, gets no answer)."""
        if mode not in DOWN_MODES:
            raise ValueError(f"mode must be one of {DOWN_MODES}")
        with self._lock:
            self._down = mode
            self._hold = hold
        if mode == "refuse":
            self._unlisten()
        elif self._server is None and self._holder is not None:
            self._listen()
        self._cut_connections()

    def up(self) -> None:
        """Undo :meth:`down`: listen again on the same port, release hanging connections."""
        with self._lock:
            self._down = None
            old, self._wake = self._wake, threading.Event()
        old.set()
        if self._server is None and self._holder is not None:
            self._listen()

    @property
    def is_down(self) -> Optional[str]:
        """The :meth:`down` mode in force, or None."""
        with self._lock:
            return self._down

    # -- counters and log ----------------------------------------------------------------

    def _reset_counters_locked(self) -> None:
        self._forwarded: collections.Counter[str] = collections.Counter()
        self._answered: collections.Counter[str] = collections.Counter()
        self._log: Deque[LogEntry] = collections.deque(maxlen=100_000)
        self._order_payloads = []
        self._dropped_connections = 0

    def reset_counters(self) -> None:
        """Zero every counter and clear the log (rules keep their own counts)."""
        with self._changed:
            self._reset_counters_locked()
            self._changed.notify_all()

    def count(self, kind: Optional[str] = None) -> int:
        """Requests of ``kind`` (None: all) the proxy received, forwarded or answered."""
        with self._lock:
            return self._count_locked(kind)

    def _count_locked(self, kind: Optional[str]) -> int:
        if kind is None:
            return sum(self._forwarded.values()) + sum(self._answered.values())
        return self._forwarded[kind] + self._answered[kind]

    def forwarded(self, kind: Optional[str] = None) -> int:
        """Requests of ``kind`` that reached the upstream (pebble or the ARI upstream)."""
        with self._lock:
            return sum(self._forwarded.values()) if kind is None else self._forwarded[kind]

    def answered(self, kind: Optional[str] = None) -> int:
        """Requests of ``kind`` the proxy answered itself (faults, unreachable upstream)."""
        with self._lock:
            return sum(self._answered.values()) if kind is None else self._answered[kind]

    def counts(self) -> Dict[str, int]:
        """``{kind: received}`` for every kind seen."""
        with self._lock:
            return dict(self._forwarded + self._answered)

    @property
    def dropped_connections(self) -> int:
        """Connections reset or hung by :meth:`down` ("reset"/"hang") since the last reset."""
        with self._lock:
            return self._dropped_connections

    def order_payloads(self) -> List[Dict[str, Any]]:
        """The JWS payload of every newOrder received (forwarded or answered), oldest first:
        identifiers, ``replaces``, ``profile``..."""
        with self._lock:
            return list(self._order_payloads)

    def log(self, kind: Optional[str] = None) -> List[LogEntry]:
        """Every answered request (of ``kind``), oldest first."""
        with self._lock:
            return [e for e in self._log if kind is None or e.kind == kind]

    def statuses(self, kind: str) -> List[int]:
        """Statuses returned for ``kind``, in order."""
        return [e.status for e in self.log(kind)]

    def wait_count(self, kind: Optional[str], n: int, timeout: float = 10.0) -> bool:
        """Wait until :meth:`count` (kind) >= n; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count_locked(kind) >= n, timeout)

    def wait_dropped(self, n: int, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._dropped_connections >= n, timeout)

    def logs(self) -> str:
        """The request log and internal errors, for the report of a failing test."""
        with self._lock:
            entries = list(self._log)[-300:]
            errs = list(self._errors)
        lines = [f"{e.time:.3f} {e.method} {e.kind} {e.path} -> {e.status}"
                 f"{'' if e.forwarded else ' (proxy)'}" for e in entries]
        out = "--- acmeproxy requests ---\n" + "\n".join(lines)
        if errs:
            out += "\n--- acmeproxy errors ---\n" + "\n".join(errs)
        return out

    def _note_error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)

    # -- classification ------------------------------------------------------------------

    def classify(self, path: str) -> str:
        """The endpoint kind of a request path (query string ignored)."""
        path = path.split("?", 1)[0]
        if path == self._directory_path:
            return "directory"
        if self.renewal_info_upstream and (path == PROXY_ARI_PATH
                                           or path.startswith(PROXY_ARI_PATH + "/")):
            return "renewalInfo"
        kind = self._paths.get(path)
        if kind is not None:
            return kind
        for prefix, name in _PEBBLE_PREFIXES:
            if path.startswith(prefix):
                return name
        for known, name in self._paths.items():
            if name == "renewalInfo" and path.startswith(known.rstrip("/") + "/"):
                return name
        return "other"

    @staticmethod
    def _kind(kind: str) -> str:
        if kind != ALL and kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}: one of {KINDS} or {ALL!r}")
        return kind

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _take(self, req: _Request) -> Optional[_Answer]:
        now = time.monotonic()
        with self._lock:
            if not self._rules:
                return None
            answer = None
            for rule in self._rules:
                if rule.matches(req):
                    answer = rule.fire(req, now)
                    if answer is not None:
                        break
            self._rules = [r for r in self._rules if not r.expired(now)]
            return answer

    # -- connections ---------------------------------------------------------------------

    def _track(self, sock: ssl.SSLSocket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(sock)
            else:
                self._conns.discard(sock)

    def _cut_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                # the plain socket's shutdown: SSLSocket.shutdown would unwrap under the feet
                # of the thread reading it
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop_if_down(self, sock: socket.socket) -> bool:
        """Handle a new connection while down ("reset"/"hang"); True if it was dropped."""
        with self._lock:
            mode, hold, wake = self._down, self._hold, self._wake
            if mode is None:
                return False
            self._dropped_connections += 1
            self._changed.notify_all()
        if mode == "hang":
            wake.wait(hold)
        # RST instead of FIN: a reset connection, like a dead load balancer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True

    # -- TLS and upstream ----------------------------------------------------------------

    def _write_tls(self) -> None:
        ca = certs.make_ca("certbot-batch test bed ACME proxy CA")
        leaf = certs.make_leaf(["localhost", ports.LOOPBACK], issuer=ca)
        leaf.write(self._cert_path, self._key_path)
        self.ca_bundle.write_bytes(ca.cert_pem())
        self._server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_context.load_cert_chain(str(self._cert_path), str(self._key_path))

    def _learn_upstream_directory(self) -> None:
        conn = http.client.HTTPSConnection(self._up_host, self._up_port, timeout=10,
                                           context=self._upstream_context)
        try:
            conn.request("GET", self._directory_path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"upstream directory {self.upstream_directory_url}: "
                                   f"HTTP {resp.status}")
            directory = json.loads(body)
        finally:
            conn.close()
        paths: Dict[str, str] = {}
        for name in _DIRECTORY_KINDS:
            url = directory.get(name)
            if isinstance(url, str):
                paths[urllib.parse.urlsplit(url).path] = name
                if name == "newNonce":
                    self._nonce_path = urllib.parse.urlsplit(url).path
        self._paths = paths

    def _fresh_nonce(self, h: _Handler, host: str) -> Optional[str]:
        try:
            status, headers, _body = self._upstream_simple(h, "HEAD", self._nonce_path, host)
        except _UpstreamError:
            return None
        for name, value in headers:
            if name.lower() == "replay-nonce":
                return value
        return None

    def _upstream_simple(self, h: _Handler, method: str, path: str, host: str
                         ) -> Tuple[int, List[Tuple[str, str]], bytes]:
        resp = self._send_upstream(h, "https", self._up_host, self._up_port, method, path,
                                   [("Host", host)], b"")
        return resp.status, resp.getheaders(), resp.read()

    def _send_upstream(self, h: _Handler, scheme: str, host: str, port: int, method: str,
                       path: str, headers: List[Tuple[str, str]], body: bytes
                       ) -> http.client.HTTPResponse:
        for attempt in (0, 1):
            conn, reused = h.upstream(scheme, host, port, fresh=attempt > 0)
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                if body or method in ("POST", "PUT", "PATCH"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # a keep-alive connection the upstream had closed: retry once
                raise _UpstreamError(f"{scheme}://{host}:{port}: {e!r}") from e
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise _UpstreamError(f"{scheme}://{host}:{port}: {e!r}") from e
        raise _UpstreamError("unreachable")  # pragma: no cover

    # -- request handling ----------------------------------------------------------------

    def _handle(self, h: _Handler) -> None:
        method = h.command
        path = h.path
        kind = self.classify(path)
        try:
            body = self._read_body(h)
        except (ValueError, OSError) as e:
            self._note_error(f"{method} {path}: bad request body: {e!r}")
            h.close_connection = True
            return
        host = h.headers.get("Host") or f"{ports.LOOPBACK}:{self.port}"
        req = _Request(method, path, kind, body)
        answer = self._take(req)
        if answer is not None:
            self._send_answer(h, req, answer, host)
            return
        try:
            self._forward(h, req, host)
        except _UpstreamError as e:
            self._note_error(f"{method} {path}: {e}")
            self._send_answer(h, req, _Answer(502, _problem_type("serverInternal", 502),
                                              f"upstream unreachable: {e}", None), host)

    @staticmethod
    def _read_body(h: _Handler) -> bytes:
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                line = h.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(h.rfile.read(size))
                h.rfile.readline(3)
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length > 0 else b""

    def _record(self, req: _Request, status: int, forwarded: bool) -> None:
        payload = req._decoded()[1] if req.kind == "newOrder" else None
        with self._changed:
            if isinstance(payload, dict):
                self._order_payloads.append(payload)
            (self._forwarded if forwarded else self._answered)[req.kind] += 1
            self._log.append(LogEntry(req.received, req.method, req.kind, req.path, status,
                                      forwarded))
            self._changed.notify_all()

    def _send_answer(self, h: _Handler, req: _Request, answer: _Answer, host: str) -> None:
        body, ctype = answer.body()
        body = body.replace(b"{retry_after}", _utc_text(answer.retry_after).encode())
        nonce = self._fresh_nonce(h, host)
        self._record(req, answer.status, False)  # before the client can see the answer
        h.send_response_only(answer.status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Cache-Control", "no-store")
        if answer.retry_after is not None:
            h.send_header("Retry-After", str(int(answer.retry_after)))
        if nonce is not None:
            h.send_header("Replay-Nonce", nonce)
        h.send_header("Link", f'<{"https://" + host + self._directory_path}>;rel="index"')
        h.end_headers()
        if req.method != "HEAD":
            h.wfile.write(body)
        h.wfile.flush()

    def _forward(self, h: _Handler, req: _Request, host: str) -> None:
        headers = [(k, v) for k, v in h.headers.items()
                   if k.lower() not in _HOP_BY_HOP and k.lower() not in ("host",
                                                                          "content-length")]
        if req.kind == "renewalInfo" and self.renewal_info_upstream is not None:
            target = urllib.parse.urlsplit(self.renewal_info_upstream)
            scheme = target.scheme or "http"
            up_host = target.hostname or ports.LOOPBACK
            up_port = int(target.port or (443 if scheme == "https" else 80))
            path = target.path.rstrip("/") + req.path[len(PROXY_ARI_PATH):]
            headers.insert(0, ("Host", target.netloc))
        else:
            scheme, up_host, up_port, path = "https", self._up_host, self._up_port, req.path
            headers.insert(0, ("Host", host))
        resp = self._send_upstream(h, scheme, up_host, up_port, req.method, path, headers,
                                   req.body)
        # recorded before the client can see the answer (tests look right after it)
        self._record(req, int(resp.status), True)
        try:
            self._relay(h, req, resp)
        finally:
            resp.close()

    def _relay(self, h: _Handler, req: _Request, resp: http.client.HTTPResponse) -> None:
        inject = (req.kind == "directory" and req.method == "GET" and resp.status == 200
                  and (self.directory_extra or self.renewal_info_upstream))
        h.send_response_only(resp.status, resp.reason)
        length: Optional[str] = None
        for name, value in resp.getheaders():
            low = name.lower()
            if low in _HOP_BY_HOP:
                continue
            if low == "content-length":
                length = value
                continue
            h.send_header(name, value)
        no_body = req.method == "HEAD" or resp.status in (204, 304) or resp.status < 200
        if inject:
            doc = json.loads(resp.read())
            if self.renewal_info_url:
                doc["renewalInfo"] = self.renewal_info_url
            doc.update(self.directory_extra)
            data = json.dumps(doc, indent=3).encode()
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        elif no_body:
            if length is not None:
                h.send_header("Content-Length", length)
            h.end_headers()
            resp.read()
        elif length is not None:
            h.send_header("Content-Length", length)
            h.end_headers()
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                h.wfile.write(chunk)
        else:
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

