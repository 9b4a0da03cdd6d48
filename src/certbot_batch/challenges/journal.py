"""Write-ahead journal of provisioned challenge files and created directories.

Every path is journaled (and fsynced) *before* it is created, so a run killed at any
point (even SIGKILL) leaves a record from which the next run removes the leftovers.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Iterable

logger = logging.getLogger(__name__)

#: batch-apache's challenge snippet (challenges/apache.py SNIPPET_NAME)
SNIPPET = "certbot-batch-acme.conf"
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


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, kind: str, paths: Iterable[str]) -> None:
        lines = "".join(json.dumps({"kind": kind, "path": p}) + "\n" for p in paths)
        if not lines:
            return
        with self._lock:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(lines)
                fh.flush()
                os.fsync(fh.fileno())

    def record_dns(self, records: Iterable[dict[str, Any]]) -> None:
        """Journal DNS records (dicts with an "id"), before they are created."""
        now = time.time()
        with self._lock:
            self._append([{"ts": now, **r, "kind": DNS_RECORD} for r in records])

    def dns_update(self, updates: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Add fields to journaled records: (id, fields) pairs."""
        with self._lock:
            if os.path.exists(self.path):
                self._append([{**fields, "kind": DNS_UPDATE, "id": ident}
                              for ident, fields in updates])

    def dns_removed(self, ids: Iterable[str]) -> None:
        """These records are gone again; the file goes once no record is left in it."""
        lines = [{"kind": DNS_REMOVED, "id": i} for i in ids]
        with self._lock:
            if lines and os.path.exists(self.path):
                self._append(lines)
            if not self._dns_outstanding():
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass

    def dns_records(self) -> list[dict[str, Any]]:
        """The journaled DNS records not marked removed, in journal order."""
        with self._lock:
            return self._dns_outstanding()

    def _append(self, items: list[dict[str, Any]]) -> None:
        """(with the lock held) Append and fsync; 0600: the settings name credentials."""
        if not items:
            return
        lines = "".join(json.dumps(item) + "\n" for item in items)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            lines = "\n" + lines  # a line torn by a crash stays a line of its own
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())

    def _dns_outstanding(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                raw = fh.readlines()
        except FileNotFoundError:
            return []
        records: dict[str, dict[str, Any]] = {}
        for line in raw:
            try:
                item = json.loads(line)
                kind, ident = item["kind"], str(item["id"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash
            if kind == DNS_RECORD:
                records[ident] = item
            elif kind == DNS_UPDATE and ident in records:
                records[ident] = {**records[ident],
                                  **{k: v for k, v in item.items() if k not in _LINE_FIELDS}}
            elif kind == DNS_REMOVED:
                records.pop(ident, None)
        return list(records.values())

    def entries(self) -> list[tuple[str, str]]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                raw = fh.readlines()
        except FileNotFoundError:
            return []
        out = []
        for line in raw:
            try:
                item = json.loads(line)
                out.append((str(item["kind"]), str(item["path"])))
            except (ValueError, KeyError, TypeError):
                # A torn last line after a crash: the entries before it still count.
                continue
        return out

    def clear(self) -> None:
        with self._lock:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def recover(self) -> int:
        """Remove everything a previous (interrupted) run left behind; reload Apache when
        its challenge snippet was among it (else the running server keeps serving the
        Alias from memory). Returns the count removed."""
        entries = self.entries()
        if not entries:
            self.clear()
            return 0
        snippets = [p for k, p in entries if k == "file" and os.path.basename(p) == SNIPPET
                    and os.path.lexists(p)]
        removed = remove_paths(entries)
        if removed:
            logger.warning("certbot-batch: removed %d challenge file(s)/dir(s) left behind by "
                           "an interrupted run (journal %s)", removed, self.path)
        ctls = [p for k, p in entries if k == "reload"]
        if snippets and ctls:
            from certbot import errors

            from certbot_batch.deploy import apachectl
            try:
                apachectl.configtest(ctls[-1])
                apachectl.graceful(ctls[-1])
                logger.warning("certbot-batch: reloaded Apache (%s) to drop the challenge "
                               "configuration of the interrupted run", ctls[-1])
            except errors.Error as exc:
                logger.warning("certbot-batch: could not reload Apache after removing %s: "
                               "%s", snippets[0], exc)
        self.clear()
        return removed


def remove_paths(entries: list[tuple[str, str]]) -> int:
    removed = 0
    for kind, path in entries:
        if kind == "file" and os.path.lexists(path):
            try:
                os.remove(path)
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("Could not remove challenge file %s: %s", path, exc)
    # Deepest directories first; only ones we created, and only if empty.
    dirs = sorted({p for k, p in entries if k == "dir"}, key=len, reverse=True)
    for path in dirs:
        try:
            os.rmdir(path)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError:
            logger.info("Challenge directory %s is not empty; left in place", path)
    return removed
