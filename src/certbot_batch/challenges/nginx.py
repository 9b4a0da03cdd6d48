"""HTTP-01 challenges served by nginx for a whole wave with one reload.

nginx has no way to add a location to a server block from outside the block (no
inheritance of locations, no server-wide alias), so for the duration of a wave:

* one snippet, ``SERVER_ROOT/certbot-batch-acme-nginx.conf``, holds one exact-match
  location per challenge token: ``location = /.well-known/acme-challenge/TOKEN { return
  200 "KEY_AUTHORIZATION"; }`` (the form certbot's own nginx plugin uses). An exact match
  wins over every prefix and regex location a server block has, including a user's own
  ``location /.well-known/acme-challenge/``, and cannot collide with one;
* the server blocks that answer the wave's names over plain HTTP get one ``include`` of the
  snippet, inserted right after their ``{`` (``INCLUDE_TEXT``: one space, the directive,
  no newline): per name and plain-HTTP port, the block nginx picks for that Host (exact
  name, wildcards, regex, else the port's default server). When that block redirects at
  server level (``return``/``rewrite``/``if``, as certbot's ``--redirect`` writes it: it
  answers before any location) the SSL blocks naming the name get it too, for a CA that
  follows the redirect;
* one configtest and one confirmed reload (``reload.deploy``), then a probe over HTTP.

Cleanup removes exactly the inserted text from each file and the snippet, so every user
file is byte-identical again (mode, owner and modification time restored too), and asks for
a reload at the end of the run, folded into the deployment reload (outside a session, or
in a dry run: at once). Every file edit and the snippet are journaled before they are made
(``journal.py``: ``insert`` and ``file`` entries); the next certbot command of any kind
undoes what a killed run left and reloads the server through the pending record.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import threading
import time
from typing import Any, Iterable, Optional

from certbot import errors

from certbot_batch import servers
from certbot_batch.challenges import journal as journal_mod
from certbot_batch.challenges.apache import ApacheChallengeProvisioner, _fetch
from certbot_batch.challenges.journal import Journal
from certbot_batch.challenges.webroot import ChallengeFile
from certbot_batch.deploy import reload
from certbot_batch.servers import nginx as nginx_server
from certbot_batch.servers.base import ServerRef
from certbot_batch.servers.nginx import ServerBlock, Walk

logger = logging.getLogger(__name__)

SNIPPET_NAME = journal_mod.NGINX_SNIPPET
#: How long to wait for the reloaded nginx to serve the challenges.
READY_TIMEOUT = 60.0
ANSWER_TIMEOUT = 10.0
_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class NginxSettings:
    ctl: str
    server_root: str
    #: reload at cleanup instead of at the end of the run (--dry-run: no final flush)
    reload_at_cleanup: bool = False
    #: certbot's config dir: the lineages whose live/ links are checked before a reload
    config_dir: str = ""

    @property
    def ref(self) -> ServerRef:
        return ServerRef(nginx_server.KIND, self.ctl, self.server_root)

    @property
    def marker(self) -> str:
        """What a challenge item of this instance carries as its ``webroot``: nothing is
        written below it (the snippet answers the challenge)."""
        return "nginx-instance:" + self.ref.key

    @property
    def snippet_path(self) -> str:
        return os.path.join(self.server_root, SNIPPET_NAME)


def include_text(settings: NginxSettings) -> str:
    """What is inserted after a server block's ``{`` (no newline: a block whose ``{`` is
    followed by directives on the same line stays valid; removed again verbatim)."""
    return journal_mod.nginx_include(settings.snippet_path)


def snippet_text(tokens: dict[str, bytes]) -> str:
    lines = ["# certbot-batch: ACME http-01 challenges of the running certbot. Temporary:\n",
             "# removed, with the include lines naming it, at the end of the run.\n"]
    for token, content in sorted(tokens.items()):
        lines.append(f"location = /.well-known/acme-challenge/{token} {{\n"
                     "\tdefault_type text/plain;\n"
                     f"\treturn 200 \"{content.decode('ascii')}\";\n"
                     "}\n")
    return "".join(lines)


# -- which server blocks answer a name ---------------------------------------------------------

def walk_for_run(root: str, fresh: bool = False) -> Walk:
    """The configuration walk of ``root``, once per renewal run (cached in the run)."""
    run = reload.active()
    key = "nginx-walk:" + root
    if run is None:
        return nginx_server.walk(root)
    with run.lock:
        found = run.cache.get(key)
        if found is None or fresh:
            found = run.cache[key] = nginx_server.walk(root)
        return found  # type: ignore[no-any-return]


def _by_port(found: Walk, ssl: bool) -> dict[int, list[ServerBlock]]:
    out: dict[int, list[ServerBlock]] = {}
    for block in found.servers:
        for port in sorted({x.port for x in block.listens if x.ssl == ssl}):
            out.setdefault(port, []).append(block)
    return out


def plan(found: Walk, names: Iterable[str]) -> tuple[list[ServerBlock], list[str]]:
    """(the server blocks that must include the snippet, the names no plain-HTTP server
    block answers)."""
    plain = _by_port(found, ssl=False)
    secure = _by_port(found, ssl=True)
    chosen: dict[tuple[str, int], ServerBlock] = {}
    unserved = []
    for name in names:
        served = False
        for blocks in plain.values():
            block = nginx_server.server_for_name(blocks, name)
            if block is None:
                continue
            served = True
            chosen[(block.file, block.open_end)] = block
            if block.redirects:
                for sblocks in secure.values():
                    match = nginx_server.server_for_name(sblocks, name, default=False)
                    if match is not None:
                        chosen[(match.file, match.open_end)] = match
        if not served:
            unserved.append(name)
    return sorted(chosen.values(), key=lambda b: b.order), unserved


# -- the provisioner ---------------------------------------------------------------------

@dataclasses.dataclass
class _Instance:
    settings: NginxSettings
    tokens: dict[str, bytes] = dataclasses.field(default_factory=dict)
    #: real path -> offsets (in the original text) where the include was inserted
    edits: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    #: real path -> (atime_ns, mtime_ns) before the first edit (restored with the text)
    times: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    snippet: bool = False
    blocks: list[ServerBlock] = dataclasses.field(default_factory=list)


class NginxChallengeProvisioner(ApacheChallengeProvisioner):
    """The wave's provisioner: nginx items (``webroot`` = an instance's marker) are served
    through nginx as the module docstring says; Apache and webroot items as before."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self._nginx: dict[str, _Instance] = {}
        self._nginx_lock = threading.RLock()

    def configure_nginx(self, settings: NginxSettings) -> None:
        with self._nginx_lock:
            if settings.marker not in self._nginx:
                self._nginx[settings.marker] = _Instance(settings)

    def provision(self, items: Iterable[ChallengeFile]) -> list[tuple[ChallengeFile, Exception]]:
        items = list(items)
        with self._nginx_lock:
            ours = [i for i in items if i.webroot in self._nginx]
        failures = super().provision([i for i in items if i.webroot not in self._nginx]) \
            if len(ours) < len(items) else []
        groups: dict[str, list[ChallengeFile]] = {}
        for item in ours:
            groups.setdefault(item.webroot, []).append(item)
        for marker, group in groups.items():
            try:
                self._serve_nginx(self._nginx[marker], group)
            except errors.Error as exc:
                failures.extend((i, exc) for i in group)
        return failures

    def _serve_nginx(self, inst: _Instance, items: list[ChallengeFile]) -> None:
        settings = inst.settings
        for item in items:
            if not _SAFE.match(item.token) or not _SAFE.match(item.content.decode("ascii",
                                                                                "replace")):
                raise errors.PluginError(f"unexpected characters in the challenge for "
                                         f"{item.identifier}")
        with self._nginx_lock:
            found = walk_for_run(settings.server_root)
            if not inst.snippet and os.path.lexists(settings.snippet_path):
                raise errors.PluginError(
                    f"{settings.snippet_path} exists: another certbot-batch run may be "
                    "serving challenges. Remove it (and the include lines naming it) if no "
                    "certbot is running.")
            blocks, unserved = plan(found, [i.identifier for i in items])
            if not inst.edits and not _unchanged(found, blocks, include_text(settings)):
                # Edited since this run walked it (certbot's own nginx code for a new
                # name, an admin): walk again, once.
                found = walk_for_run(settings.server_root, fresh=True)
                blocks, unserved = plan(found, [i.identifier for i in items])
            if unserved:
                raise errors.PluginError(
                    f"no nginx server block answers {', '.join(unserved)} over plain HTTP "
                    f"{nginx_server.NginxServer(settings.ref).where()}")
            probe_token = "certbot-batch-probe-" + secrets.token_hex(8)
            probe_content = secrets.token_hex(16).encode()
            # The reload entry lets the next command drop the challenge configuration from a
            # running nginx too.
            self.journal.record("server", [settings.ctl], root=settings.server_root,
                                server_kind=nginx_server.KIND, ctl=settings.ctl)
            if not inst.snippet:
                self.journal.record("file", [settings.snippet_path],
                                    root=settings.server_root)
            tokens = dict(inst.tokens)
            tokens.update({i.token: i.content for i in items})
            tokens[probe_token] = probe_content
            _write_file(settings.snippet_path, snippet_text(tokens))
            inst.snippet = True
            inst.tokens = {k: v for k, v in tokens.items() if k != probe_token}
            try:
                self._insert(inst, found, blocks)
            except (OSError, errors.Error) as exc:
                self._undo(inst)
                raise errors.PluginError(f"Could not edit nginx's configuration to serve "
                                         f"the http-01 challenges: {exc}") from exc
            server = servers.server_for(settings.ref)
            outcome = reload.deploy(server, settings.config_dir or None, [],
                                    timeout=READY_TIMEOUT)
            if not outcome.ok:
                self._undo(inst)
                raise errors.PluginError(
                    f"Could not serve the http-01 challenges through nginx: {outcome.message}")
            run = reload.active()
            self.reloads += 1
            if run is not None:
                run.challenge_reloads += 1
            logger.info("certbot-batch: nginx reloaded once to serve %d challenge(s) "
                        "(%d server block(s) include the challenge snippet)", len(items),
                        len(inst.blocks))
            # Without the probe's token: the next provisioning (a late lineage) or the
            # cleanup rewrites the snippet anyway.
            self._wait_nginx(inst, items[0].identifier, probe_token, probe_content)

    def _insert(self, inst: _Instance, found: Walk, blocks: list[ServerBlock]) -> None:
        settings = inst.settings
        text = include_text(settings)
        by_file: dict[str, list[ServerBlock]] = {}
        for block in blocks:
            if any(b.file == block.file and b.open_end == block.open_end for b in inst.blocks):
                continue
            by_file.setdefault(block.file, []).append(block)
        for path, file_blocks in by_file.items():
            real = os.path.realpath(path)
            with open(real, encoding="utf-8", errors="surrogateescape", newline="") as fh:
                original = fh.read()
            current = journal_mod.strip_insert(original, text)
            if nginx_server.text_digest(current) != found.digests.get(path):
                raise errors.PluginError(f"{path} changed while certbot was editing it")
            st = os.stat(real)
            atime, mtime = inst.times.setdefault(real, (st.st_atime_ns, st.st_mtime_ns))
            self.journal.record("insert", [real], root=settings.server_root, text=text,
                                sha256=found.digests.get(path), mtime_ns=mtime, atime_ns=atime)
            offsets = sorted({b.open_end for b in file_blocks})
            done = inst.edits.get(real, [])
            # Offsets are in the text as walked (without our inserts): apply all of this
            # file's inserts, old and new, to that text.
            edited = current
            for offset in sorted(set(done) | set(offsets), reverse=True):
                edited = edited[:offset] + text + edited[offset:]
            journal_mod.write_preserving(real, edited, st)
            inst.edits[real] = sorted(set(done) | set(offsets))
            inst.blocks.extend(file_blocks)

    def _undo(self, inst: _Instance) -> None:
        """Remove this run's include lines (byte-identical files again) and the snippet."""
        settings = inst.settings
        text = include_text(settings)
        for real in list(inst.edits):
            try:
                atime, mtime = inst.times.get(real, (None, None))
                journal_mod.undo_insert({"path": real, "text": text, "atime_ns": atime,
                                         "mtime_ns": mtime})
            except OSError as exc:
                logger.error("certbot-batch: could not remove the challenge include from %s: "
                             "%s (remove the text '%s' by hand)", real, exc, text.strip())
                continue
            del inst.edits[real]
            inst.times.pop(real, None)
        inst.blocks.clear()
        if inst.snippet:
            try:
                os.remove(settings.snippet_path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.error("certbot-batch: could not remove %s: %s", settings.snippet_path,
                             exc)
            inst.snippet = False
        inst.tokens.clear()

    def _wait_nginx(self, inst: _Instance, identifier: str, token: str,
                    content: bytes) -> None:
        targets: list[tuple[str, int, str]] = []
        for block in inst.blocks:
            host_name = next((n for n in block.names if n and "*" not in n
                              and not n.startswith(("~", ".")) and n != "_"), identifier)
            for listen in block.listens:
                if not listen.ssl:
                    host = "127.0.0.1" if listen.host in ("*", "", "0.0.0.0") else \
                        ("::1" if listen.host == "::" else listen.host)
                    if (host, listen.port, host_name) not in targets:
                        targets.append((host, listen.port, host_name))
        path = "/.well-known/acme-challenge/" + token
        start = time.monotonic()
        last: dict[tuple[str, int, str], Optional[int]] = {}
        while targets:
            for target in targets[:3]:
                status, body = _fetch(target[0], target[1], target[2], path)
                if status == 200 and body == content:
                    return
                last[target] = status
            waited = time.monotonic() - start
            answering = any(status is not None for status in last.values())
            if waited > READY_TIMEOUT or (answering and waited > ANSWER_TIMEOUT):
                break
            time.sleep(0.1)
        answers = ", ".join(f"{h}:{p} ({n}) -> {'HTTP ' + str(st) if st else 'no answer'}"
                            for (h, p, n), st in last.items())
        logger.warning("certbot-batch: could not confirm that nginx serves the challenges "
                       "(%s); validating anyway", answers or "no plain-HTTP listen found")

    def cleanup(self) -> None:
        with self._nginx_lock:
            served = [inst for inst in self._nginx.values() if inst.snippet or inst.edits]
            for inst in served:
                self._undo(inst)
        super().cleanup()
        for inst in served:
            settings = inst.settings
            if settings.reload_at_cleanup or not reload.request_reload(settings.ref):
                # No renewal session (or a dry run): nobody reloads at the end, do it now.
                outcome = reload.deploy(servers.server_for(settings.ref),
                                        settings.config_dir or None, [],
                                        timeout=READY_TIMEOUT)
                if not outcome.ok:
                    logger.warning("Could not reload nginx after removing the challenge "
                                   "configuration: %s", outcome.message)


def _unchanged(found: Walk, blocks: list[ServerBlock], inserted: str) -> bool:
    """Are the files of ``blocks`` still what ``found`` read (our own inserts aside)?"""
    for path in {b.file for b in blocks}:
        try:
            with open(os.path.realpath(path), encoding="utf-8", errors="surrogateescape",
                      newline="") as fh:
                text = fh.read()
        except OSError:
            return False
        if nginx_server.text_digest(journal_mod.strip_insert(text, inserted)) != \
                found.digests.get(path):
            return False
    return True


def _write_file(path: str, text: str) -> None:
    """The snippet: world-readable (nginx's master reads it as root, -t as whoever)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def settings_for(config: Any) -> NginxSettings:
    return NginxSettings(ctl=nginx_server.ctl_of(config),
                         server_root=nginx_server.root_of(config),
                         reload_at_cleanup=bool(getattr(config, "dry_run", False)),
                         config_dir=str(getattr(config, "config_dir", "") or ""))
