"""Issue 9: crash-safe batched runs that keep certbot's own order of events.

Real certbot (both full flavours), real pebble (validation delays on), real private Apache.
What pebble issued is read from its log ("Issued certificate serial S for order O"); what
was saved is every certN.pem in the lineages' archive directories: after a stop signal every
issued serial must be saved, after a SIGKILL at most one wave (--batch-size) may be lost.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
from cryptography import x509

from tests.bed import certbots, certs
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA, make_farm
from tests.bed.pebble import Pebble

WAVE = 2
K = 6  # three waves


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def flat(text: str) -> str:
    return " ".join(text.split())


class Bed:
    def __init__(self, flavour: str, tmp: Path, apache: Apache, pebble: Pebble) -> None:
        self.apache = apache
        self.pebble = pebble
        self.bot = Certbot(flavour, tmp / "cb", pebble, env_extra=apache.env())
        self.bot.register()
        self.ca = FarmCA.create("Crash Safety Test")

    def lineages(self, count: int, prefix: str, vhosts: bool = True,
                 authenticator: str = "batch-webroot",
                 installer: Optional[str] = "batch-apache") -> list[str]:
        extra = None
        if installer == "batch-apache":
            extra = {"apache_server_root": str(self.apache.root),
                     "apache_vhost_root": str(self.apache.vhost_root),
                     "apache_logs_root": str(self.apache.log_dir),
                     "apache_challenge_location": str(self.apache.challenge_location),
                     "apache_ctl": str(self.apache.ctl)}
        names = make_farm(str(self.bot.config_dir), count, ca=self.ca,
                          server=self.pebble.directory_url, webroot=str(self.apache.webroot),
                          authenticator=authenticator, installer=installer,
                          extra_renewalparams=extra, name_fmt=prefix + "{i}.test",
                          version=self.bot.version)
        if vhosts:
            for name in names:
                live = self.bot.live(name)
                self.apache.add_ssl_vhost(name, cert_path=live / "fullchain.pem",
                                          key_path=live / "privkey.pem")
            self.apache.reload()
            self.apache.reset_counts()
        return names

    def issued(self) -> set[int]:
        text = self.pebble.pebble_log.read_text(errors="replace")
        return {int(s, 16) for s in re.findall(r"Issued certificate serial ([0-9a-f]+) ", text)}

    def saved(self, names: list[str]) -> set[int]:
        """Serials of the certificates in the lineages' archives. A file that does not parse
        is one certbot's own save_successor was writing when SIGKILL came (certbot writes
        archive files in place, then moves the live/ links): not saved; live/ never points
        at it (checked after the next run)."""
        serials = set()
        for name in names:
            for pem in (self.bot.config_dir / "archive" / name).glob("cert*.pem"):
                try:
                    serials.add(certs.load_pem_chain(pem)[0].serial_number)
                except ValueError:
                    continue
        return serials

    def versions(self, name: str) -> int:
        return len(list((self.bot.config_dir / "archive" / name).glob("cert*.pem")))

    def leftovers(self) -> list[str]:
        found = [str(p) for p in self.apache.webroot.rglob("*")]
        snippet = self.apache.root / "conf-enabled" / "certbot-batch-acme.conf"
        if snippet.exists():
            found.append(str(snippet))
        challenge = self.apache.challenge_location / "certbot-batch-http01"
        if challenge.exists():
            found += [str(p) for p in challenge.rglob("*") if p.is_file()]
        return found

    def journal(self) -> Path:
        return self.bot.work_dir / "certbot-batch" / "challenges.journal"

    def pending(self) -> Path:
        return self.bot.work_dir / "certbot-batch" / "deploy-pending.json"

    def pending_lineages(self) -> list[str]:
        """Lineages of the pending-deployment record (both copies, newest wins)."""
        best: dict[str, object] = {}
        for path in (self.pending(),
                     self.bot.config_dir / "certbot-batch" / "deploy-pending.json"):
            if path.exists():
                data = json.loads(path.read_text())
                if int(data.get("seq", 0)) > int(best.get("seq", 0)):  # type: ignore[call-overload]
                    best = data
        names: set[str] = set()
        for group in ("servers", "hooks"):
            for entry in dict(best.get(group) or {}).values():  # type: ignore[call-overload]
                names.update(entry.get("lineages") or [])
        return sorted(names)

    def status(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bot.script / "certbot-batch"), "status",
                               "--config-dir", str(self.bot.config_dir),
                               "--work-dir", str(self.bot.work_dir)],
                              capture_output=True, text=True, check=False)

    def start(self, *args: str) -> subprocess.Popen[str]:
        cmd = self.bot.command("renew", *args)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self.bot.env(), cwd=self.bot.base_dir,
                                preexec_fn=certbots.default_stop_signals)

    def assert_served(self, names: list[str]) -> None:
        for name in names:
            expected = certs.load_pem_chain(self.bot.live(name) / "cert.pem")[0]
            served = self.apache.wait_for_cert(name, expected)
            assert served.serial_number == expected.serial_number, name


@pytest.fixture
def bed(certbot_flavour: str, tmp_path: Path, apache: Apache,
        request: pytest.FixtureRequest) -> Iterator[Bed]:
    with Pebble(apache.http_port, va_sleeptime=2, authz_reuse=0,
                base_dir=tmp_path / "pebble") as pebble:
        b = Bed(certbot_flavour, tmp_path, apache, pebble)
        try:
            yield b
        finally:
            rep = getattr(request.node, "bed_report_call", None)
            if rep is not None and rep.failed:
                print(f"\n===== certbot letsencrypt.log (tail) =====\n"
                      f"{b.bot.log_text()[-15000:]}\n===== pebble =====\n{pebble.logs()}")


def _version(link: Path) -> int:
    """The archive version a live/ link points at (archive/NAME/cert3.pem: 3)."""
    match = re.search(r"(\d+)\.pem$", os.path.realpath(link))
    assert match, link
    return int(match.group(1))


def wait_until(proc: subprocess.Popen[str], what: str, check: Callable[[], bool],
               timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            raise AssertionError(f"renew ended before {what}:\n{stdout}\n{stderr}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _trigger(bed: Bed, names: list[str], phase: str) -> Callable[[], bool]:
    if phase == "provisioning":
        return lambda: any(bed.apache.webroot.rglob("*"))
    if phase == "finalization":  # of a later wave: the second wave is being issued
        return lambda: len(bed.issued()) >= WAVE + 1
    if phase == "loop":  # certbot's loop saves the first wave
        return lambda: any(bed.versions(n) >= 2 for n in names)
    if phase == "reload":
        return lambda: any("configtest" in c for c in bed.apache.ctl_calls())
    raise ValueError(phase)


RENEW = ("--force-renewal", "--batch-size", str(WAVE))


@pytest.mark.parametrize("sig,phase", [
    (signal.SIGTERM, "provisioning"), (signal.SIGTERM, "finalization"),
    (signal.SIGTERM, "loop"), (signal.SIGTERM, "reload"), (signal.SIGINT, "finalization"),
    (signal.SIGKILL, "provisioning"), (signal.SIGKILL, "finalization"),
    (signal.SIGKILL, "loop"),
], ids=lambda v: v.name if isinstance(v, signal.Signals) else str(v))
def test_stopped_run_loses_nothing_and_next_stock_run_finishes(bed: Bed, sig: signal.Signals,
                                                                phase: str) -> None:
    names = bed.lineages(K, "stop")
    before = bed.issued()
    proc = bed.start(*RENEW)
    try:
        wait_until(proc, phase, _trigger(bed, names, phase))
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stdout + stderr
    assert proc.returncode != 0, text
    assert "Traceback" not in text
    issued = bed.issued() - before
    saved = bed.saved(names)
    lost = issued - saved
    if sig == signal.SIGKILL:
        assert len(lost) <= WAVE, (len(issued), len(lost))
    else:
        assert not lost, f"{len(lost)} of {len(issued)} issued certificates not saved\n{text}"
        assert bed.leftovers() == [], bed.leftovers()
        assert not bed.journal().exists()
        assert f"stopped by {sig.name}" in text, text
    # A plain stock `certbot renew` (certbot's timer): nothing is due any more for the saved
    # ones; leftovers go, a pending deployment is finished, nothing is half-written.
    follow = bed.bot.run("renew")
    assert "Traceback" not in out(follow)
    assert bed.leftovers() == [], bed.leftovers()
    assert not bed.journal().exists()
    assert not bed.pending().exists(), bed.pending().read_text()
    renewed = [n for n in names if bed.versions(n) >= 2]
    # SIGKILL inside certbot's own save can leave one lineage's live/ links on two versions
    # (certbot moves them one by one; stock certbot has the same window, and nothing repairs
    # it yet: see the notes). At most that one lineage; every other one is served as saved.
    split = [n for n in names if len({_version(bed.bot.live(n) / f"{p}.pem")
                                      for p in ("cert", "fullchain")}) > 1]
    if sig == signal.SIGKILL and phase == "loop":
        assert len(split) <= 1, split
    else:
        assert split == [], split
    bed.assert_served([n for n in names if n not in split])
    for name in renewed:  # every saved lineage is complete (certbot's own save path)
        live = bed.bot.live(name)
        for part in ("cert", "chain", "fullchain", "privkey"):
            assert (live / f"{part}.pem").exists(), (name, part)
    for name in names:  # ... and what live/ points at parses, whatever was cut short
        certs.load_pem_chain(bed.bot.live(name) / "cert.pem")
        certs.load_pem_chain(bed.bot.live(name) / "fullchain.pem")


def test_pre_hook_that_starts_the_web_server(bed: Bed, tmp_path: Path) -> None:
    """Stock `-a webroot` works with a pre-hook that starts the web server; batch-webroot
    must too: pre-hooks run before any provisioning or CA contact."""
    names = bed.lineages(4, "prehook", vhosts=False, installer=None)
    bed.apache.stop()
    assert not bed.apache.is_running()
    order = tmp_path / "order.log"
    pre = (f"echo pre >> {order} && APACHE_CONFDIR={bed.apache.root} "
           f"/usr/sbin/apache2ctl start")
    post = f"echo post >> {order}"
    deploy = f"echo deploy >> {order}"
    proc = bed.bot.run("renew", "--force-renewal", "--pre-hook", pre, "--post-hook", post,
                       "--deploy-hook", deploy)
    text = out(proc)
    assert proc.returncode == 0, text
    for name in names:
        assert bed.versions(name) == 2, (name, text)
    assert order.read_text().split() == ["pre"] + ["deploy"] * 4 + ["post"]


def test_file_modes_and_hook_umask_three_runs_of_40(bed: Bed, tmp_path: Path) -> None:
    names = bed.lineages(40, "mode", vhosts=False, installer=None)
    umasks = tmp_path / "umask.log"
    for run in range(3):
        proc = bed.bot.run("renew", "--force-renewal", "--deploy-hook",
                           f"sh -c 'umask >> {umasks}'", timeout=400)
        assert proc.returncode == 0, out(proc)
        for name in names:
            assert bed.versions(name) == run + 2
    seen = umasks.read_text().split()
    assert len(seen) == 120 and set(seen) == {"0022"}, sorted(set(seen))
    for name in names:
        for pem in (bed.bot.config_dir / "archive" / name).glob("*.pem"):
            mode = stat.S_IMODE(pem.stat().st_mode)
            if pem.name.startswith("privkey"):
                assert mode & 0o077 == 0, (pem, oct(mode))
            else:
                assert mode == 0o644, (pem, oct(mode))


def test_option_values_checked_before_any_ca_contact(bed: Bed) -> None:
    names = bed.lineages(2, "opt", vhosts=False, installer=None)
    before = bed.pebble.pebble_log.read_text().count("POST /order-plz")
    proc = bed.bot.run("renew", "--force-renewal", "--batch-size=-1")
    text = out(proc)
    assert proc.returncode != 0
    assert "--batch-size must be at least 1 (got -1)" in text, text
    assert "Traceback" not in text
    assert bed.pebble.pebble_log.read_text().count("POST /order-plz") == before
    assert all(bed.versions(n) == 1 for n in names)


# -- the state database is a cache ----------------------------------------------------------

def _db(bed: Bed) -> Path:
    return bed.bot.work_dir / "certbot-batch" / "state.sqlite"


def _locker(path: Path) -> subprocess.Popen[str]:
    """Another process holding an exclusive lock on the database until killed."""
    code = ("import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen(["python3", "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("fault", ["locked", "unusable", "locked-mid-run"])
def test_state_db_faults_never_change_the_result(bed: Bed, fault: str) -> None:
    names = bed.lineages(3, "db", vhosts=False, installer=None)
    first = bed.bot.run("renew", "--batch-engine")  # creates the database (nothing due)
    assert first.returncode == 0, out(first)
    db = _db(bed)
    assert db.exists()
    locker = None
    if fault == "locked":
        locker = _locker(db)
    elif fault == "unusable":
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        db.mkdir()  # sqlite cannot open a directory
    try:
        if fault == "locked-mid-run":
            proc = bed.start("--force-renewal")
            wait_until(proc, "validation", lambda: any(bed.apache.webroot.rglob("*")))
            locker = _locker(db)
            stdout, stderr = proc.communicate(timeout=240)
            code, text = proc.returncode, stdout + stderr
        else:
            done = bed.bot.run("renew", "--force-renewal")
            code, text = done.returncode, out(done)
    finally:
        if locker is not None:
            locker.kill()
            locker.wait()
    assert code == 0, text
    assert "Traceback" not in text
    assert "Congratulations, all renewals succeeded" in text, text
    assert "All renewals failed" not in text
    for name in names:
        assert bed.versions(name) == 2, (name, text)
    aside = list(db.parent.glob("state.sqlite.corrupt-*"))
    assert aside == [], aside  # never moved aside unless corrupt
    if fault == "unusable":
        assert db.is_dir()
        assert "this run goes without it" in flat(text + bed.bot.log_text())


# -- true output ------------------------------------------------------------------------------

def test_failed_configtest_is_never_forgotten_until_a_renew_deploys(bed: Bed) -> None:
    """Issue 16, item 2: a deployment that failed stays pending (per server) until a renew
    deployed it; every renew meanwhile retries and exits non-zero with a clear line; other
    commands only mention it; status exits non-zero."""
    names = bed.lineages(2, "cfg")
    broken = bed.apache.root / "conf-enabled" / "zz-broken.conf"
    broken.write_text("Include /nonexistent/certbot-batch-broken.conf\n")
    proc = bed.bot.run("renew", "--force-renewal")
    text = out(proc)
    assert proc.returncode != 0, text
    assert "Congratulations" not in text
    assert flat(text).count("was NOT reloaded") == 1, text
    assert "its configtest fails" in flat(text), text
    # The summary comes after the reload attempt and says what is not deployed.
    assert text.index("was NOT reloaded") < text.index("(renewed, not deployed)"), text
    for name in names:
        assert f"/live/{name}/fullchain.pem (renewed, not deployed)" in text, text
    assert sorted(bed.pending_lineages()) == sorted(names)
    assert bed.status().returncode != 0
    # The next timer run, configuration still broken: retried, still pending, exit non-zero.
    calls = len(bed.apache.ctl_calls())
    again = bed.bot.run("renew")
    assert again.returncode != 0, out(again)
    assert "are still not deployed" in flat(out(again)), out(again)
    assert "configtest" in bed.apache.ctl_calls()[calls:]
    assert sorted(bed.pending_lineages()) == sorted(names)
    # Another command only says so (no configtest, no reload, exit code as stock).
    calls = len(bed.apache.ctl_calls())
    other = bed.bot.run("certificates")
    assert other.returncode == 0, out(other)
    assert "still not deployed" in flat(out(other)), out(other)
    assert "next `certbot renew` tries again" in flat(out(other)), out(other)
    assert bed.apache.ctl_calls()[calls:] == []
    assert bed.status().returncode != 0
    # The admin fixes the configuration; the next renew deploys, confirmed, and says so.
    broken.unlink()
    follow = bed.bot.run("renew")
    assert follow.returncode == 0, out(follow)
    assert "renewed earlier" in flat(out(follow)), out(follow)
    assert bed.pending_lineages() == []
    assert bed.status().returncode == 0, bed.status().stdout
    bed.assert_served(names)


def test_dry_run_leaves_status_as_it_was(bed: Bed) -> None:
    bed.lineages(2, "dry", vhosts=False, installer=None)
    assert bed.bot.run("renew", "--batch-engine").returncode == 0

    def rows() -> list[tuple[object, ...]]:
        conn = sqlite3.connect(str(_db(bed)))
        try:
            return list(conn.execute("SELECT name, due, reason, last_scan FROM lineage "
                                     "ORDER BY name"))
        finally:
            conn.close()
    before = rows()
    proc = bed.bot.run("renew", "--dry-run", "--batch-engine")
    assert proc.returncode == 0, out(proc)
    assert rows() == before


def test_broken_lineage_is_reported_on_every_run(bed: Bed) -> None:
    [ok, broken] = bed.lineages(2, "brk", vhosts=False, installer=None)
    os.unlink(bed.bot.live(broken) / "privkey.pem")
    os.symlink("../../archive/nowhere/privkey9.pem", bed.bot.live(broken) / "privkey.pem")
    for _ in range(2):
        proc = bed.bot.run("renew", "--batch-engine")
        text = out(proc)
        assert proc.returncode != 0, text
        assert broken in text, text
        assert "1 parse failure(s)" in text, text


def test_saved_apache_ctl_missing_is_a_clear_error(bed: Bed) -> None:
    names = bed.lineages(2, "ctl")
    conf = bed.bot.renewal_conf(names[0])
    conf.write_text(re.sub(r"^apache_ctl = .*$", "apache_ctl = /nonexistent/apache2ctl",
                           conf.read_text(), flags=re.MULTILINE))
    proc = bed.bot.run("renew", "--force-renewal")
    text = out(proc)
    assert proc.returncode != 0, text
    assert "Congratulations" not in text
    assert "Traceback" not in text
    assert names[0] in text and "/nonexistent/apache2ctl" in text, text
    assert bed.versions(names[1]) == 2  # the other lineage still renews


def _served(apache: Apache, name: str) -> x509.Certificate:
    return apache.served_cert(name)


class LockHolder:
    """A real certbot run holding certbot's locks: ``certbot renew --force-renewal`` whose
    pre-hook connects to a Unix socket of the test and blocks until the test answers (or
    goes away), so the run is inside its renewal, with every lock taken, for as long as the
    test wants. A socket, not a file to poll: the test waits for the hook with accept()."""

    def __init__(self, bed: Bed) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lk"))  # AF_UNIX paths are short
        self.path = self.dir / "hook.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(1)
        hook = (f"{sys.executable} -c \"import socket; s = socket.socket(socket.AF_UNIX); "
                f"s.connect('{self.path}'); s.sendall(b'in'); s.recv(1)\"")
        self.proc = bed.start("--force-renewal", "--pre-hook", hook)
        self.conn: Optional[socket.socket] = None

    def wait_for_hook(self, timeout: float = 120.0) -> None:
        self.server.settimeout(1.0)
        end = time.monotonic() + timeout
        while self.conn is None:
            try:
                self.conn, _ = self.server.accept()
            except TimeoutError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    stdout, stderr = self.proc.communicate(timeout=60)
                    raise AssertionError(f"the pre-hook never ran:\n{stdout}\n{stderr}"
                                         ) from None
        self.conn.settimeout(60)
        assert self.conn.recv(2) == b"in"

    def release(self) -> subprocess.CompletedProcess[str]:
        if self.conn is not None:
            self.conn.sendall(b"!")
        stdout, stderr = self.proc.communicate(timeout=240)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        for sock in (self.conn, self.server):
            if sock is not None:
                sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("shared", ["logs", "config", "work"])
def test_skip_if_locked(bed: Bed, tmp_path: Path, shared: str) -> None:
    """certbot locks its logs dir (while setting up logging), then its config and work dirs.
    A second certbot meeting a running one on any of them: with --batch-skip-if-locked one
    line on stderr, exit 0 and nothing else (no pre-hook, no renewal); without it certbot's
    own error and exit 1. The running one is undisturbed."""
    names = bed.lineages(1, "lock", vhosts=False, installer=None)
    bot = bed.bot
    other = tmp_path / "other"
    dirs = {"config": other / "config", "work": other / "work", "logs": other / "logs"}
    dirs[shared] = {"config": bot.config_dir, "work": bot.work_dir, "logs": bot.logs_dir}[shared]
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    own = []
    if shared != "config":  # a due lineage of its own, which must not be renewed
        own = make_farm(str(dirs["config"]), 1, ca=bed.ca, server=bed.pebble.directory_url,
                        webroot=str(bed.apache.webroot), authenticator="batch-webroot",
                        name_fmt="second{i}.test", version=bot.version)
    hook_ran = tmp_path / "second-pre-hook-ran"

    def second(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(bot.python), "-c", "import sys; from certbot.main import main; "
               "sys.exit(main())", "renew", "--non-interactive", "--no-random-sleep-on-renew",
               "--force-renewal", "--pre-hook", f"touch {hook_ran}",
               "--server", bed.pebble.directory_url,
               "--config-dir", str(dirs["config"]), "--work-dir", str(dirs["work"]),
               "--logs-dir", str(dirs["logs"]), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=bot.env(),
                              cwd=bot.base_dir, timeout=120, check=False)

    holder = LockHolder(bed)
    try:
        holder.wait_for_hook()
        stock = second()
        skipped = second("--batch-skip-if-locked")
        done = holder.release()
    finally:
        holder.close()
    assert stock.returncode == 1, out(stock)
    assert "Another instance of Certbot is already running" in out(stock), out(stock)
    assert skipped.returncode == 0, out(skipped)
    assert skipped.stdout == "", out(skipped)
    lines = [line for line in skipped.stderr.splitlines()
             if line.strip() and not line.startswith("Saving debug log")]  # certbot's own
    assert len(lines) == 1 and "--batch-skip-if-locked" in lines[0], lines
    assert "Another instance of Certbot is already running" in lines[0], lines
    assert not hook_ran.exists()  # neither run got as far as a renewal
    assert all(len(list((dirs["config"] / "archive" / n).glob("cert*.pem"))) == 1
               for n in own)
    # The run holding the lock renewed its lineage, undisturbed.
    assert done.returncode == 0, out(done)
    assert bed.versions(names[0]) == 2, out(done)


def test_archive_file_cut_short_by_sigkill(bed: Bed) -> None:
    """SIGKILL inside certbot's own save_successor (it writes the archive files in place,
    then moves the live/ links) leaves a cut-short cert2.pem: the next runs, plain and
    through the session, neither trip over it nor point live/ at it."""
    names = bed.lineages(2, "cut")
    cut = bed.bot.config_dir / "archive" / names[0] / "cert2.pem"
    cut.write_text("-----BEGIN CERTIFICATE-----\nMIIB")
    follow = bed.bot.run("renew")
    assert follow.returncode == 0, out(follow)
    assert "Traceback" not in out(follow)
    forced = bed.bot.run("renew", "--batch-engine", "--force-renewal")
    assert forced.returncode == 0, out(forced)
    assert "Traceback" not in out(forced)
    for name in names:
        cert = certs.load_pem_chain(bed.bot.live(name) / "cert.pem")[0]
        assert cert.serial_number in bed.issued(), name  # renewed by pebble, complete
