"""Records that must outlive a crash and a lost state directory, trusted only when safe.

certbot-batch keeps two kinds of files: a cache (the state database, which may be lost at any
time) and *records* that say what is still to be done (a renewed certificate not deployed
yet, a lineage backing off after failed renewals, a challenge file or DNS record to remove).
A record is written atomically and durably (temp file, fsync, rename, fsync of the
directory), and **mirrored** in two directories: ``WORK_DIR/certbot-batch`` (the state
directory) and ``CONFIG_DIR/certbot-batch``, so that losing either directory, or either one
being unwritable, loses nothing. Each copy carries a sequence number; the copy with the
highest one wins, so a copy left behind in a directory that became unwritable never
overrides newer news.

Recovery acts on what these files say (deletes files, runs commands), so a file is only
trusted when it is a regular file owned by this user or root and not writable by group or
others, in a directory of the same kind. Anything else is ignored with one warning.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import threading
from typing import Any, Iterable, Optional

from certbot_batch import run

logger = logging.getLogger(__name__)

def warn_once(key: str, message: str, *args: Any) -> None:
    """One warning per process and key (a record read by many lineages is one problem)."""
    with run.PROCESS.lock:
        if key in run.PROCESS.warned:
            return
        run.PROCESS.warned.add(key)
    logger.warning(message, *args)


def _owner_problem(st: os.stat_result, what: str, path: str) -> Optional[str]:
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        return f"{what} {path} is owned by uid {st.st_uid}, not by this user ({uid}) or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} {path} is writable by group or others (mode {st.st_mode & 0o7777:04o})"
    return None


def trust_problem(path: str) -> Optional[str]:
    """Why the file at ``path`` must not be acted upon, or None when it is safe."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot inspect {path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    problem = _owner_problem(st, "file", path)
    if problem:
        return problem
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dst = os.stat(directory)
    except OSError as exc:
        return f"cannot inspect {directory}: {exc.strerror or exc}"
    return _owner_problem(dst, "directory", directory)


def trusted(path: str) -> bool:
    """True when ``path`` exists and may be acted upon; says once why not otherwise."""
    problem = trust_problem(path)
    if problem is not None:
        warn_once(f"trust:{path}", "certbot-batch: ignoring %s: %s. Fix its owner and mode "
                  "(chown root, chmod go-w) or remove it.", path, problem)
        return False
    return os.path.exists(path)


def ensure_dir(directory: str) -> None:
    """Create ``directory`` 0700 (records name credentials and commands)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)


def write_atomic(path: str, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text``, durably: after a crash it holds the old or the new
    text, never a mix."""
    directory = os.path.dirname(path)
    ensure_dir(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def append_line(path: str, line: str) -> None:
    """Append one line (fsynced); a line torn by a crash stays a line of its own."""
    ensure_dir(os.path.dirname(path))
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: str) -> list[dict[str, Any]]:
    """The JSON lines of a trusted file (torn or foreign lines skipped)."""
    if not trusted(path):
        return []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            raw = fh.readlines()
    except OSError:
        return []
    out = []
    for line in raw:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


class MirroredRecord:
    """One JSON document kept in several directories; the copy with the highest ``seq``
    wins. ``save`` writes every copy it can (one warning per directory that fails) and
    succeeds when at least one copy was written."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = list(dict.fromkeys(paths))
        self._lock = threading.Lock()

    def load(self) -> Optional[dict[str, Any]]:
        best: Optional[dict[str, Any]] = None
        for path in self.paths:
            data = self._load_one(path)
            if data is None:
                continue
            if best is None or int(data.get("seq", 0) or 0) > int(best.get("seq", 0) or 0):
                best = data
        return best

    def _load_one(self, path: str) -> Optional[dict[str, Any]]:
        if not trusted(path):
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            warn_once(f"unreadable:{path}", "certbot-batch: unreadable record %s (%s); its "
                      "mirror copy is used if there is one", path, exc)
            return None
        return data if isinstance(data, dict) else None

    def exists(self) -> bool:
        return any(os.path.exists(p) for p in self.paths)

    def save(self, data: dict[str, Any]) -> bool:
        """Write ``data`` (a fresh ``seq`` is set) to every copy. False when none could be
        written."""
        with self._lock:
            current = self.load()
            data = dict(data)
            data["seq"] = int((current or {}).get("seq", 0) or 0) + 1
            text = json.dumps(data, indent=1, sort_keys=True)
            written = 0
            for path in self.paths:
                try:
                    write_atomic(path, text)
                    written += 1
                except OSError as exc:
                    warn_once(f"write:{path}", "certbot-batch: could not write %s (%s); "
                              "the copy in the other directory is used", path,
                              exc.strerror or exc)
            return written > 0

    def remove(self) -> None:
        """Forget the record everywhere; where a copy cannot be removed, an empty record
        with a higher ``seq`` overrides it."""
        with self._lock:
            current = self.load()
            stale = False
            for path in self.paths:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    stale = True
        if stale and current is not None:
            self.save({})
