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
import threading
from typing import Any, Optional

from certbot_batch.deploy import apachectl

logger = logging.getLogger(__name__)

_CERT_DIRECTIVE = re.compile(
    r"^\s*SSLCertificate(?:Key|Chain)?File\s+\"?([^\"\s]+)\"?", re.IGNORECASE | re.MULTILINE)
_INCLUDE = re.compile(r"^\s*Include(?:Optional)?\s+\"?([^\"\s]+)\"?", re.IGNORECASE | re.MULTILINE)
_DEFINE_VAR = re.compile(r"\$\{([A-Za-z0-9_]+)\}")
#: The file Apache starts from, by layout (Debian first).
MAIN_CONFIGS = ("apache2.conf", "httpd.conf", "conf/httpd.conf")


@dataclasses.dataclass
class DeployRun:
    reload_requested: bool = False
    edited: bool = False
    ctl: Optional[str] = None
    delegate: Optional[Any] = None
    #: certbot checkpoints (backup_dir entries) that existed before this run's first edit
    checkpoints_before: Optional[int] = None
    backup_dir: Optional[str] = None
    referenced: Optional[set[str]] = None
    configtests: int = 0
    reloads: int = 0
    #: reloads done during the run (batch-apache authenticator: serve the challenges)
    challenge_reloads: int = 0
    result: str = "none"
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def begin(ctx: Any) -> DeployRun:
    """The deployment of a renewal session, kept in its run context."""
    ctx.deploy = DeployRun()
    return ctx.deploy  # type: ignore[no-any-return]


def active() -> Optional[DeployRun]:
    """The deployment of the session in progress, or None outside a session."""
    from certbot_batch import _certbot

    ctx = _certbot.current()
    run = getattr(ctx, "deploy", None) if ctx is not None else None
    return run if isinstance(run, DeployRun) else None


def defer_reload(config: Any, plugin: Any) -> bool:
    run = active()
    if run is None:
        return False
    with run.lock:
        run.reload_requested = True
        run.ctl = run.ctl or plugin.ctl()
        if run.delegate is None and getattr(plugin, "_delegate", None) is not None:
            run.delegate = plugin._delegate
    return True


def request_reload(ctl: str) -> bool:
    """Ask for a reload at the end of the run (e.g. to drop the challenge snippet).
    Returns False outside a session (the caller must reload itself)."""
    run = active()
    if run is None:
        return False
    with run.lock:
        run.reload_requested = True
        run.ctl = run.ctl or ctl
    return True


def shared_delegate(config: Any) -> Optional[Any]:
    run = active()
    return run.delegate if run is not None else None


def _checkpoints(backup_dir: Optional[str]) -> int:
    try:
        return len(os.listdir(backup_dir)) if backup_dir else 0
    except OSError:
        return 0


def remember_delegate(config: Any, delegate: Any) -> None:
    run = active()
    if run is not None:
        run.delegate = delegate
        run.backup_dir = getattr(config, "backup_dir", None)
        run.checkpoints_before = _checkpoints(run.backup_dir)


def mark_edited(config: Any) -> None:
    run = active()
    if run is not None:
        run.edited = True


def server_root(config: Any) -> str:
    return str(getattr(config, "apache_server_root", None) or "/etc/apache2")


def _resolve(root: str, pattern: str) -> list[str]:
    pattern = _DEFINE_VAR.sub(lambda m: os.environ.get(m.group(1), m.group(0)), pattern)
    if not os.path.isabs(pattern):
        pattern = os.path.join(root, pattern)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "*")
    return sorted(glob.glob(pattern))


def config_files(root: str) -> list[str]:
    """The files Apache reads, found by following Include/IncludeOptional from the main
    config (a text walk: milliseconds, where an Augeas parse of a big server takes
    minutes). <IfModule>/<IfDefine> are not evaluated, so this may list a little more than
    Apache reads -- never less, for the files reachable from the main config."""
    main = next((os.path.join(root, m) for m in MAIN_CONFIGS
                 if os.path.isfile(os.path.join(root, m))), None)
    if main is None:  # unknown layout: every *.conf below the root
        return sorted(glob.glob(os.path.join(root, "**", "*.conf"), recursive=True))
    out: list[str] = []
    seen: set[str] = set()
    todo = [main]
    while todo:
        path = todo.pop(0)
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        out.append(path)
        try:
            with open(real, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        for pattern in _INCLUDE.findall(text):
            todo.extend(_resolve(root, pattern))
    return out


def referenced_paths(root: str) -> set[str]:
    """Every certificate/key path that Apache's enabled config files name."""
    found: set[str] = set()
    for path in config_files(root):
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                found.update(_CERT_DIRECTIVE.findall(fh.read()))
        except OSError:
            continue
    return found


def already_deployed(config: Any, domain: str, cert_path: str, key_path: str,
                     fullchain_path: str) -> bool:
    """True when Apache already serves this lineage from its live/ paths (renewal case)."""
    run = active()
    if run is None:
        return False
    with run.lock:
        if run.referenced is None:
            run.referenced = referenced_paths(server_root(config))
        refs = run.referenced
    return key_path in refs and (fullchain_path in refs or cert_path in refs)


class ReloadFailed(Exception):
    pass


def flush(run: DeployRun) -> Optional[str]:
    """The one configtest + graceful reload of the run. Returns an error message or None.

    On a failing configtest this run's edits are rolled back (no reload); the renewed
    certificates stay saved and Apache keeps serving the previous ones. A stopped Apache
    is started by the graceful reload (as stock certbot's ``apachectl graceful`` does),
    with a warning."""
    if not run.reload_requested or run.ctl is None:
        return None
    try:
        run.configtests += 1
        apachectl.configtest(run.ctl)
    except Exception as exc:  # noqa: BLE001  (any failure: roll back, report, go on)
        run.result = "configtest-failed"
        msg = str(exc)
        if run.edited and run.delegate is not None:
            try:
                run.delegate.recovery_routine()
                # Every lineage edited in this run saved a checkpoint of its own: undo
                # them all (and nothing older).
                made = (_checkpoints(run.backup_dir) - run.checkpoints_before
                        if run.checkpoints_before is not None else 1)
                if made > 0:
                    run.delegate.rollback_checkpoints(made)
                msg += " The configuration edits of this run were rolled back."
            except Exception as rb_exc:  # noqa: BLE001
                msg += f" Rolling back this run's edits also failed: {rb_exc}"
        return (f"Apache was NOT reloaded: {msg} The renewed certificates are saved; Apache "
                "keeps serving the previous ones until the configuration is fixed and Apache "
                "is reloaded.")
    try:
        run.reloads += 1
        output = apachectl.graceful(run.ctl)
    except Exception as exc:  # noqa: BLE001
        run.result = "reload-failed"
        return f"Apache reload failed: {exc}"
    run.result = "reloaded"
    if apachectl.said_not_running(output):
        logger.warning("Apache was not running: `%s graceful` started it, serving the "
                       "renewed certificates.", run.ctl)
    else:
        logger.info("Apache reloaded once for the whole run (certbot-batch)")
    return None


def preflight(config: Any) -> None:
    """Fail before any renewal work when batch-apache is chosen on the command line and
    its apachectl cannot run (saved settings are checked per lineage by prepare())."""
    from certbot_batch import _certbot

    chosen = [getattr(config, attr, None) for attr in ("installer", "authenticator")
              if _certbot.set_by_user(config, attr)]
    if "batch-apache" not in chosen or getattr(config, "dry_run", False):
        return
    ctl = getattr(config, "apache_ctl", None)
    if ctl:
        apachectl.find_ctl(str(ctl))
