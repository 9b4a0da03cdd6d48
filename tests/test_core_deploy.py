"""The deployment in process (issues 16 and 17): the safe reload, the run's flush with its
rollback, the pending record merged and cleared per server, the batch hooks, and the
reload confirmation on real processes.

A stand-in server (``FakeServer``) answers configtest / reload / confirm as scripted and
serves lineages written to a temp dir the way certbot writes them; the confirmation test
uses real processes (a master that forks a new generation of workers, or exits).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
from certbot import errors

from certbot_batch.deploy import finish, pending, reload
from certbot_batch.servers.base import Endpoint, Server, ServerRef, Snapshot
from tests import fakes
from tests.test_records import Lineage


class FakeServer(Server):
    title = "FakeServer"

    def __init__(self, ref: ServerRef, config_dir: Path, serves: list[str],
                 configtest_error: Optional[str] = None, state: str = "reloaded") -> None:
        super().__init__(ref)
        self.config_dir = config_dir
        self.serves = serves
        self.configtest_error = configtest_error
        self.state = state
        self.calls: list[str] = []

    def ctl_problem(self) -> Optional[str]:
        return None

    def configtest(self) -> None:
        self.calls.append("configtest")
        if self.configtest_error:
            raise errors.MisconfigurationError(self.configtest_error)

    def reload(self) -> str:
        self.calls.append("reload")
        return ""

    def pid_file(self) -> Optional[str]:
        return None

    def referenced_paths(self) -> set[str]:
        return {str(self.config_dir / "live" / n / f) for n in self.serves
                for f in ("fullchain.pem", "privkey.pem")}

    def endpoints(self) -> dict[str, list[Endpoint]]:
        return {}

    def confirm(self, before: Snapshot, timeout: float, clock: Any = None) -> str:
        self.calls.append(f"confirm {timeout:g}")
        return self.state


REF = ServerRef("fake", "/usr/sbin/fakectl", "/etc/fake")


@pytest.fixture
def config(tmp_path: Path) -> Any:
    return fakes.config(tmp_path)


def _lineage(config: Any, name: str, versions: int = 1) -> Lineage:
    lin = Lineage(Path(config.config_dir), name)
    for v in range(1, versions + 1):
        lin.add_version(v)
    lin.link_all(1)
    return lin


def test_deploy_reloads_after_checking_every_served_lineage(config: Any) -> None:
    lin = _lineage(config, "a.test", versions=2)
    lin.link("privkey", 2)  # a kill in certbot's save: the key of v2 beside the cert of v1
    server = FakeServer(REF, Path(config.config_dir), ["a.test"])
    outcome = reload.deploy(server, config.config_dir, [])
    assert outcome.ok, outcome
    assert lin.versions() == {k: 2 for k in ("cert", "privkey", "chain", "fullchain")}
    assert server.calls == ["configtest", "reload", f"confirm {reload.CONFIRM_TIMEOUT:g}"]


def test_deploy_refuses_when_a_served_lineage_cannot_be_made_safe(config: Any) -> None:
    from tests.bed import certs

    lin = _lineage(config, "bad.test")
    (lin.archive / "privkey1.pem").write_bytes(certs.make_leaf(["x.test"]).key_pem())
    server = FakeServer(REF, Path(config.config_dir), ["bad.test"])
    # Served lineages are checked by their links (what a kill leaves wrong); the lineages
    # being deployed are read closely: a key that fits no certificate refuses the reload.
    outcome = reload.deploy(server, config.config_dir, ["bad.test"])
    assert outcome.status == reload.REFUSED
    assert "bad.test" in outcome.message and "would take it down" in outcome.message
    assert server.calls == []  # not even a configtest


@pytest.mark.parametrize("state,status", [("down", reload.DOWN),
                                          ("unconfirmed", reload.UNCONFIRMED),
                                          ("unverifiable", reload.RELOADED)])
def test_deploy_outcome_follows_the_confirmation(config: Any, state: str, status: str) -> None:
    server = FakeServer(REF, Path(config.config_dir), [], state=state)
    assert reload.deploy(server, config.config_dir, []).status == status


class Delegate:
    """certbot's configurator as batch-apache uses it for a rollback."""

    def __init__(self, backup_dir: Path) -> None:
        self.backup_dir = backup_dir
        self.rolled_back: list[int] = []
        self.recovered = 0

    def recovery_routine(self) -> None:
        self.recovered += 1

    def rollback_checkpoints(self, count: int) -> None:
        self.rolled_back.append(count)


def test_flush_rolls_back_exactly_this_runs_edits(config: Any, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "older").mkdir()
    server = FakeServer(REF, Path(config.config_dir), [], configtest_error="syntax error")
    target = reload.Target(REF, server, reload_requested=True, edited=True,
                           delegate=Delegate(backups), checkpoints_before=1,
                           backup_dir=str(backups))
    for n in range(3):  # three lineages edited in this run, a checkpoint each
        (backups / f"run{n}").mkdir()
    outcome = reload.flush(target, config.config_dir, [])
    assert outcome.status == reload.CONFIGTEST_FAILED
    assert "rolled back" in outcome.message
    assert target.delegate.rolled_back == [3] and target.delegate.recovered == 1


def _finish_with(config: Any, monkeypatch: pytest.MonkeyPatch,
                 servers: dict[str, FakeServer], **kw: Any) -> finish.Report:
    monkeypatch.setattr(finish, "server_for", lambda ref: servers[ref.key])
    return finish.finish(config, **kw)


def test_finish_merges_earlier_failures_and_clears_per_server(
        config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    one = ServerRef("fake", "/one/ctl", "/one")
    two = ServerRef("fake", "/two/ctl", "/two")
    record = pending.PendingDeployments(config)
    record.begin({one: ["old.test"], two: ["other.test"]}, [], [])
    record.server_failed(one, "configtest fails")
    record.server_failed(two, "configtest fails")
    good = FakeServer(one, Path(config.config_dir), [])
    broken = FakeServer(two, Path(config.config_dir), [], configtest_error="still broken")
    run = reload.DeployRun()
    monkeypatch.setattr(reload, "server_for", lambda ref: {one.key: good,
                                                           two.key: broken}[ref.key])
    run.target(one).reload_requested = True
    run.target(one).lineages.add("new.test")
    report = _finish_with(config, monkeypatch, {one.key: good, two.key: broken},
                          brief=False, run=run, run_lineages=["new.test"])
    assert report.servers[one.key].ok and not report.servers[two.key].ok
    assert report.earlier == ["old.test"]
    assert report.not_deployed == {"other.test": report.servers[two.key].message}
    (ref, entry), = pending.PendingDeployments(config).servers()
    assert ref == two and entry["attempts"] == 2
    assert good.calls.count("reload") == 1  # one reload for this run's and the earlier one


def test_brief_recovery_deploys_interrupted_only(config: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    one = ServerRef("fake", "/one/ctl", "/one")
    two = ServerRef("fake", "/two/ctl", "/two")
    record = pending.PendingDeployments(config)
    record.begin({one: ["a.test"]}, [], [], owner=None)  # left by a run that was killed
    record.begin({two: ["b.test"]}, [], [], owner=None)
    record.server_failed(two, "configtest fails")  # reported by its own run
    servers = {one.key: FakeServer(one, Path(config.config_dir), []),
               two.key: FakeServer(two, Path(config.config_dir), [])}
    report = _finish_with(config, monkeypatch, servers, brief=True)
    assert servers[one.key].calls[:2] == ["configtest", "reload"]
    assert f"confirm {reload.BRIEF_CONFIRM_TIMEOUT:g}" in servers[one.key].calls
    assert servers[two.key].calls == []
    assert len(report.left) == 1 and "next `certbot renew` tries again" in report.left[0]
    assert [r.key for r, _ in pending.PendingDeployments(config).servers()] == [two.key]


def test_batch_hooks_get_every_lineage_and_no_stale_renewed_lineage(
        config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "hook.out"
    hook = f'echo "$RENEWED_LINEAGES|${{RENEWED_LINEAGE-unset}}|$CERTBOT_BATCH_COUNT" > {out}'
    config.batch_deploy_hook = hook
    monkeypatch.setenv("RENEWED_LINEAGE", "/etc/letsencrypt/live/last.test")
    pending.PendingDeployments(config).begin({}, [hook], ["a.test", "b.test"])
    report = finish.finish(config, brief=False, run_lineages=["a.test", "b.test"])
    assert report.errors == []
    lineages, single, count = out.read_text().strip().split("|")
    assert lineages.split() == [os.path.join(config.config_dir, "live", n)
                                for n in ("a.test", "b.test")]
    assert (single, count) == ("unset", "2")
    assert not pending.PendingDeployments(config).exists()


def test_failing_hook_stays_pending_and_is_retried_once_per_renew(
        config: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    hook = f"echo x >> {runs}; exit 1"
    pending.PendingDeployments(config).begin({}, [hook], ["a.test"])
    assert finish.finish(config, brief=False, run_lineages=["a.test"]).errors
    assert finish.finish(config, brief=True).left  # another command: only said
    assert runs.read_text().count("x") == 1
    assert finish.finish(config, brief=False).errors  # the next renew: again
    assert runs.read_text().count("x") == 2
    (cmd, entry), = pending.PendingDeployments(config).hooks()
    assert entry["state"] == pending.FAILED and entry["attempts"] == 2


# -- the confirmation, on real processes ---------------------------------------------------

MASTER = r"""
import os, signal, sys, time
pid_file = sys.argv[1]
workers = []
def spawn():
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            signal.pause()
            os._exit(0)
        workers.append(pid)
def reload(signum, frame):
    if os.path.exists(pid_file + ".broken"):
        os._exit(1)          # a configuration it cannot load: the master exits
    for pid in list(workers):
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        workers.remove(pid)
    spawn()                  # a new generation of workers
signal.signal(signal.SIGHUP, reload)
spawn()
with open(pid_file + ".tmp", "w") as fh:
    fh.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)
while True:
    signal.pause()
"""


class ProcessServer(FakeServer):
    """A server whose master is a real process: reload = SIGHUP; confirm is Server's own."""

    def __init__(self, ref: ServerRef, config_dir: Path, pid_path: Path) -> None:
        super().__init__(ref, config_dir, [])
        self.pid_path = pid_path

    def pid_file(self) -> Optional[str]:
        return str(self.pid_path)

    def reload(self) -> str:
        os.kill(int(self.pid_path.read_text()), signal.SIGHUP)
        return ""

    confirm = Server.confirm  # type: ignore[assignment]


@pytest.fixture
def master(tmp_path: Path) -> Any:
    pid_path = tmp_path / "master.pid"
    proc = subprocess.Popen([sys.executable, "-c", MASTER, str(pid_path)])
    try:
        while not pid_path.exists():  # written once its first workers run
            if proc.poll() is not None:
                raise AssertionError("the master did not start")
            os.sched_yield()
        yield proc, pid_path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_confirm_sees_the_new_generation(config: Any, master: Any, tmp_path: Path) -> None:
    proc, pid_path = master
    server = ProcessServer(REF, Path(config.config_dir), pid_path)
    outcome = reload.deploy(server, config.config_dir, [], timeout=30)
    assert outcome.status == reload.RELOADED, outcome
    assert proc.poll() is None


def test_confirm_sees_the_master_exit(config: Any, master: Any, tmp_path: Path) -> None:
    proc, pid_path = master
    Path(str(pid_path) + ".broken").write_text("")
    server = ProcessServer(REF, Path(config.config_dir), pid_path)
    outcome = reload.deploy(server, config.config_dir, [], timeout=30)
    assert outcome.status == reload.DOWN, outcome
    assert "DOWN" in outcome.message


# -- what installers call during a session ---------------------------------------------------

def test_installer_calls_collect_one_target_per_server(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from certbot_batch import run

    one = ServerRef("fake", "/one/ctl", "/one")
    two = ServerRef("fake", "/two/ctl", "/two")
    assert not reload.defer_reload(one)  # outside a session: the installer reloads itself
    session = fakes.session(tmp_path)
    deployment = session.run.deploy
    monkeypatch.setattr(reload, "server_for",
                        lambda ref: FakeServer(ref, tmp_path, ["a.test"]))
    delegate = object()
    with run.publish(session.run), session.run.lineage_scope("a.test"):
        assert reload.defer_reload(one, delegate)
        assert reload.request_reload(two)
        reload.mark_edited(one)
        backups = tmp_path / "backups"
        backups.mkdir()
        reload.remember_delegate(two, SimpleConfig(str(backups)), delegate)
        live = tmp_path / "live" / "a.test"
        assert reload.already_deployed(one, str(live / "cert.pem"), str(live / "privkey.pem"),
                                       str(live / "fullchain.pem"))
        assert not reload.already_deployed(one, "/x/cert.pem", "/x/privkey.pem",
                                           "/x/fullchain.pem")
        assert reload.shared_delegate(one) is delegate
    first, second = deployment.targets[one.key], deployment.targets[two.key]
    assert first.lineages == {"a.test"} and first.edited and first.reload_requested
    assert second.reload_requested and second.delegate is delegate
    assert second.checkpoints_before == 0


class SimpleConfig:
    def __init__(self, backup_dir: str) -> None:
        self.backup_dir = backup_dir


def test_probe_finds_a_server_still_serving_the_previous_certificate(
        config: Any, tmp_path: Path) -> None:
    """A real TLS server on loopback serves the lineage's previous certificate after the
    "reload": not deployed. Serving the new one: deployed."""
    import socket
    import ssl
    import threading

    from tests.bed import certs

    lin = _lineage(config, "p.test", versions=2)
    lin.link_all(2)
    old = certs.make_leaf(["p.test"])
    old_cert, old_key = tmp_path / "old.crt", tmp_path / "old.key"
    old.write(old_cert, old_key)
    served = {"cert": str(old_cert), "key": str(old_key)}
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.settimeout(5)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(served["cert"], served["key"])
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        class Probed(FakeServer):
            def endpoints(self) -> dict[str, list[Endpoint]]:
                path = str(Path(config.config_dir) / "live" / "p.test" / "fullchain.pem")
                return {path: [Endpoint("127.0.0.1", port, "p.test")]}

        server = Probed(REF, Path(config.config_dir), ["p.test"])
        stale = reload.probe(server, config.config_dir, ["p.test"],
                             {"p.test": old.cert.serial_number}, timeout=0.5)
        assert stale == ["p.test"]
        served["cert"] = str(lin.archive / "fullchain2.pem")
        served["key"] = str(lin.archive / "privkey2.pem")
        assert reload.probe(server, config.config_dir, ["p.test"],
                            {"p.test": old.cert.serial_number}, timeout=5) == []
    finally:
        stop.set()
        thread.join(5)
        listener.close()
