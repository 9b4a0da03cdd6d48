"""Unit tests for the scan's network clients: ratelimit, ARI and OCSP.

HTTP goes to a tiny in-test server on 127.0.0.1; no real sleeping beyond a 0.2 s read
timeout.
"""
from __future__ import annotations

import json
import pickle
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from certbot_batch.scan import ari, ocsp, ratelimit
from certbot_batch.scan.ari import AriClient, AriError, cert_id, choose_time, parse_rfc3339
from certbot_batch.scan.ocsp import OcspError
from certbot_batch.scan.ratelimit import RateLimiter, key_for_url, parse_retry_after

UTC = timezone.utc
NOW = datetime.now(UTC).replace(microsecond=0)

# ----------------------------------------------------------------------------------------
# Certificates
# ----------------------------------------------------------------------------------------
Key = Any


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "Test CA", kind: str = "ec") -> Tuple[x509.Certificate, Key]:
    key: Key = (ec.generate_private_key(ec.SECP256R1()) if kind == "ec"
                else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(ca: Tuple[x509.Certificate, Key], *, serial: Optional[int] = None,
              aki: Optional[bytes] = b"", ocsp_uri: Optional[str] = None,
              eku: Optional[List[x509.ObjectIdentifier]] = None,
              cn: str = "example.com") -> Tuple[x509.Certificate, Key]:
    """A leaf signed by ``ca``; ``aki=b""`` derives the AKI, ``None`` omits it."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(serial if serial is not None else x509.random_serial_number())
               .not_valid_before(NOW - timedelta(days=1))
               .not_valid_after(NOW + timedelta(days=89)))
    if aki == b"":
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False)
    elif aki is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier(aki, None, None),
                                        critical=False)
    if ocsp_uri:
        builder = builder.add_extension(x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                   x509.UniformResourceIdentifier(ocsp_uri))]),
            critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


# ----------------------------------------------------------------------------------------
# A tiny HTTP server
# ----------------------------------------------------------------------------------------
Reply = Tuple[int, Dict[str, str], bytes]
Route = Callable[[str, str, bytes], Reply]


class Stub:
    """Routes by path prefix (longest first); records every request."""

    def __init__(self) -> None:
        self.routes: Dict[str, Route] = {}
        self.hits: List[Tuple[str, str, Dict[str, str]]] = []
        self.bodies: List[bytes] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes: avoid Nagle/delayed-ACK stalls.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with stub._lock:
                    stub.hits.append((self.command, self.path, dict(self.headers)))
                    stub.bodies.append(body)
                route = None
                for prefix in sorted(stub.routes, key=len, reverse=True):
                    if self.path.startswith(prefix):
                        route = stub.routes[prefix]
                        break
                status, headers, payload = (route(self.command, self.path, body) if route
                                            else (404, {}, b"not found"))
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass

            do_GET = _serve
            do_POST = _serve

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # many workers connect at once

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that hang up early (timeouts, oversized bodies) are expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(1 for _, path, _ in self.hits if path.startswith(prefix))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    yield server
    server.close()


def _session() -> requests.Session:
    sess = requests.Session()
    sess.trust_env = False  # no proxies from the environment for 127.0.0.1
    return sess


def json_reply(body: str, status: int = 200, **headers: str) -> Route:
    hdrs = {"Content-Type": "application/json"}
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})

    def route(method: str, path: str, data: bytes) -> Reply:
        return status, hdrs, body.encode()
    return route


def window_json(start: datetime, end: datetime, extra: str = "") -> str:
    window = {"start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
              "end": end.strftime("%Y-%m-%dT%H:%M:%SZ")}
    return json.dumps({"suggestedWindow": window})[:-1] + extra + "}"


def ari_setup(stub: Stub, route: Route, *, directory: Optional[str] = None,
              limiter: Optional[RateLimiter] = None,
              timeout: Tuple[float, float] = (2.0, 2.0)) -> AriClient:
    if directory is None:
        directory = json.dumps({"newOrder": "x", "renewalInfo": stub.url("/ari/")})
    stub.routes["/dir"] = json_reply(directory)
    stub.routes["/ari/"] = route
    return AriClient(session_factory=_session, timeout=timeout, rate_limiter=limiter,
                     user_agent="certbot-batch-test/1")


@pytest.fixture(scope="module")
def ca() -> Tuple[x509.Certificate, Key]:
    return make_ca()


@pytest.fixture(scope="module")
def leaf(ca: Tuple[x509.Certificate, Key]) -> x509.Certificate:
    return make_leaf(ca)[0]


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.waits: List[float] = []

    def __call__(self) -> float:
        return self.t

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.t += seconds


def fake_limiter(rate: Optional[float] = 10.0, burst: float = 2.0
                 ) -> Tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    return RateLimiter(rate=rate, burst=burst, clock=clock, wait=clock.wait), clock


# ----------------------------------------------------------------------------------------
# certID, timestamps, window choice
# ----------------------------------------------------------------------------------------
def test_cert_id_rfc9773_example(ca: Tuple[x509.Certificate, Key]) -> None:
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = make_leaf(ca, serial=0x87654321, aki=aki)[0]
    assert cert_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


@pytest.mark.parametrize("serial,encoded", [
    (0x01, "AQ"), (0x7F, "fw"), (0x80, "AIA"), (0xFF, "AP8"), (0x0100, "AQA"),
    (0x7FFF, "f_8"), (0x8000, "AIAA"),
])
def test_cert_id_serial_der_content(ca: Tuple[x509.Certificate, Key], serial: int,
                                    encoded: str) -> None:
    cert = make_leaf(ca, serial=serial, aki=b"\x01\x02")[0]
    assert cert_id(cert) == "AQI." + encoded


def test_serial_encoding_helper() -> None:
    assert ari._serial_der_content(0x87654321) == bytes.fromhex("0087654321")
    assert ari._serial_der_content(0) == b"\x00"
    assert ari._serial_der_content(-1) == b"\xff"
    assert ari._serial_der_content(-128) == b"\x80"
    assert ari._serial_der_content(-129) == b"\xff\x7f"


def test_cert_id_without_aki(ca: Tuple[x509.Certificate, Key]) -> None:
    cert = make_leaf(ca, aki=None)[0]
    with pytest.raises(AriError) as info:
        cert_id(cert)
    assert info.value.kind == "no_ari"
    assert "Authority Key Identifier" in str(info.value)


def test_cert_id_derived_aki_matches_ca_ski(ca: Tuple[x509.Certificate, Key],
                                            leaf: x509.Certificate) -> None:
    ski = ca[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert cert_id(leaf).split(".")[0] == ari._b64url(ski)


@pytest.mark.parametrize("text,expected", [
    ("2025-01-02T03:04:05Z", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2025-01-02t03:04:05z", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2025-01-02T03:04:05.123456789Z", datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
    ("2025-01-02T03:04:05.5+02:00", datetime(2025, 1, 2, 1, 4, 5, 500000, tzinfo=UTC)),
    ("2025-01-02T03:04:05-05:30", datetime(2025, 1, 2, 8, 34, 5, tzinfo=UTC)),
    ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)),
])
def test_parse_rfc3339(text: str, expected: datetime) -> None:
    parsed = parse_rfc3339(text)
    assert parsed == expected and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["2025-01-02", "2025-01-02T03:04:05", "yesterday",
                                  "2025-13-02T03:04:05Z", "2025-01-02T03:04:05+25:00", ""])
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_choose_time() -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    end = start + timedelta(days=2)
    rng = random.Random(42)
    picks = [choose_time(start, end, rng) for _ in range(2000)]
    assert all(start <= p < end for p in picks)
    first_half = sum(1 for p in picks if p < start + timedelta(days=1))
    assert 850 < first_half < 1150  # roughly uniform
    assert choose_time(start, end, random.Random(7)) == choose_time(start, end,
                                                                    random.Random(7))
    assert start <= choose_time(start, end) < end  # SystemRandom default
    with pytest.raises(ValueError):
        choose_time(end, start)
    with pytest.raises(ValueError):
        choose_time(start, start)


# ----------------------------------------------------------------------------------------
# Rate limiter
# ----------------------------------------------------------------------------------------
def test_parse_retry_after() -> None:
    now = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("nan", now) is None
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(later, now) == 90.0
    assert parse_retry_after("Sun, 01 Jun 2025 12:05:00 GMT", now) == 300.0
    assert parse_retry_after("Sun, 01 Jun 2025 11:00:00 GMT", now) == 0.0  # past
    assert parse_retry_after("Sun, 01 Jun 2025 12:05:00 GMT", now.replace(tzinfo=None)) == 300


def test_key_for_url() -> None:
    assert key_for_url("https://CA.example/dir") == "https://ca.example"
    assert key_for_url("https://ca.example:443/acme/renewal-info/x") == "https://ca.example"
    assert key_for_url("https://ca.example:8443/x") == "https://ca.example:8443"
    assert key_for_url("http://r3.o.lencr.org") == "http://r3.o.lencr.org"
    assert key_for_url("http://[::1]:80/x") == "http://[::1]"
    assert key_for_url(key_for_url("https://ca.example:8443/x")) == "https://ca.example:8443"


def test_token_bucket_math() -> None:
    limiter, clock = fake_limiter(rate=10.0, burst=2.0)
    key = "https://ca.example/dir"
    assert limiter.acquire(key) and limiter.acquire(key)  # the burst
    assert clock.waits == []
    assert not limiter.try_acquire(key)
    assert limiter.acquire(key)  # waits 1/rate
    assert clock.waits == [pytest.approx(0.1)]
    assert clock.t == pytest.approx(1000.1)
    # Deadline too close for the next token (0.1 s away): refused without waiting.
    assert not limiter.acquire(key, deadline=clock.t + 0.05)
    assert len(clock.waits) == 1
    assert limiter.acquire(key, deadline=clock.t + 0.1)
    # Refill never exceeds the burst.
    clock.t += 100
    assert limiter.acquire(key) and limiter.acquire(key)
    assert not limiter.try_acquire(key)
    # Keys are per CA host: another CA has its own bucket; same host shares it.
    assert limiter.try_acquire("https://other.example/x")
    assert not limiter.try_acquire("https://ca.example/acme/renewal-info/abc")


def test_token_bucket_sustained_rate() -> None:
    limiter, clock = fake_limiter(rate=50.0, burst=5.0)
    for _ in range(505):
        assert limiter.acquire("http://a")
    # 5 from the burst, then 500 at 50/s = 10 s.
    assert clock.t - 1000.0 == pytest.approx(10.0, rel=1e-6)


def test_unlimited_rate_still_backs_off() -> None:
    limiter, clock = fake_limiter(rate=None)
    for _ in range(1000):
        assert limiter.try_acquire("http://a")
    limiter.backoff("http://a", 30)
    assert not limiter.acquire("http://a", deadline=clock.t + 10)


def test_backoff() -> None:
    limiter, clock = fake_limiter(rate=10.0, burst=5.0)
    key = "https://ca.example"
    assert limiter.backed_off_until(key) is None
    assert limiter.backoff(key + "/dir", 120) == 120  # URL or key: same thing
    assert limiter.backed_off_until(key) == pytest.approx(1120.0)
    # The backoff outlasts the deadline: refused at once, no waiting.
    assert not limiter.acquire(key, deadline=clock.t + 60)
    assert clock.waits == []
    # A deadline after the backoff: waits it out, then gets a token.
    assert limiter.acquire(key, deadline=clock.t + 200)
    assert clock.t == pytest.approx(1120.0)
    assert limiter.backed_off_until(key) is None
    # No full burst right after a backoff: one token, then the rate.
    assert not limiter.try_acquire(key)
    # A shorter backoff does not shorten a longer one; clamping to [1 s, 1 day].
    limiter.backoff(key, 1000)
    limiter.backoff(key, 10)
    assert limiter.backed_off_until(key) == pytest.approx(clock.t + 1000)
    assert limiter.backoff("http://b", 0.001) == 1.0
    assert limiter.backoff("http://c", 10 ** 9) == 86400.0
    assert limiter.backoff("http://d", -5) == 1.0
    limiter.clear_backoff(key)
    assert limiter.backed_off_until(key) is None
    clock.t += 0.1  # the bucket refills from now on, at the rate
    assert limiter.try_acquire(key)
    with pytest.raises(ValueError):
        RateLimiter(rate=-1)


def test_limiter_threads_real_clock() -> None:
    limiter = RateLimiter(rate=200.0, burst=1.0)
    got: List[float] = []
    lock = threading.Lock()
    start = time.monotonic()

    def worker() -> None:
        for _ in range(5):
            assert limiter.acquire("http://x", deadline=time.monotonic() + 5)
            with lock:
                got.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 20
    assert max(got) - start >= 19 / 200.0 * 0.9  # 1 burst + 19 at 200/s


def test_backoff_wakes_waiters_that_cannot_wait() -> None:
    # The clock is frozen: the waiter's token never comes, so only the back-off's wake-up
    # can end its wait (with False: the back-off outlasts its deadline).
    entered = threading.Event()
    holder: List[RateLimiter] = []

    def wait(seconds: float) -> None:
        entered.set()
        holder[0]._cond.wait(seconds)

    limiter = RateLimiter(rate=0.5, burst=1.0, clock=lambda: 100.0, wait=wait)
    holder.append(limiter)
    assert limiter.acquire("http://x")
    result: List[bool] = []
    t = threading.Thread(target=lambda: result.append(
        limiter.acquire("http://x", deadline=105.0)))
    t.start()
    assert entered.wait(10)  # the waiter waits for its token
    limiter.backoff("http://x", 3600)
    t.join(10)
    assert not t.is_alive()
    assert result == [False]


# ----------------------------------------------------------------------------------------
# ARI client
# ----------------------------------------------------------------------------------------
def test_ari_good_window(stub: Stub, leaf: x509.Certificate) -> None:
    start = NOW + timedelta(days=50)
    end = start + timedelta(days=2)
    client = ari_setup(stub, json_reply(
        window_json(start, end, ', "explanationURL": "https://ca.example/why"'),
        Retry_After="7200"))
    with client:
        result = client.fetch(stub.url("/dir"), leaf)
    assert result.window_start == start and result.window_end == end
    assert result.window_start.tzinfo is not None
    assert result.retry_after_seconds == 7200
    assert result.explanation_url == "https://ca.example/why"
    method, path, headers = stub.hits[-1]
    assert (method, path) == ("GET", "/ari/" + cert_id(leaf))
    assert headers["User-Agent"] == "certbot-batch-test/1"
    assert [p for _, p, _ in stub.hits] == ["/dir", "/ari/" + cert_id(leaf)]


def test_ari_fractional_seconds_window(stub: Stub, leaf: x509.Certificate) -> None:
    body = ('{"suggestedWindow": {"start": "2030-01-02T03:04:05.123456789Z", '
            '"end": "2030-01-03T03:04:05.5+01:00"}}')
    client = ari_setup(stub, json_reply(body))
    result = client.fetch(stub.url("/dir"), leaf)
    assert result.window_start == datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert result.window_end == datetime(2030, 1, 3, 2, 4, 5, 500000, tzinfo=UTC)
    assert result.retry_after_seconds == ari.DEFAULT_RETRY_AFTER == 6 * 3600
    assert result.explanation_url is None


@pytest.mark.parametrize("header,expected", [
    ("5", 60.0), ("0", 60.0), ("999999", 86400.0), ("3600", 3600.0), (None, 21600.0),
    ("garbage", 21600.0),
])
def test_ari_retry_after_clamping(stub: Stub, leaf: x509.Certificate, header: Optional[str],
                                  expected: float) -> None:
    body = window_json(NOW + timedelta(days=10), NOW + timedelta(days=11))
    route = json_reply(body, Retry_After=header) if header is not None else json_reply(body)
    client = ari_setup(stub, route)
    assert client.fetch(stub.url("/dir"), leaf).retry_after_seconds == expected


def test_ari_retry_after_http_date(stub: Stub, leaf: x509.Certificate) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True)
    body = window_json(NOW + timedelta(days=10), NOW + timedelta(days=11))
    client = ari_setup(stub, json_reply(body, Retry_After=when))
    assert client.fetch(stub.url("/dir"), leaf).retry_after_seconds == pytest.approx(
        7200, abs=5)


def test_ari_timeout(stub: Stub, leaf: x509.Certificate) -> None:
    release = threading.Event()

    answered = threading.Event()

    def slow(method: str, path: str, data: bytes) -> Reply:
        release.wait(10)
        answered.set()
        return 200, {}, b"{}"

    client = ari_setup(stub, slow, timeout=(1.0, 0.2))
    try:
        with pytest.raises(AriError) as info:
            client.fetch(stub.url("/dir"), leaf)
        # The read timeout ended the request, not the server's (held) answer.
        assert not answered.is_set()
    finally:
        release.set()
    assert info.value.kind == "timeout"
    assert "/ari/" in str(info.value)


def test_ari_connection_refused(leaf: x509.Certificate) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    client = AriClient(session_factory=_session, timeout=(1.0, 1.0))
    with pytest.raises(AriError) as info:
        client.fetch(f"http://127.0.0.1:{port}/dir", leaf)
    assert info.value.kind == "connection"
    assert str(port) in str(info.value)


@pytest.mark.parametrize("status", [500, 502, 404, 400])
def test_ari_http_error(stub: Stub, leaf: x509.Certificate, status: int) -> None:
    problem = '{"type": "urn:ietf:params:acme:error:serverInternal", "detail": "boom"}'
    limiter, _ = fake_limiter()
    client = ari_setup(stub, json_reply(problem, status=status), limiter=limiter)
    with pytest.raises(AriError) as info:
        client.fetch(stub.url("/dir"), leaf)
    err = info.value
    assert err.kind == "http" and err.status == status
    assert str(status) in str(err) and "boom" in str(err)
    assert limiter.backed_off_until(stub.base) is None  # only 503/429 back off the CA


@pytest.mark.parametrize("status", [503, 429])
def test_ari_503_backs_off_and_stops_asking(stub: Stub, leaf: x509.Certificate,
                                            status: int) -> None:
    limiter = RateLimiter(rate=1000.0, burst=100.0)
    client = ari_setup(stub, json_reply('{"detail": "slow down"}', status=status,
                                        Retry_After="120"), limiter=limiter)
    with pytest.raises(AriError) as info:
        client.fetch(stub.url("/dir"), leaf)
    assert info.value.kind == "unavailable"
    assert info.value.retry_after == 120
    assert info.value.status == status
    until = limiter.backed_off_until(stub.base)
    assert until is not None and 110 < until - time.monotonic() <= 120
    sent = len(stub.hits)
    for _ in range(20):
        with pytest.raises(AriError) as info:
            client.fetch(stub.url("/dir"), leaf)
        assert info.value.kind == "unavailable"
        assert info.value.status is None  # not sent
        assert info.value.retry_after is not None and info.value.retry_after > 100
    assert len(stub.hits) == sent
    assert client.stats["not_sent"] == 20


def test_ari_503_without_retry_after_grows_exponentially(stub: Stub,
                                                         leaf: x509.Certificate) -> None:
    limiter, clock = fake_limiter(rate=1000.0, burst=100.0)
    state = {"status": 503}

    def route(method: str, path: str, data: bytes) -> Reply:
        if state["status"] == 200:
            return 200, {}, window_json(NOW, NOW + timedelta(days=1)).encode()
        return state["status"], {}, b"overloaded"

    client = ari_setup(stub, route, limiter=limiter)
    delays = []
    for _ in range(3):
        with pytest.raises(AriError) as info:
            client.fetch(stub.url("/dir"), leaf)
        assert info.value.kind == "unavailable"
        delays.append(info.value.retry_after)
        # While backed off, a concurrent 503 must not grow the backoff again.
        assert client._on_unavailable(stub.base, None) == pytest.approx(delays[-1])
        clock.t += delays[-1] + 1  # type: ignore[operator]
    assert delays == [60.0, 120.0, 240.0]
    state["status"] = 200
    client.fetch(stub.url("/dir"), leaf)  # success resets the growth
    state["status"] = 503
    with pytest.raises(AriError) as info:
        client.fetch(stub.url("/dir"), leaf)
    assert info.value.retry_after == 60.0


@pytest.mark.parametrize("body", [
    "not json", "[]", "{}", '{"suggestedWindow": "soon"}',
    '{"suggestedWindow": {"start": "2030-01-01T00:00:00Z"}}',
    '{"suggestedWindow": {"start": "2030-01-01", "end": "2030-01-02T00:00:00Z"}}',
    '{"suggestedWindow": {"start": 1, "end": 2}}',
])
def test_ari_malformed(stub: Stub, leaf: x509.Certificate, body: str) -> None:
    client = ari_setup(stub, json_reply(body))
    with pytest.raises(AriError) as info:
        client.fetch(stub.url("/dir"), leaf)
    assert info.value.kind == "malformed"
    assert "/ari/" in str(info.value)


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(hours=-1)])
def test_ari_bad_window(stub: Stub, leaf: x509.Certificate, delta: timedelta) -> None:
    start = NOW + timedelta(days=3)
    client = ari_setup(stub, json_reply(window_json(start, start + delta)))
    with pytest.raises(AriError) as info:
        client.fetch(stub.url("/dir"), leaf)
    assert info.value.kind == "bad_window"


def test_ari_directory_without_renewal_info_fetched_once(stub: Stub,
                                                         leaf: x509.Certificate) -> None:
    client = ari_setup(stub, json_reply("{}"), directory='{"newOrder": "x"}')

    def one(_: int) -> str:
        try:
            client.fetch(stub.url("/dir"), leaf)
        except AriError as exc:
            return exc.kind
        return "ok"

    with ThreadPoolExecutor(16) as pool:
        kinds = list(pool.map(one, range(200)))
    assert kinds == ["no_ari"] * 200
    assert stub.count("/dir") == 1
    assert stub.count("/ari/") == 0


def test_ari_directory_fetched_once_under_concurrency(
        stub: Stub, ca: Tuple[x509.Certificate, Key]) -> None:
    certs = [make_leaf(ca, serial=1000 + i)[0] for i in range(50)]
    body = window_json(NOW + timedelta(days=5), NOW + timedelta(days=6))
    limiter = RateLimiter(rate=10000.0, burst=1000.0)
    client = ari_setup(stub, json_reply(body), limiter=limiter)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda c: client.fetch(stub.url("/dir"), c), certs))
    client.close()
    assert len(results) == 50
    assert stub.count("/dir") == 1
    assert sorted(p for _, p, _ in stub.hits if p.startswith("/ari/")) == sorted(
        "/ari/" + cert_id(c) for c in certs)
    assert client.stats == {"directory": 1, "ari": 50, "not_sent": 0}


def test_ari_directory_failure_cached(stub: Stub, leaf: x509.Certificate) -> None:
    client = ari_setup(stub, json_reply("{}"))
    stub.routes["/dir"] = json_reply("oops", status=500)
    for _ in range(5):
        with pytest.raises(AriError) as info:
            client.fetch(stub.url("/dir"), leaf)
        assert info.value.kind == "http"
    assert stub.count("/dir") == 1
    stub.routes["/dir"] = json_reply(json.dumps({"renewalInfo": stub.url("/ari/")}))
    client.forget_directory(stub.url("/dir"))
    with pytest.raises(AriError) as info:
        client.fetch(stub.url("/dir"), leaf)
    assert info.value.kind == "malformed"  # now it reached the (stub) ARI endpoint
    assert stub.count("/dir") == 2


@pytest.mark.parametrize("directory,kind", [
    ("not json", "malformed"), ("[1]", "malformed"), ('{"renewalInfo": 5}', "malformed"),
    ('{"renewalInfo": "ftp://x"}', "malformed"),
])
def test_ari_bad_directory(stub: Stub, leaf: x509.Certificate, directory: str,
                           kind: str) -> None:
    client = ari_setup(stub, json_reply("{}"), directory=directory)
    with pytest.raises(AriError) as info:
        client.fetch(stub.url("/dir"), leaf)
    assert info.value.kind == kind


def test_ari_oversized_answer(stub: Stub, leaf: x509.Certificate) -> None:
    client = ari_setup(stub, json_reply(" " * (ari.MAX_ARI_BYTES + 10)))
    with pytest.raises(AriError) as info:
        client.fetch(stub.url("/dir"), leaf)
    assert info.value.kind == "malformed"


def test_ari_error_pickles_and_copies() -> None:
    err = AriError("unavailable", "slow down", 60.0, url="http://x", status=503)
    back = pickle.loads(pickle.dumps(err))
    assert (back.kind, str(back), back.retry_after, back.url, back.status) == (
        "unavailable", "slow down", 60.0, "http://x", 503)
    assert err.copy("other").message == "other" and err.copy().kind == "unavailable"
    assert AriError("connection", "x").retry_after is None  # positional (kind, message)


# ----------------------------------------------------------------------------------------
# OCSP
# ----------------------------------------------------------------------------------------
def ocsp_der(cert: x509.Certificate, issuer: x509.Certificate, signer_cert: x509.Certificate,
             signer_key: Key, *, status: str = "good",
             this_update: Optional[datetime] = None,
             next_update: Optional[datetime] = None,
             revocation_time: Optional[datetime] = None,
             include: Optional[List[x509.Certificate]] = None) -> bytes:
    cert_status = {"good": x509_ocsp.OCSPCertStatus.GOOD,
                   "revoked": x509_ocsp.OCSPCertStatus.REVOKED,
                   "unknown": x509_ocsp.OCSPCertStatus.UNKNOWN}[status]
    this_update = this_update or NOW - timedelta(hours=1)
    builder = x509_ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=issuer, algorithm=hashes.SHA1(), cert_status=cert_status,
        this_update=this_update.replace(tzinfo=None),
        next_update=(next_update or NOW + timedelta(days=3)).replace(tzinfo=None),
        revocation_time=(revocation_time.replace(tzinfo=None)
                         if status == "revoked" and revocation_time else None),
        revocation_reason=(x509.ReasonFlags.key_compromise if status == "revoked" else None),
    ).responder_id(x509_ocsp.OCSPResponderEncoding.HASH, signer_cert)
    if include:
        builder = builder.certificates(include)
    response = builder.sign(signer_key, hashes.SHA256())
    return response.public_bytes(serialization.Encoding.DER)


def der_route(payload: bytes, status: int = 200, **headers: str) -> Route:
    hdrs = {"Content-Type": "application/ocsp-response"}
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})

    def route(method: str, path: str, data: bytes) -> Reply:
        return status, hdrs, payload
    return route


def ocsp_check(stub: Stub, cert: x509.Certificate, issuer: x509.Certificate,
               **kwargs: Any) -> ocsp.OcspResult:
    with _session() as sess:
        return ocsp.check(cert, issuer, stub.url("/ocsp"), session=sess, timeout=2.0,
                          **kwargs)


@pytest.fixture(scope="module")
def ocsp_pki() -> Dict[str, Any]:
    ec_ca = make_ca("EC CA", "ec")
    rsa_ca = make_ca("RSA CA", "rsa")
    return {
        "ec_ca": ec_ca,
        "rsa_ca": rsa_ca,
        "ec_leaf": make_leaf(ec_ca, ocsp_uri="http://ocsp.example/")[0],
        "rsa_leaf": make_leaf(rsa_ca, ocsp_uri="http://ocsp.example/")[0],
        "delegate": make_leaf(ec_ca, cn="EC CA OCSP", eku=[ExtendedKeyUsageOID.OCSP_SIGNING]),
        "no_eku": make_leaf(ec_ca, cn="EC CA not OCSP", eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
        "other_ca": make_ca("EC CA", "ec"),  # same name, different key
    }


def test_ocsp_url(ocsp_pki: Dict[str, Any], leaf: x509.Certificate) -> None:
    assert ocsp.ocsp_url(ocsp_pki["ec_leaf"]) == "http://ocsp.example/"
    assert ocsp.ocsp_url(leaf) is None


def test_ocsp_good_ec_issuer(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, ca_key = ocsp_pki["ec_ca"]
    cert = ocsp_pki["ec_leaf"]
    next_update = NOW + timedelta(days=3)
    stub.routes["/ocsp"] = der_route(ocsp_der(cert, ca_cert, ca_cert, ca_key,
                                              next_update=next_update))
    result = ocsp_check(stub, cert, ca_cert)
    assert result.status == "good"
    assert result.this_update == NOW - timedelta(hours=1)
    assert result.next_update == next_update and result.next_update.tzinfo is not None
    assert result.revocation_time is None
    method, path, headers = stub.hits[-1]
    assert method == "POST" and headers["Content-Type"] == "application/ocsp-request"
    request = x509_ocsp.load_der_ocsp_request(stub.bodies[-1])
    assert request.serial_number == cert.serial_number
    assert isinstance(request.hash_algorithm, hashes.SHA1)


def test_ocsp_revoked_rsa_issuer(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, ca_key = ocsp_pki["rsa_ca"]
    cert = ocsp_pki["rsa_leaf"]
    revoked_at = NOW - timedelta(days=2)
    stub.routes["/ocsp"] = der_route(ocsp_der(cert, ca_cert, ca_cert, ca_key,
                                              status="revoked", revocation_time=revoked_at))
    result = ocsp_check(stub, cert, ca_cert)
    assert result.status == "revoked"
    assert result.revocation_time == revoked_at
    assert result.revocation_reason == "keyCompromise"


def test_ocsp_unknown(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, ca_key = ocsp_pki["ec_ca"]
    cert = ocsp_pki["ec_leaf"]
    stub.routes["/ocsp"] = der_route(ocsp_der(cert, ca_cert, ca_cert, ca_key, status="unknown"))
    assert ocsp_check(stub, cert, ca_cert).status == "unknown"


def test_ocsp_delegated_responder(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, _ = ocsp_pki["ec_ca"]
    cert = ocsp_pki["ec_leaf"]
    d_cert, d_key = ocsp_pki["delegate"]
    stub.routes["/ocsp"] = der_route(ocsp_der(cert, ca_cert, d_cert, d_key, include=[d_cert]))
    assert ocsp_check(stub, cert, ca_cert).status == "good"


def _expect(stub: Stub, payload: bytes, cert: x509.Certificate, issuer: x509.Certificate,
            kind: str, **kwargs: Any) -> OcspError:
    stub.routes["/ocsp"] = der_route(payload)
    with pytest.raises(OcspError) as info:
        ocsp_check(stub, cert, issuer, **kwargs)
    assert info.value.kind == kind, str(info.value)
    assert stub.url("/ocsp") in str(info.value)
    return info.value


def test_ocsp_delegate_without_eku(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, _ = ocsp_pki["ec_ca"]
    d_cert, d_key = ocsp_pki["no_eku"]
    err = _expect(stub, ocsp_der(ocsp_pki["ec_leaf"], ca_cert, d_cert, d_key,
                                 include=[d_cert]),
                  ocsp_pki["ec_leaf"], ca_cert, "bad_signature")
    assert "OCSP-signing" in str(err)


def test_ocsp_delegate_not_included(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, _ = ocsp_pki["ec_ca"]
    d_cert, d_key = ocsp_pki["delegate"]
    _expect(stub, ocsp_der(ocsp_pki["ec_leaf"], ca_cert, d_cert, d_key),
            ocsp_pki["ec_leaf"], ca_cert, "bad_signature")


def test_ocsp_delegate_from_other_ca(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, _ = ocsp_pki["ec_ca"]
    d_cert, d_key = make_leaf(ocsp_pki["other_ca"], cn="EC CA OCSP",
                              eku=[ExtendedKeyUsageOID.OCSP_SIGNING])
    err = _expect(stub, ocsp_der(ocsp_pki["ec_leaf"], ca_cert, d_cert, d_key,
                                 include=[d_cert]),
                  ocsp_pki["ec_leaf"], ca_cert, "bad_signature")
    assert "invalid signature" in str(err)


def test_ocsp_wrong_signer(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    # Signed by a key of another CA that has the same name: names match, signature fails.
    ca_cert, _ = ocsp_pki["ec_ca"]
    other_cert, other_key = ocsp_pki["other_ca"]
    payload = (x509_ocsp.OCSPResponseBuilder().add_response(
        cert=ocsp_pki["ec_leaf"], issuer=ca_cert, algorithm=hashes.SHA1(),
        cert_status=x509_ocsp.OCSPCertStatus.GOOD,
        this_update=(NOW - timedelta(hours=1)).replace(tzinfo=None),
        next_update=(NOW + timedelta(days=1)).replace(tzinfo=None),
        revocation_time=None, revocation_reason=None)
        .responder_id(x509_ocsp.OCSPResponderEncoding.NAME, other_cert)
        .sign(other_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    err = _expect(stub, payload, ocsp_pki["ec_leaf"], ca_cert, "bad_signature")
    assert "does not verify" in str(err)
    # And by another CA identified by key hash: no matching responder at all.
    _expect(stub, ocsp_der(ocsp_pki["ec_leaf"], ca_cert, other_cert, other_key),
            ocsp_pki["ec_leaf"], ca_cert, "bad_signature")


def test_ocsp_tampered_signature(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, ca_key = ocsp_pki["rsa_ca"]
    good = ocsp_der(ocsp_pki["rsa_leaf"], ca_cert, ca_cert, ca_key)
    tampered = good[:-5] + bytes(b ^ 0xFF for b in good[-5:])  # flip signature bytes
    _expect(stub, tampered, ocsp_pki["rsa_leaf"], ca_cert, "bad_signature")


@pytest.mark.parametrize("status,kind", [
    (x509_ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized"),
    (x509_ocsp.OCSPResponseStatus.SIG_REQUIRED, "unauthorized"),
    (x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformed"),
    (x509_ocsp.OCSPResponseStatus.TRY_LATER, "unavailable"),
    (x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR, "http"),
])
def test_ocsp_unsigned_error_responses(stub: Stub, ocsp_pki: Dict[str, Any],
                                       status: x509_ocsp.OCSPResponseStatus,
                                       kind: str) -> None:
    payload = x509_ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER)
    err = _expect(stub, payload, ocsp_pki["ec_leaf"], ocsp_pki["ec_ca"][0], kind)
    assert status.name in str(err)


@pytest.mark.parametrize("payload", [b"", b"garbage", b"\x30\x03\x0a\x01\x00"])
def test_ocsp_garbage(stub: Stub, ocsp_pki: Dict[str, Any], payload: bytes) -> None:
    _expect(stub, payload, ocsp_pki["ec_leaf"], ocsp_pki["ec_ca"][0], "malformed")


def test_ocsp_stale(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, ca_key = ocsp_pki["ec_ca"]
    cert = ocsp_pki["ec_leaf"]
    stale = ocsp_der(cert, ca_cert, ca_cert, ca_key, this_update=NOW - timedelta(days=8),
                     next_update=NOW - timedelta(days=1))
    err = _expect(stub, stale, cert, ca_cert, "stale")
    assert "nextUpdate" in str(err)
    future = ocsp_der(cert, ca_cert, ca_cert, ca_key, this_update=NOW + timedelta(hours=1))
    err = _expect(stub, future, cert, ca_cert, "stale")
    assert "clock" in str(err)
    # Within the 5 minute skew both ways: accepted.
    edge = ocsp_der(cert, ca_cert, ca_cert, ca_key, this_update=NOW + timedelta(minutes=2),
                    next_update=NOW - timedelta(minutes=2))
    stub.routes["/ocsp"] = der_route(edge)
    assert ocsp_check(stub, cert, ca_cert, now=NOW).status == "good"


def test_ocsp_wrong_serial(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, ca_key = ocsp_pki["ec_ca"]
    other = make_leaf(ocsp_pki["ec_ca"])[0]
    err = _expect(stub, ocsp_der(other, ca_cert, ca_cert, ca_key),
                  ocsp_pki["ec_leaf"], ca_cert, "malformed")
    assert "not about serial" in str(err)


def test_ocsp_http_errors_and_backoff(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert = ocsp_pki["ec_ca"][0]
    cert = ocsp_pki["ec_leaf"]
    stub.routes["/ocsp"] = der_route(b"nope", status=500)
    with pytest.raises(OcspError) as info:
        ocsp_check(stub, cert, ca_cert)
    assert info.value.kind == "http" and info.value.status == 500

    limiter = RateLimiter(rate=100.0, burst=10.0)
    stub.routes["/ocsp"] = der_route(b"", status=503, Retry_After="300")
    with pytest.raises(OcspError) as info:
        ocsp_check(stub, cert, ca_cert, rate_limiter=limiter)
    assert info.value.kind == "unavailable" and info.value.retry_after == 300
    assert limiter.backed_off_until(stub.url("/ocsp")) is not None
    sent = len(stub.hits)
    with pytest.raises(OcspError) as info:
        ocsp_check(stub, cert, ca_cert, rate_limiter=limiter)
    assert info.value.kind == "unavailable" and info.value.status is None
    assert len(stub.hits) == sent


def test_ocsp_timeout(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    release = threading.Event()

    def slow(method: str, path: str, data: bytes) -> Reply:
        release.wait(2)
        return 200, {}, b""

    stub.routes["/ocsp"] = slow
    try:
        with pytest.raises(OcspError) as info, _session() as sess:
            ocsp.check(ocsp_pki["ec_leaf"], ocsp_pki["ec_ca"][0], stub.url("/ocsp"),
                       session=sess, timeout=(1.0, 0.2))
    finally:
        release.set()
    assert info.value.kind == "timeout"


def test_ocsp_own_session(stub: Stub, ocsp_pki: Dict[str, Any]) -> None:
    ca_cert, ca_key = ocsp_pki["ec_ca"]
    cert = ocsp_pki["ec_leaf"]
    stub.routes["/ocsp"] = der_route(ocsp_der(cert, ca_cert, ca_cert, ca_key))
    # No session given: a temporary one is used (no proxies configured in tests).
    assert ocsp.check(cert, ca_cert, stub.url("/ocsp")).status == "good"
    assert stub.hits[-1][2]["User-Agent"].startswith("certbot-batch/")


def test_validity_helpers(leaf: x509.Certificate) -> None:
    after = ocsp.not_valid_after(leaf)
    before = ocsp.not_valid_before(leaf)
    assert after.tzinfo is not None and before.tzinfo is not None
    assert after - before == timedelta(days=90)


def test_module_exports() -> None:
    assert set(ari.ARI_KINDS) >= {"timeout", "http", "unavailable", "malformed",
                                  "bad_window", "no_ari", "connection"}
    assert set(ocsp.OCSP_KINDS) >= {"timeout", "http", "malformed", "bad_signature",
                                    "unauthorized", "connection"}
    assert ratelimit.MAX_BACKOFF == 86400.0
