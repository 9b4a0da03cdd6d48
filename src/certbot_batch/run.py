"""The run model: everything one renewal session knows, typed, in one place.

certbot builds fresh plugin and installer objects for every lineage and calls our wrappers
from its own code, so the state of a ``certbot renew`` run cannot live on those objects, nor
in module globals scattered over the package. It lives here:

* a :class:`Run` per renewal session: the config, the state DB, the backoff ledger, the
  pacer towards the CA, the deployment, the pending record, the wave in flight, the stop
  flag, and **one** :class:`LineageRecord` **per lineage** (its scan state, its loaded config,
  what was obtained for it, its :class:`Outcome` and why). The summary, the pending
  deployment, the backoff and ``status`` are projections of those records;
* a :class:`Wave` per wave: its challenge batch, its order gate, its DNS groups;
* the current run (:func:`current`), published while a session runs, so that wrappers and
  plugins called by certbot (from any thread) find it;
* :data:`PROCESS`: the little that is process-wide by nature (the seam's patch state, the
  lock around ``os.environ`` for certbot's manual hooks, caches of plugin classes and
  journals, warnings said once, the DNS rounds still up at interpreter exit).

This module is the bottom of the package: it imports nothing of certbot-batch at run time
(the types it names are imported for the type checker only), so every module may use it.
"""
from __future__ import annotations

import dataclasses
import enum
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # types only: no import at run time (this module is the bottom layer)
    from certbot_batch._certbot import SeamState, SessionHooks
    from certbot_batch.ca.ledger import Ledger
    from certbot_batch.ca.pacing import AcmePacer
    from certbot_batch.challenges.batch import ChallengeBatch
    from certbot_batch.challenges.grouped import DnsWave
    from certbot_batch.challenges.journal import Journal
    from certbot_batch.challenges.prevalidate import OrderGate
    from certbot_batch.challenges.standalone import Listener
    from certbot_batch.deploy.pending import PendingDeployments
    from certbot_batch.deploy.reload import DeployRun
    from certbot_batch.scan.state import LineageState, StateDB


class Scope:
    """A context manager made of two callables. Unlike ``@contextlib.contextmanager`` it
    never touches the exception passing through it: acme 2.x's ``messages.Error`` is an
    immutable josepy object, and contextlib's ``exc.__traceback__ = ...`` turns it into
    "AttributeError: can't set attribute" on Python 3.11, losing the CA's answer."""

    def __init__(self, enter: Callable[[], Any], leave: Callable[[], None]) -> None:
        self._enter = enter
        self._leave = leave

    def __enter__(self) -> Any:
        return self._enter()

    def __exit__(self, *exc_info: Any) -> None:
        self._leave()


class Outcome(enum.Enum):
    """What became of a lineage in this run (the summary's words in the values)."""
    NOT_DUE = "not due"
    BROKEN = "unreadable"            # certbot's loop reports it in its own words
    DUE = "due"                      # not handled yet
    BACKING_OFF = "backing off"      # failed before; not sent to the CA this time
    DEFERRED = "deferred"            # the CA would not take it now (rate limit, outage)
    NOT_ATTEMPTED = "not attempted"  # a stop signal came first
    FAILED = "failure"
    RENEWED = "success"
    NOT_DEPLOYED = "renewed, not deployed"


@dataclasses.dataclass
class LineageRecord:
    """One lineage of the run, from the scan to the summary."""
    name: str
    state: LineageState
    outcome: Outcome = Outcome.NOT_DUE
    #: certbot's config of this lineage (a deep copy with its renewal conf applied)
    config: Any = None
    #: certbot's RenewableCert, once loaded for its wave
    lineage: Any = None
    #: obtained ahead of certbot's loop: obtain_certificate's result, or the exception
    result: Any = None
    has_result: bool = False
    #: why: the CA's reason for a failure, a deferral, a server's deployment failure
    detail: str = ""
    #: the fallback CA it is being (or was) renewed from
    fallback: Optional[str] = None
    #: its failure is already in the backoff ledger (recorded when its wave ended)
    failure_noted: bool = False

    @property
    def conf_path(self) -> str:
        return self.state.conf_path

    def take_result(self) -> tuple[bool, Any]:
        """(found, result) of what was obtained ahead; handed out once."""
        found, result = self.has_result, self.result
        self.has_result, self.result = False, None
        return found, result


@dataclasses.dataclass
class Wave:
    """One wave of the run: validated together, saved by certbot's loop before the next."""
    index: int
    records: list[LineageRecord]
    batch: ChallengeBatch
    gate: OrderGate
    journal: Journal
    #: the wave's DNS groups (challenges/grouped.py), made when the first DNS lineage joins
    dns: Optional[DnsWave] = None
    #: the wave's standalone http-01 listeners, by (address, port)
    listeners: dict[tuple[str, int], Listener] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    """One renewal session (see the module docstring)."""
    config: Any
    hooks: SessionHooks
    db: StateDB
    ledger: Ledger
    pacer: AcmePacer
    deploy: DeployRun
    pending: PendingDeployments
    records: dict[str, LineageRecord] = dataclasses.field(default_factory=dict)
    #: the wave in flight
    wave: Optional[Wave] = None
    #: renewal confs certbot's own loop may see (None: certbot's own list)
    conf_files: Optional[list[str]] = None
    #: plugin entry points found once per run (certbot rescans them for every lineage)
    plugin_entry_points: Optional[list[Any]] = None
    #: set by a stop signal: start no new orders, finish what was issued
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    stop_signal: Optional[str] = None
    #: what certbot's loop would have printed / run, held back until the end of the run
    summaries: list[tuple[list[str], list[str], list[str], list[str]]] = \
        dataclasses.field(default_factory=list)
    post_hook_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = \
        dataclasses.field(default_factory=list)
    hold_back_summary: bool = False
    #: per CA directory URL: its directory (fetched once per run, not once per client)
    directories: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: per (server, account asked for): certbot's account (loaded once per run)
    accounts: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)
    #: per thread: the lineage it works on, the certID its next new-order replaces
    local: threading.local = dataclasses.field(default_factory=threading.local)
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)

    # -- lineages ----------------------------------------------------------------------
    def record(self, name: Optional[str]) -> Optional[LineageRecord]:
        return self.records.get(name) if name else None

    def current_lineage(self) -> Optional[str]:
        value = getattr(self.local, "lineage", None)
        return str(value) if value else None

    def current_record(self) -> Optional[LineageRecord]:
        return self.record(self.current_lineage())

    def lineage_scope(self, name: Optional[str]) -> Scope:
        """Mark the calling thread as working on lineage ``name``."""
        saved: list[Any] = []

        def enter() -> None:
            saved.append(getattr(self.local, "lineage", None))
            self.local.lineage = name

        def leave() -> None:
            if saved:
                self.local.lineage = saved.pop()

        return Scope(enter, leave)

    def with_outcome(self, *outcomes: Outcome) -> list[LineageRecord]:
        return [r for r in self.records.values() if r.outcome in outcomes]

    # -- the wave in flight ------------------------------------------------------------
    def batch(self) -> Optional[ChallengeBatch]:
        wave = self.wave
        return wave.batch if wave is not None else None


@dataclasses.dataclass
class Process:
    """What is process-wide by nature (module docstring)."""
    #: the seam's patch state (set by the seam's install)
    seam: Optional[SeamState] = None
    #: the renewal sessions in progress (innermost last; one in practice)
    runs: list[Run] = dataclasses.field(default_factory=list)
    runs_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    #: certbot's manual plugin passes its hooks' variables through os.environ
    environ_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    #: plugin name -> its class (None: not a DNS plugin / not found)
    plugin_classes: dict[str, Optional[type]] = dataclasses.field(default_factory=dict)
    #: one Journal object per DNS journal (its lock orders every write)
    dns_journals: dict[tuple[str, ...], Journal] = dataclasses.field(default_factory=dict)
    #: DNS rounds whose records may be up (removed at interpreter exit if still there)
    live_rounds: set[Any] = dataclasses.field(default_factory=set)
    #: keys of warnings said once
    warned: set[str] = dataclasses.field(default_factory=set)
    #: the scan's direct urllib3 pools, per thread (scan/http.py), and which origins may
    #: use them (no proxy for them)
    http_pools: threading.local = dataclasses.field(default_factory=threading.local)
    direct_origins: dict[tuple[str, Any], Optional[str]] = \
        dataclasses.field(default_factory=dict)
    #: server instance -> its configuration problem, checked once per command
    preflight: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)
    preflight_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


#: The one process-wide object of certbot-batch.
PROCESS = Process()


def current() -> Optional[Run]:
    """The renewal session in progress, or None (then everything behaves as stock)."""
    runs = PROCESS.runs
    return runs[-1] if runs else None


def publish(run: Run) -> Scope:
    """Make ``run`` the current run while the scope lasts."""
    def enter() -> Run:
        with PROCESS.runs_lock:
            PROCESS.runs.append(run)
        return run

    def leave() -> None:
        with PROCESS.runs_lock:
            if run in PROCESS.runs:
                PROCESS.runs.remove(run)

    return Scope(enter, leave)


def current_lineage() -> Optional[str]:
    """The lineage the calling thread works on inside a session, or None."""
    run = current()
    return run.current_lineage() if run is not None else None
