"""The deployment of a run: one configtest and one confirmed reload per server instance.

certbot builds a new installer object for every lineage, so what must span the run lives
in a :class:`DeployRun` (one :class:`Target` per server instance the run's lineages name),
active between ``begin()`` and the end of a renewal session. Outside a session every call is
a no-op and batch-apache reloads immediately, like stock certbot.

:func:`deploy` is the one way anything here reloads a server (end of a run, recovery):

1. every lineage the server's configuration serves from ``live/`` has its four links on one
   complete version whose key fits its certificate (``links.py``; repaired as certbot
   would, and said so). A configtest does not load certificates, so this is checked here:
   one bad pair makes the reload take the server down. If a lineage cannot be repaired,
   the server is **not** reloaded;
2. the configtest;
3. the reload, confirmed by the server's processes (a new generation of workers under a
   live master) -- a master that exits is reported loudly as a server taken down;
4. a TLS probe of a sample of the renewed lineages' vhosts: still the previous certificate
   after the reload means not deployed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any, Iterable, Optional

from certbot import errors
from cryptography import x509

from certbot_batch import _certbot, links, run
from certbot_batch.servers import Server, ServerRef, server_for
from certbot_batch.servers import apache as apache_server
from certbot_batch.servers.base import Endpoint, served_serial

logger = logging.getLogger(__name__)

#: How long a reload may take to show its new workers (a big Apache needs seconds: 6.5 s
#: at 3,000 SSL vhosts) in a renewal run, and in the recovery of another command.
CONFIRM_TIMEOUT = 120.0
BRIEF_CONFIRM_TIMEOUT = 10.0
#: Renewed lineages whose served certificate is probed after a reload, per server.
PROBE_SAMPLE = 20
PROBE_TIMEOUT = 10.0

#: deploy() outcomes
RELOADED = "reloaded"
REFUSED = "refused"              # a lineage's links could not be made safe: no reload
CONFIGTEST_FAILED = "configtest-failed"
RELOAD_FAILED = "reload-failed"  # the control program failed
DOWN = "down"                    # the reload took the server down
UNCONFIRMED = "unconfirmed"      # no new workers within the timeout
REJECTED = "rejected"            # the master refused the new configuration (nginx), said why
STALE = "not-serving"            # reloaded, still serving a previous certificate


@dataclasses.dataclass
class Outcome:
    status: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == RELOADED


@dataclasses.dataclass
class Target:
    """One server instance of the run."""
    ref: ServerRef
    server: Server
    reload_requested: bool = False
    edited: bool = False
    #: certbot's configurator for this server (batch-apache edits through it)
    delegate: Optional[Any] = None
    #: certbot checkpoints (backup_dir entries) that existed before this run's first edit
    checkpoints_before: Optional[int] = None
    backup_dir: Optional[str] = None
    referenced: Optional[set[str]] = None
    #: lineages of this run deployed through this server
    lineages: set[str] = dataclasses.field(default_factory=set)
    result: str = "none"


@dataclasses.dataclass
class DeployRun:
    targets: dict[str, Target] = dataclasses.field(default_factory=dict)
    #: reloads done during the run (batch-apache authenticator: serve the challenges)
    challenge_reloads: int = 0
    #: what a server implementation reads once per run (nginx: its configuration walk)
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)

    def target(self, ref: ServerRef) -> Target:
        with self.lock:
            found = self.targets.get(ref.key)
            if found is None:
                found = self.targets[ref.key] = Target(ref, server_for(ref))
            return found


def active() -> Optional[DeployRun]:
    """The deployment of the session in progress, or None outside a session."""
    current = run.current()
    return current.deploy if current is not None else None


def _target_for(ref: ServerRef) -> Optional[Target]:
    deployment = active()
    return deployment.target(ref) if deployment is not None else None


def defer_reload(ref: ServerRef, delegate: Optional[Any] = None) -> bool:
    """An installer's restart() inside a session: recorded for the end of the run (False
    outside a session: the caller reloads itself). ``delegate``: the certbot configurator
    the installer edited through, kept for a rollback."""
    target = _target_for(ref)
    if target is None:
        return False
    with active().lock:  # type: ignore[union-attr]
        target.reload_requested = True
        name = run.current_lineage()
        if name:
            target.lineages.add(name)
        if target.delegate is None and delegate is not None:
            target.delegate = delegate
    return True


def request_reload(ref: ServerRef) -> bool:
    """Ask for a reload at the end of the run (e.g. to drop the challenge snippet).
    Returns False outside a session (the caller must reload itself)."""
    deployment = active()
    if deployment is None:
        return False
    deployment.target(ref).reload_requested = True
    return True


def shared_delegate(ref: ServerRef) -> Optional[Any]:
    target = _target_for(ref)
    return target.delegate if target is not None else None


def _checkpoints(backup_dir: Optional[str]) -> int:
    try:
        return len(os.listdir(backup_dir)) if backup_dir else 0
    except OSError:
        return 0


def remember_delegate(ref: ServerRef, config: Any, delegate: Any) -> None:
    target = _target_for(ref)
    if target is not None:
        target.delegate = delegate
        target.backup_dir = getattr(config, "backup_dir", None)
        target.checkpoints_before = _checkpoints(target.backup_dir)


def mark_edited(ref: ServerRef) -> None:
    target = _target_for(ref)
    if target is not None:
        target.edited = True


def already_deployed(ref: ServerRef, cert_path: str, key_path: str,
                     fullchain_path: str) -> bool:
    """True when the server already serves this lineage from its live/ paths (renewal)."""
    target = _target_for(ref)
    if target is None:
        return False
    with active().lock:  # type: ignore[union-attr]
        if target.referenced is None:
            target.referenced = target.server.referenced_paths()
        refs = target.referenced
    return key_path in refs and (fullchain_path in refs or cert_path in refs)


# -- the safe reload ---------------------------------------------------------------------

def _live_name(path: str, live_root: str, real_live_root: str) -> Optional[str]:
    """The lineage whose live/ directory holds ``path``, or None."""
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.dirname(parent) == live_root:
        return os.path.basename(parent)
    if os.path.dirname(os.path.realpath(parent)) == real_live_root:
        return os.path.basename(os.path.realpath(parent))
    return None


def check_links(server: Server, config_dir: str, lineages: Iterable[str]) -> list[str]:
    """Make the links of every lineage the server serves (and of ``lineages``, read more
    closely) safe to reload with. Returns the problems that could not be fixed, for
    lineages the server serves."""
    live_root = os.path.normpath(os.path.join(config_dir, "live"))
    real_live_root = os.path.realpath(live_root)
    served = set()
    for path in server.referenced_paths():
        name = _live_name(path, live_root, real_live_root)
        if name:
            served.add(name)
    deep = {n for n in lineages if os.path.isdir(os.path.join(live_root, n))}
    problems = []
    for name in sorted(served | deep):
        outcome = links.ensure_consistent(
            links.Lineage.in_live_dir(os.path.join(live_root, name)), deep=name in deep)
        if outcome.changed:
            logger.warning("certbot-batch: %s", outcome.message)
        if not outcome.ok and name in served:
            problems.append(outcome.message)
    return problems


def _serial(path: str) -> Optional[int]:
    try:
        with open(path, "rb") as fh:
            return int(x509.load_pem_x509_certificate(fh.read()).serial_number)
    except (OSError, ValueError):
        return None


def probe(server: Server, config_dir: str, lineages: Iterable[str],
          previous: dict[str, int], timeout: float = PROBE_TIMEOUT) -> list[str]:
    """Lineages (of a sample) that the reloaded server still serves with their previous
    certificate. Only that counts: a vhost that serves something else, or does not answer,
    is no evidence either way."""
    endpoints = server.endpoints()
    plan: list[tuple[str, int, int, list[Endpoint]]] = []
    for name in sorted(lineages):
        old = previous.get(name)
        if old is None:
            continue
        live = os.path.join(config_dir, "live", name)
        where = [e for f in ("fullchain.pem", "cert.pem")
                 for e in endpoints.get(os.path.join(live, f), [])]
        current = _serial(os.path.join(live, "cert.pem"))
        if where and current is not None and current != old:
            plan.append((name, current, old, where))
        if len(plan) >= PROBE_SAMPLE:
            break
    deadline = time.monotonic() + timeout
    stale: list[str] = []
    for name, current, old, where in plan:
        while True:
            served = [served_serial(e) for e in where]
            if old not in served or current in served:
                break
            if time.monotonic() >= deadline:
                stale.append(name)
                break
            time.sleep(0.1)
    return stale


def deploy(server: Server, config_dir: Optional[str], lineages: Iterable[str], *,
           timeout: float = CONFIRM_TIMEOUT,
           previous: Optional[dict[str, int]] = None) -> Outcome:
    """The one safe reload (module docstring). Never raises certbot errors: they are the
    outcome."""
    names = sorted(set(lineages))
    label = server.label()
    title, where = server.title, server.where()
    problems = check_links(server, config_dir, names) if config_dir else []
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return Outcome(REFUSED, f"{title} was NOT reloaded {where}: {problems[0]}{more}. A reload "
                       "would take it down (it cannot load a key that does not fit its "
                       "certificate); it keeps serving what it loaded before. Renew that "
                       "lineage (certbot renew --cert-name NAME --force-renewal) or fix its "
                       "live/ links.")
    try:
        server.configtest()
    except errors.Error as exc:
        return Outcome(CONFIGTEST_FAILED, f"{title} was NOT reloaded {where}: its "
                       f"configtest fails ({exc})")
    before = server.snapshot()
    try:
        server.reload()
    except errors.Error as exc:
        return Outcome(RELOAD_FAILED, f"reloading {label} failed: {exc}")
    state = server.confirm(before, timeout)
    if state == "down":
        logger.error("certbot-batch: %s is DOWN after its reload: its master process exited "
                     "(see its error log). Start it again once its configuration loads.",
                     label)
        return Outcome(DOWN, f"{label} is DOWN after its reload (its master process "
                       "exited; see its error log)")
    if state == "rejected":
        return Outcome(REJECTED, f"{label} rejected the reload and keeps serving its previous "
                       f"configuration: {server.rejection()}")
    if state == "unconfirmed":
        return Outcome(UNCONFIRMED, f"{label} was reloaded but did not start new workers "
                       f"within {timeout:.0f} s; the next run checks again")
    stale = probe(server, config_dir, names, previous or {}) if config_dir else []
    if stale:
        return Outcome(STALE, f"{label} was reloaded but still serves the previous "
                       f"certificate of {', '.join(stale[:5])}"
                       f"{' ...' if len(stale) > 5 else ''}")
    if state == "unverifiable":
        logger.info("certbot-batch: %s reloaded (no pid file to confirm it with)", label)
    else:
        logger.info("certbot-batch: %s reloaded and confirmed", label)
    return Outcome(RELOADED)


def flush(target: Target, config_dir: str, lineages: Iterable[str],
          previous: Optional[dict[str, int]] = None) -> Outcome:
    """The end-of-run deployment of one target: ``deploy``, and when its configtest fails,
    this run's configuration edits are rolled back (the server keeps what it served)."""
    outcome = deploy(target.server, config_dir, lineages, previous=previous)
    target.result = outcome.status
    if outcome.status == CONFIGTEST_FAILED and target.edited and target.delegate is not None:
        try:
            target.delegate.recovery_routine()
            made = (_checkpoints(target.backup_dir) - target.checkpoints_before
                    if target.checkpoints_before is not None else 1)
            if made > 0:
                target.delegate.rollback_checkpoints(made)
            outcome.message += "; the configuration edits of this run were rolled back"
        except errors.Error as exc:
            outcome.message += f"; rolling back this run's edits also failed: {exc}"
    return outcome


def preflight(config: Any) -> None:
    """Fail before any renewal work when batch-apache is chosen on the command line and
    its apachectl cannot run (saved settings are checked per lineage by prepare())."""
    chosen = [getattr(config, attr, None) for attr in ("installer", "authenticator")
              if _certbot.set_by_user(config, attr)]
    if "batch-apache" not in chosen or getattr(config, "dry_run", False):
        return
    ctl = getattr(config, "apache_ctl", None)
    if ctl:
        apache_server.find_ctl(str(ctl))
