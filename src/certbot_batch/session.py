"""The renewal session: owns one ``certbot renew`` run when the batch suite is in use.

Scan every lineage in parallel, then renew the due ones wave by wave: each wave's challenges
are validated together (``challenges/prevalidate.py``) and the wave goes through certbot's
own per-lineage loop, which saves every certificate with certbot's own code (hooks, file
modes, renewal conf) before the next wave starts. Then the batched deployment (one Apache
configtest + reload, the batch deploy hooks), certbot's summary and post-hooks, the exit
code. When the suite is not in use the run is handed to certbot untouched.

certbot's order of events is kept (docs/decisions.md): random sleep (non-interactive runs)
before the first order; pre-hooks before any provisioning or CA contact; per-lineage deploy
hooks as certbot runs them; the one configtest + reload; batch deploy hooks; the summary;
post-hooks with RENEWED_DOMAINS / FAILED_DOMAINS.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import random
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

from certbot import errors

from certbot_batch import _certbot, catalog, options, paths, recovery, servers
from certbot_batch.ca import backoff, ledger, pacing
from certbot_batch.challenges import prevalidate, replaces
from certbot_batch.context import RunContext, Scope
from certbot_batch.deploy import finish, pending, reload
from certbot_batch.deploy import hooks as batch_hooks
from certbot_batch.scan import schedule
from certbot_batch.scan.engine import Scanner, ScanReport, ScanSettings, fmt_time
from certbot_batch.scan.state import LineageState, StateDB
from certbot_batch.servers.base import ServerRef

logger = logging.getLogger(__name__)

_BATCH_LINE = re.compile(
    r"^\s*(?:authenticator|installer)\s*=\s*(?:" +
    "|".join(re.escape(n) for n in catalog.NAMES) + r")\s*$", re.MULTILINE)
#: With more not-due lineages than this, the summary is condensed to a count.
LIST_LIMIT = 20
#: certbot's random delay of non-interactive runs (renewal.handle_renewal_request)
RANDOM_SLEEP_MAX = 60 * 8

#: The signals that stop a run (certbot's ErrorHandler cleans up on SIGTERM, SIGHUP and
#: SIGQUIT; SIGINT is certbot's KeyboardInterrupt).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP",
                                                         "SIGQUIT") if hasattr(signal, name))


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
        if isinstance(value, str) and value in catalog.NAMES:
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
        verify_ssl=getattr(config, "no_verify_ssl", False) is not True,
        run_interval=_number(getattr(config, "batch_run_interval", None)),
        interactive=_interactive(),
        cached_status=getattr(config, "batch_cached_status", False) is True,
    )


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and value > 0 else None


def _interactive() -> bool:
    """A person at a terminal (stdin and stdout): the scan asks ARI and OCSP afresh."""
    try:
        return bool(sys.stdin is not None and sys.stdin.isatty()
                    and sys.stdout is not None and sys.stdout.isatty())
    except (ValueError, OSError):  # closed streams
        return False


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


def handle_renewal_request(config: Any, stock: Callable[..., Any]) -> Any:
    """certbot's ``handle_renewal_request``, owned by a renewal session when the suite is
    in use. Returns exactly what certbot's own function returns on this certbot version.
    ``stock(cfg=config)`` runs certbot's own function."""
    try:
        conf_files = _conf_files(config)
        why = engaged(config, conf_files) if conf_files is not None else None
    except Exception:  # noqa: BLE001  (an odd config: certbot's own behaviour, untouched)
        logger.debug("certbot-batch: not engaging", exc_info=True)
        why = None
    if why is None or conf_files is None or not _certbot.is_active():
        return stock_then_pending(config, stock)
    logger.info("certbot-batch renewal session (%s)", why)
    return RenewalSession(config, stock, conf_files).run()


def stock_then_pending(config: Any, stock: Callable[..., Any]) -> Any:
    """certbot's own renewal; then, when an earlier batched run left a deployment pending
    (its record exists), that deployment: every ``renew`` retries it until it is done and
    exits non-zero meanwhile. Without a record: exactly certbot's own run."""
    if not recovery.renews(config) or not isinstance(getattr(config, "work_dir", None), str) \
            or not isinstance(getattr(config, "config_dir", None), str) \
            or not pending.PendingDeployments(config).exists():
        return stock()
    try:
        result = stock()
    finally:
        report = finish.finish(config, brief=False)
    if report.errors:
        raise errors.Error("; ".join(report.errors))
    return result


def stop_signals(ctx: RunContext) -> Scope:
    """While the session runs, a stop signal means: start no new order, save what the CA
    already issued, clean up, deploy, then exit non-zero. A second one stops at once
    (the journal and the pending-deployment record let the next run finish the job)."""
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if ctx.stopping.is_set():
            batch = ctx.batch
            if batch is not None:
                with contextlib.suppress(Exception), batch.locked():
                    batch.finish()
            logger.warning("certbot-batch: %s again: stopping now", name)
            logging.shutdown()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            os._exit(128 + signum)  # not reached: the default action ends the process
        ctx.stop_signal = name
        ctx.stopping.set()
        logger.warning("certbot-batch: %s received: no new orders; saving the certificates "
                       "the CA already issued, then stopping (send it again to stop at once)",
                       name)

    def enter() -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            current = signal.getsignal(sig)
            # An ignored signal stays ignored (nohup, `certbot renew &` from a script), and
            # a handler set outside Python cannot be restored.
            if current is None or current == signal.SIG_IGN:
                continue
            previous[sig] = current
            signal.signal(sig, handler)

    def leave() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
        previous.clear()

    return Scope(enter, leave)


def _urgency(state: LineageState) -> float:
    """Sooner is more urgent: the end of the ARI window or the expiry, whichever first."""
    candidates = [t for t in (state.window_end, state.not_after) if t is not None]
    return min(candidates) if candidates else 0.0


class RenewalSession:
    def __init__(self, config: Any, stock: Callable[..., Any], conf_files: list[str]) -> None:
        self.config = config
        self.stock = stock
        self.conf_files = conf_files
        self.report: Optional[ScanReport] = None
        self.renewed: list[str] = []
        self.failed: list[str] = []
        self.not_attempted: list[str] = []
        #: due lineages waiting out their failure backoff (not sent to the CA)
        self.backing_off: list[LineageState] = []
        #: lineage -> why it was not sent: an account-wide rate limit earlier in the run
        self.deferred: dict[str, str] = {}
        self.from_fallback: list[str] = []
        self.db: Optional[StateDB] = None
        self.ctx = RunContext(config=config)
        self.results: list[Any] = []
        self.loop_errors: list[errors.Error] = []
        self.deploy_problems: list[str] = []
        self.not_deployed: dict[str, str] = {}
        self.waves = 0
        self.provision_calls = 0
        self.pending = pending.PendingDeployments(config)
        #: every backoff decision, also where the state DB cannot lose it (ca/ledger.py)
        self.ledger = ledger.Ledger(config)
        #: lineages whose failure was recorded as soon as their wave ended
        self._failure_noted: set[str] = set()
        #: deployments of earlier runs that are still not done after this run's attempt
        self.earlier_not_deployed: dict[str, str] = {}
        self.installer_of: dict[str, Optional[str]] = {}

    # -- the run ------------------------------------------------------------------------
    def run(self) -> Any:
        config = self.config
        ctx = self.ctx
        options.validate(config)
        reload.preflight(config)
        self.db = StateDB(paths.state_db_path(config))
        try:
            report = Scanner(settings_from(config), self.db).scan(
                self.conf_files, full=not getattr(config, "certname", None))
            self.report = report
            changed = self.ledger.apply(report.states)
            if changed:
                logger.info("certbot-batch: backoff of %d lineage(s) taken from the ledger "
                            "(the state database did not have it)", changed)
                if not getattr(config, "dry_run", False):
                    self.db.save(report.states)
            self._announce(report)
            ctx.pacer = pacing.AcmePacer(
                rate=float(getattr(config, "batch_acme_rate", None) or pacing.DEFAULT_RATE))
            ctx.should_renew = self._should_renew
            ctx.renew_cert = self._renew_cert
            ctx.replaces_for = self._replaces_for_current
            from certbot_batch.challenges import grouped  # DNS plugins, manual: grouped
            ctx.wrap_authenticator = grouped.wrap_authenticator
            deploy_run = reload.begin(ctx)
            with stop_signals(ctx):
                activation: Optional[Scope] = _certbot.activate(ctx)
                try:
                    activation.__enter__()  # type: ignore[union-attr]
                except _certbot.Unavailable as exc:
                    logger.warning("certbot-batch: %s; certbot renews as stock", exc)
                    activation = None
                if activation is not None:
                    ctx.hold_back_summary = True
                    try:
                        self._renew_in_waves(report)
                    finally:
                        ctx.hold_back_summary = False
                        activation.__exit__(None, None, None)  # certbot as stock from here
                    self._deploy(deploy_run)
            if activation is None:
                return stock_then_pending(config, self.stock)
            return self._finish(report)
        finally:
            self.ledger.flush()
            if self.report is not None:  # the runs table: the cadence of timer runs
                self.db.finish_run(self.report.run_id, len(self.renewed))
            self.db.close()

    def _renew_in_waves(self, report: ScanReport) -> None:
        config, ctx = self.config, self.ctx
        now = time.time()
        due = []
        # Urgency first: if the run cannot do everything (a pause, a rate limit, a stop), the
        # lineages closest to expiry (or to the end of their ARI window) went first.
        for state in sorted((s for s in report.due if s.name not in report.broken),
                            key=_urgency):
            if backoff.backing_off(state, now, config):
                self.backing_off.append(state)
            else:
                due.append(state)
        broken_confs = [s.conf_path for s in report.states if s.name in report.broken]
        size = int(getattr(config, "batch_size", None) or 100)
        waves = [due[i:i + size] for i in range(0, len(due), size)] or [[]]
        slept = False
        called = False
        for index, wave in enumerate(waves):
            if wave and not slept:
                slept = True
                self._random_sleep()
            if ctx.stopping.is_set():
                self.not_attempted.extend(s.name for s in wave)
                continue
            prepared, unloadable = self._prepare(wave)
            batchable = [p for p in prepared if prevalidate.batchable(p.config)
                         and p.name not in ctx.prefetched]
            if batchable:
                _certbot.notify(f"certbot-batch: validating {len(batchable)} lineage(s) "
                                f"together" + (f" (wave {index + 1} of {len(waves)})"
                                               if len(waves) > 1 else ""))
                wave_report = prevalidate.run_wave(ctx, batchable)
                self.waves += 1
                self.provision_calls += wave_report.provision_calls
                with ctx.lock:
                    ctx.prefetched.update(wave_report.results)
                self._fallback(batchable, wave_report)
                # The wave's failures are known before certbot's loop runs: their backoff is
                # durable before anything else happens (a kill in the loop keeps it).
                for item in batchable:
                    result = ctx.prefetched.get(item.name)
                    if isinstance(result, BaseException) and \
                            not isinstance(result, replaces.Stopped) and \
                            pacing.deferral(result) is None:
                        self._record_failure(item.name, result)
                        self._failure_noted.add(item.name)
                self.ledger.flush()
                _certbot.notify(
                    f"certbot-batch: {len(wave_report.ok)} lineage(s) validated and issued, "
                    f"{len(wave_report.failed)} failed, in {wave_report.elapsed:.1f} s "
                    f"({wave_report.provision_calls} provisioning action(s), "
                    f"{wave_report.cleanup_calls} cleanup(s), {wave_report.files} "
                    "challenge file(s))")
            to_loop = []
            for p in prepared:
                result = ctx.prefetched.get(p.name, None)
                deferred = pacing.deferral(result) if isinstance(result, BaseException) \
                    else None
                if deferred is not None:
                    # The account hit an account-wide limit earlier in the run, or the CA
                    # was unavailable for longer than the pacer waits (pacing.CAUnavailable).
                    self._defer(p.name, deferred)
                    ctx.prefetched.pop(p.name, None)
                    continue
                started = p.name in ctx.prefetched and not isinstance(result, replaces.Stopped)
                if ctx.stopping.is_set() and not started:
                    self.not_attempted.append(p.name)
                    ctx.prefetched.pop(p.name, None)
                    continue
                to_loop.append(p.conf_path)
            to_loop += unloadable
            if index == 0:
                to_loop += broken_confs
            if not to_loop and (called or index < len(waves) - 1):
                continue
            self.ledger.flush()  # deferrals
            self._record_pending([p for p in prepared if p.conf_path in to_loop])
            self._certbot_loop(to_loop)
            self.ledger.flush()
            called = True

    def _fallback(self, items: list[prevalidate.Prepared],
                  wave: prevalidate.WaveReport) -> None:
        """Renew from the fallback CA, in the same run, the lineages of the wave that their
        own CA could not renew (unreachable, 5xx, rate limit) and that expire soon."""
        url = getattr(self.config, "batch_fallback_server", None)
        if not isinstance(url, str) or not url or getattr(self.config, "dry_run", False):
            return
        assert self.report is not None
        within = float(getattr(self.config, "batch_fallback_within", None) or 7.0) * 86400
        now = time.time()
        chosen = []
        for item in items:
            result = wave.results.get(item.name)
            state = self.report.by_name().get(item.name)
            if not isinstance(result, BaseException) or not _ca_problem(result):
                continue
            if state is None or state.not_after is None or state.not_after - now > within:
                continue
            chosen.append(item)
        if not chosen:
            return
        for item in chosen:
            self.ctx.fallback[item.name] = url
        _certbot.notify(f"certbot-batch: {len(chosen)} lineage(s) expiring within "
                        f"{within / 86400:g} days could not be renewed at their CA; "
                        f"renewing them from the fallback CA {url}")
        report = prevalidate.run_wave(self.ctx, chosen)
        with self.ctx.lock:
            self.ctx.prefetched.update(report.results)
        for item in chosen:
            if isinstance(report.results.get(item.name), BaseException):
                self.ctx.fallback.pop(item.name, None)
            else:
                self.from_fallback.append(item.name)
        self.provision_calls += report.provision_calls

    def _defer(self, name: str, exc: pacing.Deferred) -> None:
        self.deferred[name] = str(exc)
        state = self.report.by_name().get(name) if self.report is not None else None
        if state is not None and self.db is not None and not getattr(self.config, "dry_run",
                                                                      False):
            backoff.record_failure(state, time.time(), str(exc), retry_after=exc.retry_after,
                                   counts=False)
            self.db.update(state)
            self.ledger.note(state)

    def _random_sleep(self) -> None:
        """certbot's random delay for non-interactive runs, before the first order (certbot
        itself sleeps before the first renewal; here that comes after the scan only)."""
        try:
            interactive = sys.stdin is not None and sys.stdin.isatty()
        except (ValueError, OSError):
            interactive = False
        if interactive or getattr(self.config, "random_sleep_on_renew", False) is not True:
            return
        delay = random.uniform(1, RANDOM_SLEEP_MAX)
        logger.info("Non-interactive renewal: random delay of %s seconds", delay)
        self.ctx.stopping.wait(delay)

    def _prepare(self, wave: list[LineageState]) -> tuple[list[prevalidate.Prepared],
                                                          list[str]]:
        """Load the wave's lineages as certbot's loop does, and run their pre-hooks (in this
        thread, before any provisioning or CA contact). Lineages that cannot be loaded are
        left to certbot's loop, which reports them in its own words."""
        prepared, unloadable = [], []
        for state in wave:
            lineage_config = copy.deepcopy(self.config)
            try:
                lineage = _certbot.reconstitute(lineage_config, state.conf_path)
            except Exception:  # noqa: BLE001  (certbot's loop reports it)
                lineage = None
            if lineage is None:
                unloadable.append(state.conf_path)
                continue
            self.installer_of[state.name] = getattr(lineage_config, "installer", None)
            problem = _installer_problem(state, lineage_config)
            if problem is not None:
                # Before any CA contact: renewing a certificate nobody can deploy helps no
                # one. certbot's loop reports it as this lineage's failure, in its words.
                logger.error("%s", problem)
                with self.ctx.lock:
                    self.ctx.prefetched[state.name] = errors.Error(problem)
                prepared.append(prevalidate.Prepared(state.name, state.conf_path,
                                                     lineage_config, lineage))
                continue
            try:
                _certbot.run_pre_hook(lineage_config)
            except errors.Error as exc:
                logger.error("Pre-hook of %s: %s", state.name, exc)
            prepared.append(prevalidate.Prepared(state.name, state.conf_path, lineage_config,
                                                 lineage))
        return prepared, unloadable

    def _record_pending(self, items: list[prevalidate.Prepared]) -> None:
        """Before certbot's loop saves anything: record how these lineages are deployed
        (per server instance, and the batch deploy hooks)."""
        if getattr(self.config, "dry_run", False) or not items:
            return
        by_server: dict[ServerRef, list[str]] = {}
        for p in items:
            ref = servers.ref_for(p.config)
            if ref is not None:
                by_server.setdefault(ref, []).append(p.name)
        self.pending.begin(by_server, batch_hooks.hook_commands(self.config),
                           [p.name for p in items])

    def _certbot_loop(self, conf_files: list[str]) -> None:
        """certbot's own loop over ``conf_files`` (saving, hooks, its messages)."""
        self.ctx.conf_files = list(conf_files)
        cfg = copy.deepcopy(self.config)
        try:
            cfg.random_sleep_on_renew = False  # slept before the first order already
        except AttributeError:
            pass
        try:
            self.results.append(self.stock(cfg))
        except errors.Error as exc:
            self.loop_errors.append(exc)

    def _deploy(self, run: reload.DeployRun) -> None:
        """One confirmed reload per server instance (this run's and any earlier run's
        pending ones), then the batch deploy hooks."""
        if getattr(self.config, "dry_run", False):
            return
        previous = {}
        if self.report is not None:
            for state in self.report.states:
                if state.serial and state.name in self.renewed:
                    try:
                        previous[state.name] = int(state.serial, 16)
                    except ValueError:
                        pass
        report = finish.finish(self.config, brief=False, run=run, run_lineages=self.renewed,
                               previous=previous)
        renewed = set(self.renewed)
        for name, why in report.not_deployed.items():
            if name in renewed:
                self.not_deployed[name] = why
            else:
                self.earlier_not_deployed[name] = why
        if self.not_deployed:  # said once, in the summary, next to what it concerns
            self.deploy_problems.append(
                f"{len(self.not_deployed)} renewed certificate(s) not deployed (the next "
                "certbot renew tries again)")
        if self.earlier_not_deployed:
            shown = set(self.not_deployed.values())
            for why in dict.fromkeys(self.earlier_not_deployed.values()):
                if why not in shown:
                    logger.error("certbot-batch: %s", why)
            self.deploy_problems.append(
                f"{len(self.earlier_not_deployed)} certificate(s) renewed by an earlier run "
                "are still not deployed")
        server_errors = {o.message for o in report.servers.values() if not o.ok}
        self.deploy_problems += [e for e in report.errors if e not in server_errors]

    # -- the end of the run: certbot's summary, post-hooks, exit code ----------------------
    def _finish(self, report: ScanReport) -> Any:
        ctx = self.ctx
        successes: list[str] = []
        failures: list[str] = []
        skipped: list[str] = []
        parse_failures: list[str] = []
        for s_ok, s_fail, s_skip, s_parse in ctx.summaries:
            successes += s_ok
            failures += s_fail
            skipped += s_skip
            parse_failures += s_parse
        not_due = report.not_due
        # With --cert-name certbot's loop reads that one conf itself (and lists it when it is
        # not due); otherwise only due lineages reach it and the not-due ones are added here.
        if not_due and len(not_due) <= LIST_LIMIT and not getattr(self.config, "certname",
                                                                 None):
            skipped += [f"{self._fullchain(s)} expires on {_day(s.not_after)}" for s in not_due]
        if self.not_deployed or self.not_attempted:
            self._describe_ourselves(successes, failures, skipped, parse_failures)
        else:
            _certbot.describe_results(self.config, successes, failures, skipped,
                                      parse_failures)
        self._describe_extras()
        if len(not_due) > LIST_LIMIT and not getattr(self.config, "certname", None):
            first = min(not_due, key=lambda s: s.not_after or 0.0)
            _certbot.notify(
                f"{len(not_due)} certificates are not due for renewal yet (the earliest to "
                f"expire is {first.name}, on {fmt_time(first.not_after)}); run "
                "`certbot-batch status` for the full list.")
        renewed_domains, failed_domains, tuples = self._domains()
        if ctx.post_hook_calls:
            # This certbot runs its post-hooks at the end of handle_renewal_request: once,
            # now, after the deployment, with every wave's domains.
            args, _ = ctx.post_hook_calls[-1]
            if args:
                _certbot.run_post_hooks(renewed_domains, failed_domains)
            else:
                _certbot.run_post_hooks()
        problems: list[str] = []
        if failures or parse_failures:
            problems.append(f"{len(failures)} renew failure(s), {len(parse_failures)} parse "
                            "failure(s)")
        elif self.loop_errors:
            problems += [str(e) for e in self.loop_errors]
        problems += self.deploy_problems
        if report.internal_errors:
            problems.append(f"certbot-batch internal error while checking "
                            f"{len(report.internal_errors)} lineage(s) (see the log); certbot "
                            "decided for them itself")
        if self.deferred:
            problems.append(f"{len(self.deferred)} renewal(s) deferred (their CA's rate limit, "
                            "or their CA unavailable)")
        if self.not_attempted:
            problems.append(f"stopped by {ctx.stop_signal or 'a signal'}: "
                            f"{len(self.not_attempted)} due lineage(s) not attempted")
        elif ctx.stopping.is_set():
            problems.append(f"stopped by {ctx.stop_signal or 'a signal'}")
        if problems:
            raise errors.Error("; ".join(problems))
        return (renewed_domains, failed_domains) if tuples else None

    def _describe_extras(self) -> None:
        """What certbot's summary cannot say: fallback renewals, deferrals, backoffs."""
        notify = _certbot.notify
        if self.from_fallback:
            notify("The following certificates were renewed from the fallback CA "
                   f"{getattr(self.config, 'batch_fallback_server', '')} (their next renewal "
                   "goes to their own CA again):")
            notify("\n".join(f"  {self._fullchain_of(n)} (fallback CA)"
                             for n in self.from_fallback))
        if self.deferred:
            logger.error("The following renewals were deferred (the next run after the CA's "
                         "Retry-After renews them):")
            logger.error("\n".join(f"  {self._fullchain_of(n)} (deferred: {why})"
                                   for n, why in sorted(self.deferred.items())))
        if self.backing_off:
            notify(f"{len(self.backing_off)} due certificate(s) are backing off after failed "
                   "renewals and were not sent to the CA in this run (certbot-batch status "
                   "shows them; --force-renewal or --cert-name tries at once):")
            notify("\n".join(f"  {backoff.describe(s)}" for s in self.backing_off[:LIST_LIMIT]))
            if len(self.backing_off) > LIST_LIMIT:
                notify(f"  ... and {len(self.backing_off) - LIST_LIMIT} more")

    def _domains(self) -> tuple[list[Any], list[Any], bool]:
        renewed: list[Any] = []
        failed: list[Any] = []
        tuples = False
        for result in self.results:
            if isinstance(result, tuple) and len(result) == 2:
                tuples = True
                renewed += list(result[0])
                failed += list(result[1])
        if not tuples:
            for args, _ in self.ctx.post_hook_calls:
                if len(args) == 2:
                    renewed += list(args[0])
                    failed += list(args[1])
        return renewed, failed, tuples

    def _describe_ourselves(self, successes: list[str], failures: list[str],
                            skipped: list[str], parse_failures: list[str]) -> None:
        """certbot's summary, in certbot's words, where certbot's own would say
        "succeeded" for certificates that are not deployed (or hide the ones a stop
        signal left out)."""
        notify = _certbot.notify
        frame = "- " * 39 + "-"
        noun = "simulated renewal" if getattr(self.config, "dry_run", False) else "renewal"
        by_path = {self._fullchain_of(n): n for n in self.not_deployed}
        deployed = [p for p in successes if p not in by_path]
        undeployed = [p for p in successes if p in by_path]
        notify(f"\n{frame}")
        if skipped:
            notify("The following certificates are not due for renewal yet:")
            notify("\n".join(f"  {s} (skipped)" for s in skipped))
        if deployed:
            notify(f"The following {noun}s succeeded:")
            notify("\n".join(f"  {p} (success)" for p in deployed))
        if undeployed:
            logger.error("%s", next(iter(self.not_deployed.values())))
            logger.error("The following %ss succeeded, but the certificates are NOT deployed "
                         "yet (the next `certbot renew` deploys them once the web server's "
                         "problem is fixed):", noun)
            logger.error("\n".join(f"  {p} (renewed, not deployed)" for p in undeployed))
        if failures:
            logger.error("The following %ss failed:", noun)
            logger.error("\n".join(f"  {p} (failure)" for p in failures))
        if self.not_attempted:
            logger.error("The following certificates were not renewed: the run was stopped by "
                         "%s before their turn (the next run renews them):",
                         self.ctx.stop_signal or "a signal")
            logger.error("\n".join(f"  {self._fullchain_of(n)} (not attempted)"
                                   for n in self.not_attempted))
        if not (deployed or undeployed or failures or self.not_attempted):
            notify(f"No {noun}s were attempted.")
        if parse_failures:
            notify("\nAdditionally, the following renewal configurations were invalid: ")
            notify("\n".join(f"  {p} (parsefail)" for p in parse_failures))
        notify(frame)

    def _fullchain(self, state: LineageState) -> str:
        if state.fullchain_path:
            return state.fullchain_path
        return os.path.join(os.path.dirname(state.cert_path or ""), "fullchain.pem")

    def _fullchain_of(self, name: str) -> str:
        state = self.report.by_name().get(name) if self.report else None
        if state is not None:
            return self._fullchain(state)
        return os.path.join(str(self.config.config_dir), "live", name, "fullchain.pem")

    # -- hooks into certbot's loop ------------------------------------------------------
    def _replaces_for_current(self) -> Optional[str]:
        """The certID a new order of the current thread's lineage replaces (ARI), if its
        certificate is inside its suggested window (not for dry runs: nothing is replaced)."""
        if self.report is None or getattr(self.config, "dry_run", False):
            return None
        name = self.ctx.current_lineage() or ""
        if name in self.ctx.fallback:
            return None  # another CA: it did not issue the certificate being replaced
        state = self.report.by_name().get(name)
        if state is None or not state.ari_cert_id or state.window_start is None:
            return None
        return state.ari_cert_id if state.window_start <= time.time() else None

    def _should_renew(self, config: Any, lineage: Any) -> Optional[bool]:
        assert self.report is not None
        name = lineage.lineagename
        state = self.report.by_name().get(name)
        if state is None or name in self.report.broken:
            return None  # let certbot itself decide, hit (and report) the problem
        if state.due:
            logger.info("Lineage %s is due for renewal: %s", name, state.reason)
            _certbot.notify(f"Renewing {name}: {state.reason}")
        return state.due

    def _renew_cert(self, config: Any, lineage: Any, proceed: Callable[[], None]) -> None:
        name = lineage.lineagename
        ctx = self.ctx
        if ctx.stopping.is_set() and name not in ctx.prefetched:
            self.not_attempted.append(name)
            raise replaces.Stopped("certbot-batch: the run is stopping; not renewed")
        try:
            proceed()
        except BaseException as exc:
            self.failed.append(name)
            if name not in self._failure_noted:
                self._record_failure(name, exc)
                self.ledger.flush()
            raise
        self.renewed.append(name)
        if self.db is not None and not config.dry_run:
            state = self.report.by_name().get(name) if self.report is not None else None
            issued_by = ctx.fallback.get(name) or (state.server if state else None)
            self.db.mark_renewed(name, time.time(), issued_by=issued_by)
            if state is not None and (state.renew_failures or state.renew_next_attempt):
                backoff.record_success(state)
                self.ledger.note(state)

    def _record_failure(self, name: str, exc: BaseException) -> None:
        """The lineage's backoff: the next attempt waits (docs/decisions.md)."""
        if isinstance(exc, replaces.Stopped) or getattr(self.config, "dry_run", False):
            return
        state = self.report.by_name().get(name) if self.report is not None else None
        if state is None or self.db is None:
            return
        ctx = self.ctx
        limit = ctx.pacer.rate_limited.get(name) if ctx.pacer is not None else None
        now = time.time()
        deferred = pacing.deferral(exc)
        if deferred is not None:
            backoff.record_failure(state, now, str(deferred), retry_after=deferred.retry_after,
                                   counts=False)
        elif limit is not None:
            backoff.record_failure(state, now, f"rate limited by the CA: {limit.detail}",
                                   retry_after=limit.retry_after or 3600.0, counts=False)
        else:
            detail = ctx.failure_detail.get(name)
            backoff.record_failure(state, now, f"{exc}" + (f" ({detail})" if detail else ""))
        self.db.update(state)
        self.ledger.note(state, now)

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
        if report.interval:
            logger.info("certbot-batch: next run expected in %s (%s): lineages whose renewal "
                        "time comes before it are renewed now (RFC 9773 4.2)",
                        schedule.fmt_span(report.interval), report.interval_source)
        failing = [s for s in report.states if s.last_error and s.name not in report.broken]
        for state in failing[:LIST_LIMIT]:
            logger.warning("Lineage %s: %s (it will still renew on its expiry schedule)",
                           state.name, state.last_error)
        if len(failing) > LIST_LIMIT:
            logger.warning("... and %d more lineage(s) with status check errors; see "
                           "`certbot-batch status`", len(failing) - LIST_LIMIT)
        if getattr(self.config, "certname", None):
            for state in not_due:
                _certbot.notify(f"Certificate not yet due for renewal ({state.reason})")


def _installer_problem(state: LineageState, lineage_config: Any) -> Optional[str]:
    """A saved installer setting that cannot work (certbot would silently drop the
    installer, save the certificate and say "Congratulations")."""
    ref = servers.ref_for(lineage_config)
    problem = servers.server_for(ref).ctl_problem() if ref is not None else None
    if problem is None:
        return None
    return (f"Lineage {state.name} ({state.conf_path}): {problem} Not renewed: its "
            "certificate could not be deployed.")


def _ca_problem(exc: BaseException, depth: int = 0) -> bool:
    """Could the lineage's own CA not serve it (unreachable, 5xx, rate limit), as opposed to
    a problem of the lineage (validation failed, bad key...)?"""
    if isinstance(exc, pacing.Deferred):  # CAUnavailable too: refusing for too long
        return True
    try:
        import requests
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:
        pass
    text = str(exc)
    if isinstance(exc, ValueError) and text.startswith("Requesting "):
        return True  # acme 2.x's wording for a connection error
    typ = str(getattr(exc, "typ", "") or "")
    if typ.endswith((":serverInternal", ":rateLimited")):
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int) and status >= 500:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and depth < 5 and _ca_problem(cause, depth + 1)


def _day(ts: Optional[float]) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d")
