"""The renewal session: owns one ``certbot renew`` run when the batch suite is in use.

Scan every lineage in parallel, hand only the due ones to certbot's own per-lineage
pipeline (which keeps certbot's saving, hooks, summary and exit code), then do the batched
deployment (one Apache reload) and the batched deploy hooks. When the suite is not in use
the run is handed to certbot untouched.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, Callable, Optional

from certbot import errors

from certbot_batch import _certbot, paths
from certbot_batch.challenges import prevalidate
from certbot_batch.challenges.journal import Journal
from certbot_batch.context import RunContext
from certbot_batch.deploy import hooks as batch_hooks
from certbot_batch.deploy import reload
from certbot_batch.scan.engine import Scanner, ScanReport, ScanSettings, fmt_time
from certbot_batch.scan.state import StateDB

logger = logging.getLogger(__name__)

_BATCH_LINE = re.compile(
    r"^\s*(?:authenticator|installer)\s*=\s*(?:batch-webroot|batch-apache)\s*$", re.MULTILINE)
#: With more not-due lineages than this, the summary is condensed to a count.
LIST_LIMIT = 20


def conf_names_batch_plugin(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return bool(_BATCH_LINE.search(fh.read()))
    except OSError:
        return False


def engaged(config: Any, conf_files: Optional[list[str]]) -> Optional[str]:
    """Why our session owns this run, or None when certbot runs as stock. Only explicit,
    real values count (a boolean option that is True, a plugin name that is a string):
    certbot's own unit tests call renew with mock configs whose every attribute is truthy."""
    if getattr(config, "batch_engine", False) is True:
        return "enabled with --batch-engine / batch-engine = true"
    for attr in ("authenticator", "installer"):
        value = getattr(config, attr, None)
        if isinstance(value, str) and value in _certbot.BATCH_PLUGINS:
            return f"--{attr} {value}"
    for path in conf_files or ():
        if conf_names_batch_plugin(path):
            return f"{os.path.basename(path)} uses a batch plugin"
    return None


def settings_from(config: Any) -> ScanSettings:
    return ScanSettings(
        workers=int(getattr(config, "batch_workers", None) or 32),
        ari_rate=float(getattr(config, "batch_ari_rate", None) or 500.0),
        timeout=float(getattr(config, "batch_timeout", None) or 10.0),
        force=bool(getattr(config, "renew_by_default", False)),
        dry_run=bool(getattr(config, "dry_run", False)),
        user_agent=f"certbot-batch certbot/{_certbot.certbot_version()}",
        progress=(not getattr(config, "quiet", False)) and sys.stderr.isatty(),
    )


def _conf_files(config: Any) -> Optional[list[str]]:
    """The renewal confs of this run, or None when certbot must handle the request itself
    (an unknown --cert-name: certbot's own "no such certificate" message)."""
    certname = getattr(config, "certname", None)
    if certname is not None and not isinstance(certname, str):
        raise TypeError("certname is not a string")
    if certname:
        try:
            return [_certbot.renewal_file_for_certname(config, certname)]
        except errors.Error:
            return None
    return _certbot.renewal_conf_files(config)


def handle_renewal_request(config: Any, stock: Callable[[], Any]) -> Any:
    """certbot's ``handle_renewal_request``, owned by a renewal session when the suite is
    in use. Returns exactly what certbot's own function returns on this certbot version."""
    try:
        conf_files = _conf_files(config)
        why = engaged(config, conf_files) if conf_files is not None else None
    except Exception:  # noqa: BLE001  (an odd config: certbot's own behaviour, untouched)
        logger.debug("certbot-batch: not engaging", exc_info=True)
        why = None
    if why is None or conf_files is None:
        return stock()
    logger.info("certbot-batch renewal session (%s)", why)
    try:
        session = RenewalSession(config, stock, conf_files)
    except _certbot.Unavailable as exc:
        logger.warning("certbot-batch: %s; certbot renews as stock", exc)
        return stock()
    return session.run()


class RenewalSession:
    def __init__(self, config: Any, stock: Callable[[], Any], conf_files: list[str]) -> None:
        self.config = config
        self.stock = stock
        self.conf_files = conf_files
        self.report: Optional[ScanReport] = None
        self.renewed: list[str] = []
        self.failed: list[str] = []
        self.db: Optional[StateDB] = None
        self.prevalidation: Optional[prevalidate.PrevalidationReport] = None
        self.ctx = RunContext(config=config)
        if not _certbot.is_active():
            raise _certbot.Unavailable(_certbot.disabled_reason() or "engine not installed")

    def run(self) -> Any:
        config = self.config
        ctx = self.ctx
        reload.preflight(config)
        Journal(paths.journal_path(config)).recover()
        self.db = StateDB(paths.state_db_path(config))
        try:
            scanner = Scanner(settings_from(config), self.db)
            report = scanner.scan(self.conf_files, full=not getattr(config, "certname", None))
            self.report = report
            self._announce(report)
            due_names = {s.name for s in report.due}
            ctx.conf_files = [s.conf_path for s in report.states
                              if s.name in due_names or s.name in report.broken]
            ctx.should_renew = self._should_renew
            ctx.renew_cert = self._renew_cert
            ctx.replaces_for = self._replaces_for_current
            deploy_run = reload.begin(ctx)
            failure: Optional[BaseException] = None
            result: Any = None
            with _certbot.activate(ctx):
                ctx.prefetched = self._prevalidate(report)
                try:
                    result = self.stock()
                except errors.Error as exc:
                    failure = exc
            problems = []
            if not config.dry_run:
                reload_error = reload.flush(deploy_run)
                if reload_error:
                    logger.error("%s", reload_error)
                    problems.append(reload_error)
                hook_error = batch_hooks.run_batch_hooks(config, self._renewed_lineages(),
                                                         deploy_run.result)
                if hook_error:
                    logger.error("%s", hook_error)
                    problems.append(hook_error)
            if failure is not None:
                raise failure
            if problems:
                raise errors.Error("; ".join(problems))
            return result
        finally:
            self.db.close()

    def _replaces_for_current(self) -> Optional[str]:
        """The certID a new order of the current thread's lineage replaces (ARI), if its
        certificate is inside its suggested window (not for dry runs: nothing is replaced)."""
        if self.report is None or getattr(self.config, "dry_run", False):
            return None
        state = self.report.by_name().get(self.ctx.current_lineage() or "")
        if state is None or not state.ari_cert_id or state.window_start is None:
            return None
        return state.ari_cert_id if state.window_start <= time.time() else None

    def _prevalidate(self, report: ScanReport) -> dict[str, Any]:
        """Validate all due lineages of batch-capable authenticators together."""
        config = self.config
        if _certbot.set_by_user(config, "authenticator"):
            cli_auth = getattr(config, "authenticator", None)
        else:
            cli_auth = None
        todo = [(s.name, s.conf_path) for s in report.due
                if s.name not in report.broken
                and (cli_auth or s.authenticator) in prevalidate.BATCH_AUTHENTICATORS]
        if not todo:
            return {}
        _certbot.notify(f"certbot-batch: validating {len(todo)} lineage(s) together")
        pre = prevalidate.run(self.ctx, todo,
                              wave_size=int(getattr(config, "batch_size", 0) or 100))
        self.prevalidation = pre
        _certbot.notify(
            f"certbot-batch: {len(pre.ok)} lineage(s) validated and issued, {len(pre.failed)} "
            f"failed, in {pre.elapsed:.1f} s ({pre.provision_calls} provisioning action(s), "
            f"{pre.cleanup_calls} cleanup(s), {pre.files} challenge file(s))")
        return dict(pre.results)

    # -- hooks into certbot's loop ------------------------------------------------------
    def _should_renew(self, config: Any, lineage: Any) -> Optional[bool]:
        assert self.report is not None
        name = lineage.lineagename
        state = self.report.by_name().get(name)
        if state is None or name in self.report.broken:
            return None  # let certbot itself decide, hit (and report) the problem
        if state.due:
            logger.info("Lineage %s is due for renewal: %s", name, state.reason)
            _certbot.notify(f"Renewing {name}: {state.reason}")
        else:
            _certbot.notify(f"Certificate not yet due for renewal ({state.reason})")
        return state.due

    def _renew_cert(self, config: Any, lineage: Any, proceed: Callable[[], None]) -> None:
        name = lineage.lineagename
        try:
            proceed()
        except BaseException:
            self.failed.append(name)
            raise
        self.renewed.append(name)
        if self.db is not None and not config.dry_run:
            self.db.mark_renewed(name, time.time())

    def _renewed_lineages(self) -> list[dict[str, Any]]:
        return [batch_hooks.describe_lineage(self.config, name) for name in self.renewed]

    # -- reporting ----------------------------------------------------------------------
    def _announce(self, report: ScanReport) -> None:
        not_due = report.not_due
        _certbot.notify(
            f"certbot-batch: checked {len(report.states)} lineage(s) in "
            f"{report.elapsed:.1f} s ({report.ari_requests} ARI, {report.ocsp_requests} OCSP "
            f"request(s)): {len(report.due) - len(report.broken)} due, {len(not_due)} not "
            f"due, {len(report.broken)} unreadable.")
        failing = [s for s in report.states if s.last_error and s.name not in report.broken]
        for state in failing[:LIST_LIMIT]:
            logger.warning("Lineage %s: %s (it will still renew on its expiry schedule)",
                           state.name, state.last_error)
        if len(failing) > LIST_LIMIT:
            logger.warning("... and %d more lineage(s) with status check errors; see "
                           "`certbot-batch status`", len(failing) - LIST_LIMIT)
        if getattr(self.config, "certname", None):
            return  # certbot's own summary names the one lineage; don't list it twice
        if not_due and len(not_due) <= LIST_LIMIT:
            _certbot.notify("The following certificates are not due for renewal yet:")
            for state in not_due:
                _certbot.notify(f"  {state.name} expires on {fmt_time(state.not_after)} "
                                f"({state.reason}) (skipped)")
        elif not_due:
            first = min(not_due, key=lambda s: s.not_after or 0.0)
            _certbot.notify(
                f"{len(not_due)} certificates are not due for renewal yet (the earliest to "
                f"expire is {first.name}, on {fmt_time(first.not_after)}); run "
                "`certbot-batch status` for the full list.")
