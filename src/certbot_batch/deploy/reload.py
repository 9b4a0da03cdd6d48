"""Run-wide Apache deployment state: one parse, one configtest, one graceful reload.

certbot builds a new installer object for every lineage, so what must span the run lives
here, and is only active between ``begin()`` and ``flush()`` of a renewal session. Outside
a session every call is a no-op and batch-apache reloads immediately, like stock certbot.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from typing import Any, Optional

from certbot_batch.deploy import apachectl

logger = logging.getLogger(__name__)

_CERT_DIRECTIVE = re.compile(
    r"^\s*SSLCertificate(?:Key|Chain)?File\s+\"?([^\"\s]+)\"?", re.IGNORECASE | re.MULTILINE)


@dataclasses.dataclass
class DeployRun:
    reload_requested: bool = False
    edited: bool = False
    ctl: Optional[str] = None
    delegate: Optional[Any] = None
    referenced: Optional[set[str]] = None
    configtests: int = 0
    reloads: int = 0


_run: Optional[DeployRun] = None


def begin() -> DeployRun:
    global _run
    _run = DeployRun()
    return _run


def active() -> Optional[DeployRun]:
    return _run


def end() -> None:
    global _run
    _run = None


def defer_reload(config: Any, plugin: Any) -> bool:
    if _run is None:
        return False
    _run.reload_requested = True
    _run.ctl = plugin.ctl()
    if _run.delegate is None and getattr(plugin, "_delegate", None) is not None:
        _run.delegate = plugin._delegate
    return True


def shared_delegate(config: Any) -> Optional[Any]:
    return _run.delegate if _run is not None else None


def remember_delegate(config: Any, delegate: Any) -> None:
    if _run is not None:
        _run.delegate = delegate


def mark_edited(config: Any) -> None:
    if _run is not None:
        _run.edited = True


def server_root(config: Any) -> str:
    return str(getattr(config, "apache_server_root", None) or "/etc/apache2")


def referenced_paths(root: str) -> set[str]:
    """Every certificate/key path that Apache's config files name (a text scan, not a parse:
    milliseconds where an Augeas parse of a big server takes minutes)."""
    found: set[str] = set()
    patterns = ["*.conf", "*/*.conf", "*/*", "sites-enabled/*", "conf-enabled/*"]
    seen: set[str] = set()
    for pattern in patterns:
        for path in glob.glob(os.path.join(root, pattern)):
            real = os.path.realpath(path)
            if real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            try:
                with open(real, encoding="utf-8", errors="replace") as fh:
                    found.update(_CERT_DIRECTIVE.findall(fh.read()))
            except OSError:
                continue
    return found


def already_deployed(config: Any, domain: str, cert_path: str, key_path: str,
                     fullchain_path: str) -> bool:
    """True when Apache already serves this lineage from its live/ paths (renewal case)."""
    if _run is None:
        return False
    if _run.referenced is None:
        _run.referenced = referenced_paths(server_root(config))
    refs = _run.referenced
    return key_path in refs and (fullchain_path in refs or cert_path in refs)


class ReloadFailed(Exception):
    pass


def flush(run: DeployRun) -> Optional[str]:
    """The one configtest + graceful reload of the run. Returns an error message or None.

    On a failing configtest this run's edits are rolled back (no reload); the renewed
    certificates stay saved and Apache keeps serving the previous ones."""
    if not run.reload_requested or run.ctl is None:
        return None
    try:
        run.configtests += 1
        apachectl.configtest(run.ctl)
    except Exception as exc:  # noqa: BLE001  (any failure: roll back, report, go on)
        msg = str(exc)
        if run.edited and run.delegate is not None:
            try:
                run.delegate.recovery_routine()
                run.delegate.rollback_checkpoints(1)
                msg += " The configuration edits of this run were rolled back."
            except Exception as rb_exc:  # noqa: BLE001
                msg += f" Rolling back this run's edits also failed: {rb_exc}"
        return (f"Apache was NOT reloaded: {msg} The renewed certificates are saved; Apache "
                "keeps serving the previous ones until the configuration is fixed and Apache "
                "is reloaded.")
    try:
        run.reloads += 1
        apachectl.graceful(run.ctl)
    except Exception as exc:  # noqa: BLE001
        return f"Apache reload failed: {exc}"
    return None
