"""Finishing deployments: this run's, and whatever earlier runs left pending.

One function for every caller, so that a server is reloaded the same careful way
(``reload.deploy``) whoever asks:

* the end of a renewal session: every server instance of the run, and every entry of the
  pending record (earlier runs' failures and interruptions), then the batch deploy hooks;
* the end of a ``certbot renew`` that certbot ran as stock while something was pending;
* recovery in any other command (``brief``): only what an *interrupted* run left, with a
  short confirmation; failures reported by their run are left to the next ``renew`` and
  mentioned in one line.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

from certbot_batch.deploy import hooks as batch_hooks
from certbot_batch.deploy import pending, reload
from certbot_batch.servers import server_for
from certbot_batch.servers.base import ServerRef

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Report:
    #: server key -> outcome of its deployment in this call
    servers: dict[str, reload.Outcome] = dataclasses.field(default_factory=dict)
    #: lineage -> why it is not deployed (its server's failure)
    not_deployed: dict[str, str] = dataclasses.field(default_factory=dict)
    #: problems to report (and to make ``renew`` exit non-zero)
    errors: list[str] = dataclasses.field(default_factory=list)
    #: lineages deployed that an earlier run had left pending
    earlier: list[str] = dataclasses.field(default_factory=list)
    #: failed entries left alone (brief mode)
    left: list[str] = dataclasses.field(default_factory=list)

    @property
    def reload_result(self) -> str:
        """$CERTBOT_BATCH_APACHE_RELOAD of the batch hooks: "none", "reloaded", or the
        first failure ("configtest-failed", "reload-failed", "down", ...)."""
        if not self.servers:
            return "none"
        bad = [o.status for o in self.servers.values() if not o.ok]
        return bad[0] if bad else "reloaded"


def finish(config: Any, *, brief: bool, run: Optional[reload.DeployRun] = None,
           run_lineages: Optional[list[str]] = None,
           previous: Optional[dict[str, int]] = None) -> Report:
    """Deploy what is pending (module docstring). ``run``: the session's deployment (its
    targets carry this run's edits, for a rollback); ``run_lineages``: lineages renewed in
    this run (told to the batch hooks even if nothing else is pending)."""
    report = Report()
    record = pending.PendingDeployments(config)
    config_dir = str(config.config_dir)
    entries = {ref.key: (ref, entry) for ref, entry in record.servers()} \
        if record.exists() else {}
    targets: dict[str, tuple[ServerRef, list[str], Optional[dict[str, Any]]]] = {}
    for key, (ref, found) in entries.items():
        targets[key] = (ref, [str(n) for n in found.get("lineages") or []], found)
    if run is not None:
        for key, run_target in run.targets.items():
            if not run_target.reload_requested:
                continue
            ref, names, found_entry = targets.get(key, (run_target.ref, [], None))
            targets[key] = (ref, sorted(set(names) | run_target.lineages), found_entry)
    for key, (ref, names, entry) in targets.items():
        interrupted = entry is not None and pending.interrupted(entry) and \
            entry.get("pid") != os.getpid()
        if brief and not interrupted:
            if entry is not None:
                report.left.append(_left_line(ref, names, entry))
            continue
        try:
            server = server_for(ref)
        except ValueError as exc:
            report.errors.append(f"pending deployment for {ref.key}: {exc}")
            continue
        target = (run.targets.get(key) if run is not None else None) or \
            reload.Target(ref, server)
        outcome = reload.flush(target, config_dir, names, previous=previous) if not brief \
            else reload.deploy(server, config_dir, names,
                               timeout=reload.BRIEF_CONFIRM_TIMEOUT, previous=previous)
        report.servers[key] = outcome
        earlier = [n for n in names if not run_lineages or n not in run_lineages]
        if outcome.ok:
            if entry is not None:
                record.server_done(ref)
            if earlier and entry is not None:
                report.earlier += earlier
                why = "renewed by an interrupted run" if interrupted else "renewed earlier"
                logger.warning("certbot-batch: reloaded %s for %d lineage(s) %s: %s",
                               server.label(), len(earlier), why, ", ".join(earlier[:20]))
            elif entry is not None and entry.get("reason") == pending.CHALLENGE_CONFIG:
                logger.warning("certbot-batch: reloaded %s to drop the challenge "
                               "configuration of an interrupted run", server.label())
        else:
            if entry is not None or names:
                if entry is None:
                    record.begin({ref: names}, [], [])
                record.server_failed(ref, outcome.message)
            for name in names:
                report.not_deployed[name] = outcome.message
            report.errors.append(outcome.message)
            if brief:  # (the other callers report it next to what it concerns)
                logger.error("certbot-batch: %s", outcome.message)
    _run_hooks(config, record, report, brief, run_lineages or [])
    for line in report.left:
        logger.warning("certbot-batch: %s", line)
    return report


def _left_line(ref: ServerRef, names: list[str], entry: dict[str, Any]) -> str:
    what = f"{len(names)} renewed certificate(s)" if names else "a reload"
    return (f"{what} still not deployed on {server_for(ref).label()} "
            f"({entry.get('error') or 'failed'}); the next `certbot renew` tries again")


def _run_hooks(config: Any, record: pending.PendingDeployments, report: Report, brief: bool,
               run_lineages: list[str]) -> None:
    hooks = record.hooks() if record.exists() else []
    done_cmds = set()
    for cmd, entry in hooks:
        interrupted = pending.interrupted(entry) and entry.get("pid") != os.getpid()
        names = [str(n) for n in entry.get("lineages") or []]
        if brief and not interrupted:
            report.left.append(f"the batch deploy hook '{cmd}' failed for {len(names)} "
                               f"lineage(s) ({entry.get('error') or 'failed'}); the next "
                               "`certbot renew` runs it again")
            continue
        done_cmds.add(cmd)
        if not names:
            record.hook_done(cmd)
            continue
        described = [batch_hooks.describe_lineage(config, n) for n in names]
        error = batch_hooks.run_batch_hooks(config, described, report.reload_result,
                                            commands=[cmd])
        if error:
            record.hook_failed(cmd, error)
            report.errors.append(error)
            logger.error("certbot-batch: %s", error)
        else:
            record.hook_done(cmd)
            if interrupted:
                logger.warning("certbot-batch: ran the batch deploy hook '%s' for %d "
                               "lineage(s) renewed by an interrupted run", cmd, len(names))
    if brief or not run_lineages:
        return
    # Hooks configured now that no record named (the record could not be written).
    todo = [c for c in batch_hooks.hook_commands(config) if c not in done_cmds]
    if todo:
        described = [batch_hooks.describe_lineage(config, n) for n in run_lineages]
        error = batch_hooks.run_batch_hooks(config, described, report.reload_result,
                                            commands=todo)
        if error:
            report.errors.append(error)
            logger.error("certbot-batch: %s", error)
