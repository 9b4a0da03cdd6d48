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

import copy
import datetime
import logging
import logging.handlers
import os
import queue
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
from certbot_batch.challenges import grouped, prevalidate, replaces
from certbot_batch.deploy import finish, pending, reload
from certbot_batch.deploy import hooks as batch_hooks
from certbot_batch.run import LineageRecord, Outcome, Run, Scope
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
    except (TypeError, AttributeError, ValueError, OSError) as exc:
        # A config certbot's own unit tests build from mocks, or an unreadable renewal
        # directory: certbot's own behaviour (and its own error), untouched.
        logger.debug("certbot-batch: not engaging (%s)", exc)
        why = None
    if why is None or conf_files is None or not _certbot.is_active():
        return stock_then_pending(config, stock)
    logger.info("certbot-batch renewal session (%s)", why)
    return RenewalSession(config, stock, conf_files).run_session()


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


def stop_signals(session: Run) -> Scope:
    """While the session runs, a stop signal means: start no new order, save what the CA
    already issued, clean up, deploy, then exit non-zero. A second one stops at once
    (the journal and the pending-deployment record let the next run finish the job)."""
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if session.stopping.is_set():
            batch = session.batch()
            if batch is not None:
                with batch.locked():
                    batch.finish()
            logger.warning("certbot-batch: %s again: stopping now", name)
            logging.shutdown()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            os._exit(128 + signum)  # not reached: the default action ends the process
        session.stop_signal = name
        session.stopping.set()
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


def queued_file_logging() -> Scope:
    """While the waves run, certbot's log file gets its records through a queue, written in
    order by one thread. The wave's worker threads all log through it (acme logs every
    request and answer at debug level), and its lock became a convoy: in a profile of a
    300-lineage run, 44 % of the worker threads' samples waited for it. Set up and undone
    in the main thread; the console handler stays as it is."""
    root = logging.getLogger()
    swapped: list[tuple[int, logging.Handler]] = []
    state: dict[str, Any] = {}

    def enter() -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        files = [(i, h) for i, h in enumerate(root.handlers)
                 if isinstance(h, logging.FileHandler)]
        if not files:
            return
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        feed = logging.handlers.QueueHandler(records)
        feed.setLevel(min(h.level for _, h in files))
        listener = logging.handlers.QueueListener(records, *(h for _, h in files),
                                                  respect_handler_level=True)
        for _, handler in files:
            root.removeHandler(handler)
        swapped.extend(files)
        root.addHandler(feed)
        listener.start()
        state.update(feed=feed, listener=listener)

    def leave() -> None:
        if not state:
            return
        root.removeHandler(state["feed"])
        state["listener"].stop()  # writes what is still queued
        for index, handler in swapped:
            root.handlers.insert(min(index, len(root.handlers)), handler)
        swapped.clear()
        state.clear()

    return Scope(enter, leave)


def _urgency(state: LineageState) -> float:
    """Sooner is more urgent: the end of the ARI window or the expiry, whichever first."""
    candidates = [t for t in (state.window_end, state.not_after) if t is not None]
    return min(candidates) if candidates else 0.0


class RenewalSession:
    """One ``certbot renew`` run owned by certbot-batch. Its state is the run model
    (``run.Run``: one record per lineage); it answers the seam's session hooks
    (``_certbot.SessionHooks``) for the calls certbot makes while it runs."""

    def __init__(self, config: Any, stock: Callable[..., Any], conf_files: list[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.stock = stock
        self.conf_files = conf_files
        self.clock = clock
        self.dry_run = bool(getattr(config, "dry_run", False))
        self.report: Optional[ScanReport] = None
        #: what certbot's loop returned, and the errors it raised (per wave)
        self.results: list[Any] = []
        self.loop_errors: list[errors.Error] = []
        self.deploy_problems: list[str] = []
        #: deployments of earlier runs still not done after this run's attempt
        self.earlier_not_deployed: dict[str, str] = {}
        self.waves = 0
        self.provision_calls = 0
        self.run = Run(
            config=config, hooks=self,
            db=StateDB(paths.state_db_path(config)),
            ledger=ledger.Ledger(config),
            pacer=pacing.AcmePacer(
                rate=float(getattr(config, "batch_acme_rate", None) or
                           pacing.default_rate(getattr(config, "server", None)))),
            deploy=reload.DeployRun(),
            pending=pending.PendingDeployments(config))

    # -- projections of the run model -------------------------------------------------------
    def _names(self, *outcomes: Outcome) -> list[str]:
        return [r.name for r in self.run.with_outcome(*outcomes)]

    @property
    def renewed(self) -> list[str]:
        return self._names(Outcome.RENEWED, Outcome.NOT_DEPLOYED)

    @property
    def not_deployed(self) -> dict[str, str]:
        return {r.name: r.detail for r in self.run.with_outcome(Outcome.NOT_DEPLOYED)}

    @property
    def not_attempted(self) -> list[str]:
        return self._names(Outcome.NOT_ATTEMPTED)

    @property
    def deferred(self) -> dict[str, str]:
        return {r.name: r.detail for r in self.run.with_outcome(Outcome.DEFERRED)}

    @property
    def backing_off(self) -> list[LineageState]:
        return [r.state for r in self.run.with_outcome(Outcome.BACKING_OFF)]

    @property
    def from_fallback(self) -> list[str]:
        return [r.name for r in self.run.with_outcome(Outcome.RENEWED, Outcome.NOT_DEPLOYED)
                if r.fallback]

    # -- the run ------------------------------------------------------------------------
    def run_session(self) -> Any:
        config = self.config
        session = self.run
        try:
            options.validate(config)
            reload.preflight(config)
            report = Scanner(settings_from(config), session.db).scan(
                self.conf_files, full=not getattr(config, "certname", None))
            self.report = report
            for state in report.states:
                outcome = Outcome.BROKEN if state.name in report.broken else \
                    Outcome.DUE if state.due else Outcome.NOT_DUE
                session.records[state.name] = LineageRecord(state.name, state, outcome)
            changed = session.ledger.apply(report.states)
            if changed:
                logger.info("certbot-batch: backoff of %d lineage(s) taken from the ledger "
                            "(the state database did not have it)", changed)
                if not self.dry_run:
                    session.db.save(report.states)
            self._announce(report)
            with stop_signals(session):
                activation: Optional[Scope] = _certbot.activate(session)
                try:
                    activation.__enter__()  # type: ignore[union-attr]
                except _certbot.Unavailable as exc:
                    logger.warning("certbot-batch: %s; certbot renews as stock", exc)
                    activation = None
                if activation is not None:
                    session.hold_back_summary = True
                    try:
                        with queued_file_logging():
                            self._renew_in_waves(report)
                    finally:
                        session.hold_back_summary = False
                        activation.__exit__(None, None, None)  # certbot as stock from here
                    self._deploy()
            if activation is None:
                return stock_then_pending(config, self.stock)
            return self._finish(report)
        finally:
            session.ledger.flush()
            if self.report is not None:  # the runs table: the cadence of timer runs
                session.db.finish_run(self.report.run_id, len(self.renewed))
            session.db.close()

    def _renew_in_waves(self, report: ScanReport) -> None:
        config, session = self.config, self.run
        now = self.clock()
        due: list[LineageRecord] = []
        # Urgency first: if the run cannot do everything (a pause, a rate limit, a stop), the
        # lineages closest to expiry (or to the end of their ARI window) went first.
        for record in sorted(session.with_outcome(Outcome.DUE), key=lambda r: _urgency(r.state)):
            if backoff.backing_off(record.state, now, config):
                record.outcome = Outcome.BACKING_OFF
            else:
                due.append(record)
        broken_confs = [r.conf_path for r in session.with_outcome(Outcome.BROKEN)]
        size = int(getattr(config, "batch_size", None) or 100)
        waves = [due[i:i + size] for i in range(0, len(due), size)] or [[]]
        began = time.monotonic()
        slept = False
        called = False
        for index, wave in enumerate(waves):
            if wave and not slept:
                slept = True
                self._random_sleep()
            if session.stopping.is_set():
                for record in wave:
                    record.outcome = Outcome.NOT_ATTEMPTED
                continue
            prepared, unloadable = self._prepare(wave)
            batchable = [r for r in prepared if not r.has_result and
                         prevalidate.batchable(r.config)]
            if batchable:
                self._validate_together(index, len(waves), batchable)
            to_loop = []
            for record in prepared:
                deferred = pacing.deferral(record.result) \
                    if isinstance(record.result, BaseException) else None
                if deferred is not None:
                    # The account hit an account-wide limit earlier in the run, or the CA
                    # was unavailable for longer than the pacer waits (pacing.CAUnavailable).
                    self._defer(record, deferred)
                    record.take_result()
                    continue
                started = record.has_result and not isinstance(record.result,
                                                               replaces.Stopped)
                if session.stopping.is_set() and not started:
                    record.outcome = Outcome.NOT_ATTEMPTED
                    record.take_result()
                    continue
                to_loop.append(record)
            confs = [r.conf_path for r in to_loop] + unloadable
            if index == 0:
                confs += broken_confs
            if not confs and (called or index < len(waves) - 1):
                continue
            session.ledger.flush()  # deferrals
            self._record_pending(to_loop)
            self._certbot_loop(confs)
            session.ledger.flush()
            called = True
            for record in wave:
                # Saved (or not): the wave's configs and certbot objects are no longer
                # needed (bounded memory at tens of thousands of lineages).
                record.config = record.lineage = None
                record.take_result()
            if len(waves) > 1:
                self._progress(began, sum(len(w) for w in waves[:index + 1]), len(due))

    def _progress(self, started: float, handled: int, due: int) -> None:
        """One line a person can follow through a long run (a mass renewal)."""
        renewed = len(self.renewed)
        elapsed = max(time.monotonic() - started, 1e-6)
        rate = handled / elapsed
        left = (due - handled) / rate if rate > 0 else 0.0
        _certbot.notify(f"certbot-batch: progress: {handled} of {due} due lineage(s) done "
                        f"({renewed} renewed), {rate:.1f}/s, about {_duration(left)} left")

    def _validate_together(self, index: int, count: int,
                           records: list[LineageRecord]) -> None:
        """The wave's issuance ahead of certbot's loop (prevalidate.py), the fallback CA for
        what the own CA could not serve, and the failures' backoff, durable at once."""
        session = self.run
        _certbot.notify(f"certbot-batch: validating {len(records)} lineage(s) together" +
                        (f" (wave {index + 1} of {count})" if count > 1 else ""))
        wave_report = prevalidate.run_wave(session, index, records)
        self.waves += 1
        self.provision_calls += wave_report.provision_calls
        self._take_results(records, wave_report)
        self._fallback(index, records, wave_report)
        # The wave's failures are known before certbot's loop runs: their backoff is durable
        # before anything else happens (a kill in the loop keeps it).
        for record in records:
            result = record.result
            if record.has_result and isinstance(result, BaseException) and \
                    not isinstance(result, replaces.Stopped) and \
                    pacing.deferral(result) is None:
                self._record_failure(record, result)
                record.failure_noted = True
        session.ledger.flush()
        _certbot.notify(
            f"certbot-batch: {len(wave_report.ok)} lineage(s) validated and issued, "
            f"{len(wave_report.failed)} failed, in {wave_report.elapsed:.1f} s "
            f"({wave_report.provision_calls} provisioning action(s), "
            f"{wave_report.cleanup_calls} cleanup(s), {wave_report.files} "
            "challenge file(s))")

    def _take_results(self, records: list[LineageRecord],
                      wave: prevalidate.WaveReport) -> None:
        with self.run.lock:
            for record in records:
                if record.name in wave.results:
                    record.result = wave.results[record.name]
                    record.has_result = True

    def _fallback(self, index: int, records: list[LineageRecord],
                  wave: prevalidate.WaveReport) -> None:
        """Renew from the fallback CA, in the same run, the lineages of the wave that their
        own CA could not renew (unreachable, 5xx, rate limit) and that expire soon."""
        url = getattr(self.config, "batch_fallback_server", None)
        if not isinstance(url, str) or not url or self.dry_run:
            return
        within = float(getattr(self.config, "batch_fallback_within", None) or 7.0) * 86400
        now = self.clock()
        chosen = []
        for record in records:
            result = wave.results.get(record.name)
            not_after = record.state.not_after
            if not isinstance(result, BaseException) or not _ca_problem(result):
                continue
            if not_after is None or not_after - now > within:
                continue
            chosen.append(record)
        if not chosen:
            return
        for record in chosen:
            record.fallback = url
        _certbot.notify(f"certbot-batch: {len(chosen)} lineage(s) expiring within "
                        f"{within / 86400:g} days could not be renewed at their CA; "
                        f"renewing them from the fallback CA {url}")
        report = prevalidate.run_wave(self.run, index, chosen)
        self._take_results(chosen, report)
        for record in chosen:
            if isinstance(report.results.get(record.name), BaseException):
                record.fallback = None
        self.provision_calls += report.provision_calls

    def _defer(self, record: LineageRecord, exc: pacing.Deferred) -> None:
        record.outcome = Outcome.DEFERRED
        record.detail = str(exc)
        if not self.dry_run:
            backoff.record_failure(record.state, self.clock(), str(exc),
                                   retry_after=exc.retry_after, counts=False)
            self.run.db.update(record.state)
            self.run.ledger.note(record.state)

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
        self.run.stopping.wait(delay)

    def _prepare(self, wave: list[LineageRecord]) -> tuple[list[LineageRecord], list[str]]:
        """Load the wave's lineages as certbot's loop does, and run their pre-hooks (in this
        thread, before any provisioning or CA contact). Lineages that cannot be loaded are
        left to certbot's loop, which reports them in its own words."""
        prepared: list[LineageRecord] = []
        unloadable: list[str] = []
        for record in wave:
            lineage_config = copy.deepcopy(self.config)
            try:
                lineage = _certbot.reconstitute(lineage_config, record.conf_path)
            except (errors.Error, OSError, ValueError, KeyError):
                lineage = None  # certbot's loop reports it, in its words
            if lineage is None:
                unloadable.append(record.conf_path)
                continue
            record.config, record.lineage = lineage_config, lineage
            problem = _installer_problem(record.state, lineage_config)
            if problem is not None:
                # Before any CA contact: renewing a certificate nobody can deploy helps no
                # one. certbot's loop reports it as this lineage's failure, in its words.
                logger.error("%s", problem)
                record.result, record.has_result = errors.Error(problem), True
                prepared.append(record)
                continue
            try:
                _certbot.run_pre_hook(lineage_config)
            except errors.Error as exc:
                logger.error("Pre-hook of %s: %s", record.name, exc)
            prepared.append(record)
        return prepared, unloadable

    def _record_pending(self, records: list[LineageRecord]) -> None:
        """Before certbot's loop saves anything: record how these lineages are deployed
        (per server instance, and the batch deploy hooks)."""
        if self.dry_run or not records:
            return
        by_server: dict[ServerRef, list[str]] = {}
        for record in records:
            ref = servers.ref_for(record.config)
            if ref is not None:
                by_server.setdefault(ref, []).append(record.name)
        self.run.pending.begin(by_server, batch_hooks.hook_commands(self.config),
                               [r.name for r in records])

    def _certbot_loop(self, conf_files: list[str]) -> None:
        """certbot's own loop over ``conf_files`` (saving, hooks, its messages)."""
        self.run.conf_files = list(conf_files)
        cfg = copy.deepcopy(self.config)
        try:
            cfg.random_sleep_on_renew = False  # slept before the first order already
        except AttributeError:
            pass
        try:
            self.results.append(self.stock(cfg))
        except errors.Error as exc:
            self.loop_errors.append(exc)

    def _deploy(self) -> None:
        """One confirmed reload per server instance (this run's and any earlier run's
        pending ones), then the batch deploy hooks."""
        if self.dry_run:
            return
        previous = {}
        for record in self.run.with_outcome(Outcome.RENEWED):
            if record.state.serial:
                try:
                    previous[record.name] = int(record.state.serial, 16)
                except ValueError:
                    pass
        renewed = self.renewed
        report = finish.finish(self.config, brief=False, run=self.run.deploy,
                               run_lineages=renewed, previous=previous)
        for name, why in report.not_deployed.items():
            found = self.run.record(name)
            if found is not None and found.outcome is Outcome.RENEWED:
                found.outcome = Outcome.NOT_DEPLOYED
                found.detail = why
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
        session = self.run
        successes: list[str] = []
        failures: list[str] = []
        skipped: list[str] = []
        parse_failures: list[str] = []
        for s_ok, s_fail, s_skip, s_parse in session.summaries:
            successes += s_ok
            failures += s_fail
            skipped += s_skip
            parse_failures += s_parse
        not_due = report.not_due
        # With --cert-name certbot's loop reads that one conf itself (and lists it when it is
        # not due); otherwise only due lineages reach it and the not-due ones are added here.
        certname = getattr(self.config, "certname", None)
        if not_due and len(not_due) <= LIST_LIMIT and not certname:
            skipped += [f"{self._fullchain(s)} expires on {_day(s.not_after)}" for s in not_due]
        if self.not_deployed or self.not_attempted:
            self._describe_ourselves(successes, failures, skipped, parse_failures)
        else:
            _certbot.describe_results(self.config, successes, failures, skipped,
                                      parse_failures)
        self._describe_extras()
        if len(not_due) > LIST_LIMIT and not certname:
            first = min(not_due, key=lambda s: s.not_after or 0.0)
            _certbot.notify(
                f"{len(not_due)} certificates are not due for renewal yet (the earliest to "
                f"expire is {first.name}, on {fmt_time(first.not_after)}); run "
                "`certbot-batch status` for the full list.")
        renewed_domains, failed_domains, tuples = self._domains()
        if session.post_hook_calls:
            # This certbot runs its post-hooks at the end of handle_renewal_request: once,
            # now, after the deployment, with every wave's domains.
            args, _ = session.post_hook_calls[-1]
            if args:
                _certbot.run_post_hooks(renewed_domains, failed_domains)
            else:
                _certbot.run_post_hooks()
        problems = self._problems(failures, parse_failures)
        if problems:
            raise errors.Error("; ".join(problems))
        return (renewed_domains, failed_domains) if tuples else None

    def _problems(self, failures: list[str], parse_failures: list[str]) -> list[str]:
        """Why the run exits non-zero (nothing: it exits 0)."""
        session = self.run
        problems: list[str] = []
        if failures or parse_failures:
            problems.append(f"{len(failures)} renew failure(s), {len(parse_failures)} parse "
                            "failure(s)")
        elif self.loop_errors:
            problems += [str(e) for e in self.loop_errors]
        problems += self.deploy_problems
        if self.report is not None and self.report.internal_errors:
            problems.append(f"certbot-batch internal error while checking "
                            f"{len(self.report.internal_errors)} lineage(s) (see the log); "
                            "certbot decided for them itself")
        if self.deferred:
            problems.append(f"{len(self.deferred)} renewal(s) deferred (their CA's rate limit, "
                            "or their CA unavailable)")
        if self.not_attempted:
            problems.append(f"stopped by {session.stop_signal or 'a signal'}: "
                            f"{len(self.not_attempted)} due lineage(s) not attempted")
        elif session.stopping.is_set():
            problems.append(f"stopped by {session.stop_signal or 'a signal'}")
        return problems

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
        backing_off = self.backing_off
        if backing_off:
            notify(f"{len(backing_off)} due certificate(s) are backing off after failed "
                   "renewals and were not sent to the CA in this run (certbot-batch status "
                   "shows them; --force-renewal or --cert-name tries at once):")
            notify("\n".join(f"  {backoff.describe(s)}" for s in backing_off[:LIST_LIMIT]))
            if len(backing_off) > LIST_LIMIT:
                notify(f"  ... and {len(backing_off) - LIST_LIMIT} more")

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
            for args, _ in self.run.post_hook_calls:
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
        noun = "simulated renewal" if self.dry_run else "renewal"
        not_deployed = self.not_deployed
        by_path = {self._fullchain_of(n): n for n in not_deployed}
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
            logger.error("%s", next(iter(not_deployed.values())))
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
                         self.run.stop_signal or "a signal")
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
        record = self.run.record(name)
        if record is not None:
            return self._fullchain(record.state)
        return os.path.join(str(self.config.config_dir), "live", name, "fullchain.pem")

    # -- SessionHooks: what certbot's calls are forwarded to while the session runs -------
    def should_renew(self, config: Any, lineage: Any) -> Optional[bool]:
        record = self.run.record(lineage.lineagename)
        if record is None or record.outcome is Outcome.BROKEN:
            return None  # let certbot itself decide, hit (and report) the problem
        due = bool(record.state.due)
        if due:
            logger.info("Lineage %s is due for renewal: %s", record.name, record.state.reason)
            _certbot.notify(f"Renewing {record.name}: {record.state.reason}")
        return due

    def renew_cert(self, config: Any, lineage: Any, proceed: Callable[[], None]) -> None:
        name = lineage.lineagename
        session = self.run
        record = session.record(name)
        if session.stopping.is_set() and (record is None or not record.has_result):
            if record is not None:
                record.outcome = Outcome.NOT_ATTEMPTED
            raise replaces.Stopped("certbot-batch: the run is stopping; not renewed")
        try:
            proceed()
        except BaseException as exc:
            if record is not None:
                record.outcome = Outcome.FAILED
                if not record.failure_noted:
                    self._record_failure(record, exc)
                    session.ledger.flush()
            raise
        if record is None:
            return
        record.outcome = Outcome.RENEWED
        if not config.dry_run:
            issued_by = record.fallback or record.state.server
            session.db.mark_renewed(name, self.clock(), issued_by=issued_by)
            if record.state.renew_failures or record.state.renew_next_attempt:
                backoff.record_success(record.state)
                session.ledger.note(record.state)

    def obtained(self, name: str) -> tuple[bool, Any]:
        record = self.run.record(name)
        if record is None:
            return False, None
        with self.run.lock:
            return record.take_result()

    def plugin_substitutes(self) -> dict[str, str]:
        # One line in cli.ini batches every stock plugin: lineages keep their saved names.
        return catalog.STOCK_BATCHED

    def authenticator(self, auth: Any, config: Any) -> Any:
        session = self.run
        wave, name = session.wave, session.current_lineage()
        if wave is None or not name:
            return auth
        return grouped.join_wave(auth, config, wave, name, session.stopping, self.config)

    def client_config(self, config: Any) -> Any:
        record = self.run.current_record()
        if record is None or not record.fallback:
            return config
        # Renewed from the fallback CA: its client talks to that CA, while certbot's loop
        # saves the lineage with the lineage's own config (its server stays the primary
        # one, so the next renewal goes back there).
        return _certbot.fallback_config(config, record.fallback)

    def new_order(self, send: Callable[..., Any], client: Any, csr_pem: bytes, *args: Any,
                  **kwargs: Any) -> Any:
        session = self.run
        name = session.current_lineage()

        def paced(c: Any, *a: Any, **kw: Any) -> Any:
            return session.pacer.new_order(send, c, name, *a, **kw)

        def ordered() -> Any:
            if session.stopping.is_set():
                raise replaces.Stopped("certbot-batch: the run is stopping (signal); no new "
                                       "order started")
            return replaces.send_new_order(paced, client, csr_pem, *args,
                                           cert_id=self._replaces_for(name),
                                           local=session.local, lineage=name, **kwargs)

        if session.stopping.is_set():
            raise replaces.Stopped("certbot-batch: the run is stopping (signal); no new order "
                                   "started")
        self._check_fallback_profile(session.current_record(), client)
        wave = session.wave
        if wave is not None:
            # New orders of a wave go out one at a time, in urgency order.
            with wave.gate.turn(name):
                return ordered()
        return ordered()

    @staticmethod
    def _check_fallback_profile(record: Optional[LineageRecord], client: Any) -> None:
        """A lineage renewed from the fallback CA gets the profile it asks for there
        (--preferred-profile / --required-profile, certbot >= 4.0), or an error of its own:
        never a silently different certificate (another lifetime) from another CA."""
        if record is None or not record.fallback or record.config is None:
            return
        wanted = getattr(record.config, "required_profile", None) or \
            getattr(record.config, "preferred_profile", None)
        if not isinstance(wanted, str) or not wanted:
            return
        meta = getattr(getattr(client, "directory", None), "meta", None)
        offered = getattr(meta, "profiles", None) or {}
        if wanted not in offered:
            raise errors.Error(
                f"the fallback CA {record.fallback} does not offer the profile {wanted!r} "
                f"that {record.name} asks for (it offers {', '.join(sorted(offered)) or 'none'}"
                "); not renewed from it: the next run tries its own CA again")

    def replaces(self) -> Optional[str]:
        return replaces.payload_replaces(self.run.local)

    def _replaces_for(self, name: Optional[str]) -> Optional[str]:
        """The certID a new order of lineage ``name`` replaces (ARI), if its certificate is
        inside its suggested window (not for dry runs: nothing is replaced)."""
        record = self.run.record(name)
        if record is None or self.dry_run or record.fallback:
            return None  # (another CA did not issue the certificate being replaced)
        state = record.state
        if not state.ari_cert_id or state.window_start is None:
            return None
        return state.ari_cert_id if state.window_start <= self.clock() else None

    def finalize(self, orig: Callable[..., Any], client: Any, orderr: Any, *args: Any,
                 **kwargs: Any) -> Any:
        session = self.run
        if session.stopping.is_set():
            raise replaces.Stopped("certbot-batch: the run is stopping (signal); the order "
                                   "was not finalized")
        return session.pacer.finalize(orig, client, session.current_lineage(), orderr,
                                      *args, **kwargs)

    def send_request(self, orig: Callable[..., Any], net: Any, method: str, url: str,
                     *args: Any, **kwargs: Any) -> Any:
        return self.run.pacer.send(orig, net, method, url, *args, **kwargs)

    def retrying(self, orig: Callable[..., Any], net: Any, *args: Any, **kwargs: Any) -> Any:
        return self.run.pacer.retrying(orig, self.run.stopping.is_set, net, *args, **kwargs)

    def failed_authorizations(self, problems: list[str]) -> None:
        record = self.run.current_record()
        if record is not None:
            with self.run.lock:
                record.detail = "; ".join(problems)

    # -- backoff ------------------------------------------------------------------------
    def _record_failure(self, record: LineageRecord, exc: BaseException) -> None:
        """The lineage's backoff: the next attempt waits (docs/decisions.md)."""
        if isinstance(exc, replaces.Stopped) or self.dry_run:
            return
        state = record.state
        limit = self.run.pacer.rate_limited.get(record.name)
        now = self.clock()
        deferred = pacing.deferral(exc)
        if deferred is not None:
            backoff.record_failure(state, now, str(deferred), retry_after=deferred.retry_after,
                                   counts=False)
        elif limit is not None:
            backoff.record_failure(state, now, f"rate limited by the CA: {limit.detail}",
                                   retry_after=limit.retry_after or 3600.0, counts=False)
        else:
            detail = record.detail
            backoff.record_failure(state, now, f"{exc}" + (f" ({detail})" if detail else ""))
        self.run.db.update(state)
        self.run.ledger.note(state, now)

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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _day(ts: Optional[float]) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d")
