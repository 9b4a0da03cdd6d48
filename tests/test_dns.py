"""Batched dns-01 (issue 11): every certbot DNS plugin (built on certbot's
``dns_common.DNSAuthenticator``) and ``--manual`` with auth/cleanup hooks, validated together
inside a renewal session: one ``perform()`` per group of lineages with the same plugin and
settings, so one propagation wait per wave instead of one per lineage.

Real certbot subprocesses (PyPI 5.x and Debian's 2.1, each with its dns-rfc2136 plugin), the
real pebble validating dns-01 against a private BIND (tests/bed/bind.py), lineages of apex +
wildcard names written by the farm.

Evidence, all read from what the servers and certbot logged during the run:

* propagation waits: certbot-dns-rfc2136 notifies ``Waiting N seconds for DNS changes to
  propagate`` once per ``perform()`` call (certbot's debug log: ``Notifying user: ...``);
* order of events: named logs every update (``adding an RR at '_acme-challenge...' TXT``) and
  every query (``query: _acme-challenge... IN TXT``: only pebble's validator asks for TXT
  records) in one log, in order, from its one worker thread (``-n 1``);
* what is left: ``bind.txt_records()`` (AXFR of the zone).
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certbot_batch.challenges.prevalidate import STOP_GRACE
from tests.bed import bind as bed_bind
from tests.bed import certbots, farm, ports
from tests.bed.apache import Apache
from tests.bed.bind import Bind
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA
from tests.bed.pebble import INTERMEDIATE_CN_PREFIX, Pebble

pytestmark = pytest.mark.bed

WAIT_LINE = re.compile(r"Notifying user: Waiting (\d+) seconds? for DNS changes to propagate")
DEACTIVATION = re.compile(r'"status":\s*"deactivated"')
ADD_LINE = re.compile(r"updating zone 'test/IN': adding an RR at '?(_acme-challenge\.[^' ]+)'? "
                      r"TXT")
TXT_QUERY = re.compile(r"query: (_acme-challenge\.\S+) IN TXT")
#: our own lines, one per group: the plugin's perform() and cleanup() called once for all
PERFORM = re.compile(r"certbot-batch: ([\w-]+): one perform\(\) for (\d+) challenge\(s\) of "
                     r"(\d+) lineage\(s\)")
CLEANUP = re.compile(r"certbot-batch: ([\w-]+): one cleanup\(\) for (\d+) challenge\(s\) of "
                     r"(\d+) lineage\(s\)")
PROPAGATION = 2


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def ca() -> FarmCA:
    return FarmCA.create("Batched dns-01 Test")


@functools.cache
def _has_rfc2136(flavour: str) -> bool:
    with tempfile.TemporaryDirectory(prefix="bed-plugins-") as base:
        proc = Certbot(flavour, Path(base), None).run("plugins", timeout=120)
    return "* dns-rfc2136" in out(proc)


class DnsBed:
    """BIND + pebble validating through it + a registered certbot of one flavour."""

    def __init__(self, flavour: str, tmp: Path, ca: FarmCA, bind: Bind, pebble: Pebble) -> None:
        self.ca = ca
        self.bind = bind
        self.pebble = pebble
        self.tmp = tmp
        self.bot = Certbot(flavour, tmp / "cb", pebble)
        self.bot.register()
        ids = [p.parent.name for p in (self.bot.config_dir / "accounts").rglob("regr.json")]
        assert len(ids) == 1, ids
        self.account = ids[0]
        self.good_ini = bind.rfc2136_ini(tmp / "good.ini")
        self._mark = 0
        self._named_mark = 0

    # -- lineages --------------------------------------------------------------------------
    def add(self, count: int, prefix: str, authenticator: str = "dns-rfc2136",
            ini: Optional[Path] = None, propagation: int = PROPAGATION,
            extra: Optional[dict[str, object]] = None,
            names_for: Optional[Callable[[int], list[str]]] = None) -> list[str]:
        """``count`` lineages ``{prefix}{i}.test`` + ``*.{prefix}{i}.test`` (or
        ``names_for(i)``) of the registered account, saved as renewed with
        ``authenticator``."""
        params: dict[str, object] = {}
        if authenticator == "dns-rfc2136":
            params = {"dns_rfc2136_credentials": str(ini or self.good_ini),
                      "dns_rfc2136_propagation_seconds": str(propagation)}
        params.update(extra or {})
        return farm.make_farm(str(self.bot.config_dir), count, ca=self.ca,
                              server=self.pebble.directory_url, account=self.account,
                              authenticator=authenticator, extra_renewalparams=params,
                              names_for=names_for or (
                                  lambda i: [f"{prefix}{i}.test", f"*.{prefix}{i}.test"]))

    def add_manual(self, count: int, prefix: str) -> list[str]:
        auth, cleanup = self.bind.manual_hook_scripts(self.tmp / "hooks")
        return self.add(count, prefix, authenticator="manual",
                        extra={"manual_auth_hook": str(auth),
                               "manual_cleanup_hook": str(cleanup),
                               "pref_challs": ["dns-01"]})

    def versions(self, name: str) -> int:
        return len(list((self.bot.config_dir / "archive" / name).glob("cert*.pem")))

    def renewed_by_pebble(self, name: str) -> bool:
        if self.versions(name) != 2:
            return False
        cert = farm.load_lineage_cert(str(self.bot.config_dir), name)
        return INTERMEDIATE_CN_PREFIX in cert.issuer.rfc4514_string()

    # -- runs ------------------------------------------------------------------------------
    def mark(self) -> None:
        self._mark = self.pebble.pebble_log.stat().st_size
        self._named_mark = len(self.bind.log_text())

    def pebble_since(self) -> str:
        with open(self.pebble.pebble_log, "rb") as fh:
            fh.seek(self._mark)
            return fh.read().decode(errors="replace")

    def named_since(self) -> str:
        return self.bind.log_text()[self._named_mark:]

    def orders(self) -> int:
        return len(re.findall(r'Added order "[^"]+" to the db', self.pebble_since()))

    def validations(self, name: str) -> int:
        """dns-01 validations pebble ran for ``name`` (apex and wildcard alike)."""
        return len(re.findall(r'Pulled a task from the Tasks queue: .*Value:"'
                              + re.escape(name) + '"', self.pebble_since()))

    def renew(self, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
        self.mark()
        return self.bot.run("renew", *args, timeout=timeout)

    def waits(self) -> list[int]:
        """The propagation waits of the last run (certbot rotates its log per run)."""
        return [int(n) for n in WAIT_LINE.findall(self.bot.log_text())]

    def journal_files(self) -> list[Path]:
        d = self.bot.work_dir / "certbot-batch"
        return sorted(d.glob("*journal*")) if d.is_dir() else []

    def adds_before_first_query(self) -> tuple[int, int]:
        """(TXT records added before pebble's first TXT lookup, added in all) in named's
        log since the mark; fails when pebble looked up no TXT record at all."""
        adds_before = adds = queries = 0
        for line in self.named_since().splitlines():
            if ADD_LINE.search(line):
                adds += 1
                if not queries:
                    adds_before += 1
            elif TXT_QUERY.search(line):
                queries += 1
        assert queries, "pebble looked up no TXT record"
        return adds_before, adds


def san_names(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(n) for n in ext.value.get_values_for_type(x509.DNSName)]


def no_deactivation(bed: DnsBed) -> bool:
    log = bed.bot.log_text()
    assert "JWS payload" in log  # acme logs what certbot sends: the check below means something
    return not DEACTIVATION.search(log)


def performs(proc: subprocess.CompletedProcess[str]) -> list[tuple[str, int, int]]:
    """(plugin, challenges, lineages) of every grouped perform() of the run, sorted."""
    return sorted((p, int(c), int(n)) for p, c, n in PERFORM.findall(out(proc)))


def cleanups(bed: DnsBed) -> list[tuple[str, int, int]]:
    return sorted((p, int(c), int(n)) for p, c, n in CLEANUP.findall(bed.bot.log_text()))


@pytest.fixture
def bind(request: pytest.FixtureRequest) -> Iterator[Bind]:
    reason = bed_bind.missing_reason()
    if reason:
        pytest.skip(reason)
    server = Bind()
    try:
        server.start()
        yield server
    finally:
        rep = getattr(request.node, "bed_report_call", None)
        if rep is not None and rep.failed:
            print(f"\n===== BIND ({server.dir}) =====\n{server.logs()}")
        server.cleanup()


@pytest.fixture
def bed(certbot_flavour: str, tmp_path: Path, ca: FarmCA, bind: Bind,
        request: pytest.FixtureRequest) -> Iterator[DnsBed]:
    if not _has_rfc2136(certbot_flavour):
        pytest.skip(f"certbot flavour {certbot_flavour!r} has no dns-rfc2136 plugin")
    # Validations delayed by 0..1 s: the lineages' validations overlap, as at a real CA.
    with Pebble(http_port=ports.free_port(), dns_server=bind.address, va_sleeptime=2,
                authz_reuse=0, base_dir=tmp_path / "pebble") as pebble:
        b = DnsBed(certbot_flavour, tmp_path, ca, bind, pebble)
        try:
            yield b
        finally:
            rep = getattr(request.node, "bed_report_call", None)
            if rep is not None and rep.failed:
                print(f"\n===== certbot {certbot_flavour} letsencrypt.log (tail) =====\n"
                      f"{b.bot.log_text()[-30000:]}\n===== pebble =====\n{pebble.logs()}")


# -- 1. K lineages (apex + wildcard), dns-rfc2136: one propagation wait ---------------------------

@pytest.mark.versions
def test_rfc2136_one_wait_for_all(bed: DnsBed) -> None:
    k = 8
    names = bed.add(k, "one")
    confs = {n: bed.bot.renewal_conf(n).read_text() for n in names}
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    # One perform() (so one sleep of the plugin) for the 2 * k challenges of all k lineages.
    assert bed.waits() == [PROPAGATION], bed.waits()
    assert performs(proc) == [("dns-rfc2136", 2 * k, k)]
    assert cleanups(bed) == [("dns-rfc2136", 2 * k, k)]
    # Every record existed before pebble looked up the first one.
    assert bed.adds_before_first_query() == (2 * k, 2 * k)
    assert bed.orders() == k
    assert no_deactivation(bed)
    for name in names:
        assert bed.renewed_by_pebble(name), name
        cert = farm.load_lineage_cert(str(bed.bot.config_dir), name)
        assert sorted(san_names(cert)) == sorted([name, f"*.{name}"]), name
        assert bed.validations(name) == 2, name  # one for the apex, one for the wildcard
        conf = bed.bot.renewal_conf(name).read_text()
        # the user's renewal conf is untouched but for what certbot itself rewrites
        for line in ("authenticator = dns-rfc2136",
                     f"dns_rfc2136_credentials = {bed.good_ini}",
                     f"dns_rfc2136_propagation_seconds = {PROPAGATION}"):
            assert line in conf and line in confs[name], (line, conf)
        assert "batch" not in conf, conf
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
    assert "Congratulations, all renewals succeeded" in text




# -- 2. a group with a wrong TSIG key fails alone --------------------------------------------------

def test_wrong_key_fails_only_its_lineages(bed: DnsBed) -> None:
    bad_ini = bed.bind.rfc2136_ini(bed.tmp / "bad.ini", key="bad")
    good = bed.add(15, "good")
    bad = bed.add(5, "bad", ini=bad_ini)
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode != 0, text
    assert "Traceback" not in proc.stderr, proc.stderr
    flat = one_line(text)
    for name in good:
        assert bed.renewed_by_pebble(name), name
        assert bed.validations(name) == 2, name
    for name in bad:
        assert bed.versions(name) == 1, name
        # named in certbot's failure summary, with the DNS server's answer
        assert f"{name}/fullchain.pem (failure)" in flat, text
        assert re.search(rf"{re.escape(name)}\S* with error: .*?Received response from "
                         r"server: REFUSED", flat), text
        # the CA was never asked to validate what could not be created
        assert bed.validations(name) == 0, name
    # The good group waited once, the bad one never got that far; the bad group was tried
    # once as a group, then each of its lineages on its own.
    assert bed.waits() == [PROPAGATION], bed.waits()
    assert performs(proc) == sorted([("dns-rfc2136", 30, 15), ("dns-rfc2136", 10, 5)]
                                    + [("dns-rfc2136", 2, 1)] * 5), performs(proc)
    assert "update 'test/IN' denied" in bed.named_since()
    assert bed.orders() == 20
    assert no_deactivation(bed)
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []


# -- 3. --manual with auth/cleanup hooks: every hook first, then the validations ------------------

def test_manual_hooks_one_validation_phase(bed: DnsBed) -> None:
    k = 20
    names = bed.add_manual(k, "man")
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    calls = bed.bind.hook_calls()
    kinds = [c.split()[0] for c in calls]
    # one hook call per challenge, as certbot makes them; all auth hooks before any cleanup
    assert kinds == ["auth"] * (2 * k) + ["cleanup"] * (2 * k), calls
    # (CERTBOT_DOMAIN of a wildcard's challenge is its base name, as in a stock run)
    assert sorted(c.split()[1] for c in calls) == sorted(names * 4), calls
    assert len({c.split()[2] for c in calls}) == 2 * k  # distinct validations
    # ... and every record existed before pebble's first lookup
    assert bed.adds_before_first_query() == (2 * k, 2 * k)
    assert performs(proc) == [("manual", 2 * k, k)]
    assert cleanups(bed) == [("manual", 2 * k, k)]
    for name in names:
        assert bed.renewed_by_pebble(name), name
        assert "authenticator = manual" in bed.bot.renewal_conf(name).read_text()
    assert bed.orders() == k
    assert no_deactivation(bed)
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
    # the hooks' variables do not outlive the run's hooks (certbot sets them process-wide)
    assert "CERTBOT_VALIDATION" not in os.environ



def test_manual_unvalidated_group_fails_once_with_the_cas_detail(bed: DnsBed) -> None:
    """A group whose auth hook creates nothing: its lineages fail with the CA's problem
    detail after exactly one validation per authorization; the other group renews."""
    good = bed.add_manual(3, "hook")
    silent = bed.tmp / "silent-hook.sh"
    silent.write_text("#!/bin/sh\nexit 0\n")
    silent.chmod(0o755)
    bad = bed.add(2, "nohook", authenticator="manual",
                  extra={"manual_auth_hook": str(silent), "pref_challs": ["dns-01"]})
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode != 0, text
    assert "Traceback" not in proc.stderr, proc.stderr
    flat = one_line(text)
    assert performs(proc) == sorted([("manual", 6, 3), ("manual", 4, 2)])
    for name in good:
        assert bed.renewed_by_pebble(name), name
    for name in bad:
        assert bed.versions(name) == 1, name
        assert f"{name}/fullchain.pem (failure)" in flat, text
        assert f"Failed to renew certificate {name} with error: " in flat, text
        # the CA's problem detail, per identifier, as certbot reports it
        assert re.search(rf"(?:Identifier|Domain): {re.escape(name)} Type: unauthorized "
                         r"Detail: No TXT records? found", flat), text
        assert bed.validations(name) == 2, name  # once per authorization, no retry
    assert no_deactivation(bed)
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []

# -- 4. groups by settings, concurrently; what cannot be batched renews in certbot's loop ---------

def test_groups_by_settings_and_unbatched_in_loop(bed: DnsBed) -> None:
    other_ini = bed.bind.rfc2136_ini(bed.tmp / "other.ini")  # same key, another file
    fast = bed.add(3, "fast")
    slow = bed.add(2, "slow", ini=other_ini, propagation=2 * PROPAGATION,
                   extra={"key_type": "rsa", "rsa_key_size": "2048"})
    # standalone joins the wave too (issue 18: its own listener, no perform() of a group)
    [alone] = farm.make_farm(str(bed.bot.config_dir), 1, ca=bed.ca,
                             server=bed.pebble.directory_url, account=bed.account,
                             authenticator="standalone", name_fmt="alone{i}.test",
                             extra_renewalparams={"http01_port": str(bed.pebble.http_port)})
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode == 0, text
    # one perform() per group (plugin + settings), both in the one wave, concurrently
    assert "certbot-batch: validating 6 lineage(s) together" in text, text
    assert performs(proc) == sorted([("dns-rfc2136", 6, 3), ("dns-rfc2136", 4, 2)])
    assert sorted(bed.waits()) == [PROPAGATION, 2 * PROPAGATION]
    assert bed.adds_before_first_query() == (10, 10)
    for name in fast + slow + [alone]:
        assert bed.renewed_by_pebble(name), name
    # every lineage's key settings were honoured
    for name in slow:
        key = farm.load_lineage_cert(str(bed.bot.config_dir), name).public_key()
        assert isinstance(key, rsa.RSAPublicKey), (name, key)
    for name in fast:
        key = farm.load_lineage_cert(str(bed.bot.config_dir), name).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey), (name, key)
    assert bed.orders() == 6
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []


def test_dropouts_do_not_hold_the_group(bed: DnsBed) -> None:
    """A lineage of the group that never gets to perform() (the CA refuses its order:
    a name with an underscore) drops out of the wave's rendezvous; the others do not wait
    for it."""
    good = bed.add(3, "stay")
    [lost] = bed.add(1, "lost_")
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode != 0, text
    flat = one_line(text)
    assert f"{lost}/fullchain.pem (failure)" in flat, text
    assert f"Failed to renew certificate {lost} with error: " in flat, text
    # the CA's answer (in certbot's log: on certbot 2.1 the terminal line is currently
    # "can't set attribute", see the report on replaces.new_order's OrderGate)
    assert "containing an illegal character" in bed.bot.log_text()
    assert performs(proc) == [("dns-rfc2136", 6, 3)]
    assert bed.waits() == [PROPAGATION]
    assert "did not reach validation in time" not in bed.bot.log_text()
    for name in good:
        assert bed.renewed_by_pebble(name), name
    assert bed.versions(lost) == 1
    assert bed.orders() == 3
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []


def test_same_wave_as_batch_webroot(certbot_flavour: str, tmp_path: Path, ca: FarmCA,
                                    bind: Bind, apache: Apache) -> None:
    """DNS lineages and batch-webroot lineages in one wave: both kinds meet at the wave's
    barrier (the DNS ones with no file), neither waits for the other's validation."""
    if not _has_rfc2136(certbot_flavour):
        pytest.skip(f"certbot flavour {certbot_flavour!r} has no dns-rfc2136 plugin")
    with Pebble(http_port=apache.http_port, dns_server=bind.address, authz_reuse=0,
                base_dir=tmp_path / "pebble") as pebble:
        bed = DnsBed(certbot_flavour, tmp_path, ca, bind, pebble)
        dns = bed.add(3, "mixdns")
        web = farm.make_farm(str(bed.bot.config_dir), 3, ca=ca, server=pebble.directory_url,
                             webroot=str(apache.webroot), account=bed.account,
                             authenticator="batch-webroot", name_fmt="mixweb{i}.test")
        proc = bed.renew("--force-renewal")  # engaged by the batch-webroot confs
        text = out(proc)
        assert proc.returncode == 0, text
        assert "certbot-batch: validating 6 lineage(s) together" in text, text
        assert re.search(r"6 lineage\(s\) validated and issued, 0 failed, .*\(1 provisioning "
                         r"action\(s\), 1 cleanup\(s\), 3 challenge file\(s\)\)", text), text
        assert performs(proc) == [("dns-rfc2136", 6, 3)]
        assert bed.waits() == [PROPAGATION]
        for name in dns + web:
            assert bed.renewed_by_pebble(name), name
        assert bed.orders() == 6
        assert bed.bind.txt_records() == []
        assert sorted(p.name for p in apache.webroot.rglob("*")) == []
        assert bed.journal_files() == []


# -- 5. --dry-run ----------------------------------------------------------------------------------

def test_dry_run_one_wait_nothing_saved(bed: DnsBed) -> None:
    k = 4
    names = bed.add(k, "dry")
    confs = {n: bed.bot.renewal_conf(n).read_text() for n in names}
    proc = bed.renew("--dry-run", "--batch-engine")
    text = out(proc)
    assert proc.returncode == 0, text
    assert "all simulated renewals succeeded" in text.lower(), text
    assert bed.waits() == [PROPAGATION]
    assert performs(proc) == [("dns-rfc2136", 2 * k, k)]
    for name in names:
        assert bed.versions(name) == 1, name
        assert bed.bot.renewal_conf(name).read_text() == confs[name]
    assert bed.orders() == k
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []


# -- 6. crash safety -----------------------------------------------------------------------------

def _start_renew(bed: DnsBed) -> subprocess.Popen[str]:
    bed.mark()
    cmd = bed.bot.command("renew", "--force-renewal", "--batch-engine")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=bed.bot.env(), cwd=bed.bot.base_dir,
                            preexec_fn=certbots.default_stop_signals)


def _wait_for_records(bed: DnsBed, proc: subprocess.Popen[str], count: int,
                      deadline: float = 90.0) -> list[tuple[str, str]]:
    """Poll the zone until ``count`` TXT records are up (the plugin is then in its
    propagation wait)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        records = bed.bind.txt_records()
        if len(records) >= count:
            return records
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            raise AssertionError(f"renew ended before creating the records:\n{stdout}\n"
                                 f"{stderr}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{count} TXT records did not appear: {bed.bind.txt_records()}")


def _reap(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _during_wait(bed: DnsBed, count: int, act: Callable[[subprocess.Popen[str]], None],
                 timeout: float = 120.0) -> tuple[subprocess.Popen[str], list[tuple[str, str]],
                                                  str]:
    """Start a batched renew, wait until ``count`` records are up (the plugin is in its
    propagation wait), ``act`` on the run (signal it, stop the DNS server...), reap it:
    (the ended process, the records that were up, its output)."""
    proc = _start_renew(bed)
    try:
        records = _wait_for_records(bed, proc, count)
        act(proc)
        stdout, stderr = _reap(proc, timeout)
    finally:
        _reap(proc, 1)
    return proc, records, stdout + stderr


def test_sigkill_during_wait_then_plain_renew(bed: DnsBed) -> None:
    k = 4
    names = bed.add(k, "kill", propagation=120)
    proc, records, _ = _during_wait(bed, 2 * k, lambda p: p.kill(), timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert len(records) == 2 * k and bed.bind.txt_records() == records
    [journal] = bed.journal_files()
    entries = journal.read_text()
    for _, value in records:
        assert value in entries, (value, entries)
    # A plain `certbot renew` (nothing due, no batch option: stock certbot runs) removes
    # them with the lineages' own plugin, right after taking certbot's lock.
    proc2 = bed.renew()
    text = out(proc2)
    assert proc2.returncode == 0, text
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
    assert f"removed {2 * k} TXT record(s) left by an interrupted run (dns-rfc2136)" in \
        bed.bot.log_text()
    assert bed.orders() == 0
    for name in names:
        assert bed.versions(name) == 1, name


def test_sigterm_wait_longer_than_the_grace(bed: DnsBed) -> None:
    """The propagation wait outlasts the session's stop grace: the wave gives its workers
    up (the plugin still sleeps in one of them) and the run ends; the records go at exit."""
    k = 2
    names = bed.add(k, "grace", propagation=int(STOP_GRACE) + 10)
    proc, _, text = _during_wait(bed, 2 * k, lambda p: p.send_signal(signal.SIGTERM))
    assert proc.returncode != 0, text
    log = bed.bot.log_text()
    assert "still talking to the CA are given up" in log, log[-5000:]
    assert f"removed the {2 * k} challenge(s) of {k} lineage(s) whose renewal was given up" \
        in log, log[-5000:]
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
    for name in names:
        assert bed.versions(name) == 1, name


def test_sigterm_during_wait_cleans_up(bed: DnsBed) -> None:
    k = 4
    names = bed.add(k, "term", propagation=3 * PROPAGATION)
    proc, _, text = _during_wait(bed, 2 * k, lambda p: p.send_signal(signal.SIGTERM))
    assert proc.returncode != 0, text
    assert "stopped by SIGTERM" in text
    assert "SIGTERM received: no new orders" in bed.bot.log_text()
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
    for name in names:
        assert bed.versions(name) == 1, name  # nothing was finalized after the signal


def test_dns_server_down_mid_run_records_removed_by_the_next_command(bed: DnsBed) -> None:
    """The DNS server goes away while the records are up (in the propagation wait): the CA
    cannot validate, the lineages fail with its detail, the records cannot be removed and
    the run says so; once the server is back, the next certbot command of any kind
    (`certbot certificates` here) removes them through the lineages' own plugin."""
    k = 3
    names = bed.add(k, "down", propagation=PROPAGATION)
    proc, records, text = _during_wait(bed, 2 * k, lambda _: bed.bind.stop(), timeout=240)
    assert proc.returncode != 0, text
    assert "Traceback" not in text
    flat = one_line(text)
    for name in names:
        assert bed.versions(name) == 1, name
        assert f"{name}/fullchain.pem (failure)" in flat, text
    assert "succeeded" not in flat.replace("0 succeeded", ""), text
    log = bed.bot.log_text()
    assert "could not remove the TXT record" in log, log[-5000:]
    # a server that does not answer costs each removal the plugin's timeout: after two
    # failures in a row the rest are left for the next run at once
    assert "2 removals failed in a row" in log, log[-5000:]
    [journal] = bed.journal_files()
    for _, value in records:
        assert value in journal.read_text()
    # The server comes back with the records (its journal of dynamic updates).
    bed.bind.start()
    assert sorted(bed.bind.txt_records()) == sorted(records)
    follow = bed.bot.run("certificates")
    assert follow.returncode == 0, out(follow)
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
    assert f"removed {2 * k} TXT record(s) left by an interrupted run (dns-rfc2136)" in \
        bed.bot.log_text()


# -- 7. recovery after a fault: brief, forgets what never existed, expires, same hook variables --

#: recovery's one line when commands other than renew leave the records (issue 16)
LEFT_TO_RENEW = re.compile(r"certbot-batch: (\d+) TXT record\(s\) left by an interrupted run "
                           r"\(([\w:, -]+)\) are left to the next `certbot renew`")


def _status(bed: DnsBed) -> subprocess.CompletedProcess[str]:
    """The flavour's own ``certbot-batch status --json`` over the bed's certbot dirs."""
    return subprocess.run([str(bed.bot.script / "certbot-batch"), "status", "--json",
                           "--config-dir", str(bed.bot.config_dir),
                           "--work-dir", str(bed.bot.work_dir)],
                          capture_output=True, text=True, env=bed.bot.env(), timeout=120,
                          check=False)


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[str],
                what: str, deadline: float = 90.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if ready():
            return
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            raise AssertionError(f"renew ended before {what}:\n{stdout}\n{stderr}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_then_dns_down_other_commands_leave_it_to_renew(bed: DnsBed) -> None:
    """SIGKILL during the propagation wait, then the DNS server stops answering (a query to
    it costs certbot-dns-rfc2136 its 45 s timeout): `certbot certificates` does its job
    without waiting for the server and says in one line that the records are left to the
    next renew; `certbot-batch status` lists them; once the server is back, `certbot renew`
    removes them."""
    k = 2
    names = bed.add(k, "brief", propagation=120)
    proc, records, _ = _during_wait(bed, 2 * k, lambda p: p.kill(), timeout=30)
    assert proc.returncode == -signal.SIGKILL
    bed.bind.stop()
    follow = bed.bot.run("certificates")
    text = out(follow)
    assert follow.returncode == 0, text
    assert "Traceback" not in text
    for name in names:
        assert f"Certificate Name: {name}" in text, text
    said = [line for line in text.splitlines() if "interrupted run" in line]
    assert len(said) == 1, said
    left = LEFT_TO_RENEW.search(said[0])
    assert left and left.groups() == (str(2 * k), "dns-rfc2136"), said
    # Nothing was given up: every record is still journaled, and status says so.
    status = _status(bed)
    assert status.returncode == 1, out(status)
    doc = json.loads(status.stdout)
    assert sorted((r["plugin"], r["lineage"], r["validation_name"], r["validation"])
                  for r in doc["dns_records"]) == sorted(
        ("dns-rfc2136", n, f"_acme-challenge.{n}", v) for n in names
        for rn, v in records if rn == f"_acme-challenge.{n}")
    assert all(r["since"] for r in doc["dns_records"]), doc["dns_records"]
    # The server comes back (with the records): the next renew removes them.
    bed.bind.start()
    assert sorted(bed.bind.txt_records()) == sorted(records)
    renew = bed.renew()
    assert renew.returncode == 0, out(renew)
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
    assert f"removed {2 * k} TXT record(s) left by an interrupted run (dns-rfc2136)" in \
        out(renew)
    assert "left to the next" not in out(renew)
    assert json.loads(_status(bed).stdout)["dns_records"] == []


@pytest.mark.parametrize("fault", ["missing-credentials", "no-secret", "unknown-key"])
def test_records_never_created_are_not_journaled(bed: DnsBed, fault: str) -> None:
    """A group whose records could never be created: its credentials file is missing, or
    has no TSIG secret (the plugin fails before creating anything, and dns_common's cleanup()
    then does nothing), or names a key named does not know (each creation fails): its
    lineages fail, and nothing is left for later commands to warn about."""
    if fault == "missing-credentials":
        ini = bed.tmp / "nowhere" / "rfc2136.ini"
    elif fault == "no-secret":
        ini = bed.bind.rfc2136_ini(bed.tmp / "nosecret.ini")
        ini.write_text("".join(line + "\n" for line in ini.read_text().splitlines()
                               if not line.startswith("dns_rfc2136_secret")))
    else:
        ini = bed.bind.rfc2136_ini(bed.tmp / "unknown.ini", key="unknown")
    good = bed.add(2, "made")
    bad = bed.add(2, "never", ini=ini)
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode != 0, text
    assert "Traceback" not in text
    flat = one_line(text)
    for name in good:
        assert bed.renewed_by_pebble(name), name
    for name in bad:
        assert bed.versions(name) == 1, name
        assert f"{name}/fullchain.pem (failure)" in flat, text
        assert bed.validations(name) == 0, name
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
    follow = bed.bot.run("certificates")
    assert follow.returncode == 0, out(follow)
    assert "record(s)" not in out(follow) and "interrupted" not in out(follow), out(follow)


def test_records_that_keep_failing_expire(bed: DnsBed) -> None:
    """Journal entries whose removal fails (the key is refused): one journaled longer ago
    than the bound is given up with an error naming it; a younger one and one of the
    journal format without a time stay (the latter dated now)."""
    from certbot_batch.challenges import grouped

    [name] = bed.add(1, "stale")
    refused = bed.bind.rfc2136_ini(bed.tmp / "refused.ini", key="bad")
    settings = {"dns_rfc2136_credentials": str(refused),
                "dns_rfc2136_propagation_seconds": PROPAGATION}
    now = time.time()
    ages = {"old": grouped.EXPIRY_SECONDS + 3600, "young": grouped.EXPIRY_SECONDS - 3600,
            "undated": None}
    lines = []
    for ident, age in ages.items():
        line: dict[str, object] = {
            "kind": "dns-record", "id": ident, "lineage": name,
            "conf": str(bed.bot.renewal_conf(name)), "plugin": "dns-rfc2136", "domain": name,
            "validation_name": f"_acme-challenge.{name}", "validation": f"value-{ident}",
            "settings": settings}
        if age is not None:
            line["ts"] = now - age
        lines.append(json.dumps(line) + "\n")
    journal = bed.bot.work_dir / "certbot-batch" / grouped.JOURNAL_NAME
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text("".join(lines))
    journal.chmod(0o600)
    follow = bed.bot.run("certificates")
    text = out(follow)
    assert follow.returncode == 0, text
    errors = [line for line in text.splitlines() if "giving up on" in line]
    assert len(errors) == 1, text
    for part in (f"_acme-challenge.{name}", '"value-old"', f"lineage {name}",
                 "plugin dns-rfc2136", "Remove it by hand"):
        assert part in errors[0], errors
    assert "could not remove 2" in text, text
    status = json.loads(_status(bed).stdout)["dns_records"]
    assert sorted(r["validation"] for r in status) == ["value-undated", "value-young"]
    undated = next(r for r in status if r["validation"] == "value-undated")
    assert undated["since"] is not None  # dated by the recovery that first saw it
    # The next command gives up nothing more.
    again = bed.bot.run("certificates")
    assert "giving up" not in out(again), out(again)
    assert len(json.loads(_status(bed).stdout)["dns_records"]) == 2


class _IdHooks:
    """The hooks of a DNS API that deletes by record id: the auth hook creates the record,
    keeps id -> (name, value) in its table and prints the id; the cleanup hook deletes the
    record whose id is in ``$CERTBOT_AUTH_OUTPUT`` (nothing else tells it which). Both log
    their variables. While ``block`` exists, the auth hook of the last challenge of a
    perform() blocks before creating anything (its pid in ``pidfile``)."""

    def __init__(self, bed: DnsBed, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.table, self.log = directory / "records", directory / "calls"
        self.block, self.pidfile = directory / "block", directory / "blocked.pid"
        self.auth, self.cleanup = directory / "auth.sh", directory / "cleanup.sh"
        send = (f"| {bed_bind.NSUPDATE} -t 5 -y '{bed.bind.key.spec}'")
        server = f"server {ports.LOOPBACK} {bed.bind.port}"
        variables = ("$CERTBOT_DOMAIN $CERTBOT_VALIDATION $CERTBOT_REMAINING_CHALLENGES "
                     "$CERTBOT_ALL_DOMAINS")
        self.auth.write_text(
            "#!/bin/sh\nset -eu\n"
            f'if [ "$CERTBOT_REMAINING_CHALLENGES" = 0 ] && [ -e "{self.block}" ]; then\n'
            f'  echo $$ > "{self.pidfile}"\n  exec sleep 600\nfi\n'
            "domain=${CERTBOT_DOMAIN#\\*.}\n"
            "id=rec-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \\n')\n"
            f"printf '{server}\\nupdate add _acme-challenge.%s. 5 TXT \"%s\"\\nsend\\n' "
            f'"$domain" "$CERTBOT_VALIDATION" {send}\n'
            f'echo "$id _acme-challenge.$domain $CERTBOT_VALIDATION" >> "{self.table}"\n'
            f'echo "auth {variables} $id" >> "{self.log}"\n'
            'echo "$id"\n')
        self.cleanup.write_text(
            "#!/bin/sh\nset -eu\n"
            f'echo "cleanup {variables} ${{CERTBOT_AUTH_OUTPUT:--}}" >> "{self.log}"\n'
            f'found=$(grep "^${{CERTBOT_AUTH_OUTPUT:--}} " "{self.table}") || '
            "{ echo \"no record with id '${CERTBOT_AUTH_OUTPUT:-}'\" >&2; exit 1; }\n"
            "set -- $found\n"
            f"printf '{server}\\nupdate delete %s. TXT \"%s\"\\nsend\\n' \"$2\" \"$3\" {send}\n")
        for script in (self.auth, self.cleanup):
            script.chmod(0o755)

    def settings(self) -> dict[str, object]:
        return {"manual_auth_hook": str(self.auth), "manual_cleanup_hook": str(self.cleanup),
                "pref_challs": ["dns-01"]}

    def calls(self, kind: str) -> list[list[str]]:
        """The logged calls of one hook: [variables..., id or output]."""
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.split()[1:] for line in lines if line.split()[0] == kind]

    def blocked_pid(self) -> Optional[int]:
        try:
            return int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def release(self) -> None:
        self.block.unlink(missing_ok=True)
        pid = self.blocked_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_manual_cleanup_hook_after_sigkill_gets_the_auth_hooks_output(bed: DnsBed) -> None:
    """A run killed (SIGKILL) while its manual hooks have records up: the next certbot
    command runs the cleanup hook for each with the variables and CERTBOT_AUTH_OUTPUT its
    auth hook had (the hook deletes by the id it printed), one line per hook in the log and
    one summary line. The kill lands while the last auth hook of the grouped perform()
    blocks (a deterministic moment: every other hook has returned); that challenge gets one
    try without output, named once in the summary line, then is forgotten."""
    k = 2
    hooks = _IdHooks(bed, bed.tmp / "byid-hooks")
    bed.add(k, "byid", authenticator="manual", extra=hooks.settings())
    hooks.block.touch()
    proc = _start_renew(bed)
    try:
        _wait_until(lambda: hooks.blocked_pid() is not None, proc, "the last auth hook")
        proc.kill()
        _reap(proc, 30)
    finally:
        _reap(proc, 1)
        hooks.release()
    assert proc.returncode == -signal.SIGKILL
    auths = hooks.calls("auth")
    assert len(auths) == 2 * k - 1, auths
    assert len(bed.bind.txt_records()) == 2 * k - 1
    assert len({a[-1] for a in auths}) == len(auths)  # one id per record
    follow = bed.bot.run("certificates")
    text = out(follow)
    assert follow.returncode == 0, text
    assert "Traceback" not in text
    cleanups = hooks.calls("cleanup")
    # Every record's cleanup hook saw what its auth hook saw and printed ...
    assert sorted(c for c in cleanups if c[-1] != "-") == sorted(auths), (cleanups, auths)
    # ... and the challenge whose auth hook never returned was tried once, without output.
    assert len([c for c in cleanups if c[-1] == "-"]) == 1, cleanups
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
    log = bed.bot.log_text()
    for auth in auths:
        assert f"running the manual cleanup hook for {auth[0]} (left by an interrupted run)" \
            in log, log[-5000:]
    said = [line for line in text.splitlines() if "certbot-batch:" in line]
    assert len(said) == 1, text
    assert said[0].startswith(f"certbot-batch: removed {2 * k - 1} TXT record(s) left by an "
                              "interrupted run (manual); the cleanup hook failed for 1 "
                              "challenge(s) whose auth hook had not returned"), said
    again = bed.bot.run("certificates")
    assert "interrupted" not in out(again), out(again)
    assert len(hooks.calls("cleanup")) == len(cleanups)


def _as_certbot_names_it(bot: Certbot, farm_name: str, name: str) -> str:
    """Rename a farm lineage (named after its first name, "*.x.test") the way certbot names
    the second lineage of a base name ("x.test-0001")."""
    cfg = bot.config_dir
    for sub in ("archive", "live"):
        (cfg / sub / farm_name).rename(cfg / sub / name)
    for link in (cfg / "live" / name).iterdir():
        if link.is_symlink():
            target = os.readlink(link).replace(f"/{farm_name}/", f"/{name}/")
            link.unlink()
            link.symlink_to(target)
    conf = bot.renewal_conf(farm_name)
    text = conf.read_text().replace(f"/{farm_name}/", f"/{name}/") \
        .replace(f"/{farm_name}\n", f"/{name}\n")
    bot.renewal_conf(name).write_text(text)
    conf.unlink()
    return name


def test_replacing_hooks_same_name_in_two_lineages_at_least_stock(bed: DnsBed) -> None:
    """Manual hooks that *set* a name's TXT records (delete them all, then add), as many DNS
    APIs do, with x.test and *.x.test in two lineages (3 such pairs): stock certbot renews
    6/6, one lineage after the other; so does the session: lineages whose validation name
    another lineage of the round already has go to a later round of the group, performed
    once the earlier round's records are removed (2 performs of 3 lineages)."""
    auth, cleanup = bed.bind.manual_hook_scripts(bed.tmp / "replacing", replace=True)
    extra: dict[str, object] = {"manual_auth_hook": str(auth),
                                "manual_cleanup_hook": str(cleanup), "pref_challs": ["dns-01"]}
    apex = bed.add(3, "rep", authenticator="manual", extra=extra,
                   names_for=lambda i: [f"rep{i}.test"])
    wild = [_as_certbot_names_it(bed.bot, n, n[2:] + "-0001")
            for n in bed.add(3, "rep", authenticator="manual", extra=extra,
                             names_for=lambda i: [f"*.rep{i}.test"])]
    stock = bed.renew("--dry-run")
    assert stock.returncode == 0, out(stock)
    assert "all simulated renewals succeeded" in out(stock).lower(), out(stock)
    assert performs(stock) == []  # certbot's own loop
    before = len(bed.bind.hook_calls())
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    for name in apex + wild:
        assert bed.renewed_by_pebble(name), name
    # pebble reuses a valid authorization about 1 % of the time even with reuse set to 0
    # (tests/bed/pebble.py), and the dry run just made some: a lineage whose order came back
    # already valid performs nothing. Counted from pebble's side, not ours.
    validated = [bed.validations(f"rep{i}.test") for i in range(3)]
    assert all(1 <= v <= 2 for v in validated), validated  # apex and wildcard, at most once
    reused = 6 - sum(validated)
    rounds = performs(proc)
    if reused == 0:
        assert rounds == [("manual", 3, 3), ("manual", 3, 3)], rounds
    else:
        assert len(rounds) == 2 and all(c == n <= 3 for _, c, n in rounds), rounds
        assert sum(n for _, _, n in rounds) == 6 - reused, (rounds, validated)
    # Never two lineages' records of one name at a time: per name, auth and cleanup
    # alternate, each cleanup removing what the auth before it set.
    up: dict[str, str] = {}
    calls = bed.bind.hook_calls()[before:]
    for call in calls:
        action, domain, value = call.split()
        if action == "auth":
            assert domain not in up, calls
            up[domain] = value
        else:
            assert up.pop(domain) == value, calls
    assert not up and len(calls) == 2 * (6 - reused), calls
    assert no_deactivation(bed)
    assert bed.bind.txt_records() == []
    assert bed.journal_files() == []
