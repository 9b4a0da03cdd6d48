"""The challenge batch and the journal in process (issue 17): rendezvous, drop-outs,
timeout, stop; one provisioning and one cleanup per wave; torn journal lines, recovery order.
Threads synchronise on events and joins, never on sleeps."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from certbot import errors

from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.journal import Journal
from certbot_batch.challenges.webroot import ChallengeFile
from certbot_batch.servers.apache import SNIPPET_NAME as SNIPPET

JOIN = 30.0


class Provisioner:
    """Records what the batch asks; fails the items of ``bad`` lineages."""

    def __init__(self, bad: tuple[str, ...] = ()) -> None:
        self.provisioned: list[list[str]] = []
        self.cleanups = 0
        self.bad = bad

    def provision(self, items: list[ChallengeFile]) -> list[tuple[ChallengeFile, Exception]]:
        self.provisioned.append(sorted(str(i.lineage) for i in items))
        return [(i, errors.PluginError(f"cannot write for {i.lineage}")) for i in items
                if i.lineage in self.bad]

    def cleanup(self) -> None:
        self.cleanups += 1


def _item(lineage: str) -> ChallengeFile:
    return ChallengeFile(identifier=lineage, webroot="/srv/www", token=f"t-{lineage}",
                         content=b"x", lineage=lineage)


def _perform_all(batch: ChallengeBatch, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def one(name: str) -> None:
        try:
            batch.perform(name, [_item(name)])
            results[name] = "ok"
        except errors.Error as exc:
            results[name] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not any(t.is_alive() for t in threads)
    return results


def test_one_provisioning_for_everyone_then_one_cleanup() -> None:
    prov = Provisioner()
    names = ["a", "b", "c"]
    batch = ChallengeBatch(names, prov)  # type: ignore[arg-type]
    results = _perform_all(batch, names)
    assert results == {n: "ok" for n in names}
    assert prov.provisioned == [names]
    batch.cleanup("a")
    batch.cleanup("b")
    assert prov.cleanups == 0  # c still validating
    batch.depart("c")
    assert prov.cleanups == 1 and batch.cleanup_calls == 1


def test_a_drop_out_does_not_hold_the_others() -> None:
    prov = Provisioner()
    batch = ChallengeBatch(["a", "b", "gone"], prov)  # type: ignore[arg-type]
    batch.depart("gone")  # its order failed: it will never perform
    assert _perform_all(batch, ["a", "b"]) == {"a": "ok", "b": "ok"}
    assert prov.provisioned == [["a", "b"]]


def test_one_lineages_bad_webroot_never_costs_another_its_renewal() -> None:
    prov = Provisioner(bad=("b",))
    batch = ChallengeBatch(["a", "b"], prov)  # type: ignore[arg-type]
    results = _perform_all(batch, ["a", "b"])
    assert results["a"] == "ok"
    assert isinstance(results["b"], errors.PluginError) and "b" in str(results["b"])


def test_timeout_provisions_those_who_came_and_a_late_one_alone() -> None:
    prov = Provisioner()
    batch = ChallengeBatch(["a", "late"], prov, wait_timeout=0.05)  # type: ignore[arg-type]
    assert _perform_all(batch, ["a"]) == {"a": "ok"}
    assert prov.provisioned == [["a"]]
    batch.perform("late", [_item("late")])
    assert prov.provisioned == [["a"], ["late"]]
    assert batch.provision_calls == 2


def test_stop_releases_the_waiting_and_writes_nothing() -> None:
    prov = Provisioner()
    batch = ChallengeBatch(["a", "never"], prov)  # type: ignore[arg-type]
    results: dict[str, Any] = {}
    waiting = threading.Event()

    def perform() -> None:
        waiting.set()
        try:
            batch.perform("a", [_item("a")])
            results["a"] = "ok"
        except errors.PluginError as exc:
            results["a"] = exc

    thread = threading.Thread(target=perform)
    thread.start()
    assert waiting.wait(JOIN)
    with batch.locked():  # a is inside perform() (or about to be) when the wave is given up
        batch.finish()
    thread.join(JOIN)
    assert isinstance(results["a"], errors.PluginError)
    assert prov.provisioned == []
    with pytest.raises(errors.PluginError):
        batch.perform("never", [_item("never")])


def test_finish_cleans_up_what_was_provisioned() -> None:
    prov = Provisioner()
    batch = ChallengeBatch(["a"], prov)  # type: ignore[arg-type]
    batch.perform("a", [_item("a")])
    batch.finish()  # the worker never came back (stop signal, grace over)
    assert prov.cleanups == 1
    batch.finish()
    assert prov.cleanups == 1


# -- the journal ----------------------------------------------------------------------------

def test_torn_last_line_is_skipped_and_the_next_record_starts_a_line(tmp_path: Path) -> None:
    path = tmp_path / "challenges.journal"
    journal = Journal([str(path)])
    journal.record("file", ["/srv/www/.well-known/acme-challenge/one"], root="/srv/www")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"kind": "file", "path": "/srv/www/.well-kn')  # SIGKILL mid-write
    journal.record("file", ["/srv/www/.well-known/acme-challenge/two"], root="/srv/www")
    assert [p for _, p in journal.entries()] == ["/srv/www/.well-known/acme-challenge/one",
                                                  "/srv/www/.well-known/acme-challenge/two"]


def test_recovery_removes_files_then_the_directories_made_for_them(tmp_path: Path) -> None:
    webroot = tmp_path / "www"
    webroot.mkdir()
    well_known = webroot / ".well-known"
    challenge = well_known / "acme-challenge"
    journal = Journal([str(tmp_path / "state" / "challenges.journal")])
    journal.record("dir", [str(well_known), str(challenge)], root=str(webroot))
    journal.record("file", [str(challenge / "tok")], root=str(webroot))
    challenge.mkdir(parents=True)
    (challenge / "tok").write_text("x")
    assert journal.recover() == []
    assert not well_known.exists() and webroot.is_dir()
    assert not journal.exists()


def test_recovery_names_the_server_whose_snippet_was_live(tmp_path: Path) -> None:
    conf_enabled = tmp_path / "apache" / "conf-enabled"
    conf_enabled.mkdir(parents=True)
    snippet = conf_enabled / SNIPPET
    journal = Journal([str(tmp_path / "state" / "challenges.journal")])
    journal.record("server", ["/usr/sbin/apache2ctl"], root=str(tmp_path / "apache"),
                   server_kind="apache", ctl="/usr/sbin/apache2ctl")
    journal.record("file", [str(snippet)])
    snippet.write_text("Alias ...")
    servers = journal.recover()
    assert servers == [{"kind": "apache", "ctl": "/usr/sbin/apache2ctl",
                        "root": str(tmp_path / "apache")}]
    assert not snippet.exists()
    # Without a live snippet there is nothing for the server to drop: no reload asked.
    journal.record("server", ["/usr/sbin/apache2ctl"], root=str(tmp_path / "apache"),
                   server_kind="apache", ctl="/usr/sbin/apache2ctl")
    journal.record("file", [str(snippet)])
    assert journal.recover() == []


def test_dns_records_across_both_copies(tmp_path: Path) -> None:
    """A record journaled in the state directory, its removal in the mirror (the state
    directory could not be written any more when it was removed): gone."""
    first, second = tmp_path / "a" / "dns.journal", tmp_path / "b" / "dns.journal"
    Journal([str(first)]).record_dns([{"id": "r1", "domain": "x.test"},
                                      {"id": "r2", "domain": "y.test"}])
    second.parent.mkdir()
    second.write_text(json.dumps({"kind": "dns-removed", "id": "r1"}) + "\n")
    second.chmod(0o600)
    assert [r["id"] for r in Journal([str(first), str(second)]).dns_records()] == ["r2"]
