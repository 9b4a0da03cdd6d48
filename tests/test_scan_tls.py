"""Issue 16, item 9/11: the status scan honours certbot's TLS options.

certbot's own ACME and ARI requests (acme's ``ClientNetwork``) verify TLS certificates
unless ``--no-verify-ssl`` is given, with requests' CA bundle rules (``REQUESTS_CA_BUNDLE``,
then ``CURL_CA_BUNDLE``, a file or a c_rehash'd directory). The scan's ARI and OCSP requests
must do the same, through both of their transports: requests, and the urllib3 fast path of
``scan/ari.py`` (used when no proxy applies).

In-process: our responder serving ARI and OCSP over HTTPS with a certificate from its own
throw-away CA. End to end: real certbot (both full flavours), a lineage whose server is the
responder over HTTPS (pebble's directory with the responder's ``renewalInfo``).
"""
from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from urllib3.exceptions import InsecureRequestWarning

from certbot_batch.scan import ari
from certbot_batch.scan import http as scan_http
from certbot_batch.scan.engine import Scanner, ScanReport, ScanSettings
from certbot_batch.scan.state import StateDB
from tests.bed import certs, farm
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA
from tests.bed.pebble import Pebble
from tests.bed.responder import Responder

TRANSPORTS = ["urllib3", "requests"]
DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> FarmCA:
    return FarmCA.create("Scan TLS Test")


@pytest.fixture
def untrusted(tmp_path: Path) -> Path:
    """A CA bundle that does not contain the responder's CA."""
    path = tmp_path / "other-ca.pem"
    path.write_bytes(certs.make_ca("Some other CA").cert_pem())
    return path


@pytest.fixture
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The scan's urllib3 fast path, or requests (the path taken when a proxy applies)."""
    if request.param == "requests":
        monkeypatch.setattr(scan_http, "_direct_pool", lambda session, url: None)
    return str(request.param)


class TlsBed:
    """Two responders over HTTPS: one CA with ARI, one without (its lineage is checked by
    OCSP, the responder's HTTPS OCSP URL in the certificate)."""

    def __init__(self, tmp: Path, ca: FarmCA) -> None:
        self.tmp = tmp
        self.ari = Responder(ca, tls=True).start()
        self.ocsp = Responder(ca, tls=True, renewal_info=False).start()
        config = str(tmp / "config")
        [self.by_ari] = farm.make_farm(config, 1, ca=ca, server=self.ari.directory_url,
                                       name_fmt="ari{i}.test")
        [self.by_ocsp] = farm.make_farm(config, 1, ca=ca, server=self.ocsp.directory_url,
                                        ocsp_url=self.ocsp.ocsp_url, name_fmt="ocsp{i}.test")
        self.confs = sorted(str(p) for p in (tmp / "config" / "renewal").glob("*.conf"))

    def scan(self, verify_ssl: bool) -> ScanReport:
        db_path = self.tmp / "state.sqlite"
        for suffix in ("", "-wal", "-shm"):  # a cold scan each time: every request is sent
            Path(str(db_path) + suffix).unlink(missing_ok=True)
        db = StateDB(str(db_path))
        try:
            return Scanner(ScanSettings(workers=2, timeout=5.0, verify_ssl=verify_ssl),
                           db).scan(self.confs)
        finally:
            db.close()

    def close(self) -> None:
        self.ari.stop()
        self.ocsp.stop()


@pytest.fixture
def tls_bed(tmp_path: Path, ca: FarmCA) -> Iterator[TlsBed]:
    bed = TlsBed(tmp_path, ca)
    try:
        yield bed
    finally:
        bed.close()


def _bundle_env(monkeypatch: pytest.MonkeyPatch, requests_bundle: Any = None,
                curl_bundle: Any = None) -> None:
    for var, value in (("REQUESTS_CA_BUNDLE", requests_bundle),
                       ("CURL_CA_BUNDLE", curl_bundle)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(value))


def _assert_both_answered(bed: TlsBed, report: ScanReport) -> None:
    states = report.by_name()
    ari_state, ocsp_state = states[bed.by_ari], states[bed.by_ocsp]
    assert ari_state.last_error is None, ari_state.last_error
    assert ari_state.window_start is not None and "(ARI)" in ari_state.reason
    assert ocsp_state.last_error is None, ocsp_state.last_error
    assert ocsp_state.ocsp_status == "good"
    assert bed.ari.ari_requests == 1 and bed.ocsp.ocsp_requests == 1


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_no_verify_ssl_scan_asks_an_untrusted_server(tls_bed: TlsBed, untrusted: Path,
                                                     transport: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-verify-ssl (verify_ssl=False): ARI and OCSP over HTTPS from a server nobody
    trusts are answered, although REQUESTS_CA_BUNDLE names another CA (requests alone would
    let the variable override a session's verify=False), and urllib3's
    InsecureRequestWarning for those requests is not printed."""
    _bundle_env(monkeypatch, requests_bundle=untrusted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The same kind of request outside the scan still warns, as certbot's own do.
        session = requests.Session()
        session.verify = False
        reply = ari.http_exchange(session, "GET", tls_bed.ari.directory_url, timeout=5.0)
        assert reply.status == 200
        assert any(issubclass(w.category, InsecureRequestWarning) for w in caught)
        del caught[:]
        report = tls_bed.scan(verify_ssl=False)
    _assert_both_answered(tls_bed, report)
    assert not [w for w in caught if issubclass(w.category, InsecureRequestWarning)], \
        [str(w.message) for w in caught]


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
def test_untrusted_server_is_a_tls_error_by_default(tls_bed: TlsBed, untrusted: Path,
                                                   transport: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _bundle_env(monkeypatch, requests_bundle=untrusted)
    report = tls_bed.scan(verify_ssl=True)
    states = report.by_name()
    for name in (tls_bed.by_ari, tls_bed.by_ocsp):
        error = states[name].last_error or ""
        assert error.startswith("ARI: TLS error"), error
        assert "certificate verify failed" in error.lower(), error
    assert "OCSP: TLS error" in (states[tls_bed.by_ocsp].last_error or "")
    assert tls_bed.ari.ari_requests == 0 and tls_bed.ocsp.ocsp_requests == 0


@pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)
@pytest.mark.parametrize("how", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "directory"])
def test_ca_bundle_of_the_environment(tls_bed: TlsBed, untrusted: Path, transport: str,
                                      how: str, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    """The CA bundle certbot (requests) uses: REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE; a
    file or a c_rehash'd directory."""
    bundle = tls_bed.ari.ca_bundle
    assert bundle is not None and tls_bed.ocsp.ca_bundle is not None
    both = tmp_path / "both.pem"
    both.write_bytes(bundle.read_bytes() + tls_bed.ocsp.ca_bundle.read_bytes())
    if how == "REQUESTS_CA_BUNDLE":
        _bundle_env(monkeypatch, requests_bundle=both, curl_bundle=untrusted)
    elif how == "CURL_CA_BUNDLE":
        _bundle_env(monkeypatch, curl_bundle=both)
    else:
        if shutil.which("openssl") is None:
            pytest.skip("no openssl to hash a CA directory")
        cadir = tmp_path / "cadir"
        cadir.mkdir()
        shutil.copy(bundle, cadir / "ari.pem")
        shutil.copy(tls_bed.ocsp.ca_bundle, cadir / "ocsp.pem")
        subprocess.run(["openssl", "rehash", str(cadir)], check=True, capture_output=True)
        _bundle_env(monkeypatch, requests_bundle=cadir)
    _assert_both_answered(tls_bed, tls_bed.scan(verify_ssl=True))


# -- end to end --------------------------------------------------------------------------------

def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


class Site:
    """certbot whose lineages' ACME server is the responder over HTTPS (pebble's directory,
    the responder's renewalInfo), with a CA bundle that trusts pebble but not the
    responder: certbot itself needs --no-verify-ssl for that server, as in certbot's own
    integration suite against a self-signed pebble."""

    def __init__(self, flavour: str, tmp: Path, ca: FarmCA, apache: Apache,
                 pebble: Pebble) -> None:
        directory = requests.get(pebble.directory_url, verify=str(pebble.ca_bundle),
                                 timeout=10).json()
        self.responder = Responder(ca, acme_directory=directory, tls=True).start()
        assert self.responder.directory_url.startswith("https://")

        class Via:
            directory_url = self.responder.directory_url
            ca_bundle = pebble.ca_bundle  # trusts pebble only

        self.bot = Certbot(flavour, tmp / "cb", Via, env_extra=apache.env())
        self.bot.run("register", "--no-verify-ssl", check=True)
        self.names = farm.make_farm(str(self.bot.config_dir), 2, ca=ca,
                                    server=self.responder.directory_url,
                                    webroot=str(apache.webroot), name_fmt="tls{i}.test",
                                    version=self.bot.version)

    def renew(self, *args: str) -> subprocess.CompletedProcess[str]:
        db = self.bot.work_dir / "certbot-batch" / "state.sqlite"
        for suffix in ("", "-wal", "-shm"):  # cold: the scan asks ARI for every lineage
            Path(str(db) + suffix).unlink(missing_ok=True)
        self.responder.reset_counters()
        return self.bot.run("renew", *args)

    def status(self) -> dict[str, dict[str, Any]]:
        proc = subprocess.run([str(self.bot.script / "certbot-batch"), "status", "--json",
                               "--config-dir", str(self.bot.config_dir),
                               "--work-dir", str(self.bot.work_dir)],
                              capture_output=True, text=True, check=False)
        return {r["lineage"]: r for r in json.loads(proc.stdout)["lineages"]}


@pytest.fixture
def site(certbot_flavour: str, tmp_path: Path, ca: FarmCA, apache: Apache, pebble: Pebble,
         request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(certbot_flavour, tmp_path, ca, apache, pebble)
    try:
        yield s
    finally:
        s.responder.stop()
        rep = getattr(request.node, "bed_report_call", None)
        if rep is not None and rep.failed:
            print(f"\n===== letsencrypt.log (tail) =====\n{s.bot.log_text()[-15000:]}")


def test_scan_honours_no_verify_ssl(site: Site) -> None:
    names = site.names
    # Without --no-verify-ssl the scan's ARI requests fail on the TLS certificate, for
    # every lineage, and say so (as certbot's own requests to that server would fail).
    plain = site.renew("--batch-engine")
    text = out(plain)
    assert "Traceback" not in text
    assert "certbot-batch: checked 2 lineage(s)" in text, text
    assert site.responder.ari_requests == 0
    rows = site.status()
    for name in names:
        error = str(rows[name]["last_error"])
        assert error.startswith("ARI: TLS error"), rows[name]
        assert "certificate verify failed" in error.lower(), rows[name]
        assert f"Lineage {name}: ARI: TLS error" in text, text

    # With it, they are answered: no "ARI:" error, the decision is the CA's window, and
    # urllib3's warning for unverified requests is not printed for the scan's requests
    # (nothing is due: certbot itself sends no request in this run).
    insecure = site.renew("--batch-engine", "--no-verify-ssl")
    text = out(insecure)
    assert insecure.returncode == 0, text
    assert "certbot-batch: checked 2 lineage(s)" in text and "(2 ARI, 0 OCSP" in text, text
    assert site.responder.ari_requests == 2
    assert "ARI:" not in text and "InsecureRequestWarning" not in text, text
    rows = site.status()
    for name in names:
        assert rows[name]["last_error"] is None, rows[name]
        assert "(ARI)" in str(rows[name]["reason"]), rows[name]
        assert len(list((site.bot.config_dir / "archive" / name).glob("cert*.pem"))) == 1

    # A lineage due by its window is renewed through that server (certbot's own requests
    # to it with --no-verify-ssl, as stock).
    site.responder.set_window(farm.load_lineage_cert(str(site.bot.config_dir), names[0]),
                              -2 * DAY, -DAY)
    due = site.renew("--batch-engine", "--no-verify-ssl")
    assert due.returncode == 0, out(due)
    assert site.responder.ari_requests == 2
    assert len(list((site.bot.config_dir / "archive" / names[0]).glob("cert*.pem"))) == 2
    assert len(list((site.bot.config_dir / "archive" / names[1]).glob("cert*.pem"))) == 1
