"""Durable deployment: a renewed certificate is deployed by this run or the next, on every
server instance it belongs to.

Before certbot's loop saves a wave, the session records, per server instance (kind, control
program, configuration root), which lineages it must reload for, and, per batch deploy hook,
which lineages it must be told about: ``deploy-pending.json``, a mirrored record
(``durable.py``: in the state directory and in ``CONFIG_DIR/certbot-batch``). An entry goes
only once that server was reloaded and the reload confirmed (or that hook succeeded).

Each entry has a state:

* ``in-progress``: a run is deploying it. Found by a later command (certbot's lock is held
  then, so that run is gone), it was **interrupted**: any certbot command deploys it;
* ``failed``: the run tried and said so (configtest failed, the server did not come back,
  a hook failed). ``certbot renew`` retries it on every run and exits non-zero until it
  works; other commands only mention it in one line. ``certbot-batch status`` shows both
  and exits non-zero.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Iterable, Optional

from certbot_batch import paths
from certbot_batch.durable import MirroredRecord
from certbot_batch.servers.base import ServerRef, pid_alive

logger = logging.getLogger(__name__)

FILE_NAME = "deploy-pending.json"
IN_PROGRESS = "in-progress"
FAILED = "failed"
#: why a server entry exists
RENEWED = "renewed"
CHALLENGE_CONFIG = "challenge-config"


def path_for(config: Any) -> str:
    """The primary copy (``status`` and older tests look here first)."""
    return os.path.join(paths.state_dir(config), FILE_NAME)


def _entry(lineages: Iterable[str], now: float) -> dict[str, Any]:
    return {"lineages": sorted(set(lineages)), "state": IN_PROGRESS, "pid": os.getpid(),
            "since": now, "error": None, "attempts": 0, "last_attempt": None}


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A record of certbot-batch 0.1.0 (one Apache, one list)."""
    out: dict[str, Any] = {"servers": {}, "hooks": {}}
    lineages = [str(n) for n in data.get("lineages") or []]
    state = FAILED if data.get("error") else IN_PROGRESS
    since = float(data.get("since") or time.time())
    reload = data.get("reload")
    if isinstance(reload, dict) and reload.get("ctl"):
        ref = ServerRef("apache", str(reload["ctl"]), str(reload.get("server_root") or
                                                          "/etc/apache2"))
        entry = dict(_entry(lineages, since), state=state, error=data.get("error"), pid=None)
        entry["server"] = ref.to_dict()
        entry["reason"] = RENEWED
        out["servers"][ref.key] = entry
    for hook in data.get("hooks") or []:
        out["hooks"][str(hook)] = dict(_entry(lineages, since), state=state,
                                       error=data.get("error"), pid=None, command=str(hook))
    return out


class PendingDeployments:
    """The pending-deployment record of one certbot configuration."""

    def __init__(self, config: Any) -> None:
        self.record = MirroredRecord(paths.record_paths(config, FILE_NAME))
        self._lock = threading.RLock()

    # -- reading -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.record.exists()

    def load(self) -> dict[str, Any]:
        data = self.record.load() or {}
        if "lineages" in data and "servers" not in data:
            data = _from_v1(data)
        servers = data.get("servers")
        hooks = data.get("hooks")
        return {"servers": dict(servers) if isinstance(servers, dict) else {},
                "hooks": dict(hooks) if isinstance(hooks, dict) else {}}

    def servers(self) -> list[tuple[ServerRef, dict[str, Any]]]:
        out = []
        for entry in self.load()["servers"].values():
            ref = ServerRef.from_dict(entry.get("server"))
            if ref is not None:
                out.append((ref, entry))
        return out

    def hooks(self) -> list[tuple[str, dict[str, Any]]]:
        return [(str(cmd), entry) for cmd, entry in self.load()["hooks"].items()]

    def lineages(self) -> list[str]:
        data = self.load()
        names: set[str] = set()
        for group in (data["servers"], data["hooks"]):
            for entry in group.values():
                names.update(str(n) for n in entry.get("lineages") or [])
        return sorted(names)

    # -- writing -------------------------------------------------------------------------
    def _save(self, data: dict[str, Any]) -> None:
        if not data["servers"] and not data["hooks"]:
            self.record.remove()
            return
        if not self.record.save({"version": 2, **data}):
            logger.warning("certbot-batch: the pending deployment could not be recorded "
                           "anywhere: if this run is killed before its reload, reload the "
                           "web server by hand")

    def begin(self, servers: dict[ServerRef, list[str]], hooks: list[str],
              lineages: list[str], reason: str = RENEWED,
              owner: Optional[int] = -1) -> None:
        """Before saving: these lineages need these reloads and hooks (merged with what is
        already pending; this run owns the entries now). ``owner``: the pid of the run that
        deploys them (default: this process); None records them as left by an
        interrupted run (recovery found the work, nobody is doing it)."""
        pid = os.getpid() if owner == -1 else owner
        if not servers and not (hooks and lineages):
            return
        now = time.time()
        with self._lock:
            data = self.load()
            for ref, names in servers.items():
                entry = data["servers"].get(ref.key) or dict(_entry([], now),
                                                             server=ref.to_dict(),
                                                             reason=reason)
                entry["lineages"] = sorted(set(entry.get("lineages") or []) | set(names))
                entry["state"] = IN_PROGRESS
                entry["pid"] = pid
                if names:
                    entry["reason"] = RENEWED
                data["servers"][ref.key] = entry
            if lineages:
                for cmd in hooks:
                    entry = data["hooks"].get(cmd) or dict(_entry([], now), command=cmd)
                    entry["lineages"] = sorted(set(entry.get("lineages") or []) |
                                               set(lineages))
                    entry["state"] = IN_PROGRESS
                    entry["pid"] = pid
                    data["hooks"][cmd] = entry
            self._save(data)

    def _finish(self, group: str, key: str, error: Optional[str]) -> None:
        with self._lock:
            data = self.load()
            entry = data[group].get(key)
            if entry is None:
                return
            if error is None:
                del data[group][key]
            else:
                entry["state"] = FAILED
                entry["error"] = error
                entry["attempts"] = int(entry.get("attempts") or 0) + 1
                entry["last_attempt"] = time.time()
                entry["pid"] = None
            self._save(data)

    def server_done(self, ref: ServerRef) -> None:
        self._finish("servers", ref.key, None)

    def server_failed(self, ref: ServerRef, error: str) -> None:
        self._finish("servers", ref.key, error)

    def hook_done(self, command: str) -> None:
        self._finish("hooks", command, None)

    def hook_failed(self, command: str, error: str) -> None:
        self._finish("hooks", command, error)


def interrupted(entry: dict[str, Any]) -> bool:
    """Left ``in-progress`` by a run that is gone (callers hold certbot's lock, or check)."""
    return entry.get("state") == IN_PROGRESS


def running(entry: dict[str, Any]) -> bool:
    """In progress in a live process (for ``status``, which takes no lock)."""
    pid = entry.get("pid")
    return (entry.get("state") == IN_PROGRESS and isinstance(pid, int)
            and pid != os.getpid() and pid_alive(pid))
