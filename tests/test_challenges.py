"""Batched challenges (issue 4): ``certbot renew -a batch-webroot`` through the real certbot
(PyPI 5.x and Debian 2.1), the real pebble (validation delays on, authorization reuse 0) and
the test Apache serving the webroot.

What pebble saw is read from its log, counting only what a given run added:
``Added order "ID" to the db`` (one per new order), ``POST /chalZ/`` (one per challenge
answered) and ``Pulled a task ... Value:"NAME"`` (one per validation of NAME). What certbot
sent is read from its debug log (acme logs every JWS payload): a deactivation would show up
there as ``"status": "deactivated"``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.bed import certbots, farm
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA
from tests.bed.pebble import Pebble

SUMMARY = re.compile(
    r"certbot-batch: (\d+) lineage\(s\) validated and issued, (\d+) failed, in [\d.]+ s "
    r"\((\d+) provisioning action\(s\), (\d+) cleanup\(s\), (\d+) challenge file\(s\)\)")
DEACTIVATION = re.compile(r'"status":\s*"deactivated"')


@pytest.fixture(scope="module")
def ca() -> FarmCA:
    return FarmCA.create("Batched Challenges Test")


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


class Bed:
    """Apache + a slow-validating pebble + a registered certbot of one flavour."""

    def __init__(self, flavour: str, tmp: Path, ca: FarmCA, apache: Apache,
                 pebble: Pebble) -> None:
        self.ca = ca
        self.apache = apache
        self.pebble = pebble
        self.webroot = apache.webroot
        self.bot = Certbot(flavour, tmp / "cb", pebble, env_extra=apache.env())
        self.bot.register()
        ids = [p.parent.name for p in (self.bot.config_dir / "accounts").rglob("regr.json")]
        assert len(ids) == 1, ids
        self.account = ids[0]
        self._mark = 0
        self._log_mark = 0

    # -- lineages --------------------------------------------------------------------------
    def add(self, count: int, prefix: str, webroot: Optional[Path] = None,
            authenticator: str = "webroot") -> list[str]:
        """Lineages of the registered account at pebble (their current cert is from a local
        CA, which pebble does not care about when renewing)."""
        return farm.make_farm(str(self.bot.config_dir), count, ca=self.ca,
                              server=self.pebble.directory_url,
                              webroot=str(webroot or self.webroot), account=self.account,
                              authenticator=authenticator, name_fmt=prefix + "{i}.test")

    def versions(self, name: str) -> int:
        return len(list((self.bot.config_dir / "archive" / name).glob("cert*.pem")))

    def live_target(self, name: str) -> str:
        return os.readlink(self.bot.live(name) / "cert.pem")

    def conf(self, name: str) -> str:
        return self.bot.renewal_conf(name).read_text()

    # -- runs ------------------------------------------------------------------------------
    def mark(self) -> None:
        """Start counting pebble's and certbot's log lines from here."""
        self._mark = self.pebble.pebble_log.stat().st_size
        self._log_mark = len(self.bot.log_text())

    def pebble_since(self) -> str:
        with open(self.pebble.pebble_log, "rb") as fh:
            fh.seek(self._mark)
            return fh.read().decode(errors="replace")

    def certbot_log_since(self) -> str:
        # certbot rotates letsencrypt.log per run: the newest file is this run's.
        return self.bot.log_text()

    def orders(self) -> int:
        """New orders: pebble 2.4 logs ``Added order "ID" to the db`` once per order it
        creates (``POST /order-plz`` counts requests, which a rejected one would inflate)."""
        return len(re.findall(r'Added order "[^"]+" to the db', self.pebble_since()))

    def challenge_posts(self) -> int:
        return self.pebble_since().count("POST /chalZ/")

    def validations(self, name: str) -> int:
        return len(re.findall(r'Pulled a task from the Tasks queue: .*Value:"'
                              + re.escape(name) + '"', self.pebble_since()))

    def renew(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.mark()
        return self.bot.run("renew", *args)

    def webroot_entries(self) -> list[str]:
        return sorted(str(p.relative_to(self.webroot)) for p in self.webroot.rglob("*"))


def no_deactivation(bed: Bed) -> bool:
    log = bed.certbot_log_since()
    assert "JWS payload" in log  # acme logs what certbot sends: the check below means something
    return not DEACTIVATION.search(log)


def summary(proc: subprocess.CompletedProcess[str]) -> tuple[int, int, int, int, int]:
    found = SUMMARY.findall(out(proc))
    assert len(found) == 1, out(proc)
    ok, failed, provisions, cleanups, files = (int(x) for x in found[0])
    return ok, failed, provisions, cleanups, files


def journal(bed: Bed) -> Path:
    return bed.bot.work_dir / "certbot-batch" / "challenges.journal"


def _bed(va_sleeptime: int, certbot_flavour: str, tmp_path: Path, ca: FarmCA, apache: Apache,
         request: pytest.FixtureRequest) -> Iterator[Bed]:
    with Pebble(apache.http_port, va_sleeptime=va_sleeptime, authz_reuse=0,
                base_dir=tmp_path / "pebble") as pebble:
        b = Bed(certbot_flavour, tmp_path, ca, apache, pebble)
        try:
            yield b
        finally:
            rep = getattr(request.node, "bed_report_call", None)
            if rep is not None and rep.failed:
                print(f"\n===== certbot {certbot_flavour} letsencrypt.log (tail) =====\n"
                      f"{b.bot.log_text()[-20000:]}\n===== pebble =====\n{pebble.logs()}")


@pytest.fixture
def bed(certbot_flavour: str, tmp_path: Path, ca: FarmCA, apache: Apache,
        request: pytest.FixtureRequest) -> Iterator[Bed]:
    # Validations take 0..1 s (pebble sleeps a random whole number of seconds below
    # PEBBLE_VA_SLEEPTIME), enough for the lineages' validations to overlap.
    yield from _bed(2, certbot_flavour, tmp_path, ca, apache, request)


@pytest.fixture
def slow_bed(certbot_flavour: str, tmp_path: Path, ca: FarmCA, apache: Apache,
             request: pytest.FixtureRequest) -> Iterator[Bed]:
    # Validations take 0..4 s: the challenge files stay on disk until the slowest of the
    # wave is validated, long enough to signal the run while they are there.
    yield from _bed(5, certbot_flavour, tmp_path, ca, apache, request)


# -- 1. K lineages, one provisioning action --------------------------------------------------

@pytest.mark.versions
def test_renews_all_with_one_provisioning(bed: Bed) -> None:
    k = 8
    names = bed.add(k, "one")
    before = bed.webroot_entries()
    proc = bed.renew("--force-renewal", "-a", "batch-webroot")
    text = out(proc)
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    assert summary(proc) == (k, 0, 1, 1, k)
    assert bed.orders() == k
    assert bed.challenge_posts() == k
    assert no_deactivation(bed)
    for name in names:
        assert bed.versions(name) == 2, name
        assert bed.live_target(name).endswith(f"archive/{name}/cert2.pem"), name
        conf = bed.conf(name)
        assert re.search(r"^authenticator = batch-webroot$", conf, re.MULTILINE), conf
        assert re.search(rf"^{re.escape(name)} = {re.escape(str(bed.webroot))}$", conf,
                         re.MULTILINE), conf
        cert = farm.load_lineage_cert(str(bed.bot.config_dir), name)
        assert cert.issuer.rfc4514_string().find("Pebble Intermediate CA") >= 0, name
    assert bed.webroot_entries() == before == []
    assert not journal(bed).exists()
    assert "Congratulations, all renewals succeeded" in text


# -- 2. switching from -a webroot keeps the saved webroot settings; --webroot-map on the CLI ---

def test_switch_from_webroot_and_webroot_map(bed: Bed, tmp_path: Path) -> None:
    www = str(bed.webroot)
    # Two real lineages issued by stock certbot's webroot plugin: -w and --webroot-map.
    bed.bot.run("certonly", "-a", "webroot", "-w", www, "-d", "w1.test", "-d", "alt.w1.test",
                check=True)
    bed.bot.run("certonly", "-a", "webroot", "--webroot-map",
                '{"w2.test": "' + www + '"}', "-d", "w2.test", check=True)
    proc = bed.renew("--force-renewal", "-a", "batch-webroot")
    text = out(proc)
    assert proc.returncode == 0, text
    ok, failed, provisions, cleanups, files = summary(proc)
    # These names were validated before (certonly): pebble with PEBBLE_AUTHZREUSE=0 still
    # reuses a valid authorization now and then, so up to 3 files (w1.test has two names).
    assert (ok, failed) == (2, 0)
    assert provisions == cleanups == 1 and 1 <= files <= 3 or provisions == files == 0
    assert bed.orders() == 2
    for name in ("w1.test", "w2.test"):
        assert bed.versions(name) == 2, name
        assert "authenticator = batch-webroot" in bed.conf(name)
    conf = bed.conf("w1.test")
    assert f"w1.test = {www}" in conf and f"alt.w1.test = {www}" in conf, conf
    assert f"w2.test = {www}" in bed.conf("w2.test")

    # A lineage whose saved webroot is wrong, fixed by --webroot-map on the command line
    # (which, as with stock certbot, replaces the saved maps of every lineage renewed in
    # that run: hence --cert-name).
    wrong = tmp_path / "not-served"
    wrong.mkdir()
    [moved] = bed.add(1, "moved", webroot=wrong)
    proc = bed.renew("--force-renewal", "-a", "batch-webroot", "--cert-name", moved,
                     "--webroot-map", '{"' + moved + '": "' + www + '"}')
    text = out(proc)
    assert proc.returncode == 0, text
    assert summary(proc) == (1, 0, 1, 1, 1)
    assert bed.orders() == 1
    assert bed.versions(moved) == 2
    assert f"{moved} = {www}" in bed.conf(moved)  # the command-line map won, and was saved
    assert list(wrong.iterdir()) == []
    assert bed.webroot_entries() == []


# -- 3. lineages the CA cannot validate --------------------------------------------------------

def test_unvalidated_lineages_fail_once(bed: Bed, tmp_path: Path) -> None:
    unserved = tmp_path / "unserved"  # exists, writable, but Apache does not serve it
    unserved.mkdir()
    # The case: K=20, of which 5 cannot be validated.
    good = bed.add(15, "good")
    bad = bed.add(5, "bad", webroot=unserved)
    proc = bed.renew("--force-renewal", "-a", "batch-webroot")
    text = out(proc)
    assert proc.returncode != 0, text
    assert summary(proc) == (15, 5, 1, 1, 20)
    for name in good:
        assert bed.versions(name) == 2, name
    for name in bad:
        assert bed.versions(name) == 1, name
        # named in certbot's failure summary, with the CA's problem detail
        assert re.search(rf"{re.escape(name)}/fullchain\.pem \(failure\)", text), text
        assert re.search(rf"{re.escape(name)}.*404", text), text
        # exactly one validation attempt, no retry within the run
        assert bed.validations(name) == 1, name
    assert bed.orders() == 20
    assert bed.challenge_posts() == 20
    assert no_deactivation(bed)
    assert "Traceback" not in proc.stderr
    assert list(unserved.rglob("*")) == []
    assert bed.webroot_entries() == []


# -- 4. a webroot that does not exist -----------------------------------------------------------

def test_missing_webroot_is_a_clear_error(bed: Bed, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    good = bed.add(3, "fine")
    [lost] = bed.add(1, "lost", webroot=missing)
    proc = bed.renew("--force-renewal", "-a", "batch-webroot")
    text = out(proc)
    assert proc.returncode != 0, text
    assert "Traceback" not in proc.stderr, proc.stderr
    flat = " ".join(text.split())
    assert f"The webroot {missing} for {lost} (lineage {lost}) does not exist" in flat, text
    assert re.search(rf"{re.escape(lost)}/fullchain\.pem \(failure\)", text), text
    assert summary(proc)[:4] == (3, 1, 1, 1)
    for name in good:
        assert bed.versions(name) == 2, name
    assert bed.versions(lost) == 1
    assert not missing.exists()  # we never create a webroot
    # No validation of the lost lineage was asked for (the file could not be written).
    assert bed.validations(lost) == 0
    assert bed.webroot_entries() == []


# -- 5. --dry-run --------------------------------------------------------------------------------

def test_dry_run_one_provisioning_nothing_saved(bed: Bed) -> None:
    k = 6
    names = bed.add(k, "dry")
    confs = {n: bed.conf(n) for n in names}
    proc = bed.renew("--dry-run", "-a", "batch-webroot")
    text = out(proc)
    assert proc.returncode == 0, text
    assert summary(proc) == (k, 0, 1, 1, k)
    assert bed.orders() == k
    assert "all simulated renewals succeeded" in text.lower(), text
    for name in names:
        assert bed.versions(name) == 1, name
        assert bed.conf(name) == confs[name]  # nothing saved, not even the authenticator
    assert bed.webroot_entries() == []


# -- 6. crash safety -------------------------------------------------------------------------------

def _ignore_sigint() -> None:
    certbots.default_stop_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_renew(bed: Bed, ignore_sigint: bool = False) -> subprocess.Popen[str]:
    bed.mark()
    cmd = bed.bot.command("renew", "--force-renewal", "-a", "batch-webroot")
    # SIGINT ignored (inherited through exec): how a script's `certbot renew &` starts.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=bed.bot.env(), cwd=bed.bot.base_dir,
                            preexec_fn=(_ignore_sigint if ignore_sigint
                                        else certbots.default_stop_signals))


def _wait_for_challenge_files(bed: Bed, proc: subprocess.Popen[str], deadline: float = 90.0
                              ) -> list[Path]:
    challenge_dir = bed.webroot / ".well-known" / "acme-challenge"
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        files = list(challenge_dir.glob("*")) if challenge_dir.is_dir() else []
        if files:
            return files
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            raise AssertionError(f"renew ended before provisioning:\n{stdout}\n{stderr}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("no challenge file appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["TERM", "INT", "HUP"])
def test_signal_mid_run_cleans_up(slow_bed: Bed, sig: signal.Signals) -> None:
    bed = slow_bed
    names = bed.add(4, "sig")
    proc = _start_renew(bed)
    try:
        files = _wait_for_challenge_files(bed, proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, stdout + stderr
    assert files and not any(f.exists() for f in files)
    assert bed.webroot_entries() == [], "challenge files or our directories left behind"
    assert not journal(bed).exists()
    # The stop came while the CA was validating: no order was finalized after it, so no
    # certificate was issued, and the run says why it ends.
    assert f"{sig.name} received: no new orders" in bed.bot.log_text()
    assert f"stopped by {sig.name}" in stdout + stderr
    for name in names:
        assert bed.versions(name) == 1, name


def test_ignored_sigint_stays_ignored(slow_bed: Bed) -> None:
    """A run started with SIGINT ignored must not be made killable by it while the
    challenges are out: it goes on and renews everything."""
    bed = slow_bed
    names = bed.add(4, "nohup")
    proc = _start_renew(bed, ignore_sigint=True)
    try:
        files = _wait_for_challenge_files(bed, proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert files
    assert proc.returncode == 0, stdout + stderr
    assert "received: no new orders" not in bed.bot.log_text()
    for name in names:
        assert bed.versions(name) == 2, name
    assert bed.orders() == 4
    assert bed.webroot_entries() == []
    assert not journal(bed).exists()


def test_sigkill_leftovers_removed_by_next_run(slow_bed: Bed) -> None:
    bed = slow_bed
    names = bed.add(4, "kill", authenticator="batch-webroot")
    proc = _start_renew(bed)
    try:
        _wait_for_challenge_files(bed, proc)
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in bed.webroot.rglob("*")]
    assert left, "SIGKILL right after provisioning should leave the files"
    entries = journal(bed).read_text()
    for path in left:
        assert f'"{path}"' in entries, (path, entries)
    assert all(bed.versions(n) == 1 for n in names)
    # Next run, nothing due (certs are 10 days old of 90): the leftovers go first.
    proc2 = bed.renew()
    text = out(proc2)
    assert proc2.returncode == 0, text
    assert "0 due" in text, text
    assert bed.orders() == 0
    assert bed.webroot_entries() == []
    assert not journal(bed).exists()
    assert "left behind by an interrupted run" in bed.bot.log_text()


# -- 7. authenticators that are not batch-capable ------------------------------------------------

def test_plain_webroot_is_batched_in_session_conf_untouched(bed: Bed) -> None:
    """Issue 18, item 3: inside a session certbot's own webroot is batched too, and its
    renewal confs keep naming it."""
    names = bed.add(3, "plain")
    proc = bed.renew("--force-renewal", "--batch-engine")
    text = out(proc)
    assert proc.returncode == 0, text
    assert "certbot-batch: checked 3 lineage(s)" in text
    assert "validating 3 lineage(s) together" in text, text
    match = SUMMARY.search(text)
    assert match and match.group(3) == "1", text  # one provisioning action
    assert bed.orders() == 3
    for name in names:
        assert bed.versions(name) == 2, name
        assert re.search(r"^authenticator = webroot$", bed.conf(name), re.MULTILINE)
    assert bed.webroot_entries() == []
