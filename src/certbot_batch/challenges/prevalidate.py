"""Obtain the certificates of one wave of due lineages together, ahead of certbot's loop.

Each lineage runs certbot's own issuance code (same account, server, profile, key and CSR
settings, same authorization handling: pending authorizations are never deactivated) in a
worker thread of its wave. Their ``perform`` calls meet in one :class:`ChallengeBatch`, so
the challenges of the whole wave are provisioned in one action, validated concurrently and
cleaned up once; finalization runs concurrently too. The session then hands the wave to
certbot's per-lineage loop, which receives each lineage's result instead of contacting the
CA again, and saves the lineage, runs its hooks and deploys exactly as usual; so every
certificate issued in a wave is saved before the next wave starts.

A stop signal (the session sets ``run.stopping``) makes the wave start no new order and
finalize no new certificate (``_certbot`` wraps acme for that); the workers still in
flight get a grace period to finish what the CA already issued, then the wave's
challenges are cleaned up and the session saves what arrived. Workers are daemon threads:
one blocked in a network call can never keep the process alive.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Optional

from certbot_batch import _certbot, catalog, paths, run
from certbot_batch.challenges import grouped
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.http01 import Http01Provisioner
from certbot_batch.challenges.journal import Journal
from certbot_batch.run import LineageRecord, Run, Scope, Wave

logger = logging.getLogger(__name__)

#: Authenticators whose perform() can join a batch.
BATCH_AUTHENTICATORS = catalog.AUTHENTICATORS
#: After a stop signal, how long the wave's workers may take to finish what is in flight.
STOP_GRACE = 30.0


def batchable(lineage_config: Any) -> bool:
    """Can this lineage's challenges be validated together with the rest of its wave?
    The batch plugins, and every DNS plugin built on certbot's dns_common (and manual with
    an auth hook), whose perform() joins a group of the wave (challenges/grouped.py)."""
    name = getattr(lineage_config, "authenticator", None)
    if name in BATCH_AUTHENTICATORS or name in catalog.STOCK_BATCHED:
        return True
    return grouped.groupable(lineage_config)


def active_batch() -> Optional[ChallengeBatch]:
    """The challenge batch of the wave in flight (inside a renewal session), or None."""
    current = run.current()
    return current.batch() if current is not None else None


class OrderGate:
    """New orders of a wave go out in the wave's order (urgency first: least time before
    expiry or before the end of the ARI window), at most ``width`` at a time: lineage k
    sends its order once every lineage before k - width + 1 has sent its own or dropped
    out. When the CA stops the run part way (a rate limit, a pause, a stop signal), the
    most urgent lineages were served first, and after a rate-limit answer at most
    ``width - 1`` further orders were already on their way to the CA. The session uses
    width 1: strict urgency order (a new order takes tens of milliseconds; 1,000 of them
    cost about half a minute)."""

    def __init__(self, names: list[str], stopping: threading.Event,
                 wait_timeout: float = 300.0, width: int = 1) -> None:
        self.width = max(1, width)
        self._rank = {name: i for i, name in enumerate(names)}
        self._passed: set[str] = set()
        self._next = 0
        self._order = list(names)
        self._cond = threading.Condition()
        self._stopping = stopping
        self.wait_timeout = wait_timeout

    def _advance(self) -> None:
        while self._next < len(self._order) and self._order[self._next] in self._passed:
            self._next += 1
        self._cond.notify_all()

    def turn(self, name: Optional[str]) -> Scope:
        """``with gate.turn(name):`` around the lineage's new-order request."""
        def enter() -> None:
            rank = self._rank.get(name or "")
            if rank is None:
                return
            deadline = time.monotonic() + self.wait_timeout
            with self._cond:
                while rank >= self._next + self.width and not self._stopping.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        logger.debug("certbot-batch: %s orders without waiting for its "
                                     "turn", name)
                        break
                    self._cond.wait(min(remaining, 0.5))

        return Scope(enter, lambda: self.done(name or ""))

    def done(self, name: str) -> None:
        """The lineage sent its order, or will not send one."""
        with self._cond:
            if name in self._rank and name not in self._passed:
                self._passed.add(name)
                self._advance()


@dataclasses.dataclass
class WaveReport:
    results: dict[str, Any]
    provision_calls: int = 0
    cleanup_calls: int = 0
    files: int = 0
    elapsed: float = 0.0
    #: lineages whose worker had not finished when the wave was given up (stop signal)
    abandoned: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> list[str]:
        return [n for n, r in self.results.items() if not isinstance(r, BaseException)]

    @property
    def failed(self) -> list[str]:
        return [n for n, r in self.results.items() if isinstance(r, BaseException)]


def _obtain_one(session: Run, record: LineageRecord, batch: ChallengeBatch,
                gate: OrderGate) -> Any:
    with session.lineage_scope(record.name):
        try:
            # A registry of its own: certbot caches the initialised plugin (built from one
            # lineage's config: webroot map, ...) on the registry's entry points.
            plugins = _certbot.find_plugins()
            obtain = _certbot.prepare_obtain(record.config, record.lineage, plugins)
            return obtain()
        finally:
            gate.done(record.name)
            batch.depart(record.name)


def run_wave(session: Run, index: int, records: list[LineageRecord]) -> WaveReport:
    """Validate and issue ``records`` together (the session's wave ``index``). Returns each
    lineage's obtain_certificate result, or the exception it raised (one lineage's error
    never costs another its certificate)."""
    t0 = time.monotonic()
    report = WaveReport(results={})
    if not records:
        return report
    _certbot.find_plugins()  # fills the session's entry-point cache before the threads start
    journal = Journal(paths.journal_paths(session.config))
    names = [r.name for r in records]
    # One provisioner for every kind of the wave (webroot files, Apache, nginx).
    batch = ChallengeBatch(names, Http01Provisioner(journal))
    gate = OrderGate(names, session.stopping)
    done = threading.Condition()
    results: dict[str, Any] = {}

    def work(record: LineageRecord) -> None:
        try:
            result: Any = _obtain_one(session, record, batch, gate)
        except BaseException as exc:  # noqa: BLE001  (kept for certbot's loop)
            logger.debug("Lineage %s failed ahead of certbot's loop", record.name,
                         exc_info=True)
            result = exc
        with done:
            results[record.name] = result
            done.notify_all()

    session.wave = Wave(index, list(records), batch, gate, journal)
    try:
        # One thread per lineage of the wave: they must all be able to reach the rendezvous
        # at the same time. The wave size bounds the load on the CA.
        for record in records:
            threading.Thread(target=work, args=(record,), daemon=True,
                             name=f"certbot-batch-{record.name}").start()
        stop_deadline: Optional[float] = None
        with done:
            while len(results) < len(records):
                if session.stopping.is_set():
                    stop_deadline = stop_deadline or time.monotonic() + STOP_GRACE
                    if time.monotonic() >= stop_deadline:
                        break
                # A bounded wait: signal handlers run in this (main) thread in between.
                done.wait(0.2)
            report.results = dict(results)
        report.abandoned = [n for n in names if n not in report.results]
        if report.abandoned:
            logger.warning("certbot-batch: stopping; %d lineage(s) of the wave still talking "
                           "to the CA are given up: %s", len(report.abandoned),
                           ", ".join(report.abandoned[:20]))
    finally:
        batch.finish()
        for listener in list(session.wave.listeners.values()):
            listener.stop()
        session.wave = None
        report.provision_calls = batch.provision_calls
        report.cleanup_calls = batch.cleanup_calls
        report.files = batch.files_provisioned
    report.elapsed = time.monotonic() - t0
    return report
