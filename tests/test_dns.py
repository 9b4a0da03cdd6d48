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
            extra: Optional[dict[str, object]] = None) -> list[str]:
        """``count`` lineages ``{prefix}{i}.test`` + ``*.{prefix}{i}.test`` of the
        registered account, saved as renewed with ``authenticator``."""
        params: dict[str, object] = {}
        if authenticator == "dns-rfc2136":
            params = {"dns_rfc2136_credentials": str(ini or self.good_ini),
                      "dns_rfc2136_propagation_seconds": str(propagation)}
        params.update(extra or {})
        return farm.make_farm(str(self.bot.config_dir), count, ca=self.ca,
                              server=self.pebble.directory_url, account=self.account,
                              authenticator=authenticator, extra_renewalparams=params,
                              names_for=lambda i: [f"{prefix}{i}.test", f"*.{prefix}{i}.test"])

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
    # standalone cannot join a batch: renewed one lineage at a time by certbot's own loop
    [alone] = farm.make_farm(str(bed.bot.config_dir), 1, ca=bed.ca,
                             server=bed.pebble.directory_url, account=bed.account,
                             authenticator="standalone", name_fmt="alone{i}.test",
                             extra_renewalparams={"http01_port": str(bed.pebble.http_port)})
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode == 0, text
    # one perform() per group (plugin + settings), both in the one wave, concurrently
    assert "certbot-batch: validating 5 lineage(s) together" in text, text
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
    assert f"removed {2 * k} TXT record(s) left behind by an interrupted run" in \
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
    assert f"removed {2 * k} TXT record(s) left behind by an interrupted run" in \
        bed.bot.log_text()
