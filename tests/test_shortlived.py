"""Certificates of a few seconds' lifetime, renewed by frequent timer runs (issue 19).

Real certbot (both full flavours) renews from a real pebble whose every certificate lives
``LIFETIME`` seconds (its ``certificateValidityPeriod``), through our ACME proxy, whose
directory names our responder's ``renewalInfo``: the responder steers the ARI windows (the
second and third quarter of each certificate's life, as the test registers each new
certificate), and answers 404 for one lineage, which the lifetime rule (1/2 of the lifetime
under 10 days) renews instead. Runs go back to back, as a frequent timer would start them,
for several lifetimes (time passes for real). Checked:

* every run exits 0;
* no certificate ever expires: each new certificate exists before the one it replaces
  expires, and after every run every lineage's certificate is valid;
* none is renewed before its window opens (ARI), or before the lifetime rule's time less the
  lookahead to the next run that the run itself used (the runs table);
* none more often than its window calls for: each certificate is replaced once, and a
  lineage is renewed about once per lifetime;
* pebble's orders (new orders that reached it) equal the certificates saved.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
from cryptography import x509

from certbot_batch.scan import ocsp
from tests.bed import farm
from tests.bed.acmeproxy import AcmeProxy
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA
from tests.bed.pebble import Pebble
from tests.bed.responder import Responder, cert_id

UTC = datetime.timezone.utc
#: Every certificate's lifetime, seconds: pebble's and the farm's first ones.
LIFETIME = 40
#: How long the runs go on: several lifetimes.
DURATION = 4 * LIFETIME


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


@dataclasses.dataclass
class Cert:
    serial: int
    not_before: float
    not_after: float
    cert_id: str
    #: the ARI window the responder answers for it (None: 404, the lifetime rule decides)
    window: Optional[tuple[float, float]]


def _cert(c: x509.Certificate, with_ari: bool) -> Cert:
    nb = ocsp.not_valid_before(c).timestamp()  # any cryptography version
    na = ocsp.not_valid_after(c).timestamp()
    life = na - nb
    # Whole seconds: the responder's RFC 3339 times have no fraction.
    window = (float(math.ceil(nb + life / 2)), float(math.floor(nb + life * 3 / 4))) \
        if with_ari else None
    return Cert(c.serial_number, nb, na, cert_id(c), window)


class Site:
    def __init__(self, flavour: str, tmp: Path, apache: Apache) -> None:
        self.pebble = Pebble(http_port=apache.http_port, base_dir=tmp / "pebble",
                             validity_period=LIFETIME)
        self.pebble.start()
        self.ca = FarmCA.create("Short-lived Test")
        #: certID -> the certificate it names (the responder's windows come from here)
        self.known: dict[str, Cert] = {}
        self.responder = Responder(self.ca, policy=self._window).start()
        self.proxy = AcmeProxy(self.pebble, renewal_info=self.responder.renewal_info_url,
                               base_dir=tmp / "proxy").start()
        self.bot = Certbot(flavour, tmp / "cb", self.proxy, env_extra=apache.env())
        self.bot.register()
        self.apache = apache

    def _window(self, cid: str) -> Optional[tuple[datetime.datetime, datetime.datetime]]:
        cert = self.known.get(cid)
        if cert is None or cert.window is None:
            return None  # 404: no ARI for it
        start, end = cert.window
        return (datetime.datetime.fromtimestamp(start, UTC),
                datetime.datetime.fromtimestamp(end, UTC))

    def current(self, name: str, with_ari: bool) -> Cert:
        cert = _cert(farm.load_lineage_cert(str(self.bot.config_dir), name), with_ari)
        self.known.setdefault(cert.cert_id, cert)
        return self.known[cert.cert_id]

    def last_run(self) -> tuple[float, Optional[float]]:
        """(scan time, the lookahead interval it used) of the newest row of the runs table."""
        conn = sqlite3.connect(str(self.bot.work_dir / "certbot-batch" / "state.sqlite"))
        try:
            row = conn.execute("SELECT started, interval FROM runs ORDER BY rowid DESC "
                               "LIMIT 1").fetchone()
        finally:
            conn.close()
        return float(row[0]), (float(row[1]) if row[1] is not None else None)

    def cleanup(self) -> None:
        self.proxy.cleanup()
        self.responder.stop()
        self.pebble.cleanup()


@pytest.fixture
def site(certbot_flavour: str, tmp_path: Path, apache: Apache,
         request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(certbot_flavour, tmp_path, apache)
    try:
        yield s
    finally:
        rep = getattr(request.node, "bed_report_call", None)
        if rep is not None and rep.failed:
            print(f"\n===== certbot log (tail) =====\n{s.bot.log_text()[-15000:]}\n"
                  f"===== proxy =====\n{s.proxy.logs()[-5000:]}")
        s.cleanup()


def test_frequent_runs_keep_short_lived_certificates_valid(site: Site) -> None:
    bot = site.bot
    ari_names = farm.make_farm(str(bot.config_dir), 2, ca=site.ca,
                               server=site.proxy.directory_url,
                               webroot=str(site.apache.webroot),
                               authenticator="batch-webroot", name_fmt="ari{i}.test",
                               version=bot.version, lifetime=datetime.timedelta(
                                   seconds=LIFETIME), age=datetime.timedelta(0))
    [plain] = farm.make_farm(str(bot.config_dir), 1, ca=site.ca,
                             server=site.proxy.directory_url,
                             webroot=str(site.apache.webroot), authenticator="batch-webroot",
                             name_fmt="plain{i}.test", version=bot.version,
                             lifetime=datetime.timedelta(seconds=LIFETIME),
                             age=datetime.timedelta(0))
    names = ari_names + [plain]
    with_ari = {n: n != plain for n in names}
    current = {n: site.current(n, with_ari[n]) for n in names}
    renewals: dict[str, list[tuple[Cert, Cert, float, Optional[float]]]] = {n: [] for n in names}
    site.proxy.reset_counters()
    started = time.time()
    runs = 0
    while time.time() < started + DURATION:
        proc = bot.run("renew", timeout=120)
        runs += 1
        ended = time.time()
        text = out(proc)
        assert proc.returncode == 0, text
        assert "Traceback" not in text
        scanned, interval = site.last_run()
        for name in names:
            now_cert = site.current(name, with_ari[name])
            old = current[name]
            if now_cert.serial != old.serial:
                renewals[name].append((old, now_cert, scanned, interval))
                current[name] = now_cert
            # After every run, every lineage's certificate is valid.
            assert current[name].not_after > ended, (name, runs, text)
    assert runs >= 10  # frequent runs, several lifetimes

    saved = 0
    for name in names:
        history = renewals[name]
        # Renewed about once per lifetime: kept alive, not more often than its window.
        assert DURATION / LIFETIME - 1 <= len(history) <= 2 * DURATION / LIFETIME, \
            (name, len(history))
        seen = [old.serial for old, _, _, _ in history]
        assert len(seen) == len(set(seen))  # each certificate replaced once
        for old, new, scan_time, interval in history:
            # No gap: the new certificate was issued before the old one expired.
            assert new.not_before <= old.not_after, (name, old, new)
            if old.window is not None:
                assert scan_time >= old.window[0], (name, old, scan_time)  # window open
            else:
                rule = old.not_before + (old.not_after - old.not_before) / 2
                assert scan_time >= rule - (interval or 0.0) - 1, (name, old, scan_time)
        saved += len(history)
    # pebble's orders equal the certificates saved (the proxy counts what reached pebble).
    assert site.proxy.forwarded("newOrder") == saved
    assert site.proxy.forwarded("finalize") == saved
