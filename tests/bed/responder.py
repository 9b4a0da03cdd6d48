"""Our own ARI (RFC 9773) + OCSP responder with fault injection (pebble 2.4 has neither).

    with Responder(ca) as r:
        r.set_window(cert, timedelta(hours=-1), timedelta(hours=1))   # due now
        r.set_fault("http503", kind="ari", count=10, retry_after=120)  # a 503 storm
        r.set_ocsp_status(cert, "revoked")
        ... point the scanner at r.directory_url; certs carry r.ocsp_url ...
        assert r.ari_requests == 2000

Endpoints (plain HTTP on 127.0.0.1, a free port, HTTP/1.1 keep-alive, one thread per
connection; HTTPS with ``tls=True``: a certificate for 127.0.0.1/localhost from a
throw-away CA of its own, :attr:`Responder.ca_bundle`, which no client trusts unless told):

* ``GET /directory`` — ACME directory; ``renewalInfo`` = ``{base}/renewal-info`` unless
  ``renewal_info`` is False (or the ``no_renewal_info`` directory fault is set). With
  ``acme_directory`` (another server's directory, e.g. pebble's) its fields are served instead
  of the placeholder ACME URLs, so ACME clients order from that server and ask us for ARI.
* ``GET /renewal-info/{certID}`` — ``{"suggestedWindow": {"start", "end"}}`` + ``Retry-After``.
* ``POST /ocsp`` and ``GET /ocsp/{base64 DER}`` — OCSP responses signed by the issuing FarmCA.

Faults are settable at runtime from any thread, globally or per certID / serial; see
:data:`ARI_FAULTS`, :data:`OCSP_FAULTS`, :data:`DIRECTORY_FAULTS`. Works with Python 3.9+ and
cryptography 38.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import shutil
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from tests.bed import certs
from tests.bed.farm import FarmCA, cert_id, serial_der_bytes

__all__ = [
    "Responder",
    "LogEntry",
    "Window",
    "ARI_FAULTS",
    "OCSP_FAULTS",
    "DIRECTORY_FAULTS",
    "OCSP_STATUSES",
    "cert_id",
    "cert_id_from_parts",
    "parse_cert_id",
    "rfc3339",
    "not_due_policy",
    "due_policy",
    "window_policy",
]

UTC = datetime.timezone.utc

#: ARI faults. http500/http503 (503 carries Retry-After), timeout (hold the connection for
#: ``hold`` seconds, then drop it without an answer), malformed_json (body is not JSON),
#: missing_window (valid JSON without suggestedWindow), inverted_window (end < start),
#: empty_window (end == start), bad_retry_after (valid body, unparsable Retry-After), http404.
ARI_FAULTS = frozenset({
    "http500", "http503", "timeout", "malformed_json", "missing_window", "inverted_window",
    "empty_window", "bad_retry_after", "http404",
})
#: OCSP faults. garbage (random bytes, 200), unsigned (an unsuccessful OCSPResponse without
#: signature: tryLater), malformed (truncated DER), wrong_key (claims to be the issuer but is
#: signed by another key), wrong_responder (signed by a different CA under its own name),
#: revoked, unknown, stale (nextUpdate in the past), http500, http503, timeout.
OCSP_FAULTS = frozenset({
    "garbage", "unsigned", "malformed", "wrong_key", "wrong_responder", "revoked", "unknown",
    "stale", "http500", "http503", "timeout",
})
#: Directory faults: no_renewal_info, http500, http503, malformed_json, timeout.
DIRECTORY_FAULTS = frozenset({"no_renewal_info", "http500", "http503", "malformed_json",
                              "timeout"})
OCSP_STATUSES = frozenset({"good", "revoked", "unknown"})
_FAULTS_BY_KIND = {"ari": ARI_FAULTS, "ocsp": OCSP_FAULTS, "directory": DIRECTORY_FAULTS}
_KINDS = ("ari", "ocsp", "directory")

Key = Union[str, int, x509.Certificate]
WhenSpec = Union[datetime.datetime, datetime.timedelta]
Policy = Callable[[str], Optional[Tuple[datetime.datetime, datetime.datetime]]]


# --------------------------------------------------------------------------------------------
# certID helpers


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def cert_id_from_parts(key_identifier: bytes, serial: int) -> str:
    """certID from the issuer's key identifier (the leaf's AKI) and the serial number."""
    return f"{_b64url(key_identifier)}.{_b64url(serial_der_bytes(serial))}"


def parse_cert_id(value: str) -> Tuple[bytes, int]:
    """``(AKI keyIdentifier, serial)`` of a certID; ValueError if it is not one."""
    aki_part, sep, serial_part = value.partition(".")
    if not sep or not aki_part or not serial_part or "=" in value:
        raise ValueError(f"not a certID: {value!r}")
    try:
        aki = _unb64url(aki_part)
        serial_bytes = _unb64url(serial_part)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not a certID: {value!r}") from e
    if not aki or not serial_bytes:
        raise ValueError(f"not a certID: {value!r}")
    return aki, int.from_bytes(serial_bytes, "big", signed=True)


def rfc3339(dt: datetime.datetime) -> str:
    """``2026-01-02T03:04:05Z`` (UTC, seconds)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


# --------------------------------------------------------------------------------------------
# window policies


def window_policy(start: datetime.timedelta, end: datetime.timedelta) -> Policy:
    """A policy answering every certID with ``[now + start, now + end]``."""

    def policy(_cert_id: str) -> Tuple[datetime.datetime, datetime.datetime]:
        now = _now()
        return now + start, now + end

    return policy


#: Not due: window 30..32 days from now (the default).
not_due_policy: Policy = window_policy(datetime.timedelta(days=30), datetime.timedelta(days=32))
#: Due: the window started an hour ago and ends in an hour.
due_policy: Policy = window_policy(datetime.timedelta(hours=-1), datetime.timedelta(hours=1))


# --------------------------------------------------------------------------------------------
# state records


@dataclasses.dataclass
class Window:
    start: WhenSpec
    end: WhenSpec
    explanation_url: Optional[str] = None
    retry_after: Optional[int] = None

    def resolve(self, now: datetime.datetime) -> Tuple[datetime.datetime, datetime.datetime]:
        def at(v: WhenSpec) -> datetime.datetime:
            if isinstance(v, datetime.timedelta):
                return now + v
            return v if v.tzinfo is not None else v.replace(tzinfo=UTC)

        return at(self.start), at(self.end)


@dataclasses.dataclass
class _Fault:
    mode: str
    remaining: Optional[int] = None  # None: until cleared
    retry_after: Optional[int] = 60
    hold: float = 30.0


@dataclasses.dataclass
class _OcspStatus:
    status: str
    revocation_time: Optional[datetime.datetime] = None
    reason: Optional[x509.ReasonFlags] = None


class LogEntry(NamedTuple):
    time: float
    method: str
    path: str
    status: int  # 0: connection dropped without an answer (timeout fault)


# --------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    responder: Responder

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            return  # a client that does not trust our TLS certificate hangs up: expected
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "certbot-batch-test-responder/1"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 120  # idle keep-alive connections are dropped after this
    server: _Server

    def setup(self) -> None:
        context = self.server.responder._tls_context
        if context is not None:
            # The handshake in this connection's thread, not in the accepting one.
            self.request.settimeout(self.timeout)
            self.request = context.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self.server.responder._dispatch(self, "GET", b"")

    def do_HEAD(self) -> None:
        self.server.responder._dispatch(self, "HEAD", b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        self.server.responder._dispatch(self, "POST", body)


class _Reply(NamedTuple):
    status: int
    body: bytes
    content_type: str
    headers: Sequence[Tuple[str, str]]


_DROP = _Reply(0, b"", "", ())


# --------------------------------------------------------------------------------------------
# the responder


class Responder:
    """ARI + OCSP responder on 127.0.0.1 in a background thread. Use as a context manager or
    call :meth:`start` / :meth:`stop`.

    ``cas``: the FarmCA(s) whose leaves the OCSP endpoint answers for (matched by issuer key
    hash). ``policy(cert_id)`` gives windows for certIDs without a registered one (default
    :data:`not_due_policy`; return None for a 404). ``retry_after`` is the default Retry-After
    of ARI answers (seconds, None for no header).
    """

    def __init__(self, cas: Union[FarmCA, Sequence[FarmCA], None] = None, *,
                 host: str = "127.0.0.1", port: int = 0, renewal_info: bool = True,
                 policy: Optional[Policy] = None, retry_after: Optional[int] = 21600,
                 explanation_url: Optional[str] = None,
                 ocsp_validity: datetime.timedelta = datetime.timedelta(days=4),
                 ocsp_cache_seconds: float = 60.0,
                 acme_directory: Optional[Dict[str, Any]] = None,
                 tls: bool = False) -> None:
        if cas is None:
            self.cas: List[FarmCA] = []
        elif isinstance(cas, FarmCA):
            self.cas = [cas]
        else:
            self.cas = list(cas)
        self.host = host
        self._port = port
        self.renewal_info = renewal_info
        self.policy: Policy = policy or not_due_policy
        self.retry_after = retry_after
        self.explanation_url = explanation_url
        self.ocsp_validity = ocsp_validity
        self.ocsp_cache_seconds = ocsp_cache_seconds
        #: Another ACME server's directory (e.g. pebble's) whose fields /directory serves, with
        #: renewalInfo pointing at this responder: an ACME server that also has ARI.
        self.acme_directory: Optional[Dict[str, Any]] = acme_directory
        #: With ``tls``: the PEM file of the responder's own CA (trust it to verify).
        self.ca_bundle: Optional[Path] = None
        self._tls_context: Optional[ssl.SSLContext] = None
        self._tls_dir: Optional[str] = None
        if tls:
            self._tls_dir = tempfile.mkdtemp(prefix="bed-responder-")
            ca = certs.make_ca("certbot-batch test bed responder CA")
            leaf = certs.make_leaf(["localhost", host], issuer=ca)
            cert_path = Path(self._tls_dir) / "cert.pem"
            key_path = Path(self._tls_dir) / "key.pem"
            leaf.write(cert_path, key_path)
            self.ca_bundle = Path(self._tls_dir) / "ca.pem"
            self.ca_bundle.write_bytes(ca.cert_pem())
            self._tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls_context.load_cert_chain(str(cert_path), str(key_path))

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._stopping = False
        self._wake = threading.Event()
        self._windows: Dict[Union[str, int], Window] = {}
        self._ocsp_status: Dict[int, _OcspStatus] = {}
        self._faults: Dict[Tuple[str, Union[str, int, None]], _Fault] = {}
        self._latency: Dict[Tuple[str, Union[str, int, None]], float] = {}
        self._ocsp_cache: Dict[Tuple[Any, ...], Tuple[float, bytes]] = {}
        self._wrong_ca: Optional[FarmCA] = None
        self._impostors: Dict[int, Tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {}
        self._nonce = itertools.count(1)
        self._reset_counters_locked()

        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._issuers: Dict[Tuple[str, bytes], FarmCA] = {}
        self._index_cas()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Responder:
        if self._server is not None:
            return self
        self._stopping = False
        server = _Server((self.host, self._port), _Handler)
        server.responder = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"responder-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        self.release_held()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.wait_idle(5.0)
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None

    def release_held(self) -> None:
        """End every wait in progress now (latency and timeout faults): held timeouts drop
        their connection, delayed answers are sent."""
        with self._lock:
            old, self._wake = self._wake, threading.Event()
        old.set()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no request is being handled (e.g. after :meth:`release_held`)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    @property
    def inflight(self) -> int:
        """Requests being handled right now (held ones included)."""
        with self._lock:
            return self._inflight

    def __enter__(self) -> Responder:
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("responder not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        scheme = "https" if self._tls_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def directory_url(self) -> str:
        return f"{self.base_url}/directory"

    @property
    def renewal_info_url(self) -> str:
        return f"{self.base_url}/renewal-info"

    @property
    def ocsp_url(self) -> str:
        return f"{self.base_url}/ocsp"

    # -- CAs -----------------------------------------------------------------------------

    def add_ca(self, ca: FarmCA) -> None:
        with self._lock:
            self.cas.append(ca)
            self._index_cas()

    def _index_cas(self) -> None:
        issuers: Dict[Tuple[str, bytes], FarmCA] = {}
        for ca in self.cas:
            spki = ca.issuer_cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            key_bits = _spki_key_bits(spki)
            for alg in ("sha1", "sha256", "sha384", "sha512"):
                issuers[(alg, hashlib.new(alg, key_bits).digest())] = ca
        self._issuers = issuers

    # -- windows / policy ----------------------------------------------------------------

    @staticmethod
    def _key(key: Key) -> Union[str, int]:
        if isinstance(key, x509.Certificate):
            return cert_id(key)
        if isinstance(key, bool):
            raise TypeError("key must be a certID, serial or certificate")
        if isinstance(key, int):
            return key
        parse_cert_id(key)
        return key

    @staticmethod
    def _serial_key(key: Key) -> int:
        if isinstance(key, x509.Certificate):
            return int(key.serial_number)
        if isinstance(key, int):
            return key
        return parse_cert_id(key)[1]

    def set_window(self, key: Key, start: WhenSpec, end: WhenSpec, *,
                   explanation_url: Optional[str] = None,
                   retry_after: Optional[int] = None) -> None:
        """Register the suggested window for a certID / serial / certificate. ``start``/``end``
        are datetimes, or timedeltas relative to the time of each request."""
        with self._lock:
            self._windows[self._key(key)] = Window(start, end, explanation_url, retry_after)

    def clear_window(self, key: Optional[Key] = None) -> None:
        """Forget one registered window (or all)."""
        with self._lock:
            if key is None:
                self._windows.clear()
            else:
                self._windows.pop(self._key(key), None)

    def window_for(self, cert_id_: str) -> Optional[Tuple[datetime.datetime, datetime.datetime]]:
        """The window answered for ``cert_id_``: registered per certID, then per serial, then
        :attr:`policy`."""
        win = self._lookup_window(cert_id_)
        if win is not None:
            return win.resolve(_now())
        return self.policy(cert_id_)

    def _lookup_window(self, cid: str) -> Optional[Window]:
        with self._lock:
            if not self._windows:
                return None
            win = self._windows.get(cid)
            if win is None:
                try:
                    win = self._windows.get(parse_cert_id(cid)[1])
                except ValueError:
                    return None
            return win

    # -- OCSP status ---------------------------------------------------------------------

    def set_ocsp_status(self, key: Key, status: str, *,
                        revocation_time: Optional[datetime.datetime] = None,
                        reason: Optional[x509.ReasonFlags] = None) -> None:
        """good / revoked / unknown for a serial (or certificate / certID)."""
        if status not in OCSP_STATUSES:
            raise ValueError(f"status must be one of {sorted(OCSP_STATUSES)}")
        with self._lock:
            self._ocsp_status[self._serial_key(key)] = _OcspStatus(status, revocation_time,
                                                                   reason)
            self._ocsp_cache.clear()

    def clear_ocsp_status(self) -> None:
        with self._lock:
            self._ocsp_status.clear()
            self._ocsp_cache.clear()

    # -- faults and latency --------------------------------------------------------------

    def set_fault(self, mode: str, *, kind: str = "ari", key: Optional[Key] = None,
                  count: Optional[int] = None, retry_after: Optional[int] = 60,
                  hold: float = 30.0) -> None:
        """Inject ``mode`` into ``kind`` ("ari", "ocsp", "directory") requests, for ``key``
        (certID / serial / certificate; OCSP keys are serials) or all. ``count``: only the next
        N matching requests (a "storm"), else until cleared. ``retry_after`` for 503s,
        ``hold`` (seconds) for timeouts."""
        if kind not in _FAULTS_BY_KIND:
            raise ValueError(f"kind must be one of {_KINDS}")
        if mode not in _FAULTS_BY_KIND[kind]:
            raise ValueError(f"unknown {kind} fault {mode!r}: {sorted(_FAULTS_BY_KIND[kind])}")
        if count is not None and count <= 0:
            raise ValueError("count must be positive")
        k = self._fault_key(kind, key)
        with self._lock:
            self._faults[(kind, k)] = _Fault(mode, count, retry_after, hold)
            self._ocsp_cache.clear()

    def clear_fault(self, kind: str = "ari", key: Optional[Key] = None) -> None:
        with self._lock:
            self._faults.pop((kind, self._fault_key(kind, key)), None)

    def clear_faults(self) -> None:
        """Remove every fault and every latency setting."""
        with self._lock:
            self._faults.clear()
            self._latency.clear()

    def faults(self) -> Dict[Tuple[str, Union[str, int, None]], str]:
        """Active faults: ``{(kind, key): mode}``."""
        with self._lock:
            return {k: f.mode for k, f in self._faults.items()}

    def set_latency(self, seconds: float, *, kind: str = "all",
                    key: Optional[Key] = None) -> None:
        """Delay answers by ``seconds`` (each request waits in its own thread). ``kind``:
        "all", "ari", "ocsp" or "directory"; ``key`` narrows it to one certID / serial. The
        most specific setting wins. 0 removes it."""
        if kind != "all" and kind not in _FAULTS_BY_KIND:
            raise ValueError("kind must be all, ari, ocsp or directory")
        k = self._fault_key(kind, key)
        with self._lock:
            if seconds <= 0:
                self._latency.pop((kind, k), None)
            else:
                self._latency[(kind, k)] = float(seconds)

    def _fault_key(self, kind: str, key: Optional[Key]) -> Union[str, int, None]:
        if key is None:
            return None
        if kind == "ocsp":
            return self._serial_key(key)
        return self._key(key)

    def _take_fault(self, kind: str, keys: Sequence[Union[str, int]]) -> Optional[_Fault]:
        with self._lock:
            if not self._faults:
                return None
            for k in (*keys, None):
                fault = self._faults.get((kind, k))
                if fault is None:
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        del self._faults[(kind, k)]
                return fault
            return None

    def _latency_for(self, kind: str, keys: Sequence[Union[str, int]]) -> float:
        with self._lock:
            if not self._latency:
                return 0.0
            for k in keys:
                for kd in (kind, "all"):
                    if (kd, k) in self._latency:
                        return self._latency[(kd, k)]
            return self._latency.get((kind, None), self._latency.get(("all", None), 0.0))

    # -- counters ------------------------------------------------------------------------

    def _reset_counters_locked(self) -> None:
        self.ari_requests = 0
        self.ocsp_requests = 0
        self.directory_requests = 0
        self.other_requests = 0
        self._ari_by_id: collections.Counter[str] = collections.Counter()
        self._ocsp_by_serial: collections.Counter[int] = collections.Counter()
        self._log: Deque[LogEntry] = collections.deque(maxlen=1_000_000)

    def reset_counters(self) -> None:
        with self._lock:
            self._reset_counters_locked()

    @property
    def total_requests(self) -> int:
        with self._lock:
            return (self.ari_requests + self.ocsp_requests + self.directory_requests
                    + self.other_requests)

    def ari_requests_by_cert_id(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._ari_by_id)

    def ari_requests_for(self, key: Key) -> int:
        k = self._key(key)
        with self._lock:
            if isinstance(k, int):
                return sum(n for cid, n in self._ari_by_id.items()
                           if _safe_serial(cid) == k)
            return self._ari_by_id.get(k, 0)

    def ocsp_requests_by_serial(self) -> Dict[int, int]:
        with self._lock:
            return dict(self._ocsp_by_serial)

    def log(self) -> List[LogEntry]:
        """(time, method, path, status) of every answered (or dropped) request, oldest first."""
        with self._lock:
            return list(self._log)

    # -- request handling ----------------------------------------------------------------

    def _dispatch(self, h: _Handler, method: str, body: bytes) -> None:
        with self._lock:
            self._inflight += 1
        try:
            self._handle(h, method, body)
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _handle(self, h: _Handler, method: str, body: bytes) -> None:
        path = h.path.split("?", 1)[0]
        try:
            if path == "/directory" or path == "/dir":
                reply = self._directory(method)
            elif path.startswith("/renewal-info/"):
                reply = self._ari(method, path[len("/renewal-info/"):])
            elif path == "/ocsp" or path.startswith("/ocsp/"):
                reply = self._ocsp(method, path, body)
            elif path.startswith("/acme/new-nonce"):
                with self._lock:
                    self.other_requests += 1
                reply = _Reply(200 if method == "HEAD" else 204, b"", "",
                               (("Replay-Nonce", f"farm-nonce-{next(self._nonce)}"),
                                ("Cache-Control", "no-store")))
            else:
                with self._lock:
                    self.other_requests += 1
                reply = _problem(404, "malformed", f"no such resource {path}")
        except Exception as e:  # pragma: no cover - a bug in the responder: say so loudly
            reply = _problem(500, "serverInternal", f"responder error: {e!r}")
        with self._lock:
            self._log.append(LogEntry(time.time(), method, path, reply.status))
        if reply.status == 0:
            h.close_connection = True
            return
        h.send_response(reply.status)
        if reply.content_type:
            h.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(reply.body)))
        h.end_headers()
        if method != "HEAD" and reply.body:
            h.wfile.write(reply.body)

    def _wait(self, seconds: float) -> None:
        """Sleep in this handler thread (until :meth:`release_held` or :meth:`stop`)."""
        if seconds > 0 and not self._stopping:
            with self._lock:
                wake = self._wake
            wake.wait(seconds)

    def _common_fault(self, fault: _Fault) -> Optional[_Reply]:
        if fault.mode == "http500":
            return _problem(500, "serverInternal", "injected fault")
        if fault.mode == "http503":
            hdrs = (("Retry-After", str(fault.retry_after)),) if fault.retry_after is not None \
                else ()
            return _problem(503, "rateLimited", "injected 503", hdrs)
        if fault.mode == "http404":
            return _problem(404, "malformed", "injected 404")
        if fault.mode == "timeout":
            self._wait(fault.hold)
            return _DROP
        return None

    def _directory(self, method: str) -> _Reply:
        with self._lock:
            self.directory_requests += 1
        self._wait(self._latency_for("directory", ()))
        fault = self._take_fault("directory", ())
        if fault is not None:
            common = self._common_fault(fault)
            if common is not None:
                return common
            if fault.mode == "malformed_json":
                return _Reply(200, b'{"newNonce": ', "application/json", ())
        base = self.base_url
        doc: Dict[str, Any] = {
            "newNonce": f"{base}/acme/new-nonce",
            "newAccount": f"{base}/acme/new-account",
            "newOrder": f"{base}/acme/new-order",
            "revokeCert": f"{base}/acme/revoke-cert",
            "keyChange": f"{base}/acme/key-change",
            "meta": {"termsOfService": f"{base}/terms"},
        }
        if self.acme_directory is not None:
            doc = {k: v for k, v in self.acme_directory.items() if k != "renewalInfo"}
        if self.renewal_info and not (fault is not None and fault.mode == "no_renewal_info"):
            doc["renewalInfo"] = f"{base}/renewal-info"
        return _Reply(200, json.dumps(doc).encode(), "application/json", ())

    def _ari(self, method: str, cid: str) -> _Reply:
        cid = urllib.parse.unquote(cid)
        try:
            _aki, serial = parse_cert_id(cid)
        except ValueError:
            with self._lock:
                self.ari_requests += 1
            return _problem(400, "malformed", "invalid certID")
        with self._lock:
            self.ari_requests += 1
            self._ari_by_id[cid] += 1
        keys: Tuple[Union[str, int], ...] = (cid, serial)
        self._wait(self._latency_for("ari", keys))
        if method not in ("GET", "HEAD"):
            return _problem(405, "malformed", "GET renewalInfo")
        fault = self._take_fault("ari", keys)
        if fault is not None:
            common = self._common_fault(fault)
            if common is not None:
                return common
            if fault.mode == "malformed_json":
                return _Reply(200, b'{"suggestedWindow": {"start": "2026-', "application/json",
                              self._retry_after_header(None))
            if fault.mode == "missing_window":
                return _Reply(200, b'{"explanationURL": "https://example.test/no-window"}',
                              "application/json", self._retry_after_header(None))
        win = self._lookup_window(cid)
        if win is not None:
            start, end = win.resolve(_now())
            explanation, retry = win.explanation_url or self.explanation_url, win.retry_after
        else:
            answer = self.policy(cid)
            if answer is None:
                return _problem(404, "malformed", "unknown certificate")
            start, end = answer
            explanation, retry = self.explanation_url, None
        if fault is not None and fault.mode == "inverted_window":
            start, end = end, start - datetime.timedelta(hours=1)
            if end >= start:
                end = start - datetime.timedelta(hours=1)
        elif fault is not None and fault.mode == "empty_window":
            end = start
        extra = f', "explanationURL": {json.dumps(explanation)}' if explanation else ""
        body = ('{"suggestedWindow": {"start": "' + rfc3339(start) + '", "end": "'
                + rfc3339(end) + '"}' + extra + "}")
        headers = self._retry_after_header(retry)
        if fault is not None and fault.mode == "bad_retry_after":
            headers = (("Retry-After", "soon-ish"),)
        return _Reply(200, body.encode(), "application/json", headers)

    def _retry_after_header(self, retry: Optional[int]) -> Tuple[Tuple[str, str], ...]:
        value = retry if retry is not None else self.retry_after
        return (("Retry-After", str(int(value))),) if value is not None else ()

    # -- OCSP ----------------------------------------------------------------------------

    def _ocsp(self, method: str, path: str, body: bytes) -> _Reply:
        with self._lock:
            self.ocsp_requests += 1
        if method == "POST":
            der = body
        elif method == "GET" and path.startswith("/ocsp/"):
            text = urllib.parse.unquote(path[len("/ocsp/"):])
            try:
                der = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_") \
                    if ("-" in text or "_" in text) else \
                    base64.b64decode(text + "=" * (-len(text) % 4))
            except (binascii.Error, ValueError):
                der = b""
        else:
            return _problem(405, "malformed", "POST or GET an OCSP request")
        try:
            req = ocsp.load_der_ocsp_request(der)
            serial = int(req.serial_number)
        except Exception:
            return _Reply(200, _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST),
                          "application/ocsp-response", ())
        with self._lock:
            self._ocsp_by_serial[serial] += 1
        self._wait(self._latency_for("ocsp", (serial,)))
        fault = self._take_fault("ocsp", (serial,))
        mode = fault.mode if fault is not None else None
        if fault is not None:
            common = self._common_fault(fault)
            if common is not None:
                return common
            if mode == "garbage":
                return _Reply(200, os.urandom(64), "application/ocsp-response", ())
            if mode == "unsigned":
                return _Reply(200, _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER),
                              "application/ocsp-response", ())
        der_out = self._ocsp_response(req, serial, mode)
        if mode == "malformed":
            der_out = der_out[: max(8, len(der_out) // 2)]
        return _Reply(200, der_out, "application/ocsp-response",
                      (("Cache-Control", "max-age=3600, public"),))

    def _ocsp_response(self, req: ocsp.OCSPRequest, serial: int, mode: Optional[str]) -> bytes:
        alg = req.hash_algorithm
        ca = self._issuers.get((alg.name, req.issuer_key_hash))
        if ca is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        with self._lock:
            registered = self._ocsp_status.get(serial)
        status = registered.status if registered else "good"
        if mode in ("revoked", "unknown"):
            status = mode
        cache_key = (alg.name, req.issuer_key_hash, req.issuer_name_hash, serial, status, mode)
        now_mono = time.monotonic()
        if self.ocsp_cache_seconds > 0:
            with self._lock:
                hit = self._ocsp_cache.get(cache_key)
            if hit is not None and now_mono - hit[0] < self.ocsp_cache_seconds:
                return hit[1]

        now = datetime.datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        this_update = now - datetime.timedelta(minutes=1)
        next_update = now + self.ocsp_validity
        if mode == "stale":
            this_update = now - datetime.timedelta(days=10)
            next_update = now - datetime.timedelta(days=3)
        cert_status = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED,
                       "unknown": ocsp.OCSPCertStatus.UNKNOWN}[status]
        rev_time: Optional[datetime.datetime] = None
        rev_reason: Optional[x509.ReasonFlags] = None
        if status == "revoked":
            rev_time = (registered.revocation_time if registered and registered.revocation_time
                        else now - datetime.timedelta(hours=1))
            if rev_time.tzinfo is not None:
                rev_time = rev_time.astimezone(UTC).replace(tzinfo=None)
            rev_reason = registered.reason if registered else None

        builder = ocsp.OCSPResponseBuilder()
        if hasattr(builder, "add_response_by_hash"):  # cryptography >= 42
            builder = builder.add_response_by_hash(
                issuer_name_hash=req.issuer_name_hash, issuer_key_hash=req.issuer_key_hash,
                serial_number=serial, algorithm=alg, cert_status=cert_status,
                this_update=this_update, next_update=next_update,
                revocation_time=rev_time, revocation_reason=rev_reason)
        else:  # cryptography 38: needs a cert object; a stub with this serial has the same CertID
            builder = builder.add_response(
                cert=_stub_cert(ca, serial), issuer=ca.issuer_cert, algorithm=alg,
                cert_status=cert_status, this_update=this_update, next_update=next_update,
                revocation_time=rev_time, revocation_reason=rev_reason)
        signer_cert, signer_key = ca.issuer_cert, ca.issuer_key
        encoding = ocsp.OCSPResponderEncoding.HASH
        if mode == "wrong_key":
            # responderID names the real issuer; the signature is by another key.
            signer_cert, signer_key = self._impostor(ca)
            encoding = ocsp.OCSPResponderEncoding.NAME
        elif mode == "wrong_responder":
            wrong = self._wrong_signing_ca()
            signer_cert, signer_key = wrong.issuer_cert, wrong.issuer_key
            builder = builder.certificates([wrong.issuer_cert])
        builder = builder.responder_id(encoding, signer_cert)
        der = builder.sign(signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        if self.ocsp_cache_seconds > 0:
            with self._lock:
                if len(self._ocsp_cache) > 100_000:
                    self._ocsp_cache.clear()
                self._ocsp_cache[cache_key] = (now_mono, der)
        return der

    def _impostor(self, ca: FarmCA) -> Tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A self-signed cert with the issuer's subject name but a different key."""
        with self._lock:
            hit = self._impostors.get(id(ca))
            if hit is None:
                key = ec.generate_private_key(ec.SECP256R1())
                now = datetime.datetime.now(UTC).replace(tzinfo=None)
                cert = (
                    x509.CertificateBuilder()
                    .subject_name(ca.issuer_name)
                    .issuer_name(ca.issuer_name)
                    .public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(days=1))
                    .not_valid_after(now + datetime.timedelta(days=365))
                    .sign(key, hashes.SHA256())
                )
                hit = self._impostors[id(ca)] = (cert, key)
            return hit

    def _wrong_signing_ca(self) -> FarmCA:
        with self._lock:
            if self._wrong_ca is None:
                self._wrong_ca = FarmCA.create("Wrong OCSP", intermediate=False)
            return self._wrong_ca


def _safe_serial(cid: str) -> Optional[int]:
    try:
        return parse_cert_id(cid)[1]
    except ValueError:
        return None


def _problem(status: int, typ: str, detail: str,
             headers: Sequence[Tuple[str, str]] = ()) -> _Reply:
    body = json.dumps({"type": f"urn:ietf:params:acme:error:{typ}", "detail": detail,
                       "status": status}).encode()
    return _Reply(status, body, "application/problem+json", tuple(headers))


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER)


def _spki_key_bits(spki_der: bytes) -> bytes:
    """The subjectPublicKey BIT STRING contents (without the unused-bits octet) of an SPKI:
    what OCSP's issuerKeyHash hashes."""

    def read_tlv(buf: bytes, pos: int) -> Tuple[int, int, int]:
        tag = buf[pos]
        length = buf[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(buf[pos:pos + n], "big")
            pos += n
        return tag, pos, length

    _tag, pos, _len = read_tlv(spki_der, 0)  # SEQUENCE
    _tag, alg_pos, alg_len = read_tlv(spki_der, pos)  # AlgorithmIdentifier
    tag, bits_pos, bits_len = read_tlv(spki_der, alg_pos + alg_len)
    if tag != 0x03:
        raise ValueError("SPKI without BIT STRING")
    return spki_der[bits_pos + 1:bits_pos + bits_len]


_stub_key_lock = threading.Lock()
_stub_key: List[ec.EllipticCurvePrivateKey] = []


def _stub_cert(ca: FarmCA, serial: int) -> x509.Certificate:
    """A throw-away cert with ``serial`` from ``ca`` (only its serial and issuer matter)."""
    with _stub_key_lock:
        if not _stub_key:
            _stub_key.append(ec.generate_private_key(ec.SECP256R1()))
        key = _stub_key[0]
    now = datetime.datetime.now(UTC).replace(tzinfo=None)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.issuer_name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("stub.invalid")]),
                       critical=True)
        .sign(ca.issuer_key, hashes.SHA256())
    )
