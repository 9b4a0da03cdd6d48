"""http-01 through a web server, in process (issue 17 item 3): ``challenges/http01.py`` speaks
only to the ``servers/`` interface, so two stand-in kinds registered in ``servers.KINDS``
exercise it without Apache or nginx -- one that inserts an include into a configuration
file and answers tokens from its snippet (nginx's way), one that serves a directory of
challenge files (Apache's way). The real kinds run the same code in test_apache_deploy.py,
test_nginx.py and test_crash_safety.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest
from certbot import errors

from certbot_batch import servers
from certbot_batch.challenges.http01 import Http01Provisioner, ServedBy
from certbot_batch.challenges.journal import Journal
from certbot_batch.challenges.webroot import ChallengeFile
from certbot_batch.servers.base import ChallengePlan, ServerRef, text_digest
from tests.test_core_deploy import FakeServer

CONF = "site.conf"
ORIGINAL = "server {listen 80; server_name a.test;}\nserver {listen 80; server_name b.test;}\n"


class InlineServer(FakeServer):
    """nginx's way: a snippet answering each token, included by each block naming a name."""
    title = "Inline"
    SNIPPET_NAME = "fake-acme-inline.conf"
    #: set by a test: the configtest fails with this
    broken: Optional[str] = None
    instances: list[InlineServer] = []

    def __init__(self, ref: ServerRef) -> None:
        super().__init__(ref, Path(ref.root), [], configtest_error=self.broken)
        InlineServer.instances.append(self)

    def challenge_snippet_path(self) -> str:
        return os.path.join(self.ref.root, self.SNIPPET_NAME)

    @classmethod
    def snippet_misplaced(cls, path: str, root: Optional[str]) -> Optional[str]:
        return None if root and os.path.dirname(path) == root else "elsewhere"

    def challenge_insert(self) -> str:
        return f' include "{self.challenge_snippet_path()}";'

    @classmethod
    def owns_insert(cls, text: str) -> bool:
        return text.endswith(f'/{cls.SNIPPET_NAME}";')

    def challenge_plan(self, names: list[str], tokens: dict[str, bytes],
                       files_root: Optional[str], first: bool) -> ChallengePlan:
        conf = os.path.join(self.ref.root, CONF)
        offsets = tuple(ORIGINAL.rindex("{", 0, ORIGINAL.index(f"server_name {n}")) + 1
                        for n in names if f"server_name {n}" in ORIGINAL)
        if len(offsets) < len(names):
            raise errors.PluginError("no block answers")
        return ChallengePlan(
            snippet="".join(f"{t} {c.decode()}\n" for t, c in sorted(tokens.items())),
            inserts={conf: offsets}, digests={conf: text_digest(ORIGINAL)}, probes=[])


class FilesServer(InlineServer):
    """Apache's way: one snippet serving a directory; the files are the challenges."""
    title = "Files"
    SNIPPET_NAME = "fake-acme-files.conf"
    SERVES_FILES = True

    def challenge_insert(self) -> str:
        return ""

    def challenge_plan(self, names: list[str], tokens: dict[str, bytes],
                       files_root: Optional[str], first: bool) -> ChallengePlan:
        return ChallengePlan(snippet=f"Alias {files_root}\n", inserts={}, digests={},
                             probes=[])


@pytest.fixture
def kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(servers.KINDS, "inline", InlineServer)
    monkeypatch.setitem(servers.KINDS, "files", FilesServer)
    monkeypatch.setattr(InlineServer, "broken", None)
    InlineServer.instances.clear()


def _setup(tmp_path: Path, kind: str) -> tuple[Http01Provisioner, ServedBy, Path, Journal]:
    root = tmp_path / "etc"
    root.mkdir()
    conf = root / CONF
    conf.write_text(ORIGINAL)
    os.utime(conf, ns=(1_000_000_000, 2_000_000_000))
    journal = Journal(str(tmp_path / "state" / "challenges.journal"))
    files_root = str(tmp_path / "acme") if kind == "files" else None
    served = ServedBy(ServerRef(kind, "/usr/sbin/fakectl", str(root)), files_root=files_root)
    return Http01Provisioner(journal), served, conf, journal


def _items(marker: str, *names: str) -> list[ChallengeFile]:
    return [ChallengeFile(identifier=n, webroot=marker, token=f"tok-{n[0]}",
                          content=f"key-{n[0]}".encode(), lineage=n) for n in names]


def _reloads() -> int:
    return sum(s.calls.count("reload") for s in InlineServer.instances)


def test_inline_kind_one_reload_late_lineage_and_byte_identical_cleanup(
        tmp_path: Path, kinds: None) -> None:
    prov, served, conf, journal = _setup(tmp_path, "inline")
    marker = prov.serve_through(served)
    assert prov.provision(_items(marker, "a.test")) == []
    snippet = Path(served.ref.root) / InlineServer.SNIPPET_NAME
    assert "tok-a key-a" in snippet.read_text()
    include = f' include "{snippet}";'
    assert conf.read_text() == ORIGINAL.replace("{", "{" + include, 1)
    assert _reloads() == 1
    # Journaled before the files were touched: the server, the snippet, the edit.
    assert [k for k, _ in journal.entries()] == ["server", "file", "insert"]
    # A late lineage: its token joins the snippet, its block gets the include; one reload.
    assert prov.provision(_items(marker, "b.test")) == []
    assert "tok-a key-a" in snippet.read_text() and "tok-b key-b" in snippet.read_text()
    assert conf.read_text().count(include) == 2
    assert _reloads() == 2
    prov.cleanup()
    assert conf.read_text() == ORIGINAL
    assert conf.stat().st_mtime_ns == 2_000_000_000
    assert not snippet.exists()
    assert _reloads() == 3  # outside a session: the reload that drops the snippet, at once
    assert not journal.exists()


def test_files_kind_late_lineage_needs_no_reload(tmp_path: Path, kinds: None) -> None:
    prov, served, conf, journal = _setup(tmp_path, "files")
    marker = prov.serve_through(served)
    assert marker == served.files_root
    assert prov.provision(_items(marker, "a.test")) == []
    challenge_dir = Path(marker) / ".well-known" / "acme-challenge"
    assert (challenge_dir / "tok-a").read_bytes() == b"key-a"
    assert oct((Path(marker)).stat().st_mode & 0o777) == "0o755"
    snippet = Path(served.ref.root) / FilesServer.SNIPPET_NAME
    assert snippet.read_text() == f"Alias {marker}\n"
    assert _reloads() == 1
    assert prov.provision(_items(marker, "b.test")) == []
    assert (challenge_dir / "tok-b").read_bytes() == b"key-b"
    assert _reloads() == 1  # the snippet already serves the directory
    prov.cleanup()
    assert not snippet.exists() and not challenge_dir.exists()
    assert conf.read_text() == ORIGINAL
    assert _reloads() == 2


def test_configtest_failure_undoes_everything_and_fails_the_items(
        tmp_path: Path, kinds: None) -> None:
    InlineServer.broken = "syntax error in site.conf"
    prov, served, conf, _ = _setup(tmp_path, "inline")
    marker = prov.serve_through(served)
    failures = prov.provision(_items(marker, "a.test", "b.test"))
    assert [i.identifier for i, _ in failures] == ["a.test", "b.test"]
    assert "Could not serve the http-01 challenges through Inline" in str(failures[0][1])
    assert "syntax error" in str(failures[0][1])
    assert conf.read_text() == ORIGINAL
    assert not (Path(served.ref.root) / InlineServer.SNIPPET_NAME).exists()
    assert _reloads() == 0  # never reloaded with a configuration that fails its test


def test_existing_snippet_is_never_overwritten(tmp_path: Path, kinds: None) -> None:
    prov, served, conf, _ = _setup(tmp_path, "inline")
    snippet = Path(served.ref.root) / InlineServer.SNIPPET_NAME
    snippet.write_text("another run's\n")
    marker = prov.serve_through(served)
    failures = prov.provision(_items(marker, "a.test"))
    assert len(failures) == 1 and str(snippet) in str(failures[0][1])
    assert "include lines" in str(failures[0][1])
    assert snippet.read_text() == "another run's\n"
    assert conf.read_text() == ORIGINAL


def test_killed_run_is_undone_by_the_journal_and_its_server_named(
        tmp_path: Path, kinds: None) -> None:
    prov, served, conf, journal = _setup(tmp_path, "inline")
    marker = prov.serve_through(served)
    assert prov.provision(_items(marker, "a.test", "b.test")) == []
    # No cleanup: the run was killed. The next command's recovery reads the journal.
    to_reload = Journal(journal.path).recover()
    assert conf.read_text() == ORIGINAL
    assert conf.stat().st_mtime_ns == 2_000_000_000
    assert not (Path(served.ref.root) / InlineServer.SNIPPET_NAME).exists()
    assert to_reload == [served.ref.to_dict()]
    assert not journal.exists()


def test_journal_refuses_a_snippet_or_insert_its_kind_does_not_own(
        tmp_path: Path, kinds: None) -> None:
    root = tmp_path / "etc"
    root.mkdir()
    elsewhere = tmp_path / InlineServer.SNIPPET_NAME
    elsewhere.write_text("x")
    placed = root / InlineServer.SNIPPET_NAME  # where its kind writes it: removed
    placed.write_text("x")
    victim = root / CONF
    victim.write_text('keep; include "/x/other.conf";')
    journal = Journal(str(tmp_path / "j"))
    journal.record("file", [str(elsewhere), str(placed)], root=str(root))
    journal.record("insert", [str(victim)], root=str(root), text=' include "/x/other.conf";')
    journal.recover()
    assert elsewhere.exists() and not placed.exists()
    assert victim.read_text() == 'keep; include "/x/other.conf";'
