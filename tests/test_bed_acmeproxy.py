"""The test bed's fault-injecting ACME proxy (tests/bed/acmeproxy.py) in front of a real pebble,
driven by the real acme client (this venv's) and by real certbots (every full flavour).

What the certbots do with the faults is asserted from what they actually print, so these tests
also document it for certbot-batch's CA pacing and backoff.
"""
from __future__ import annotations

import datetime
import functools
import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import josepy as jose
import pytest
import requests
from acme import client as acme_client
from acme import crypto_util, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.bed import certbots
from tests.bed.acmeproxy import (
    LE_EXACT_SET_DETAIL,
    LE_NEW_ORDERS_DETAIL,
    AcmeProxy,
)
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.pebble import INTERMEDIATE_CN_PREFIX, Pebble
from tests.bed.responder import Responder, cert_id_from_parts

pytestmark = pytest.mark.bed

RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"
SERVER_INTERNAL = "urn:ietf:params:acme:error:serverInternal"
NEW_ORDERS_START = LE_NEW_ORDERS_DETAIL.split("{", 1)[0]    # "too many new orders (300) ..."
EXACT_SET_START = LE_EXACT_SET_DETAIL.split("{", 1)[0]


# --------------------------------------------------------------------------------------------
# fixtures and helpers


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"bed_report_{w}", None), "failed", False)
               for w in ("setup", "call"))


@pytest.fixture
def proxy(pebble: Pebble, request: pytest.FixtureRequest) -> Iterator[AcmeProxy]:
    with AcmeProxy(pebble) as p:
        yield p
        if _failed(request):
            print(f"\n===== acmeproxy ({p.base_url}) =====\n{p.logs()}")


@pytest.fixture
def bot(certbot_flavour: str, tmp_path: Path, proxy: AcmeProxy, apache: Apache,
        request: pytest.FixtureRequest) -> Iterator[Certbot]:
    """certbot of one flavour pointed at the proxy (trusting only the proxy's CA)."""
    b = Certbot(certbot_flavour, tmp_path / "certbot", proxy, env_extra=apache.env())
    yield b
    if _failed(request):
        print(f"\n===== certbot {certbot_flavour} letsencrypt.log (tail) =====\n"
              f"{b.log_text()[-20000:]}")


def _session(proxy: AcmeProxy) -> requests.Session:
    s = requests.Session()
    s.verify = str(proxy.ca_bundle)
    s.trust_env = False  # no proxies, no machine-wide REQUESTS_CA_BUNDLE
    return s


def _client(proxy: AcmeProxy) -> acme_client.ClientV2:
    """A registered acme ClientV2 (this venv's acme) talking to the proxy."""
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = acme_client.ClientNetwork(key, alg=jose.ES256, verify_ssl=str(proxy.ca_bundle),
                                    user_agent="certbot-batch-tests")
    net.session.trust_env = False
    directory = acme_client.ClientV2.get_directory(proxy.directory_url, net)
    c = acme_client.ClientV2(directory, net)
    c.new_account(messages.NewRegistration.from_data(email="t@example.org",
                                                      terms_of_service_agreed=True))
    return c


@functools.cache
def _csr(*names: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return crypto_util.make_csr(key, list(names))


def _order(c: acme_client.ClientV2, *names: str) -> messages.OrderResource:
    return c.new_order(_csr(*names))


def _raw_post(c: acme_client.ClientV2, proxy: AcmeProxy, url: str, obj: Any,
              nonce: Optional[str] = None, jws_url: Optional[str] = None) -> requests.Response:
    """A signed POST sent by hand, to see the headers the acme client hides."""
    s = _session(proxy)
    if nonce is None:
        nonce = s.head(c.directory["newNonce"]).headers["Replay-Nonce"]
    data = c.net._wrap_in_jws(obj, jose.b64decode(nonce), jws_url or url)  # a decoded nonce
    return s.post(url, data=data, headers={"Content-Type": "application/jose+json"})


def _new_order_obj(*names: str) -> messages.NewOrder:
    return messages.NewOrder(identifiers=[
        messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in names])


def _retry_after_time(detail: str) -> datetime.datetime:
    m = re.search(r"retry after (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", detail)
    assert m, detail
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(
        tzinfo=datetime.timezone.utc)


def _certonly(bot: Certbot, webroot: Path, name: str) -> subprocess.CompletedProcess[str]:
    return bot.run("certonly", "-a", "webroot", "-w", str(webroot), "-d", name)


@functools.cache
def _acme_error_survives_contextmanager(flavour: str) -> bool:
    """False where an acme.messages.Error raised through a @contextmanager turns into
    ``AttributeError: can't set attribute`` (acme 2.1's immutable josepy Error on Python 3.11+:
    contextlib sets ``exc.__traceback__``). certbot's main() runs inside one."""
    python = certbots.python_for(flavour)
    assert python is not None
    code = ("import contextlib\nfrom acme import messages\n"
            "@contextlib.contextmanager\ndef cm():\n    yield\n"
            "try:\n    with cm():\n        raise messages.Error(typ='x', detail='d')\n"
            "except Exception as e:\n    print(type(e).__name__)\n")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                         env=certbots.clean_env()).stdout.strip()
    assert out in ("Error", "AttributeError"), out
    return out == "Error"


def _assert_certbot_shows_acme_error(bot: Certbot, proc: subprocess.CompletedProcess[str],
                                     detail_start: str, typ: str) -> None:
    """certbot failed on an ACME problem document: the detail reaches the user (or, where the
    acme Error cannot cross certbot's contextmanager, an AttributeError does) and the log
    always has the problem document."""
    assert proc.returncode != 0
    assert "An unexpected error occurred:" in proc.stderr
    if _acme_error_survives_contextmanager(bot.flavour):
        assert detail_start in proc.stderr, proc.stderr
    else:
        assert "AttributeError: can't set attribute" in proc.stderr, proc.stderr
        assert detail_start not in proc.stderr
    log = bot.log_text()
    assert f'"type": "{typ}"' in log
    assert detail_start in log
    # the original exception, as acme raised it (str(messages.Error): type :: description ::
    # detail)
    assert re.search(r"acme\.messages\.Error: " + re.escape(typ) + r" :: [^\n]* :: "
                     + re.escape(detail_start), log), log[-4000:]


# --------------------------------------------------------------------------------------------
# forwarding


def test_urls_point_at_proxy_and_pebble_checks_jws_url(proxy: AcmeProxy, pebble: Pebble) -> None:
    """Pebble builds its URLs from the Host header, which the proxy passes through: every URL
    a client gets names the proxy, and pebble's check of the JWS "url" (against
    https://{Host}{path}) passes for them and fails for pebble's own URL."""
    s = _session(proxy)
    directory = s.get(proxy.directory_url).json()
    urls = [v for v in directory.values() if isinstance(v, str) and v.startswith("https://")]
    assert len(urls) >= 4
    assert all(u.startswith(proxy.base_url + "/") for u in urls), directory
    assert proxy.port != pebble.port

    c = _client(proxy)
    assert c.net.account is not None
    assert c.net.account.uri.startswith(proxy.base_url + "/my-account/")
    order = _order(c, "urls.test")
    assert order.uri.startswith(proxy.base_url + "/my-order/")
    assert order.body.finalize.startswith(proxy.base_url + "/finalize-order/")
    assert order.authorizations[0].uri.startswith(proxy.base_url + "/authZ/")
    chall_urls = [ch.uri for ch in order.authorizations[0].body.challenges]
    assert chall_urls and all(u.startswith(proxy.base_url + "/chalZ/") for u in chall_urls)

    # the same request signed for pebble's own URL is refused by pebble (not by the proxy)
    direct = f"https://127.0.0.1:{pebble.port}/order-plz"
    resp = _raw_post(c, proxy, directory["newOrder"], _new_order_obj("urls.test"),
                     jws_url=direct)
    assert resp.status_code == 400, resp.text
    assert resp.json()["type"] == "urn:ietf:params:acme:error:malformed"
    assert "url" in resp.json()["detail"].lower()
    assert proxy.answered() == 0
    assert proxy.statuses("newOrder") == [201, 400]
    assert proxy.count("newAccount") == 1 and proxy.count("authz") == 1


def test_certbot_certonly_through_proxy(bot: Certbot, proxy: AcmeProxy, pebble: Pebble,
                                        webroot: Path) -> None:
    """A whole certonly (account, order, HTTP-01 against the test Apache, finalize, download)
    through the proxy, trusting only the proxy's CA: nothing went to pebble directly."""
    assert proxy.ca_bundle.read_bytes() != pebble.ca_bundle.read_bytes()
    assert proxy.ca_bundle.read_bytes().count(b"BEGIN CERTIFICATE") == 1
    bot.run("certonly", "-a", "webroot", "-w", str(webroot), "-d", "x.test", check=True)

    counts = proxy.counts()
    assert counts["newAccount"] == 1
    assert counts["newOrder"] == 1
    assert counts["challenge"] == 1
    assert counts["finalize"] == 1
    assert counts["cert"] == 1
    assert counts["authz"] >= 1 and counts["directory"] >= 1 and counts["newNonce"] >= 1
    assert set(counts) <= {"directory", "newNonce", "newAccount", "newOrder", "authz",
                           "challenge", "finalize", "order", "cert"}, counts
    assert proxy.answered() == 0
    assert proxy.forwarded() == proxy.count() == sum(counts.values())
    assert all(e.forwarded and e.status < 400 for e in proxy.log()), proxy.logs()
    chain = (bot.live("x.test") / "fullchain.pem").read_bytes()
    leaf = x509.load_pem_x509_certificate(chain)
    issuer_cn = leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert str(issuer_cn).startswith(INTERMEDIATE_CN_PREFIX)


def test_directory_injection_and_renewal_info_forwarding(pebble: Pebble) -> None:
    """``renewal_info``: the directory gets renewalInfo -> the proxy, which forwards ARI to the
    responder (faultable as kind renewalInfo); ``directory_extra`` fields are merged in."""
    with Responder(None) as responder, AcmeProxy(
            pebble, renewal_info=responder.renewal_info_url,
            directory_extra={"meta": {"profiles": {"classic": "x"}}}) as proxy:
        s = _session(proxy)
        directory = s.get(proxy.directory_url).json()
        assert directory["renewalInfo"] == proxy.renewal_info_url
        assert directory["renewalInfo"].startswith(proxy.base_url)
        assert directory["meta"] == {"profiles": {"classic": "x"}}
        assert directory["newOrder"].startswith(proxy.base_url)

        cid = cert_id_from_parts(b"\x01" * 20, 4242)
        resp = s.get(f"{directory['renewalInfo']}/{cid}")
        assert resp.status_code == 200, resp.text
        assert set(resp.json()["suggestedWindow"]) == {"start", "end"}
        assert resp.headers["Retry-After"] == "21600"
        assert responder.ari_requests == 1
        assert proxy.forwarded("renewalInfo") == 1

        proxy.storm("renewalInfo", seconds=30, retry_after=7)
        resp = s.get(f"{directory['renewalInfo']}/{cid}")
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "7"
        assert responder.ari_requests == 1  # not forwarded
        assert proxy.answered("renewalInfo") == 1
        assert proxy.count("renewalInfo") == 2


# --------------------------------------------------------------------------------------------
# rate limits


def test_rate_limit_new_order_account_wide(proxy: AcmeProxy) -> None:
    c = _client(proxy)
    proxy.rate_limit("newOrder", after=2, retry_after=60)
    _order(c, "a.test")
    _order(c, "b.test")
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    for name in ("c.test", "a.test"):
        with pytest.raises(messages.Error) as exc_info:
            _order(c, name)
        err = exc_info.value
        assert err.typ == RATE_LIMITED and err.code == "rateLimited"
        assert err.detail is not None and err.detail.startswith(NEW_ORDERS_START)
        assert err.detail.endswith("see https://letsencrypt.org/docs/rate-limits/"
                                   "#new-orders-per-account")
        retry_at = _retry_after_time(err.detail)
        assert before + datetime.timedelta(seconds=59) <= retry_at \
            <= before + datetime.timedelta(seconds=70)
    assert proxy.statuses("newOrder") == [201, 201, 429, 429]
    assert proxy.forwarded("newOrder") == 2 and proxy.answered("newOrder") == 2
    assert proxy.forwarded("authz") == 2  # the two real orders' authorizations

    # per account: another account still has its 2
    other = _client(proxy)
    _order(other, "c.test")
    assert proxy.statuses("newOrder")[-1] == 201


def test_rate_limited_answer_headers_and_nonce(proxy: AcmeProxy) -> None:
    """The 429 carries problem+json, Retry-After and a Replay-Nonce that pebble accepts."""
    c = _client(proxy)
    proxy.rate_limit("newOrder", after=0, retry_after=123, detail="custom {retry_after}!")
    url = c.directory["newOrder"]
    resp = _raw_post(c, proxy, url, _new_order_obj("h.test"))
    assert resp.status_code == 429
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.headers["Retry-After"] == "123"
    body = resp.json()
    assert body["type"] == RATE_LIMITED and body["status"] == 429
    assert re.fullmatch(r"custom \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC!", body["detail"])
    nonce = resp.headers["Replay-Nonce"]
    assert nonce
    proxy.clear()
    ok = _raw_post(c, proxy, url, _new_order_obj("h.test"), nonce=nonce)
    assert ok.status_code == 201, ok.text
    assert proxy.statuses("newOrder") == [429, 201]


def test_rate_limit_per_identifier_set(proxy: AcmeProxy) -> None:
    c = _client(proxy)
    proxy.rate_limit("newOrder", after=1, account_wide=False, retry_after=3600)
    _order(c, "a.test")
    with pytest.raises(messages.Error) as exc_info:
        _order(c, "a.test")
    assert exc_info.value.code == "rateLimited"
    assert exc_info.value.detail.startswith(EXACT_SET_START)
    _order(c, "b.test")
    _order(c, "b.test", "a.test")  # another exact set
    assert proxy.statuses("newOrder") == [201, 429, 201, 201]


def test_rate_limit_window_refills(proxy: AcmeProxy) -> None:
    c = _client(proxy)
    proxy.rate_limit("newOrder", after=1, window=1.0, retry_after=1)
    _order(c, "w.test")
    with pytest.raises(messages.Error):
        _order(c, "w.test")
    deadline = time.monotonic() + 10
    while True:
        try:
            _order(c, "w.test")
            break
        except messages.Error as e:
            assert e.code == "rateLimited"
            assert time.monotonic() < deadline, "the window never refilled"
            time.sleep(0.1)
    first_ok, *_rest, second_ok = [e for e in proxy.log("newOrder") if e.status == 201]
    assert second_ok.time - first_ok.time >= 0.95


def test_certbot_rate_limited_new_order(bot: Certbot, proxy: AcmeProxy, webroot: Path) -> None:
    proxy.rate_limit("newOrder", after=0, retry_after=3600)
    proc = _certonly(bot, webroot, "rl.test")
    _assert_certbot_shows_acme_error(bot, proc, NEW_ORDERS_START, RATE_LIMITED)
    assert "Retry-After: 3600" in bot.log_text()  # acme logs the headers at debug level
    assert proxy.statuses("newOrder") == [429]  # no retry by acme / certbot
    assert proxy.forwarded("newOrder") == 0
    assert proxy.forwarded("newAccount") == 1
    assert not bot.live("rl.test").exists()


def test_certbot_rate_limited_finalize(bot: Certbot, proxy: AcmeProxy, webroot: Path) -> None:
    proxy.rate_limit("finalize", after=0, account_wide=False, retry_after=120)
    proc = _certonly(bot, webroot, "fin.test")
    _assert_certbot_shows_acme_error(bot, proc, EXACT_SET_START, RATE_LIMITED)
    assert proxy.statuses("newOrder") == [201]
    assert proxy.statuses("challenge") == [200]
    assert proxy.statuses("finalize") == [429]
    assert proxy.count("cert") == 0
    assert not bot.live("fin.test").exists()


# --------------------------------------------------------------------------------------------
# failures, storms


def test_fail_count_and_bad_nonce_retry(proxy: AcmeProxy) -> None:
    c = _client(proxy)
    proxy.fail("newOrder", 500, count=2)
    for _ in range(2):
        with pytest.raises(messages.Error) as exc_info:
            _order(c, "f.test")
        assert exc_info.value.typ == SERVER_INTERNAL
    _order(c, "f.test")
    assert proxy.statuses("newOrder") == [500, 500, 201]
    assert proxy.answered("newOrder") == 2 and proxy.forwarded("newOrder") == 1

    # acme retries a badNonce once by itself (ClientNetwork.post), never twice
    proxy.reset_counters()
    proxy.fail("newOrder", 400, count=1, problem_type="badNonce")
    _order(c, "f.test")
    assert proxy.statuses("newOrder") == [400, 201]
    proxy.fail("newOrder", 400, count=2, problem_type="badNonce")
    with pytest.raises(messages.Error) as exc_info:
        _order(c, "f.test")
    assert exc_info.value.code == "badNonce"
    assert proxy.statuses("newOrder") == [400, 201, 400, 400]
    assert proxy.rules() == []


def test_storm_then_normal(proxy: AcmeProxy) -> None:
    """503 for every newOrder during 2 s from the first one, other kinds untouched, then
    normal service; the storm's answers carry Retry-After."""
    c = _client(proxy)
    proxy.storm("newOrder", status=503, seconds=2.0, retry_after=1)
    s = _session(proxy)
    raw = _raw_post(c, proxy, c.directory["newOrder"], _new_order_obj("s.test"))
    assert raw.status_code == 503
    assert raw.headers["Retry-After"] == "1"
    assert raw.json()["type"] == SERVER_INTERNAL
    assert raw.headers["Replay-Nonce"]
    assert s.get(proxy.directory_url).status_code == 200  # other kinds pass

    deadline = time.monotonic() + 15
    errors: List[Tuple[float, Optional[str]]] = []
    while True:
        try:
            _order(c, "s.test")
            break
        except messages.Error as e:
            errors.append((time.monotonic(), e.typ))
            assert time.monotonic() < deadline, "the storm never ended"
            time.sleep(0.1)
    assert errors and all(t == SERVER_INTERNAL for _, t in errors)
    log = proxy.log("newOrder")
    assert [e.status for e in log] == [503] * (len(log) - 1) + [201]
    assert 1.95 <= log[-1].time - log[0].time <= 6.0
    assert log[-2].time - log[0].time < 2.05
    assert proxy.forwarded("newOrder") == 1 and proxy.answered("newOrder") == len(log) - 1
    assert proxy.rules() == []


def test_storm_from_now_and_plain_body(proxy: AcmeProxy) -> None:
    s = _session(proxy)
    proxy.storm("directory", status=502, seconds=30, retry_after=None, problem=False,
                from_now=True)
    resp = s.get(proxy.directory_url)
    assert resp.status_code == 502
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert "Retry-After" not in resp.headers
    proxy.clear("directory")
    assert s.get(proxy.directory_url).status_code == 200

    proxy.storm("directory", seconds=0.3, from_now=True)
    deadline = time.monotonic() + 10
    while proxy.rules():  # expires on its own, without a request
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert s.get(proxy.directory_url).status_code == 200
    assert proxy.statuses("directory") == [502, 200, 200]


def test_certbot_storm_then_normal(bot: Certbot, proxy: AcmeProxy, webroot: Path) -> None:
    """certbot (acme) does not retry a 503: it fails at once; after the storm it works."""
    proxy.storm("newOrder", status=503, seconds=2.0, retry_after=1,
                detail="service busy, try later")
    proc = _certonly(bot, webroot, "storm.test")
    _assert_certbot_shows_acme_error(bot, proc, "service busy, try later", SERVER_INTERNAL)
    assert "Retry-After: 1" in bot.log_text()
    assert proxy.statuses("newOrder") == [503]
    deadline = time.monotonic() + 10
    while proxy.rules():
        assert time.monotonic() < deadline, "the storm never ended"
        time.sleep(0.05)
    proc = _certonly(bot, webroot, "storm.test")
    assert proc.returncode == 0, proc.stderr
    assert proxy.statuses("newOrder") == [503, 201]
    assert (bot.live("storm.test") / "fullchain.pem").exists()


# --------------------------------------------------------------------------------------------
# down / up


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_down_modes_and_up(proxy: AcmeProxy) -> None:
    s = _session(proxy)
    assert s.get(proxy.directory_url).status_code == 200  # a keep-alive connection now

    proxy.down()
    assert proxy.is_down == "refuse"
    assert _refused(proxy.port)
    with pytest.raises(requests.ConnectionError):
        s.get(proxy.directory_url)  # the open keep-alive connection was cut too
    proxy.up()
    assert proxy.is_down is None
    assert s.get(proxy.directory_url).status_code == 200  # same port again

    proxy.down("reset")
    with pytest.raises(requests.ConnectionError):
        _session(proxy).get(proxy.directory_url)
    assert proxy.dropped_connections >= 1
    proxy.up()

    proxy.reset_counters()
    proxy.down("hang", hold=30)
    # A hung connection ends by the client's own read timeout (not the proxy's 30 s hold).
    with pytest.raises(requests.ReadTimeout):
        _session(proxy).get(proxy.directory_url, timeout=(2, 0.5))
    assert proxy.wait_dropped(1, timeout=5)
    proxy.clear()  # also up()
    assert proxy.is_down is None
    assert _session(proxy).get(proxy.directory_url).status_code == 200
    assert proxy.statuses("directory") == [200]


def test_certbot_ca_down(bot: Certbot, proxy: AcmeProxy, webroot: Path) -> None:
    proxy.down()
    proc = _certonly(bot, webroot, "down.test")
    assert proc.returncode != 0
    assert "Connection refused" in proc.stderr, proc.stderr
    # certbot >= 2.x on acme 5: requests' exception verbatim; acme 2.1 rewrites it as
    # "ValueError: Requesting 127.0.0.1/dir: Connection refused"
    assert re.search(r"requests\.exceptions\.ConnectionError: .*Connection refused"
                     r"|ValueError: Requesting 127\.0\.0\.1/dir: Connection refused",
                     proc.stderr), proc.stderr
    assert proxy.count() == 0
    proxy.up()
    proc = _certonly(bot, webroot, "down.test")
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# the rule API itself


def test_rule_api_validation(proxy: AcmeProxy) -> None:
    with pytest.raises(ValueError):
        proxy.fail("nosuchkind", 500)
    with pytest.raises(ValueError):
        proxy.fail("newOrder", 500, count=0)
    with pytest.raises(ValueError):
        proxy.storm("newOrder", seconds=0)
    with pytest.raises(ValueError):
        proxy.down("sideways")
    proxy.fail("all", 500, count=None)
    s = _session(proxy)
    assert s.get(proxy.directory_url).status_code == 500
    assert s.head(proxy.directory_url.replace("/dir", "/nonce-plz")).status_code == 500
    assert proxy.classify("/nonce-plz") == "newNonce"
    assert proxy.classify("/certZ/abc") == "cert"
    assert proxy.classify("/nope") == "other"
    proxy.clear()
    assert s.get(proxy.directory_url).status_code == 200
    counts: Dict[str, int] = proxy.counts()
    assert counts == {"directory": 2, "newNonce": 1}
    assert json.loads(s.get(proxy.directory_url).content)["newNonce"].endswith("/nonce-plz")
