"""Write-ahead journal of provisioned challenge files and created directories.

Every path is journaled (and fsynced) *before* it is created, so a run killed at any
point (even SIGKILL) leaves a record from which the next run removes the leftovers.

The journal is a record in the sense of ``durable.py``: written to the state directory, or
to the mirror directory in certbot's config directory when the state directory cannot be
written (one warning; a journal that cannot be written anywhere never costs a renewal),
and only trusted when its owner and mode are safe. Recovery deletes nothing but challenge
files (directly inside a ``.well-known/acme-challenge`` directory, inside the webroot they
were written for), the directories made for them and a web server's challenge snippet
(where its kind writes it: ``servers/``, ``Server.snippet_misplaced``); and the only edit it
undoes in a user's file is the removal of the exact text a server kind inserts to include
its snippet (``insert`` entries, ``Server.owns_insert``: batch-nginx's ``include
"…/certbot-batch-acme-nginx.conf";``): nothing else of the file changes.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Iterable, Optional, Union

from certbot_batch import durable, servers

logger = logging.getLogger(__name__)

#: dns-01 records of certbot's DNS plugins and manual hooks (challenges/grouped.py), kept in
#: a journal file of their own (the webroot cleanup clears its journal whole): one
#: DNS_RECORD line (renewal conf, plugin, domain, validation name and value, the plugin's
#: settings, ``ts``: when it was journaled) before the record is created, DNS_UPDATE lines
#: (same id) adding fields later (the manual auth hook's variables once it ran; ``ts`` for a
#: line of an older version that had none), one DNS_REMOVED line (same id) once it is gone.
DNS_RECORD = "dns-record"
DNS_UPDATE = "dns-update"
DNS_REMOVED = "dns-removed"
#: fields of a line that are not the record's own
_LINE_FIELDS = ("kind", "id")
#: the directories a challenge file may sit in, and the ones we may create for it
_CHALLENGE_DIRS = (".well-known", "acme-challenge")
_OUR_DIRS = frozenset({".well-known", "acme-challenge"}) | servers.CHALLENGE_DIRS


def safe_to_remove(kind: str, path: str, root: Optional[str]) -> Optional[str]:
    """Why a journaled path must not be removed, or None. ``root`` is the webroot (or
    Apache challenge root) the entry was written for, when the journal says it."""
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        return "not a plain absolute path"
    parent = os.path.dirname(path)
    if kind == "file":
        owner = servers.snippet_owner(path)
        if owner is not None:  # a server's challenge snippet: where that kind writes it
            return owner.snippet_misplaced(path, root)
        if tuple(parent.split(os.sep)[-2:]) != _CHALLENGE_DIRS:
            return "not directly inside a .well-known/acme-challenge directory"
        if root is not None:
            expected = os.path.join(os.path.realpath(root), *_CHALLENGE_DIRS)
            if os.path.realpath(parent) != expected:
                return f"not inside the challenge directory of {root}"
        return None
    if kind == "dir":
        if os.path.basename(path) not in _OUR_DIRS:
            return "not a challenge directory"
        if root is not None:
            real_root = os.path.realpath(root)
            real = os.path.realpath(path)
            if real != real_root and not real.startswith(real_root + os.sep):
                return f"not inside {root}"
        return None
    return f"unknown kind {kind!r}"


def strip_insert(text: str, inserted: str) -> str:
    return text.replace(inserted, "") if inserted else text


def temp_path_for(path: str) -> str:
    """Where ``write_preserving`` stages ``path``'s new text: a fixed name (recovery removes
    one a kill left), a dot file (nginx's include globs skip it)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.certbot-batch-tmp")


def write_preserving(path: str, text: str, st: os.stat_result) -> None:
    """Replace ``path`` atomically with ``text`` (a temp file in its directory, fsynced,
    renamed), keeping its mode and owner."""
    directory = os.path.dirname(path)
    tmp = temp_path_for(path)
    try:
        os.remove(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), st.st_mode & 0o7777)
            try:
                os.fchown(fh.fileno(), st.st_uid, st.st_gid)
            except OSError:
                pass
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    durable.fsync_dir(directory)


def undo_insert(item: dict[str, Any]) -> bool:
    """Remove the text an ``insert`` entry names from its file (the file is then what it
    was before, byte for byte, whatever else changed in it meanwhile). Only a server's
    include of its own snippet (``Server.owns_insert``: batch-nginx's) is ever removed.
    Returns True when the file changed."""
    path, text = str(item.get("path") or ""), str(item.get("text") or "")
    if not os.path.isabs(path) or not servers.owns_insert(text):
        durable.warn_once(f"unsafe-insert:{path}", "certbot-batch: not editing %s named by "
                          "the challenge journal: not an include of certbot-batch's snippet",
                          path)
        return False
    real = os.path.realpath(path)
    try:
        os.remove(temp_path_for(real))  # staged by a write a kill interrupted
    except FileNotFoundError:
        pass
    try:
        with open(real, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            current = fh.read()
    except FileNotFoundError:
        return False
    if text not in current:
        return False
    st = os.stat(real)
    write_preserving(real, strip_insert(current, text), st)
    mtime, atime = item.get("mtime_ns"), item.get("atime_ns")
    if isinstance(mtime, int) and isinstance(atime, int):
        try:
            os.utime(real, ns=(atime, mtime))
        except OSError:
            pass
    logger.info("certbot-batch: removed the challenge include from %s", real)
    return True


class Journal:
    def __init__(self, path: Union[str, list[str]]) -> None:
        #: where it is written (the first path that works), then where else it may be
        self.paths = [path] if isinstance(path, str) else list(path)
        self.path = self.paths[0]
        self._lock = threading.Lock()
        self._disabled = False

    def record(self, kind: str, paths: Iterable[str], root: Optional[str] = None,
               **extra: Any) -> None:
        """Journal ``paths`` before they are created (``root``: the webroot they belong to).
        Never raises: without a writable journal the run goes on (one warning), its own
        cleanup still removes everything; only a kill would leave files behind."""
        items = []
        for p in paths:
            item: dict[str, Any] = {"kind": kind, "path": p}
            if root is not None:
                item["root"] = root
            item.update(extra)
            items.append(item)
        if not items:
            return
        lines = "".join(json.dumps(i) + "\n" for i in items)
        with self._lock:
            if self._disabled:
                return
            for candidate in [self.path] + [p for p in self.paths if p != self.path]:
                try:
                    durable.append_line(candidate, lines)
                    self.path = candidate
                    return
                except OSError as exc:
                    durable.warn_once(f"journal:{candidate}", "certbot-batch: cannot write "
                                      "the challenge journal %s (%s)", candidate,
                                      exc.strerror or exc)
            self._disabled = True
            logger.warning("certbot-batch: no challenge journal can be written; this run "
                           "goes on without one (a killed run may leave challenge files "
                           "behind)")

    def record_dns(self, records: Iterable[dict[str, Any]]) -> None:
        """Journal DNS records (dicts with an "id"), before they are created."""
        now = time.time()
        with self._lock:
            self._append([{"ts": now, **r, "kind": DNS_RECORD} for r in records])

    def dns_update(self, updates: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Add fields to journaled records: (id, fields) pairs."""
        with self._lock:
            if self.exists():
                self._append([{**fields, "kind": DNS_UPDATE, "id": ident}
                              for ident, fields in updates])

    def dns_removed(self, ids: Iterable[str]) -> None:
        """These records are gone again; the files go once no record is left in them."""
        lines = [{"kind": DNS_REMOVED, "id": i} for i in ids]
        with self._lock:
            if lines and self.exists():
                self._append(lines)
            if not self._dns_outstanding():
                for path in self.paths:
                    try:
                        os.remove(path)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        durable.warn_once(f"journal-rm:{path}", "certbot-batch: could not "
                                          "remove %s: %s", path, exc.strerror or exc)

    def dns_records(self) -> list[dict[str, Any]]:
        """The journaled DNS records not marked removed, in journal order."""
        with self._lock:
            return self._dns_outstanding()

    def _append(self, items: list[dict[str, Any]]) -> None:
        """(with the lock held) Append and fsync (0600: the settings name credentials), to
        the first copy that can be written. Never raises: without a journal the run goes
        on (one warning), its own cleanup still removes the records."""
        if not items or self._disabled:
            return
        lines = "".join(json.dumps(item) + "\n" for item in items)
        for candidate in [self.path] + [p for p in self.paths if p != self.path]:
            try:
                durable.append_line(candidate, lines)
                self.path = candidate
                return
            except OSError as exc:
                durable.warn_once(f"journal:{candidate}", "certbot-batch: cannot write the "
                                  "journal %s (%s)", candidate, exc.strerror or exc)
        self._disabled = True
        logger.warning("certbot-batch: no journal of DNS records can be written; this run "
                       "goes on without one (a killed run may leave TXT records behind)")

    def _dns_outstanding(self) -> list[dict[str, Any]]:
        lines = [item for path in self.paths for item in durable.read_lines(path)]
        records: dict[str, dict[str, Any]] = {}
        removed: set[str] = set()
        # Records first: an update or removal may sit in the other copy (written after the
        # state directory became writable again, or stopped being so).
        for item in lines:
            if item.get("kind") == DNS_RECORD:
                records[str(item.get("id"))] = item
        for item in lines:
            kind, ident = item.get("kind"), str(item.get("id"))
            if kind == DNS_UPDATE and ident in records:
                records[ident] = {**records[ident],
                                  **{k: v for k, v in item.items() if k not in _LINE_FIELDS}}
            elif kind == DNS_REMOVED:
                removed.add(ident)
        return [r for ident, r in records.items() if ident not in removed]

    def items(self) -> list[dict[str, Any]]:
        """Every journaled entry of every trusted copy (a torn last line after a crash is
        skipped; the entries before it still count)."""
        out: list[dict[str, Any]] = []
        for path in self.paths:
            for item in durable.read_lines(path):
                if isinstance(item.get("kind"), str) and isinstance(item.get("path"), str):
                    out.append(item)
        return out

    def entries(self) -> list[tuple[str, str]]:
        return [(str(i["kind"]), str(i["path"])) for i in self.items()]

    def exists(self) -> bool:
        return any(os.path.exists(p) for p in self.paths)

    def clear(self) -> None:
        with self._lock:
            for path in self.paths:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    durable.warn_once(f"journal-rm:{path}", "certbot-batch: could not "
                                      "remove %s: %s", path, exc.strerror or exc)
            self.path = self.paths[0]

    def recover(self) -> list[dict[str, str]]:
        """Remove everything a previous (interrupted) run left behind. Returns the servers
        (``{"kind", "ctl", "root"}``) whose challenge configuration was removed: the
        running server still serves it from memory until its next reload, which the caller
        arranges (recovery.py: the next deployment of that server)."""
        items = self.items()
        if not items:
            self.clear()
            return []
        snippets = [i["path"] for i in items if i["kind"] == "file"
                    and servers.snippet_owner(i["path"]) is not None
                    and os.path.lexists(i["path"])]
        # Edits first: a server block must not include a snippet that is already gone.
        edited = 0
        for item in items:
            if item["kind"] == "insert":
                try:
                    edited += undo_insert(item)
                except OSError as exc:
                    logger.error("certbot-batch: could not remove the challenge include from "
                                 "%s: %s (remove the text '%s' by hand)", item["path"], exc,
                                 str(item.get("text", "")).strip())
        if edited:
            logger.warning("certbot-batch: removed the challenge include an interrupted run "
                           "left in %d nginx configuration file(s)", edited)
        removed = remove_items(items)
        if removed:
            logger.warning("certbot-batch: removed %d challenge file(s)/dir(s) left behind by "
                           "an interrupted run", removed)
        to_reload: list[dict[str, str]] = []
        if snippets or edited:
            for item in items:
                if item["kind"] == "server":
                    # (older journals name no kind: Apache, the only one then)
                    ref = {"kind": str(item.get("server_kind") or "apache"),
                           "ctl": str(item.get("ctl") or item["path"]),
                           "root": str(item.get("root") or "")}
                elif item["kind"] == "reload":  # journals of certbot-batch <= 0.1.0
                    ref = {"kind": "apache", "ctl": item["path"], "root": ""}
                else:
                    continue
                if ref not in to_reload:
                    to_reload.append(ref)
        self.clear()
        return to_reload


def remove_items(items: list[dict[str, Any]]) -> int:
    """Remove journaled files and directories, each only where ``safe_to_remove`` allows."""
    removed = 0
    for item in items:
        kind, path = item["kind"], item["path"]
        if kind != "file" or not os.path.lexists(path):
            continue
        why = safe_to_remove(kind, path, item.get("root"))
        if why is not None:
            durable.warn_once(f"unsafe:{path}", "certbot-batch: not removing %s named by the "
                              "challenge journal: %s", path, why)
            continue
        try:
            os.remove(path)
            removed += 1
            logger.info("certbot-batch: removed %s", path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("Could not remove challenge file %s: %s", path, exc)
    # Deepest directories first; only ones we created, and only if empty.
    dirs = {i["path"]: i.get("root") for i in items if i["kind"] == "dir"}
    for path in sorted(dirs, key=len, reverse=True):
        if not os.path.isdir(path) or safe_to_remove("dir", path, dirs[path]) is not None:
            continue
        try:
            os.rmdir(path)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError:
            logger.info("Challenge directory %s is not empty; left in place", path)
    return removed


def remove_paths(entries: list[tuple[str, str]], root: Optional[str] = None) -> int:
    """``remove_items`` for (kind, path) pairs (a run's own files)."""
    return remove_items([{"kind": k, "path": p, "root": root} for k, p in entries])
