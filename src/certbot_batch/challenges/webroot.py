"""HTTP-01 challenge files in webroots, provisioned for many lineages in one go."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterable, Optional

from certbot import errors

from certbot_batch import paths
from certbot_batch.challenges.journal import Journal, remove_paths

logger = logging.getLogger(__name__)

URI_ROOT = os.path.join(".well-known", "acme-challenge")


@dataclasses.dataclass(frozen=True)
class ChallengeFile:
    identifier: str
    webroot: str
    token: str
    content: bytes
    lineage: Optional[str] = None

    @property
    def path(self) -> str:
        return os.path.join(self.webroot, URI_ROOT, self.token)


def _who(item: ChallengeFile) -> str:
    return f"{item.identifier} (lineage {item.lineage})" if item.lineage else item.identifier


def check_webroot(item: ChallengeFile) -> None:
    """Clear, actionable errors instead of a traceback from deep inside os.*."""
    root = item.webroot
    if not root:
        raise errors.PluginError(
            f"No webroot is configured for {_who(item)}. Pass -w/--webroot-path or "
            "--webroot-map, or set webroot_map in the lineage's renewal conf.")
    if not os.path.isdir(root):
        raise errors.PluginError(
            f"The webroot {root} for {_who(item)} does not exist or is not a directory. "
            "Create it (it must be the directory your web server serves for this name) or "
            "fix -w/--webroot-map (saved as webroot_map in the renewal conf).")
    challenge_dir = os.path.join(root, URI_ROOT)
    for part in (os.path.dirname(challenge_dir), challenge_dir):
        if os.path.lexists(part) and not os.path.isdir(part):
            raise errors.PluginError(
                f"{part} exists and is not a directory, so the challenge for {_who(item)} "
                "cannot be saved below it. Remove or rename it (the web server must serve "
                "/.well-known/acme-challenge/ from the webroot).")
    probe = root
    for candidate in (challenge_dir, os.path.dirname(challenge_dir)):
        if os.path.isdir(candidate):
            probe = candidate
            break
    if not os.access(probe, os.W_OK | os.X_OK):
        raise errors.PluginError(
            f"The webroot directory {probe} for {_who(item)} is not writable by this user "
            f"(uid {os.getuid()}). Fix its permissions or run certbot as a user that can "
            "write there.")


class WebrootProvisioner:
    """Creates challenge files (world-readable, so the web server can serve them with 200)
    and exactly the directories needed, and removes both again."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._files: list[str] = []
        self._dirs: list[str] = []

    def provision(self, items: Iterable[ChallengeFile]) -> list[tuple[ChallengeFile, Exception]]:
        """Write every file; returns the ones that failed with their error (others go on)."""
        failures: list[tuple[ChallengeFile, Exception]] = []
        for item in items:
            try:
                check_webroot(item)
                self._write(item)
            except (errors.PluginError, OSError) as exc:
                if isinstance(exc, OSError):
                    exc = errors.PluginError(
                        f"Could not write the challenge file {item.path} for {_who(item)}: "
                        f"{exc.strerror or exc}. Check the webroot's permissions.")
                failures.append((item, exc))
        return failures

    def _write(self, item: ChallengeFile) -> None:
        missing = paths.missing_dirs(os.path.dirname(item.path))
        self.journal.record("dir", missing, root=item.webroot)
        self.journal.record("file", [item.path], root=item.webroot)
        # Modes are set explicitly (chmod) instead of through the umask: the umask is
        # process-wide, and changing it from a worker thread would race with every other
        # thread creating files (certbot's own included).
        for path in missing:
            os.mkdir(path, 0o755)
            self._dirs.append(path)
            os.chmod(path, 0o755)
            _copy_owner(item.webroot, path)
        fd = os.open(item.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, item.content)
        finally:
            os.close(fd)
        self._files.append(item.path)

    def cleanup(self) -> None:
        entries = [("file", p) for p in self._files] + [("dir", p) for p in self._dirs]
        remove_paths(entries)
        self._files.clear()
        self._dirs.clear()
        self.journal.clear()


def _copy_owner(src: str, dst: str) -> None:
    # The web server may run as the webroot's owner; mirror certbot's webroot plugin.
    try:
        st = os.stat(src)
        os.chown(dst, st.st_uid, st.st_gid)
    except OSError as exc:
        logger.debug("Could not copy ownership of %s to %s: %s", src, dst, exc)
