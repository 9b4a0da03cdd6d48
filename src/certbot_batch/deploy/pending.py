"""Durable deployment: a renewed certificate is deployed by this run or the next.

Before the first certificate of a run is saved, the session records which lineages are
being renewed and how they are deployed (the Apache reload of batch-apache, the batch
deploy hooks) in ``WORK_DIR/certbot-batch/deploy-pending.json``; the record is cleared only
after the configtest, the reload and the batch hooks succeeded. A run killed in between, or
one whose configtest failed, leaves it behind, and the next certbot run of any kind
(``recovery.py``) finishes the deployment first. ``certbot-batch status`` shows it.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Optional

from certbot_batch import paths

logger = logging.getLogger(__name__)

FILE_NAME = "deploy-pending.json"
_lock = threading.Lock()


def path_for(config: Any) -> str:
    return os.path.join(paths.state_dir(config), FILE_NAME)


def load(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("certbot-batch: unreadable pending-deployment record %s (%s); the "
                       "next reload deploys everything anyway", path, exc)
        return {"lineages": [], "reload": None, "hooks": [], "error": str(exc)}
    return data if isinstance(data, dict) else None


def _write(path: str, data: dict[str, Any]) -> None:
    """Atomically, and durably: the point of the record is to survive a SIGKILL."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".deploy-pending-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class PendingDeployment:
    """The record of one run's deployment (merged with what an earlier run left)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def add(self, lineages: list[str], reload: Optional[dict[str, str]],
            hooks: list[str]) -> None:
        """Record before saving: these lineages need ``reload`` (Apache ctl and server root)
        and the batch ``hooks`` to be deployed."""
        if not lineages:
            return
        with _lock:
            data = load(self.path) or {"lineages": [], "reload": None, "hooks": [],
                                        "since": time.time()}
            data["lineages"] = sorted(set(data.get("lineages") or []) | set(lineages))
            if reload and not data.get("reload"):
                data["reload"] = reload
            data["hooks"] = sorted(set(data.get("hooks") or []) | set(hooks))
            data.setdefault("since", time.time())
            try:
                _write(self.path, data)
            except OSError as exc:
                logger.warning("certbot-batch: could not record the pending deployment in %s "
                               "(%s): if this run is killed before its reload, reload Apache "
                               "by hand", self.path, exc)

    def failed(self, error: str) -> None:
        with _lock:
            data = load(self.path)
            if data is None:
                return
            data["error"] = error
            data["last_attempt"] = time.time()
            try:
                _write(self.path, data)
            except OSError:
                pass

    def clear(self) -> None:
        with _lock:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("certbot-batch: could not remove %s: %s", self.path, exc)

    def get(self) -> Optional[dict[str, Any]]:
        return load(self.path)
