"""End to end: ``certbot renew`` through the real certbot (PyPI 5.x and Debian 2.1), with and
without the certbot-batch renewal session.

The lineages' ACME server is our responder, serving pebble's directory with ``renewalInfo``
pointing at itself: certbot orders from the real pebble (HTTP-01 answered by the test
Apache from the saved webroot), and the session asks the responder for ARI windows.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import requests

from tests.bed import farm, hiding
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA
from tests.bed.pebble import Pebble
from tests.bed.responder import Responder

DAY = datetime.timedelta(days=1)
PAST = (-2 * DAY, -1 * DAY)


@dataclasses.dataclass
class AcmeVia:
    """What Certbot needs of an ACME server: its directory URL and the CA bundle for TLS."""
    directory_url: str
    ca_bundle: Path


@pytest.fixture(scope="module")
def ca() -> FarmCA:
    return FarmCA.create("Session E2E Test")


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def flat(text: str) -> str:
    return " ".join(text.split())


def versions(bot: Certbot, name: str) -> int:
    return len(list((bot.config_dir / "archive" / name).glob("cert*.pem")))


def state_db(bot: Certbot) -> Path:
    return bot.work_dir / "certbot-batch" / "state.sqlite"


def account_id(bot: Certbot) -> str:
    ids = [p.parent.name for p in (bot.config_dir / "accounts").rglob("regr.json")]
    assert len(ids) == 1, ids
    return ids[0]


# -- (a) not engaged: stock certbot --------------------------------------------------------

def _normalized(proc: subprocess.CompletedProcess[str], bot: Certbot,
                account: str) -> tuple[int, str, str]:
    def norm(text: str) -> str:
        return text.replace(str(bot.base_dir), "<BASE>").replace(account, "<ACCOUNT>")
    return proc.returncode, norm(proc.stdout), norm(proc.stderr)


def _conf_snapshot(bot: Certbot, account: str) -> dict[str, str]:
    """Renewal confs after a run, timestamps (certbot's ari_retry_after) masked."""
    out = {}
    for conf in sorted((bot.config_dir / "renewal").glob("*.conf")):
        text = conf.read_text(errors="replace").replace(str(bot.base_dir), "<BASE>")
        text = text.replace(account, "<ACCOUNT>")
        out[conf.name] = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", "<TIME>", text)
    return out


@pytest.mark.versions
def test_not_engaged_is_stock(certbot_flavour: str, tmp_path: Path, ca: FarmCA,
                              apache: Apache, pebble: Pebble) -> None:
    """Without a batch plugin or --batch-engine, ``certbot renew`` with certbot-batch installed
    is the certbot of before: same decisions, same output (every line), same exit code, same
    ARI requests, same renewals and renewal conf updates as the same certbot with certbot-batch
    invisible, on twin farms (same names, dates, ARI windows)."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    directory = requests.get(pebble.directory_url, verify=str(pebble.ca_bundle),
                             timeout=10).json()
    runs: dict[str, Any] = {}
    with Responder(ca, acme_directory=directory) as responder:
        via = AcmeVia(responder.directory_url, pebble.ca_bundle)
        ours = Certbot(certbot_flavour, tmp_path / "ours", via, env_extra=apache.env())
        stock = Certbot(certbot_flavour, tmp_path / "stock", via, env_extra=apache.env())
        hidden = hiding.without_certbot_batch(stock.python, tmp_path / "mirror")
        probe = [str(stock.python), "-c"]
        seen = subprocess.run(probe + [hiding.VISIBLE_PROBE], capture_output=True, text=True,
                              check=True, env=stock.env())
        assert seen.stdout.split() == ["True", "True"], seen  # installed: hiding matters
        unseen = subprocess.run(probe + [hiding.prelude(hidden) + hiding.VISIBLE_PROBE],
                                capture_output=True, text=True, check=True, env=stock.env())
        assert unseen.stdout.split() == ["False", "False"], unseen

        for label, bot in (("ours", ours), ("stock", stock)):
            bot.register()
            account = account_id(bot)
            config_dir = str(bot.config_dir)
            common: dict[str, Any] = dict(ca=ca, server=responder.directory_url, now=now,
                                          webroot=str(apache.webroot), account=account)
            idle = farm.make_farm(config_dir, 3, name_fmt="idle{i}.test", **common)
            # Due by its ARI window (certbot >= 4.1) / not due by the default rule (2.1).
            [by_ari] = farm.make_farm(config_dir, 1, name_fmt="byari{i}.test", **common)
            responder.set_window(farm.load_lineage_cert(config_dir, by_ari), *PAST)
            # Due by the default rule (2.1) / not due by its ARI window (>= 4.1).
            [old] = farm.make_farm(config_dir, 1, name_fmt="old{i}.test", age=70, **common)
            # autorenew off: never due; a broken conf: a parse failure.
            [manual] = farm.make_farm(config_dir, 1, name_fmt="manual{i}.test", age=80,
                                      autorenew=False, **common)
            [broken] = farm.make_farm(config_dir, 1, name_fmt="broken{i}.test", **common)
            bot.renewal_conf(broken).write_text("[renewalparams\nnot = configobj = at all\n")
            responder.reset_counters()
            cmd = bot.command("renew")
            if label == "stock":
                cmd[2] = hiding.prelude(hidden) + cmd[2]
            env = bot.env()
            env.pop("CERTBOT_PLUGIN_PATH", None)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  cwd=bot.base_dir, timeout=240, check=False)
            runs[label] = (_normalized(proc, bot, account), responder.ari_requests,
                           _conf_snapshot(bot, account),
                           {n: versions(bot, n) for n in idle + [by_ari, old, manual]})

    (code, stdout, stderr), ari_requests, _, renewed = runs["ours"]
    assert runs["ours"] == runs["stock"], (runs["ours"], runs["stock"])
    # ... and that stock behaviour is the expected one.
    text = stdout + stderr
    due = by_ari if ours.has_stock_ari else old
    assert renewed == {n: 2 if n == due else 1 for n in renewed}, (renewed, text)
    assert code == 1, text  # the parse failure
    assert "Traceback" not in text
    assert "certbot-batch" not in text
    assert text.count("Certificate not yet due for renewal") == 5, text
    assert "The following certificates are not due for renewal yet:" in text
    skipped = re.findall(r"^\s+\S+/live/(\S+)/fullchain\.pem expires on \S+ \(skipped\)$",
                         text, re.MULTILINE)
    assert sorted(skipped) == sorted(set(renewed) - {due}), text
    assert f"/live/{due}/fullchain.pem (success)" in text, text
    assert "0 renew failure(s), 1 parse failure(s)" in text, text
    # Stock certbot >= 4.1 asks the CA for ARI once per autorenewing lineage; older: no ARI.
    assert ari_requests == (5 if ours.has_stock_ari else 0)
    assert not (ours.work_dir / "certbot-batch").exists()
    assert "certbot-batch renewal session" not in ours.log_text()


# -- (b) .. (e) engaged ----------------------------------------------------------------------

class Site:
    """pebble + Apache + a responder serving pebble's directory with ARI, a registered
    certbot, and a farm of webroot lineages pointing at that account and server."""

    def __init__(self, flavour: str, tmp: Path, ca: FarmCA, apache: Apache,
                 pebble: Pebble) -> None:
        self.ca = ca
        self.apache = apache
        directory = requests.get(pebble.directory_url, verify=str(pebble.ca_bundle),
                                 timeout=10).json()
        self.responder = Responder(ca, acme_directory=directory).start()
        self.bot = Certbot(flavour, tmp / "cb",
                           AcmeVia(self.responder.directory_url, pebble.ca_bundle),
                           env_extra=apache.env())
        self.bot.register()
        self.account = account_id(self.bot)

    def add(self, count: int, prefix: str, webroot: Optional[Path] = None) -> list[str]:
        return farm.make_farm(str(self.bot.config_dir), count, ca=self.ca,
                              server=self.responder.directory_url,
                              webroot=str(webroot or self.apache.webroot),
                              account=self.account, name_fmt=prefix + "{i}.test")

    def make_due(self, names: list[str]) -> None:
        for name in names:
            self.responder.set_window(farm.load_lineage_cert(str(self.bot.config_dir), name),
                                      *PAST)

    def renew(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.bot.run("renew", "--batch-engine", *args)


@pytest.fixture
def site(certbot_flavour: str, tmp_path: Path, ca: FarmCA, apache: Apache,
         pebble: Pebble, request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(certbot_flavour, tmp_path, ca, apache, pebble)
    try:
        yield s
    finally:
        s.responder.stop()
        rep = getattr(request.node, "bed_report_call", None)
        if rep is not None and rep.failed:
            print(f"\n===== certbot {certbot_flavour} letsencrypt.log (tail) =====\n"
                  f"{s.bot.log_text()[-20000:]}")


@pytest.mark.versions
def test_engaged_renews_exactly_the_due(site: Site) -> None:
    bot = site.bot
    due = site.add(2, "due")
    idle = site.add(22, "idle")
    site.make_due(due)

    # (d) --cert-name of a lineage that is not due: nothing is renewed.
    proc = site.renew("--cert-name", idle[0])
    text = out(proc)
    assert proc.returncode == 0, text
    assert "certbot-batch: checked 1 lineage(s)" in text, text
    assert "No renewals were attempted." in text, text
    # certbot's own summary names it once (the session does not list it a second time),
    # and the session says why it is not due.
    assert len(re.findall(rf"live/{re.escape(idle[0])}/fullchain\.pem expires on .*"
                          r"\(skipped\)$", text, re.MULTILINE)) == 1, text
    assert re.search(r"Certificate not yet due for renewal \(not due until .*\(ARI\)\)",
                     text), text
    assert site.responder.ari_requests == 1  # only that lineage was scanned
    assert all(versions(bot, n) == 1 for n in due + idle)

    # (b) the whole farm: exactly the due lineages are renewed against pebble.
    proc = site.renew()
    text = out(proc)
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    assert f"checked {len(due) + len(idle)} lineage(s)" in text
    assert f"{len(due)} due, {len(idle)} not due, 0 unreadable" in text
    for name in due:
        assert versions(bot, name) == 2, name
        assert f"/live/{name}/fullchain.pem (success)" in text, text
    for name in idle:
        assert versions(bot, name) == 1, name
        assert f"live/{name}/" not in text  # condensed: > 20 not due lineages
    assert "Congratulations, all renewals succeeded" in flat(text), text
    assert (f"{len(idle)} certificates are not due for renewal yet (the earliest to expire "
            f"is") in flat(text), text
    assert "certbot-batch status" in text
    assert "renew failure" not in text and "(failure)" not in text
    # The renewed certs come from pebble, not from the farm CA.
    new = farm.load_lineage_cert(str(bot.config_dir), due[0])
    assert "Pebble" in new.issuer.rfc4514_string() or "pebble" in \
        new.issuer.rfc4514_string().lower(), new.issuer
    # The state records the renewal and the next run is warm: no ARI request.
    site.responder.reset_counters()
    proc = site.renew("-q")
    assert proc.returncode == 0, out(proc)
    assert out(proc) == ""  # nothing due, -q: silent (no progress, no summary)
    assert all(versions(bot, n) == 2 for n in due)
    # The renewed lineages' new certs are asked about (new serials), the others are not.
    assert site.responder.ari_requests == len(due), site.responder.ari_requests_by_cert_id()

    # Stock certbot (no batch option: the session stays out) renews one lineage behind the
    # state's back; the next session run sees the new certificate and asks about it alone.
    victim = idle[1]
    old_serial = farm.load_lineage_cert(str(bot.config_dir), victim).serial_number
    proc = bot.run("renew", "--force-renewal", "--cert-name", victim)
    assert proc.returncode == 0, out(proc)
    assert "certbot-batch" not in out(proc)
    new_cert = farm.load_lineage_cert(str(bot.config_dir), victim)
    assert versions(bot, victim) == 2 and new_cert.serial_number != old_serial
    site.responder.reset_counters()
    proc = site.renew()
    assert proc.returncode == 0, out(proc)
    assert site.responder.ari_requests == 1, site.responder.ari_requests_by_cert_id()
    assert site.responder.ari_requests_for(new_cert) == 1
    conn = sqlite3.connect(str(state_db(bot)))
    try:
        [(serial,)] = conn.execute("SELECT serial FROM lineage WHERE name=?", (victim,))
    finally:
        conn.close()
    assert serial == format(new_cert.serial_number, "x")


def test_engaged_failure_is_named_others_renewed(site: Site, tmp_path: Path) -> None:
    bot = site.bot
    good = site.add(2, "good")
    gone_root = tmp_path / "gone-webroot"
    gone_root.mkdir()
    [bad] = site.add(1, "bad", webroot=gone_root)
    idle = site.add(2, "idle")
    site.make_due(good + [bad])
    shutil.rmtree(gone_root)  # the saved webroot of `bad` no longer exists

    proc = site.renew()
    text = out(proc)
    assert proc.returncode != 0, text
    assert "Traceback" not in text
    for name in good:
        assert versions(bot, name) == 2, (name, text)
        assert f"/live/{name}/fullchain.pem (success)" in text, text
    assert versions(bot, bad) == 1
    assert f"/live/{bad}/fullchain.pem (failure)" in text, text
    assert "1 renew failure(s), 0 parse failure(s)" in text, text
    for name in idle:
        assert versions(bot, name) == 1
        # Few not-due lineages: listed in certbot's own summary format, not condensed.
        assert re.search(rf"^\s+\S+/live/{re.escape(name)}/fullchain\.pem expires on "
                         r"\d{4}-\d\d-\d\d \(skipped\)$", text, re.MULTILINE), text


def test_two_runs_at_once(site: Site) -> None:
    bot = site.bot
    names = site.add(4, "race")
    site.make_due(names[:1])
    site.responder.set_latency(0.5, kind="ari")  # keep the first run busy holding the lock
    cmd = bot.command("renew", "--batch-engine")
    env = bot.env()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=bot.base_dir) for _ in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        results.append((p.returncode, stdout + stderr))
    for code, text in results:
        assert "Traceback" not in text, text
        if code != 0:  # the loser fails cleanly on certbot's lock
            assert "Another instance of Certbot is already running" in text, text
    assert any(code == 0 for code, _ in results), results
    assert versions(bot, names[0]) == 2  # renewed exactly once
    assert all(versions(bot, n) == 1 for n in names[1:])
    conn = sqlite3.connect(str(state_db(bot)))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = dict(conn.execute("SELECT name, reason FROM lineage").fetchall())
    finally:
        conn.close()
    assert sorted(rows) == sorted(names)
    status = subprocess.run(
        [sys.executable, "-m", "certbot_batch.cli", "status", "--json",
         "--config-dir", str(bot.config_dir), "--work-dir", str(bot.work_dir)],
        capture_output=True, text=True, check=False)
    doc = json.loads(status.stdout)
    assert sorted(r["lineage"] for r in doc["lineages"]) == sorted(names)


def test_orders_inside_the_ari_window_send_replaces(site: Site) -> None:
    """RFC 9773 section 5: a renewal inside the certificate's ARI window names the certificate
    it replaces (the rate-limit exemption); one outside its window (forced) does not.
    Pebble 2.4 ignores the field, so the payload in certbot's debug log is what we check."""
    bot = site.bot
    in_window = site.add(2, "win")
    forced = site.add(1, "forced")
    site.make_due(in_window)
    ids = farm.lineage_cert_ids(str(bot.config_dir))
    proc = site.bot.run("renew", "-a", "batch-webroot")
    text = out(proc)
    assert proc.returncode == 0, text
    log = bot.log_text()
    for name in in_window:
        assert versions(bot, name) == 2, name
        assert re.search(rf'"replaces":\s*"{re.escape(ids[name])}"', log), name
    assert versions(bot, forced[0]) == 1
    proc = site.bot.run("renew", "-a", "batch-webroot", "--force-renewal",
                        "--cert-name", forced[0])
    assert proc.returncode == 0, out(proc)
    assert versions(bot, forced[0]) == 2
    assert not re.search(rf'"replaces":\s*"{re.escape(ids[forced[0]])}"', bot.log_text())


# -- revocation seen as soon as stock sees it (issue 19 item 5) --------------------------------

def run_on_a_terminal(bot: Certbot, *args: str,
                      timeout: float = 240.0) -> tuple[int, str]:
    """``certbot ARGS`` with stdin, stdout and stderr on a pseudo-terminal, as an
    administrator who logged in and typed it (a real certbot process; no flag tells it)."""
    import os
    import pty
    import select
    import time as _time

    master, slave = pty.openpty()
    proc = subprocess.Popen(bot.command(*args), stdin=slave, stdout=slave, stderr=slave,
                            env=bot.env(), cwd=bot.base_dir, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = _time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline -
                                                               _time.monotonic()))
            if not ready:
                proc.kill()
                raise AssertionError(f"certbot on a terminal did not finish within "
                                     f"{timeout} s:\n" + b"".join(chunks).decode(
                                         errors="replace"))
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_revocation_seen_by_the_next_interactive_renew(site: Site) -> None:
    """After the CA revokes (OCSP says revoked, or the ARI window moves into the past), the
    next `certbot renew` typed at a terminal renews those lineages, as stock does: it asks
    OCSP and ARI afresh. A timer run (no terminal) keeps the stored answers within their
    bounds (ARI: the CA's Retry-After; OCSP: 6 h) and renews nothing."""
    bot = site.bot
    resp = site.responder
    names = farm.make_farm(str(bot.config_dir), 3, ca=site.ca, server=resp.directory_url,
                           webroot=str(site.apache.webroot), account=site.account,
                           ocsp_url=resp.ocsp_url, name_fmt="rev{i}.test")
    revoked, moved, fine = names
    certs = {n: farm.load_lineage_cert(str(bot.config_dir), n) for n in names}
    for name in names:
        resp.set_window(certs[name], 30 * DAY, 31 * DAY)
    proc = site.renew()
    assert proc.returncode == 0, out(proc)
    assert "0 due" in out(proc)

    resp.set_ocsp_status(certs[revoked], "revoked")
    resp.set_window(certs[moved], *PAST)
    resp.reset_counters()
    proc = site.renew()  # a timer run: stdin is not a terminal
    text = out(proc)
    assert proc.returncode == 0, text
    assert "(0 ARI, 0 OCSP request(s)): 0 due" in flat(text), text
    assert all(versions(bot, n) == 1 for n in names)

    code, text = run_on_a_terminal(bot, "renew", "--batch-engine")
    assert code == 0, text
    assert "Traceback" not in text
    assert "(3 ARI, 3 OCSP request(s)): 2 due" in flat(text), text
    assert versions(bot, revoked) == 2 and versions(bot, moved) == 2, text
    assert versions(bot, fine) == 1
    assert resp.ocsp_requests == 3

    # The opt-out: the stored answers, as a timer run (only the two new certificates, which
    # nothing is known about yet, are asked ARI; pebble's carry no OCSP URL).
    resp.reset_counters()
    code, text = run_on_a_terminal(bot, "renew", "--batch-engine", "--batch-cached-status")
    assert code == 0, text
    assert "(2 ARI, 0 OCSP request(s)): 0 due" in flat(text), text
    assert resp.ari_requests_for(certs[fine]) == 0


def test_timer_run_sees_a_revocation_once_the_ocsp_bound_passed(site: Site) -> None:
    """A CA that answers OCSP and no ARI for this lineage (404): the timer run believes a
    stored "good" for at most 6 h; once that has passed (the stored time is moved back, as
    6 h of waiting would), the next timer run asks again and renews the revoked lineage."""
    bot = site.bot
    resp = site.responder
    [name] = farm.make_farm(str(bot.config_dir), 1, ca=site.ca, server=resp.directory_url,
                            webroot=str(site.apache.webroot), account=site.account,
                            ocsp_url=resp.ocsp_url, name_fmt="ocsp{i}.test")
    cert = farm.load_lineage_cert(str(bot.config_dir), name)
    resp.set_fault("http404", key=cert)  # no ARI answer for it: OCSP decides
    proc = site.renew()
    assert proc.returncode == 0 and "0 due" in out(proc), out(proc)
    conn = sqlite3.connect(str(state_db(bot)))
    try:
        (status, ocsp_next, scanned), = conn.execute(
            "SELECT ocsp_status, ocsp_next, last_scan FROM lineage WHERE name=?", (name,))
    finally:
        conn.close()
    assert status == "good" and ocsp_next <= scanned + 6 * 3600 + 1  # the stated bound
    resp.set_ocsp_status(cert, "revoked")
    proc = site.renew()  # within the bound: the stored answer holds
    assert proc.returncode == 0 and "0 due" in out(proc) and versions(bot, name) == 1
    conn = sqlite3.connect(str(state_db(bot)))
    try:
        with conn:
            conn.execute("UPDATE lineage SET ocsp_next = ? WHERE name=?", (1.0, name))
    finally:
        conn.close()
    proc = site.renew()
    text = out(proc)
    assert proc.returncode == 0, text
    assert "1 OCSP request(s)): 1 due" in flat(text), text
    assert versions(bot, name) == 2
