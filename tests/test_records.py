"""Issue 16, in process: the records recovery acts on, and the live/ links a reload trusts.

No bed: lineages, journals and records are written in a temp dir exactly as certbot and
certbot-batch write them; every function under test reads and writes real files.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from certbot_batch import durable, links
from certbot_batch.ca import backoff, ledger
from certbot_batch.challenges.journal import Journal, safe_to_remove
from certbot_batch.deploy import pending
from certbot_batch.scan.state import LineageState
from certbot_batch.servers.base import ServerRef
from tests.bed import certs

KINDS = ("cert", "privkey", "chain", "fullchain")


def config(tmp_path: Path) -> Any:
    return SimpleNamespace(config_dir=str(tmp_path / "config"), work_dir=str(tmp_path / "work"))


# -- live/ links ------------------------------------------------------------------------------

class Lineage:
    """A lineage laid out as certbot lays it out (archive/NAME/kindN.pem, relative links)."""

    def __init__(self, root: Path, name: str = "example.test") -> None:
        self.name = name
        self.archive = root / "archive" / name
        self.live = root / "live" / name
        self.archive.mkdir(parents=True)
        self.live.mkdir(parents=True)
        self.ca = certs.make_ca()
        self.serials: dict[int, int] = {}

    def add_version(self, version: int) -> None:
        leaf = certs.make_leaf([self.name], issuer=self.ca)
        self.serials[version] = leaf.cert.serial_number
        (self.archive / f"cert{version}.pem").write_bytes(leaf.cert_pem())
        (self.archive / f"privkey{version}.pem").write_bytes(leaf.key_pem())
        (self.archive / f"chain{version}.pem").write_bytes(self.ca.cert_pem())
        (self.archive / f"fullchain{version}.pem").write_bytes(leaf.cert_pem() +
                                                               self.ca.cert_pem())

    def link(self, kind: str, version: int, prefix: str = "") -> None:
        path = self.live / f"{prefix}{kind}.pem"
        if path.is_symlink():
            path.unlink()
        path.symlink_to(Path("..") / ".." / "archive" / self.name / f"{kind}{version}.pem")

    def link_all(self, version: int) -> None:
        for kind in KINDS:
            self.link(kind, version)

    def versions(self) -> dict[str, int]:
        return {k: int(os.readlink(self.live / f"{k}.pem").rsplit(k, 1)[1][:-4])
                for k in KINDS}

    def model(self) -> links.Lineage:
        return links.Lineage.in_live_dir(str(self.live))


def test_consistent_lineage_is_left_alone(tmp_path: Path) -> None:
    lin = Lineage(tmp_path)
    lin.add_version(1)
    lin.link_all(1)
    assert links.quick_problem(lin.model()) is None
    outcome = links.ensure_consistent(lin.model())
    assert outcome.ok and not outcome.changed and outcome.version == 1


def test_kill_between_link_moves_is_finished_forward(tmp_path: Path) -> None:
    """certbot's update_all_links_to killed after moving cert and privkey: the undo record
    (previous_*) is applied, then the complete new version is linked (as certbot's renew
    would: _fix_symlinks, then ensure_deployed)."""
    lin = Lineage(tmp_path)
    lin.add_version(1)
    lin.add_version(2)
    lin.link_all(1)
    for kind in KINDS:
        lin.link(kind, 1, prefix="previous_")
    lin.link("cert", 2)
    lin.link("privkey", 2)
    assert "previous_" in str(links.quick_problem(lin.model()))
    outcome = links.ensure_consistent(lin.model(), deep=False)
    assert outcome.ok and outcome.changed and outcome.version == 2, outcome
    assert lin.versions() == {k: 2 for k in KINDS}
    assert not list(lin.live.glob("previous_*"))
    assert "live/ now on version 2" in outcome.message


def test_links_on_two_versions_without_undo_record(tmp_path: Path) -> None:
    lin = Lineage(tmp_path)
    lin.add_version(1)
    lin.add_version(2)
    lin.link_all(1)
    lin.link("privkey", 2)
    assert "different versions" in str(links.quick_problem(lin.model()))
    assert links.ensure_consistent(lin.model()).version == 2
    assert lin.versions() == {k: 2 for k in KINDS}


def test_cut_short_newest_version_is_never_linked(tmp_path: Path) -> None:
    lin = Lineage(tmp_path)
    lin.add_version(1)
    lin.add_version(2)
    (lin.archive / "privkey2.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nMIG")
    lin.link_all(1)
    lin.link("cert", 2)
    outcome = links.ensure_consistent(lin.model())
    assert outcome.ok and outcome.version == 1, outcome
    assert lin.versions() == {k: 1 for k in KINDS}
    assert "skipped v2" in outcome.message


def test_newer_complete_version_never_linked_is_deployed(tmp_path: Path) -> None:
    """A kill after the archive was written, before any link moved."""
    lin = Lineage(tmp_path)
    lin.add_version(1)
    lin.add_version(2)
    lin.link_all(1)
    assert links.quick_problem(lin.model()) is None  # invisible without reading the archive
    assert links.ensure_consistent(lin.model(), deep=False).version is None
    outcome = links.ensure_consistent(lin.model(), deep=True)
    assert outcome.version == 2 and outcome.changed
    assert lin.versions() == {k: 2 for k in KINDS}


def test_key_that_fits_no_certificate_is_refused(tmp_path: Path) -> None:
    lin = Lineage(tmp_path)
    lin.add_version(1)
    other = certs.make_leaf(["other.test"])
    (lin.archive / "privkey1.pem").write_bytes(other.key_pem())
    lin.link_all(1)
    outcome = links.ensure_consistent(lin.model())
    assert not outcome.ok
    assert "does not fit" in outcome.message and "no version" in outcome.message
    assert lin.versions() == {k: 1 for k in KINDS}  # nothing changed


# -- mirrored records and trust -------------------------------------------------------------------

def test_mirrored_record_survives_either_copy(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "rec.json", tmp_path / "b" / "rec.json"
    rec = durable.MirroredRecord([str(a), str(b)])
    assert rec.save({"x": 1})
    assert json.loads(a.read_text())["x"] == 1 and json.loads(b.read_text())["x"] == 1
    a.unlink()
    assert rec.load()["x"] == 1  # type: ignore[index]
    rec.save({"x": 2})
    b.unlink()
    assert rec.load()["x"] == 2  # type: ignore[index]


def test_newest_copy_wins_over_a_stale_one(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "rec.json", tmp_path / "b" / "rec.json"
    rec = durable.MirroredRecord([str(a), str(b)])
    rec.save({"x": 1})
    stale = a.read_text()
    rec.save({"x": 2})
    a.write_text(stale)  # a directory that could not be written any more kept the old copy
    assert rec.load()["x"] == 2  # type: ignore[index]


def test_unwritable_directory_costs_one_copy(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    good = tmp_path / "good" / "rec.json"
    rec = durable.MirroredRecord([str(blocked / "rec.json"), str(good)])
    assert rec.save({"x": 3})
    assert rec.load()["x"] == 3  # type: ignore[index]


@pytest.mark.parametrize("mode", [0o666, 0o620])
def test_records_writable_by_others_are_ignored(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "rec.json"
    rec = durable.MirroredRecord([str(path)])
    rec.save({"x": 1})
    os.chmod(path, mode)
    assert durable.trust_problem(str(path)) is not None
    assert rec.load() is None


def test_record_owned_by_another_user_is_ignored(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    path = tmp_path / "rec.json"
    path.write_text("{}")
    os.chmod(path, 0o600)
    os.chown(path, 4242, 4242)
    assert "owned by uid 4242" in str(durable.trust_problem(str(path)))


def test_symlinked_record_is_ignored(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text('{"x": 1}')
    os.chmod(real, 0o600)
    link = tmp_path / "rec.json"
    link.symlink_to(real)
    assert durable.MirroredRecord([str(link)]).load() is None


# -- the challenge journal -------------------------------------------------------------------------

def test_journal_removes_only_challenge_files_inside_their_webroot(tmp_path: Path) -> None:
    webroot = tmp_path / "www"
    challenge_dir = webroot / ".well-known" / "acme-challenge"
    challenge_dir.mkdir(parents=True)
    token = challenge_dir / "tok"
    token.write_text("x")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    elsewhere = tmp_path / "other" / ".well-known" / "acme-challenge"
    elsewhere.mkdir(parents=True)
    decoy = elsewhere / "tok2"
    decoy.write_text("not ours")
    journal = Journal([str(tmp_path / "state" / "challenges.journal")])
    journal.record("file", [str(token)], root=str(webroot))
    journal.record("file", [str(victim)])
    journal.record("file", [str(decoy)], root=str(webroot))  # outside the journaled webroot
    journal.record("dir", [str(tmp_path / "other")])
    journal.recover()
    assert not token.exists()
    assert victim.read_text() == "precious"
    assert decoy.exists()
    assert (tmp_path / "other").is_dir()
    assert not journal.exists()


def test_untrusted_journal_is_not_acted_upon(tmp_path: Path) -> None:
    webroot = tmp_path / "www"
    token = webroot / ".well-known" / "acme-challenge" / "tok"
    token.parent.mkdir(parents=True)
    token.write_text("x")
    path = tmp_path / "state" / "challenges.journal"
    journal = Journal([str(path)])
    journal.record("file", [str(token)], root=str(webroot))
    os.chmod(path, 0o646)
    journal.recover()
    assert token.exists()


@pytest.mark.parametrize("kind,path,root,ok", [
    ("file", "/srv/www/.well-known/acme-challenge/t", "/srv/www", True),
    ("file", "/srv/www/.well-known/acme-challenge/t", None, True),
    ("file", "/etc/passwd", None, False),
    ("file", "/srv/www/.well-known/acme-challenge/../../index.html", None, False),
    ("file", "/etc/apache2/conf-enabled/certbot-batch-acme.conf", None, True),
    ("file", "/etc/apache2/certbot-batch-acme.conf", None, False),
    ("dir", "/srv/www/.well-known", "/srv/www", True),
    ("dir", "/srv/www", "/srv/www", False),
    ("dir", "/elsewhere/.well-known", "/srv/www", False),
    ("other", "/srv/www/x", None, False),
])
def test_safe_to_remove(kind: str, path: str, root: Any, ok: bool) -> None:
    assert (safe_to_remove(kind, path, root) is None) == ok


def test_unwritable_state_dir_journal_goes_to_the_mirror(tmp_path: Path) -> None:
    blocked = tmp_path / "work" / "certbot-batch"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a directory")
    mirror = tmp_path / "config" / "certbot-batch" / "challenges.journal"
    journal = Journal([str(blocked / "challenges.journal"), str(mirror)])
    journal.record("file", ["/srv/www/.well-known/acme-challenge/t"], root="/srv/www")
    assert mirror.exists()
    assert journal.entries() == [("file", "/srv/www/.well-known/acme-challenge/t")]


def test_journal_that_cannot_be_written_anywhere_never_raises(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("x")
    journal = Journal([str(blocked / "a"), str(blocked / "b")])
    journal.record("file", ["/srv/www/.well-known/acme-challenge/t"])
    assert journal.entries() == []


# -- the pending-deployment record -------------------------------------------------------------

def test_pending_per_server_and_states(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    one = ServerRef("apache", "/usr/sbin/apache2ctl", "/etc/apache2")
    two = ServerRef("apache", "/opt/b/apachectl", "/opt/b/conf")
    record = pending.PendingDeployments(cfg)
    record.begin({one: ["a.test"], two: ["b.test"]}, ["hook"], ["a.test", "b.test"])
    assert {r.key for r, _ in record.servers()} == {one.key, two.key}
    assert all(pending.interrupted(e) for _, e in record.servers())
    record.server_done(one)
    record.server_failed(two, "configtest fails")
    (ref, entry), = record.servers()
    assert ref == two and entry["state"] == pending.FAILED and entry["attempts"] == 1
    assert record.lineages() == ["a.test", "b.test"]  # the hook still owes both
    record.hook_done("hook")
    record.server_done(two)
    assert not record.exists()


def test_pending_record_survives_a_lost_state_dir(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    ref = ServerRef("apache", "apache2ctl", "/etc/apache2")
    pending.PendingDeployments(cfg).begin({ref: ["a.test"]}, [], ["a.test"])
    for path in (tmp_path / "work" / "certbot-batch").iterdir():
        path.unlink()
    (tmp_path / "work" / "certbot-batch").rmdir()
    assert pending.PendingDeployments(cfg).lineages() == ["a.test"]


def test_pending_record_of_version_1_is_read(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    path = Path(pending.path_for(cfg))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"lineages": ["a.test"], "hooks": ["h"], "since": 1.0,
                                "reload": {"ctl": "apache2ctl", "server_root": "/etc/apache2"},
                                "error": "configtest failed"}))
    path.chmod(0o600)
    record = pending.PendingDeployments(cfg)
    (ref, entry), = record.servers()
    assert ref.ctl == "apache2ctl" and entry["state"] == pending.FAILED
    assert record.hooks()[0][0] == "h"


# -- the backoff ledger ---------------------------------------------------------------------------

def _failing(name: str, serial: str = "abc") -> LineageState:
    state = LineageState(name=name, serial=serial, conf_sig="1:2")
    backoff.record_failure(state, 1000.0, "validation failed")
    return state


def test_ledger_restores_backoff_lost_with_the_database(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    book = ledger.Ledger(cfg)
    state = _failing("dead.test")
    book.note(state)
    book.flush()
    # A rebuilt database knows nothing but what the scan reads again (conf, certificate).
    fresh = LineageState(name="dead.test", serial="abc", conf_sig="1:2")
    assert ledger.Ledger(cfg).apply([fresh]) == 1
    assert fresh.renew_failures == 1 and fresh.renew_next_attempt == state.renew_next_attempt
    assert backoff.backing_off(fresh, 1001.0, SimpleNamespace())


def test_ledger_newest_line_wins_and_success_clears(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    book = ledger.Ledger(cfg)
    state = _failing("x.test")
    book.note(state, now=1.0)
    backoff.record_success(state)
    book.note(state, now=2.0)
    book.flush()
    fresh = LineageState(name="x.test", serial="abc", renew_failures=3,
                         renew_next_attempt=9e9)
    ledger.Ledger(cfg).apply([fresh])
    assert fresh.renew_failures == 0 and fresh.renew_next_attempt is None


def test_ledger_line_of_a_replaced_certificate_does_not_apply(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    book = ledger.Ledger(cfg)
    book.note(_failing("x.test", serial="old"))
    book.flush()
    fresh = LineageState(name="x.test", serial="new")
    assert ledger.Ledger(cfg).apply([fresh]) == 0
    assert fresh.renew_next_attempt is None


def test_ledger_with_one_copy_lost_or_unwritable(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    state_dir = tmp_path / "work" / "certbot-batch"
    state_dir.parent.mkdir(parents=True)
    state_dir.write_text("not a directory")  # the state dir cannot be written at all
    book = ledger.Ledger(cfg)
    book.note(_failing("x.test"))
    book.flush()
    fresh = LineageState(name="x.test", serial="abc")
    assert ledger.Ledger(cfg).apply([fresh]) == 1
    mirror = tmp_path / "config" / "certbot-batch" / "backoff.log"
    assert stat.S_IMODE(mirror.stat().st_mode) == 0o600
