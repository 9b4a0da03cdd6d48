"""Issue 10: renewal at scale under the CA's limits.

Real certbot (both full flavours), real pebble, real Apache. pebble has no rate limits and
no outages: a fault-injecting reverse proxy of our own sits in front of it
(tests/bed/acmeproxy.py, a stand-in for the CA's limits); a second pebble is the fallback
CA. Unvalidatable lineages are lineages whose webroot the test Apache does not serve.
"""
from __future__ import annotations

import datetime
import json
import re
import sqlite3
import subprocess
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.bed import certs
from tests.bed.acmeproxy import LE_NEW_ORDERS_DETAIL, AcmeProxy
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA, make_farm
from tests.bed.pebble import Pebble

DAY = datetime.timedelta(days=1)


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def flat(text: str) -> str:
    return " ".join(text.split())


class Site:
    def __init__(self, flavour: str, tmp: Path, apache: Apache, pebble: Pebble) -> None:
        self.tmp = tmp
        self.apache = apache
        self.pebble = pebble
        self.proxy = AcmeProxy(pebble, base_dir=tmp / "proxy").start()
        self.bot = Certbot(flavour, tmp / "cb", self.proxy, env_extra=apache.env())
        self.bot.register()
        self.ca = FarmCA.create("CA Limits Test")

    def add(self, count: int, prefix: str, webroot: Optional[Path] = None,
            age: datetime.timedelta = 70 * DAY, **kw: object) -> list[str]:
        """Lineages due by certbot's default rule (70 of 90 days old), at the proxy."""
        return make_farm(str(self.bot.config_dir), count, ca=self.ca,
                         server=self.proxy.directory_url,
                         webroot=str(webroot or self.apache.webroot),
                         authenticator="batch-webroot", name_fmt=prefix + "{i}.test",
                         version=self.bot.version, age=age, **kw)  # type: ignore[arg-type]

    def versions(self, name: str) -> int:
        return len(list((self.bot.config_dir / "archive" / name).glob("cert*.pem")))

    def renew(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.proxy.reset_counters()
        return self.bot.run("renew", *args, timeout=400)

    def db(self) -> Path:
        return self.bot.work_dir / "certbot-batch" / "state.sqlite"

    def move_time_past_backoff(self) -> None:
        """Tests may move the stored time: the backoff of every lineage has passed (in the
        state database and in both copies of the backoff ledger, which outlives it)."""
        conn = sqlite3.connect(str(self.db()))
        try:
            with conn:
                conn.execute("UPDATE lineage SET renew_next_attempt = 1 "
                             "WHERE renew_next_attempt IS NOT NULL")
        finally:
            conn.close()
        for base in (self.bot.work_dir, self.bot.config_dir):
            ledger = base / "certbot-batch" / "backoff.log"
            if not ledger.exists():
                continue
            lines = []
            for line in ledger.read_text().splitlines():
                item = json.loads(line)
                if item.get("renew_next_attempt"):
                    item["renew_next_attempt"] = 1
                lines.append(json.dumps(item) + "\n")
            ledger.write_text("".join(lines))

    def status(self) -> tuple[int, dict[str, object]]:
        proc = subprocess.run([str(self.bot.script / "certbot-batch"), "status", "--json",
                               "--config-dir", str(self.bot.config_dir),
                               "--work-dir", str(self.bot.work_dir)],
                              capture_output=True, text=True, check=False)
        return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
def site(certbot_flavour: str, tmp_path: Path, apache: Apache, pebble: Pebble,
         request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(certbot_flavour, tmp_path, apache, pebble)
    try:
        yield s
    finally:
        rep = getattr(request.node, "bed_report_call", None)
        if rep is not None and rep.failed:
            print(f"\n===== certbot log (tail) =====\n{s.bot.log_text()[-15000:]}\n"
                  f"===== proxy =====\n{s.proxy.logs()}")
        s.proxy.cleanup()


def test_failing_lineages_back_off(site: Site, tmp_path: Path) -> None:
    good = site.add(7, "good")
    dead_root = tmp_path / "not-served"
    dead_root.mkdir()
    dead = site.add(3, "dead", webroot=dead_root)

    first = site.renew()
    text = out(first)
    assert first.returncode != 0, text
    assert site.proxy.count("newOrder") == 10
    assert all(site.versions(n) == 2 for n in good), text
    assert all(site.versions(n) == 1 for n in dead), text
    code, status = site.status()
    assert code != 0
    rows = {r["lineage"]: r for r in status["lineages"]}  # type: ignore[union-attr]
    for name in dead:
        assert rows[name]["renew_attempts"] == 1, rows[name]
        assert rows[name]["renew_next_attempt"], rows[name]
        assert "404" in str(rows[name]["renew_last_error"]), rows[name]

    for _ in range(3):  # runs seconds apart: nothing is sent for the failing three
        again = site.renew()
        text = out(again)
        assert again.returncode == 0, text
        assert site.proxy.count("newOrder") == 0, text
        assert "backing off after failed renewals" in flat(text), text
        for name in dead:
            assert f"{name}: failing since" in text, text

    # --cert-name (the admin asking for it) bypasses the backoff.
    forced = site.renew("--cert-name", dead[0])
    assert forced.returncode != 0
    assert site.proxy.count("newOrder") == 1

    site.move_time_past_backoff()
    late = site.renew()
    assert late.returncode != 0, out(late)
    assert site.proxy.count("newOrder") == 3  # exactly the three again
    code, status = site.status()
    rows = {r["lineage"]: r for r in status["lineages"]}  # type: ignore[union-attr]
    assert rows[dead[1]]["renew_attempts"] == 2, rows[dead[1]]


def test_account_wide_rate_limit_defers_the_rest(site: Site) -> None:
    # Added least urgent first: urgency, not the order of the renewal confs, must decide.
    normal = site.add(15, "rl")  # expire in 20 days
    urgent = site.add(5, "urgent", age=85 * DAY)  # expire in 5 days
    names = normal + urgent
    site.proxy.rate_limit("newOrder", after=5, retry_after=60, detail=LE_NEW_ORDERS_DETAIL,
                          account_wide=True)
    proc = site.renew()
    text = out(proc)
    assert proc.returncode != 0, text
    orders = site.proxy.count("newOrder")
    assert orders <= 7, orders  # the five that passed, the refused sixth, at most one more
    renewed = [n for n in names if site.versions(n) == 2]
    assert sorted(renewed) == sorted(urgent), (renewed, text)  # urgency first
    assert "deferred" in text and "too many new orders" in text, text
    deferred = [n for n in names if f"/live/{n}/fullchain.pem (deferred" in text]
    assert len(deferred) >= 20 - 7, text

    # The next run after the CA's Retry-After renews the rest.
    site.proxy.clear()
    quick = site.renew()
    assert site.proxy.count("newOrder") == 0, out(quick)  # still inside the Retry-After
    site.move_time_past_backoff()
    later = site.renew()
    assert later.returncode == 0, out(later)
    assert all(site.versions(n) == 2 for n in names), out(later)


def test_503_storm_on_new_order_is_waited_out(site: Site) -> None:
    names = site.add(6, "storm")
    site.proxy.storm("newOrder", status=503, seconds=2.0, retry_after=1)
    proc = site.renew()
    text = out(proc)
    assert proc.returncode == 0, text
    assert all(site.versions(n) == 2 for n in names), text
    assert 503 in site.proxy.statuses("newOrder")  # the storm did happen


def test_fallback_ca_for_certificates_about_to_expire(site: Site, apache: Apache,
                                                      tmp_path: Path) -> None:
    with Pebble(apache.http_port, base_dir=tmp_path / "fallback") as fallback:
        # An account at the fallback CA, registered the certbot way.
        other = Certbot(site.bot.flavour, site.bot.base_dir, fallback,
                        env_extra=apache.env())
        other.register()
        bundle = tmp_path / "both-cas.pem"
        bundle.write_text(site.proxy.ca_bundle.read_text() + fallback.ca_bundle.read_text())
        soon = site.add(3, "soon", age=85 * DAY)  # expire in 5 days
        later = site.add(2, "later", age=50 * DAY,
                         renew_before_expiry="60 days")  # expire in 40 days, due
        site.proxy.down()
        proc = site.bot.run("renew", "--batch-fallback-server", fallback.directory_url,
                            env_extra={"REQUESTS_CA_BUNDLE": str(bundle)}, timeout=400)
        text = out(proc)
        assert proc.returncode != 0, text  # the two that could not be renewed
        issued = fallback.pebble_log.read_text().count("Issued certificate serial")
        assert issued == 3, text
        for name in soon:
            assert site.versions(name) == 2, (name, text)
            cert = certs.load_pem_chain(site.bot.live(name) / "cert.pem")[0]
            assert "Pebble" in cert.issuer.rfc4514_string()
        for name in later:
            assert site.versions(name) == 1, (name, text)
        assert "fallback CA" in text
        for name in soon + later:
            conf = site.bot.renewal_conf(name).read_text()
            assert f"server = {site.proxy.directory_url}" in conf, conf
        code, status = site.status()
        rows = {r["lineage"]: r for r in status["lineages"]}  # type: ignore[union-attr]
        for name in soon:
            assert rows[name]["issued_by"] == fallback.directory_url, rows[name]
        for name in later:
            assert rows[name]["renew_attempts"] == 1, rows[name]


def test_new_order_unavailable_fallback_within_the_bound(site: Site, apache: Apache,
                                                         tmp_path: Path) -> None:
    """new-order answered 503 Retry-After 60 for good, after two orders went through
    (issue 16, items 8/10). The pause is per endpoint: the two orders already made are
    validated, finalized and downloaded from the primary CA. new-order is unavailable for the
    rest of the run once its refusals would outlast pacing.UNAVAILABLE_AFTER (2 minutes):
    exactly two refused new orders are sent (at 0 and 60 s; the next would come at the
    bound), every later lineage fails at once without a request, the ones expiring soon
    are renewed from the fallback CA in the same run, the others are deferred with the
    CA's Retry-After (not a failed validation) and the run exits non-zero saying so."""
    with Pebble(apache.http_port, base_dir=tmp_path / "fallback") as fallback:
        other = Certbot(site.bot.flavour, site.bot.base_dir, fallback, env_extra=apache.env())
        other.register()
        bundle = tmp_path / "both-cas.pem"
        bundle.write_text(site.proxy.ca_bundle.read_text() + fallback.ca_bundle.read_text())
        # Urgency order: first (3 days left), soon (5 days), later (40 days, due by its conf).
        later = site.add(3, "later", age=50 * DAY, renew_before_expiry="60 days")
        soon = site.add(2, "soon", age=85 * DAY)
        first = site.add(2, "first", age=87 * DAY)
        site.proxy.rate_limit("newOrder", after=2, retry_after=60, status=503,
                              problem_type="serverInternal", account_wide=True,
                              detail="service unavailable (injected)")
        site.proxy.reset_counters()
        proc = site.bot.run("renew", "--batch-fallback-server", fallback.directory_url,
                            env_extra={"REQUESTS_CA_BUNDLE": str(bundle)}, timeout=600)
        text = out(proc)
        assert proc.returncode != 0, text
        assert "Traceback" not in text
        # Two orders passed; exactly two refused ones were sent; nothing after that.
        assert site.proxy.forwarded("newOrder") == 2, site.proxy.logs()
        assert site.proxy.answered("newOrder") == 2, site.proxy.logs()
        assert site.proxy.statuses("newOrder").count(503) == 2
        assert "has refused its new-order requests" in flat(text), text
        # The orders already made: renewed from the primary CA (pebble behind the proxy).
        primary = {int(s, 16) for s in re.findall(r"Issued certificate serial ([0-9a-f]+) ",
                                                    site.pebble.pebble_log.read_text())}
        backup = {int(s, 16) for s in re.findall(r"Issued certificate serial ([0-9a-f]+) ",
                                                   fallback.pebble_log.read_text())}
        assert len(primary) == 2 and len(backup) == 2, text
        for name in first:
            assert site.versions(name) == 2, (name, text)
            assert _serial(site, name) in primary
        # Expiring soon: renewed from the fallback CA in the same run.
        for name in soon:
            assert site.versions(name) == 2, (name, text)
            assert _serial(site, name) in backup
        assert "renewed from the fallback CA" in flat(text), text
        # The others: deferred, stated, backing off with the CA's Retry-After, not counted.
        assert "3 renewal(s) deferred" in flat(text), text
        code, status = site.status()
        rows = {r["lineage"]: r for r in status["lineages"]}  # type: ignore[union-attr]
        for name in later:
            assert site.versions(name) == 1, (name, text)
            assert f"/live/{name}/fullchain.pem (deferred" in text, text
            assert rows[name]["renew_attempts"] == 0, rows[name]
            assert rows[name]["renew_next_attempt"], rows[name]
            assert "unavailable" in str(rows[name]["renew_last_error"]), rows[name]

        # The next run, seconds later, sends no new order: they back off.
        site.proxy.clear()
        again = site.renew("--batch-fallback-server", fallback.directory_url)
        assert site.proxy.count("newOrder") == 0, out(again)


def _serial(site: Site, name: str) -> int:
    return certs.load_pem_chain(site.bot.live(name) / "cert.pem")[0].serial_number
