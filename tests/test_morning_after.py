"""Issue 16: what runs after a fault never takes a server down and never forgets a certificate.

Real certbot subprocesses (both full flavours), real pebble, real private Apaches. The kill
inside certbot's own save is made the way it happens: certbot's process is SIGKILLed between
two of its link moves (``RenewableCert._update_link_to`` wrapped in the boot code of that one
certbot process, nothing else changed). Order counts come from the fault-injecting proxy in
front of pebble (tests/bed/acmeproxy.py, here only counting).
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.bed import certs
from tests.bed.apache import Apache
from tests.bed.farm import make_farm
from tests.bed.pebble import Pebble
from tests.test_ca_limits import Site
from tests.test_crash_safety import Bed, flat, out

KINDS = ("cert", "privkey", "chain", "fullchain")

#: certbot's save of lineage NAME killed after its cert and privkey links moved (the order of
#: certbot's ALL_FOUR), before chain and fullchain: a key of the new version next to the
#: certificate of the old one in fullchain.pem.
KILL_IN_SAVE = """
import os, signal
from certbot._internal import storage
_orig_update_link_to = storage.RenewableCert._update_link_to
def _update_link_to(self, kind, version):
    _orig_update_link_to(self, kind, version)
    if kind == "privkey" and self.lineagename == {name!r}:
        os.kill(os.getpid(), signal.SIGKILL)
storage.RenewableCert._update_link_to = _update_link_to
"""


@pytest.fixture
def bed(certbot_flavour: str, tmp_path: Path, apache: Apache,
        request: pytest.FixtureRequest) -> Iterator[Bed]:
    with Pebble(apache.http_port, authz_reuse=0, base_dir=tmp_path / "pebble") as pebble:
        b = Bed(certbot_flavour, tmp_path, apache, pebble)
        try:
            yield b
        finally:
            rep = getattr(request.node, "bed_report_call", None)
            if rep is not None and rep.failed:
                print(f"\n===== certbot letsencrypt.log (tail) =====\n"
                      f"{b.bot.log_text()[-15000:]}\n===== pebble =====\n{pebble.logs()}")


def version(link: Path) -> int:
    return int(os.readlink(link).rsplit(link.stem, 1)[1][:-4])


def killed_in_save(bed: Bed, names: list[str], victim: str) -> None:
    """Run `certbot renew --force-renewal` and SIGKILL it inside the save of ``victim``."""
    cmd = bed.bot.command("renew", "--force-renewal")
    assert cmd[1] == "-c"
    cmd[2] = KILL_IN_SAVE.format(name=victim) + cmd[2]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bed.bot.env(),
                          cwd=bed.bot.base_dir, timeout=300, check=False)
    assert proc.returncode == -9, out(proc)
    live = bed.bot.live(victim)
    # The state the issue describes: links on two versions, certbot's undo record present.
    assert (version(live / "privkey.pem"), version(live / "fullchain.pem")) == (2, 1)
    assert (live / "previous_fullchain.pem").is_symlink()
    assert set(names) <= set(bed.pending_lineages())  # the deployment was recorded first
    assert bed.apache.is_running()


def assert_consistent_and_served(bed: Bed, names: list[str]) -> None:
    for name in names:
        live = bed.bot.live(name)
        assert len({version(live / f"{k}.pem") for k in KINDS}) == 1, name
        assert not list(live.glob("previous_*")), name
    bed.assert_served(names)


@pytest.mark.parametrize("command", ["certificates", "renew"])
def test_kill_between_link_moves_never_takes_apache_down(bed: Bed, command: str) -> None:
    names = bed.lineages(3, "save")
    victim = names[1]
    killed_in_save(bed, names, victim)
    follow = bed.bot.run(command)
    text = out(follow)
    assert follow.returncode == 0, text + bed.bot.log_text()[-5000:]
    assert "Traceback" not in text
    assert bed.apache.is_running(), bed.apache.logs()[-3000:]
    # Finished the way certbot's own renew finishes it: the complete new version linked.
    assert version(bed.bot.live(victim) / "fullchain.pem") == 2
    assert f"lineage {victim}: an interrupted save left previous_*.pem links" in flat(
        bed.bot.log_text())
    assert_consistent_and_served(bed, names)
    assert bed.pending_lineages() == []
    # Nothing is called interrupted twice, nothing is done twice.
    calls = len(bed.apache.ctl_calls())
    again = bed.bot.run("certificates")
    assert again.returncode == 0 and "interrupted" not in out(again), out(again)
    assert bed.apache.ctl_calls()[calls:] == []


def test_unrepairable_lineage_refuses_the_reload(bed: Bed) -> None:
    names = bed.lineages(2, "bad")
    victim = names[0]
    killed_in_save(bed, names, victim)
    served_before = bed.apache.served_cert(victim).serial_number
    # Neither version's key fits its certificate any more: no version is safe to serve.
    stranger = certs.make_leaf(["stranger.test"]).key_pem()
    for n in (1, 2):
        (bed.bot.config_dir / "archive" / victim / f"privkey{n}.pem").write_bytes(stranger)
    calls = len(bed.apache.ctl_calls())
    follow = bed.bot.run("certificates")
    text = flat(out(follow))
    assert follow.returncode == 0, text  # another command's exit code stays certbot's
    assert "was NOT reloaded" in text and "would take it down" in text, text
    assert victim in text
    assert "graceful" not in bed.apache.ctl_calls()[calls:]
    assert bed.apache.is_running()
    assert bed.apache.served_cert(victim).serial_number == served_before
    assert victim in bed.pending_lineages()
    assert bed.status().returncode != 0


def _second_apache_lineages(bed: Bed, second: Apache, count: int, prefix: str) -> list[str]:
    extra = {"apache_server_root": str(second.root),
             "apache_vhost_root": str(second.vhost_root),
             "apache_logs_root": str(second.log_dir),
             "apache_challenge_location": str(second.challenge_location),
             "apache_ctl": str(second.ctl)}
    names = make_farm(str(bed.bot.config_dir), count, ca=bed.ca,
                      server=bed.pebble.directory_url, webroot=str(bed.apache.webroot),
                      authenticator="batch-webroot", installer="batch-apache",
                      extra_renewalparams=extra, name_fmt=prefix + "{i}.test",
                      version=bed.bot.version)
    for name in names:
        live = bed.bot.live(name)
        second.add_ssl_vhost(name, cert_path=live / "fullchain.pem",
                             key_path=live / "privkey.pem")
    second.reload()
    second.reset_counts()
    return names


def _serves(apache: Apache, bed: Bed, names: list[str]) -> None:
    for name in names:
        expected = certs.load_pem_chain(bed.bot.live(name) / "cert.pem")[0]
        assert apache.wait_for_cert(name, expected).serial_number == expected.serial_number


def test_two_apache_instances_each_deployed_and_retried_alone(bed: Bed) -> None:
    second = Apache()
    try:
        second.start()
        one = bed.lineages(2, "first")
        two = _second_apache_lineages(bed, second, 2, "second")
        proc = bed.bot.run("renew", "--force-renewal")
        assert proc.returncode == 0, out(proc)
        assert bed.apache.counts().graceful == 1 and second.counts().graceful == 1
        _serves(bed.apache, bed, one)
        _serves(second, bed, two)
        assert bed.pending_lineages() == []

        # The second one's configuration breaks: the first is deployed, the second waits.
        broken = second.root / "conf-enabled" / "zz-broken.conf"
        broken.write_text("Include /nonexistent/certbot-batch-broken.conf\n")
        bed.apache.reset_counts()
        second.reset_counts()
        proc = bed.bot.run("renew", "--force-renewal")
        text = flat(out(proc))
        assert proc.returncode != 0, text
        assert bed.apache.counts().graceful == 1 and second.counts().graceful == 0
        _serves(bed.apache, bed, one)
        for name in two:
            assert f"/live/{name}/fullchain.pem (renewed, not deployed)" in text, text
        for name in one:
            assert f"/live/{name}/fullchain.pem (success)" in text, text
        assert sorted(bed.pending_lineages()) == sorted(two)

        broken.unlink()
        bed.apache.reset_counts()
        proc = bed.bot.run("renew")
        assert proc.returncode == 0, out(proc)
        assert bed.apache.counts().graceful == 0 and second.counts().graceful == 1
        _serves(second, bed, two)
        assert bed.pending_lineages() == []
    finally:
        second.cleanup()


def test_failing_batch_hook_is_retried_by_renew_only(bed: Bed, tmp_path: Path) -> None:
    names = bed.lineages(2, "hook")
    hook_dir = bed.bot.config_dir / "renewal-hooks" / "batch-deploy"
    hook_dir.mkdir(parents=True)
    failing = tmp_path / "failing"
    failing.write_text("on")
    logs = {}
    for hook, fail in (("10-ok", False), ("20-restart-postfix", True)):
        log = tmp_path / f"{hook}.log"
        logs[hook] = log
        body = (f'echo "${{RENEWED_LINEAGES}}|${{RENEWED_LINEAGE-unset}}" >> {log}\n' +
                (f"[ -e {failing} ] && exit 1\n" if fail else "") + "exit 0\n")
        path = hook_dir / hook
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)

    def lines(hook: str) -> list[str]:
        return logs[hook].read_text().splitlines() if logs[hook].exists() else []

    first = bed.bot.run("renew", "--force-renewal")
    assert first.returncode != 0, out(first)
    assert "20-restart-postfix" in flat(out(first))
    assert len(lines("10-ok")) == 1 and len(lines("20-restart-postfix")) == 1
    lineages, single = lines("10-ok")[0].split("|")
    assert sorted(lineages.split()) == sorted(str(bed.bot.live(n)) for n in names)
    assert single == "unset"  # no stale RENEWED_LINEAGE of certbot's last deploy hook
    bed.assert_served(names)

    for command in ("certificates", "plugins", "show_account"):
        calls = len(bed.apache.ctl_calls())
        proc = bed.bot.run(command)
        text = flat(out(proc))
        assert proc.returncode == 0, text
        assert "interrupted" not in text, text
        assert "next `certbot renew` runs it again" in text, text
        assert bed.apache.ctl_calls()[calls:] == [], command
    assert len(lines("10-ok")) == 1 and len(lines("20-restart-postfix")) == 1

    calls = len(bed.apache.ctl_calls())
    again = bed.bot.run("renew")
    assert again.returncode != 0, out(again)
    assert len(lines("10-ok")) == 1 and len(lines("20-restart-postfix")) == 2
    assert bed.apache.ctl_calls()[calls:] == []  # Apache was deployed: not again

    failing.unlink()
    fixed = bed.bot.run("renew")
    assert fixed.returncode == 0, out(fixed)
    assert len(lines("20-restart-postfix")) == 3 and len(lines("10-ok")) == 1
    assert bed.pending_lineages() == []
    assert bed.status().returncode == 0


def test_records_that_are_not_safe_are_not_acted_upon(bed: Bed, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    outside = tmp_path / "outside" / ".well-known" / "acme-challenge" / "token"
    outside.parent.mkdir(parents=True)
    outside.write_text("not ours")
    state = bed.bot.work_dir / "certbot-batch"
    state.mkdir(parents=True, exist_ok=True)
    journal = state / "challenges.journal"
    journal.write_text(
        json.dumps({"kind": "file", "path": str(victim)}) + "\n" +
        json.dumps({"kind": "file", "path": str(outside), "root": str(bed.apache.webroot)})
        + "\n")
    journal.chmod(0o600)
    marker = tmp_path / "hook-ran"
    record = state / "deploy-pending.json"
    record.write_text(json.dumps({"version": 2, "seq": 1, "servers": {}, "hooks": {
        f"touch {marker}": {"command": f"touch {marker}", "lineages": ["x.test"],
                            "state": "in-progress", "pid": None, "since": 1.0}}}))
    record.chmod(0o666)  # writable by anyone: never trusted
    proc = bed.bot.run("certificates")
    text = flat(out(proc) + bed.bot.log_text())
    assert proc.returncode == 0, text
    assert victim.read_text() == "precious" and outside.exists()
    assert not marker.exists()
    assert "not removing" in text and "writable by group or others" in text, text


@pytest.fixture
def site(certbot_flavour: str, tmp_path: Path, apache: Apache, pebble: Pebble,
         request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(certbot_flavour, tmp_path, apache, pebble)
    try:
        yield s
    finally:
        rep = getattr(request.node, "bed_report_call", None)
        if rep is not None and rep.failed:
            print(f"\n===== certbot log (tail) =====\n{s.bot.log_text()[-15000:]}")
        s.proxy.cleanup()


def _fault(site: Site, fault: str) -> Optional[sqlite3.Connection]:
    state_dir = site.bot.work_dir / "certbot-batch"
    db = state_dir / "state.sqlite"
    if fault == "db-deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    elif fault == "state-dir-lost":
        subprocess.run(["rm", "-rf", str(state_dir)], check=True)
    elif fault == "state-dir-unusable":
        subprocess.run(["rm", "-rf", str(state_dir)], check=True)
        state_dir.write_text("a file where the state directory was")
    elif fault == "db-corrupt":
        db.write_bytes(b"this is not a database" * 100)
    elif fault == "db-locked":
        conn = sqlite3.connect(str(db), timeout=1)
        conn.execute("BEGIN EXCLUSIVE")
        return conn
    return None


@pytest.mark.parametrize("fault", ["db-deleted", "state-dir-lost", "state-dir-unusable",
                                   "db-corrupt", "db-locked"])
def test_backoff_survives_whatever_happens_to_the_state_db(site: Site, tmp_path: Path,
                                                            fault: str) -> None:
    site.add(2, "good")
    dead_root = tmp_path / "not-served"
    dead_root.mkdir()
    dead = site.add(3, "dead", webroot=dead_root)
    first = site.renew()
    assert first.returncode != 0, out(first)
    assert site.proxy.count("newOrder") == 5
    lock = _fault(site, fault)
    try:
        late = site.add(1, "late")  # due now: must still renew whatever the state dir
        again = site.renew()
    finally:
        if lock is not None:
            lock.close()
    text = flat(out(again))
    assert again.returncode == 0, text + site.bot.log_text()[-5000:]
    assert site.proxy.count("newOrder") == 1, text  # the late one; none of the dead
    assert site.versions(late[0]) == 2
    for name in dead:
        assert f"{name}: failing since" in text, text
    assert "Could not write the challenge file" not in text


def test_server_taken_down_by_a_reload_is_said_loudly(bed: Bed) -> None:
    """A pair nothing of ours can check (a vhost outside certbot's live/ with a key that fits
    no certificate): the configtest passes, the reload takes Apache down. The run says so,
    exits non-zero and keeps the deployment pending for the next renew."""
    names = bed.lineages(1, "down")
    stranger = certs.make_leaf(["stranger.test"])
    other = certs.make_leaf(["other.test"])
    cert = bed.apache.placeholder_dir / "mismatch.crt"
    key = bed.apache.placeholder_dir / "mismatch.key"
    cert.write_bytes(stranger.cert_pem())
    key.write_bytes(other.key_pem())
    bed.apache.add_ssl_vhost("mismatch.test", cert_path=cert, key_path=key)
    proc = bed.bot.run("renew", "--force-renewal")
    text = flat(out(proc))
    assert proc.returncode != 0, text
    assert "is DOWN after its reload" in text, text
    assert not bed.apache.is_running()
    assert f"/live/{names[0]}/fullchain.pem (renewed, not deployed)" in text, text
    assert names == bed.pending_lineages()
    assert bed.status().returncode != 0
