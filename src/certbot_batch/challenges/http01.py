"""HTTP-01 challenges of a wave served by the lineages' web servers, one reload for all.

The wave's provisioner writes webroot files as ``WebrootProvisioner`` does. Challenges whose
lineage has a web server instance as its authenticator (batch-apache, batch-nginx, or the
stock ``apache``/``nginx`` batched) go to that instance's *front*: the server kind says,
through the ``servers/`` interface (``Server.challenge_plan``), which snippet serves them
and which configuration files must include it (Apache: a server-wide snippet serving a
directory of challenge files; nginx: a snippet answering each token, included by the
server blocks that answer the names). This module, the same for every kind:

* journals every path and edit before it is made (``journal.py``: ``server``, ``file``,
  ``insert`` entries), so that the next certbot command of any kind undoes what a killed
  run left and reloads the server through the pending record;
* writes the snippet and the inserts, then one configtest and one confirmed reload
  (``reload.deploy``: the same care as a deployment -- a server taken down here would stop
  every site, not only validation), then probes over HTTP that a challenge is served;
* for a lineage that arrives late: nothing more when the snippet already serves it (Apache:
  its files are in the served directory), else the snippet rewritten and one more reload;
* at cleanup takes out exactly what was added (inserted text removed byte for byte, with
  the file's mode, owner and times; the snippet; the files) and asks the session for a
  reload at the end of the run, folded into the deployment reload (outside a session, or in
  a dry run: at once).
"""
from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import secrets
import threading
import time
from typing import Any, Iterable, Optional

from certbot import errors

from certbot_batch import paths, servers
from certbot_batch.challenges import journal as journal_mod
from certbot_batch.challenges.journal import Journal
from certbot_batch.challenges.webroot import ChallengeFile, WebrootProvisioner
from certbot_batch.deploy import reload
from certbot_batch.servers.base import ChallengePlan, Server, ServerRef, text_digest

logger = logging.getLogger(__name__)

#: How long to wait for the reloaded server to serve the challenges.
READY_TIMEOUT = 60.0
#: ... and how long, when it answers the probe with something else (403, 404, ...).
ANSWER_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class ServedBy:
    """How a lineage's http-01 challenges are served by a web server instance."""
    ref: ServerRef
    #: for kinds that serve files (``Server.SERVES_FILES``): the directory whose
    #: ``.well-known/acme-challenge/`` the snippet serves
    files_root: Optional[str] = None
    #: reload at cleanup instead of at the end of the run (--dry-run: no final flush)
    reload_at_cleanup: bool = False
    #: certbot's config dir: the lineages whose live/ links are checked before a reload
    config_dir: str = ""

    @classmethod
    def for_lineage(cls, ref: ServerRef, config: Any,
                    files_root: Optional[str] = None) -> ServedBy:
        """A lineage's, from its (certbot) config."""
        return cls(ref=ref, files_root=files_root,
                   reload_at_cleanup=bool(getattr(config, "dry_run", False)),
                   config_dir=str(getattr(config, "config_dir", "") or ""))

    @property
    def marker(self) -> str:
        """What the lineage's challenge items carry as their ``webroot``: the files root,
        or a name of the instance (nothing is written below it)."""
        return self.files_root or "server:" + self.ref.key


def server_for_run(ref: ServerRef) -> Server:
    """The instance's ``Server``, one per renewal run (it caches what it read of its
    configuration; a deployment of the same run reads it again only if it changed)."""
    run = reload.active()
    if run is None:
        return servers.server_for(ref)
    key = "http01-server:" + ref.key
    with run.lock:
        found = run.cache.get(key)
        if found is None:
            found = run.cache[key] = servers.server_for(ref)
        return found  # type: ignore[no-any-return]


def ensure_served_dir(path: str) -> None:
    """Create ``path`` (and parents) readable and searchable by the server's user (0755),
    and repair one of ours left 0700 (the server then answers 403 to the CA). Modes are set
    with chmod, never through the umask: that is process-wide, shared with worker
    threads."""
    for directory in paths.missing_dirs(path):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass
        os.chmod(directory, 0o755)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o055 != 0o055:
        os.chmod(path, mode | 0o755)


def _fetch(host: str, port: int, vhost: str, path: str) -> tuple[Optional[int], bytes]:
    """(HTTP status, body), or (None, b"") when nothing answered."""
    conn = http.client.HTTPConnection(host, port, timeout=3)
    try:
        conn.request("GET", path, headers={"Host": vhost})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def wait_served(server: Server, probes: list[tuple[str, int, str]], token: str,
                content: bytes) -> bool:
    """Poll ``probes`` until one serves ``content`` for ``token``. A server answering
    something else for a while (e.g. 403 for a directory it may not read) would answer the
    CA the same: given up after ``ANSWER_TIMEOUT``; one not answering at all (a big
    configuration still loading) after ``READY_TIMEOUT``. Either way the validation goes on
    (one warning): the CA's answer is the real test."""
    path = "/.well-known/acme-challenge/" + token
    start = time.monotonic()
    last: dict[tuple[str, int, str], Optional[int]] = {}
    while probes:
        for target in probes:
            status, body = _fetch(*target, path)
            if status == 200 and body == content:
                logger.debug("%s serves the challenges on %s:%d", server.title, *target[:2])
                return True
            last[target] = status
        waited = time.monotonic() - start
        answering = any(status is not None for status in last.values())
        if waited > READY_TIMEOUT or (answering and waited > ANSWER_TIMEOUT):
            break
        time.sleep(0.1)
    answers = ", ".join(f"{h}:{p} ({n}) -> {'HTTP ' + str(st) if st else 'no answer'}"
                        for (h, p, n), st in last.items())
    logger.warning("certbot-batch: could not confirm that %s serves the challenges (%s); "
                   "validating anyway", server.label(), answers or "no plain-HTTP port found")
    return False


@dataclasses.dataclass
class _Front:
    """What this run added to one server instance to serve its challenges."""
    served: ServedBy
    server: Server
    #: token -> key authorization of the challenges served (kinds that answer them)
    tokens: dict[str, bytes] = dataclasses.field(default_factory=dict)
    #: the snippet's text as written (None: not written)
    snippet: Optional[str] = None
    #: real path -> offsets (in the text as walked) where the insert went
    edits: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    #: real path -> (atime_ns, mtime_ns) before the first edit (restored with the text)
    times: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


class Http01Provisioner(WebrootProvisioner):
    """The wave's provisioner (see the module docstring): webroot items as before, items
    carrying a front's marker through that server instance."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self._fronts: dict[str, _Front] = {}  # ServerRef.key -> front
        self._markers: dict[str, str] = {}  # marker -> ServerRef.key
        self._lock = threading.RLock()
        #: reloads made to serve challenges (the session counts them in the run too)
        self.reloads = 0

    def serve_through(self, served: ServedBy) -> str:
        """Serve the challenges of a lineage through ``served``'s instance; returns the
        marker its items must carry (one snippet per instance: the first settings win)."""
        with self._lock:
            front = self._fronts.get(served.ref.key)
            if front is None:
                front = self._fronts[served.ref.key] = _Front(served,
                                                              server_for_run(served.ref))
                self._markers[served.marker] = served.ref.key
            elif front.served.files_root != served.files_root:
                logger.warning("certbot-batch: lineages of this run name different challenge "
                               "locations for %s; challenges are served from %s",
                               front.server.label(), front.served.files_root)
            return front.served.marker

    def provision(self, items: Iterable[ChallengeFile]) -> list[tuple[ChallengeFile, Exception]]:
        items = list(items)
        with self._lock:
            fronts = {marker: self._fronts[key] for marker, key in self._markers.items()}
        plain = [i for i in items if i.webroot not in fronts]
        failures = super().provision(plain) if plain else []
        groups: dict[str, list[ChallengeFile]] = {}
        for item in items:
            if item.webroot in fronts:
                groups.setdefault(item.webroot, []).append(item)
        for marker, group in groups.items():
            failures.extend(self._serve(fronts[marker], group))
        return failures

    def _serve(self, front: _Front, items: list[ChallengeFile]
               ) -> list[tuple[ChallengeFile, Exception]]:
        failures: list[tuple[ChallengeFile, Exception]] = []
        with self._lock:
            if front.server.SERVES_FILES:
                root = front.served.files_root or ""
                try:
                    ensure_served_dir(root)
                except OSError as exc:
                    err = errors.PluginError(f"Cannot create {root}: {exc}")
                    return [(i, err) for i in items]
                failures = super().provision(items)
                failed = {id(i) for i, _ in failures}
                items = [i for i in items if id(i) not in failed]
                if not items:
                    return failures
            try:
                self._install(front, items)
            except errors.Error as exc:
                failures.extend((i, exc) for i in items)
        return failures

    def _install(self, front: _Front, items: list[ChallengeFile]) -> None:
        """(with the lock held) The snippet and edits serving ``items``; one reload."""
        served, server = front.served, front.server
        ref = served.ref
        snippet_path = server.challenge_snippet_path()
        if front.snippet is None and os.path.lexists(snippet_path):
            also = " (and the include lines naming it)" if server.challenge_insert() else ""
            raise errors.PluginError(
                f"{snippet_path} exists: another certbot-batch run may be serving "
                f"challenges. Remove it{also} if no certbot is running.")
        probe = ChallengeFile(identifier=items[0].identifier, webroot=served.marker,
                              token="certbot-batch-probe-" + secrets.token_hex(8),
                              content=secrets.token_hex(16).encode())
        tokens = {**front.tokens, **{i.token: i.content for i in items}}
        plan = server.challenge_plan([i.identifier for i in items],
                                     {**tokens, probe.token: probe.content},
                                     served.files_root, first=not front.edits)
        new_edits = any(set(offsets) - set(front.edits.get(os.path.realpath(p), []))
                        for p, offsets in plan.inserts.items())
        front.tokens = tokens
        if front.snippet == plan.snippet and not new_edits:
            return  # the snippet already serves them (Apache: files in its directory)
        # The server entry lets the next command drop the challenge configuration from a
        # running server too (its reload goes through the pending record).
        self.journal.record("server", [ref.ctl], root=ref.root, server_kind=ref.kind,
                            ctl=ref.ctl)
        if front.snippet is None:
            self.journal.record("file", [snippet_path], root=ref.root)
        if server.SERVES_FILES:
            failed = super().provision([probe])
            if failed:
                raise failed[0][1]
        _write_file(snippet_path, plan.snippet)
        front.snippet = plan.snippet
        try:
            self._insert(front, plan)
        except (OSError, errors.Error) as exc:
            self._undo(front)
            raise errors.PluginError(f"Could not edit {server.title}'s configuration to serve "
                                     f"the http-01 challenges: {exc}") from exc
        outcome = reload.deploy(server, served.config_dir or None, [], timeout=READY_TIMEOUT)
        if not outcome.ok:
            self._undo(front)
            raise errors.PluginError(f"Could not serve the http-01 challenges through "
                                     f"{server.title}: {outcome.message}")
        self.reloads += 1
        run = reload.active()
        if run is not None:
            run.challenge_reloads += 1
        logger.info("certbot-batch: %s reloaded once to serve %d challenge(s)%s", server.title,
                    len(items), f" ({sum(map(len, front.edits.values()))} server block(s) "
                    "include the challenge snippet)" if front.edits else "")
        wait_served(server, plan.probes, probe.token, probe.content)

    def _insert(self, front: _Front, plan: ChallengePlan) -> None:
        """Insert the server's include text at the plan's offsets (journaled first)."""
        text = front.server.challenge_insert()
        for path, offsets in plan.inserts.items():
            real = os.path.realpath(path)
            done = front.edits.get(real, [])
            if set(offsets) <= set(done):
                continue
            with open(real, encoding="utf-8", errors="surrogateescape", newline="") as fh:
                current = journal_mod.strip_insert(fh.read(), text)
            if text_digest(current) != plan.digests.get(path):
                raise errors.PluginError(f"{path} changed while certbot was editing it")
            st = os.stat(real)
            atime, mtime = front.times.setdefault(real, (st.st_atime_ns, st.st_mtime_ns))
            self.journal.record("insert", [real], root=front.served.ref.root, text=text,
                                sha256=plan.digests.get(path), mtime_ns=mtime, atime_ns=atime)
            # Offsets are in the text as walked (without our inserts): apply all of this
            # file's inserts, old and new, to that text.
            edited = current
            every = sorted(set(done) | set(offsets))
            for offset in reversed(every):
                edited = edited[:offset] + text + edited[offset:]
            journal_mod.write_preserving(real, edited, st)
            front.edits[real] = every

    def _undo(self, front: _Front) -> bool:
        """Remove this run's inserts (byte-identical files again) and the snippet. True
        when something was removed (the running server still serves it: reload)."""
        text = front.server.challenge_insert()
        changed = bool(front.edits) or front.snippet is not None
        for real in list(front.edits):
            try:
                atime, mtime = front.times.get(real, (None, None))
                journal_mod.undo_insert({"path": real, "text": text, "atime_ns": atime,
                                         "mtime_ns": mtime})
            except OSError as exc:
                logger.error("certbot-batch: could not remove the challenge include from %s: "
                             "%s (remove the text '%s' by hand)", real, exc, text.strip())
                continue
            del front.edits[real]
            front.times.pop(real, None)
        if front.snippet is not None:
            path = front.server.challenge_snippet_path()
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.error("certbot-batch: could not remove %s: %s", path, exc)
            front.snippet = None
        front.tokens.clear()
        return changed

    def cleanup(self) -> None:
        with self._lock:
            undone = [front for front in self._fronts.values() if self._undo(front)]
        super().cleanup()
        for front in undone:
            served, server = front.served, front.server
            if served.reload_at_cleanup or not reload.request_reload(served.ref):
                # No renewal session (or a dry run): nobody reloads at the end, do it now.
                outcome = reload.deploy(server, served.config_dir or None, [],
                                        timeout=READY_TIMEOUT)
                if not outcome.ok:
                    logger.warning("Could not reload %s after removing the challenge "
                                   "configuration: %s", server.title, outcome.message)


def _write_file(path: str, text: str) -> None:
    """The snippet: world-readable (the server's master reads it as root, its configtest
    may run as whoever), on disk before the reload."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
