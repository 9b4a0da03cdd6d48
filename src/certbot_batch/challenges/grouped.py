"""Grouped dns-01: every certbot DNS plugin, and ``--manual`` with an auth hook, batched.

certbot's DNS plugins (certbot-dns-rfc2136, -cloudflare, ... all built on
:class:`certbot.plugins.dns_common.DNSAuthenticator`) create the TXT records of one
``perform()`` call, sleep ``--dns-<plugin>-propagation-seconds`` once, and return; certbot
calls ``perform()`` once per lineage, so the waits add up lineage after lineage. Inside a
renewal session the due lineages of such plugins are issued ahead of certbot's loop with the
rest of their wave (``prevalidate.batchable``), and :func:`wrap_authenticator` (the run
context's ``wrap_authenticator``) makes each lineage's ``perform()``/``cleanup()`` join a
*group*: the lineages of the wave with the same plugin and the same plugin settings (every
config value under the plugin's dest prefix: ``dns_rfc2136_credentials``,
``dns_rfc2136_propagation_seconds``, ...; for manual: the hooks). A group's records are
created by ONE call of the plugin's own ``perform()`` with the challenges of all its
lineages (so one propagation wait; the groups of a wave run concurrently, so the wave waits
once, as long as its longest group), each lineage gets its own responses back and answers
its own challenges, and the records go in ONE ``cleanup()`` once every lineage of the group
is done with them.

Rendezvous. A lineage's ``perform()`` registers its challenges with its group's open
*round*, then arrives at the wave's :class:`~certbot_batch.challenges.batch.ChallengeBatch`
with no challenge file: that batch releases its participants once every lineage of the
wave has either arrived or dropped out (order failed, authorizations already valid, worker
done: ``depart()``), or after its timeout, or raises once the wave is given up (stop signal:
``finish()``). So when a round's first lineage comes out of the barrier, every lineage that
will join that round has joined: it seals the round and runs the plugin for all of them;
the others wait for the result. Nobody waits for a lineage that dropped out, a late
lineage (after the barrier's timeout) starts a round of its own, and a lineage whose
barrier raises before its round is sealed withdraws its challenges.

Failures stay per lineage: when a group's ``perform()`` fails (a wrong TSIG key, a zone the
server does not serve), its records are removed at once and each lineage of the group
tries again on its own (its own ``perform()``, concurrently), so only the lineages that
really cannot be validated fail, each with its own error. No validation is ever retried at
the CA: a lineage whose records could not be created never answers its challenges.

Crash safety: every record is written to a journal (``WORK_DIR/certbot-batch/dns.journal``,
fsynced: renewal conf, plugin, domain, validation name and value, the plugin's settings)
before the plugin creates it, and marked removed once its cleanup succeeded. A run killed
in between leaves the journal behind; the next certbot command (any: ``recovery.py``) rebuilds
the plugin from the lineage's renewal conf and the journaled settings and calls the
plugin's own cleanup (for manual: runs the cleanup hook as certbot would). Records still
up when a stopping run exits (workers given up after the grace period) are removed at
interpreter exit.

certbot's manual plugin sets ``os.environ`` for its hooks (process-wide): manual groups run
one at a time under one lock, and the ``CERTBOT_*`` variables are put back afterwards.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import importlib.metadata
import json
import logging
import os
import threading
import uuid
import weakref
from typing import Any, Iterator, Optional

from certbot import errors
from certbot.plugins import dns_common

from certbot_batch import _certbot, paths
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.journal import Journal

logger = logging.getLogger(__name__)

#: certbot's manual plugin (identified by name and settings only: it lives in certbot's
#: internals).
MANUAL = "manual"
JOURNAL_NAME = "dns.journal"

_OPEN, _SEALED, _DONE, _FAILED, _SPLIT = "open", "sealed", "done", "failed", "split"

#: Removals of existing records that fail in a row before the rest of a round's records are
#: left to the journal (and the next run): a DNS server that does not answer costs each
#: record the plugin's whole network timeout (45 s for rfc2136), 1,000 records 12 hours.
CLEANUP_FAILURES_IN_A_ROW = 2


def journal_path(config: Any) -> str:
    return os.path.join(paths.state_dir(config), JOURNAL_NAME)


def journal_paths(config: Any) -> list[str]:
    """Every place a DNS journal may be (recovery looks at each)."""
    return [journal_path(config)]


# -- which authenticators are grouped ---------------------------------------------------------

_classes: dict[str, Optional[type]] = {}
_classes_lock = threading.Lock()


def plugin_class(name: str) -> Optional[type]:
    """The class of the certbot plugin registered as ``name`` (public entry points, as
    certbot finds them), or None."""
    with _classes_lock:
        if name in _classes:
            return _classes[name]
    found: Optional[type] = None
    try:
        for ep in importlib.metadata.entry_points(group="certbot.plugins"):
            if ep.name != name:
                continue
            # certbot's own plugins (webroot, standalone, manual, null; apache from 5.5) and
            # ours are no DNS plugins: never load certbot's internals from here.
            if ep.value.partition(".")[0].partition(":")[0] in ("certbot", "certbot_batch"):
                break
            loaded = ep.load()
            found = loaded if isinstance(loaded, type) else None
            break
    except Exception:  # noqa: BLE001  (a broken plugin is simply not grouped)
        logger.debug("certbot-batch: could not load plugin %s", name, exc_info=True)
        found = None
    with _classes_lock:
        _classes[name] = found
    return found


def _manual_with_hook(config: Any) -> bool:
    hook = getattr(config, "manual_auth_hook", None)
    return (getattr(config, "noninteractive_mode", False) is True and isinstance(hook, str)
            and bool(hook.strip()))


def groupable(lineage_config: Any) -> bool:
    """Is this lineage's authenticator one whose challenges are grouped: a DNS plugin built
    on certbot's ``dns_common.DNSAuthenticator``, or manual, non-interactive, with an auth
    hook?"""
    name = getattr(lineage_config, "authenticator", None)
    if not isinstance(name, str) or not name:
        return False
    if name == MANUAL:
        return _manual_with_hook(lineage_config)
    cls = plugin_class(name)
    return cls is not None and issubclass(cls, dns_common.DNSAuthenticator)


def _kind(auth: Any, config: Any) -> Optional[str]:
    if isinstance(auth, dns_common.DNSAuthenticator):
        return "dns"
    if getattr(auth, "name", None) == MANUAL and _manual_with_hook(config):
        return "manual"
    return None


def plugin_settings(auth: Any, config: Any) -> dict[str, Any]:
    """The plugin's own settings in this config: every value under its dest prefix
    (``dns_rfc2136_credentials``, ``manual_auth_hook``, ...)."""
    prefix = str(getattr(auth, "dest_namespace", "") or "")
    try:
        values = vars(config.namespace)
    except (AttributeError, TypeError):
        return {}
    return {k: v for k, v in values.items() if prefix and k.startswith(prefix)}


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in settings.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def _identifier(achall: Any) -> str:
    ident = getattr(achall, "identifier", None)
    if ident is not None:  # certbot >= 5 (IP identifiers)
        return str(ident.value)
    return str(achall.domain)


# -- manual: os.environ is process-wide --------------------------------------------------------

_manual_lock = threading.Lock()


@contextlib.contextmanager
def _manual_environment(timeout: Optional[float] = None) -> Iterator[bool]:
    """certbot's manual plugin passes the hooks' variables through ``os.environ``: one
    manual perform()/cleanup() at a time, and the CERTBOT_* variables as they were after."""
    acquired = _manual_lock.acquire(timeout=-1 if timeout is None else timeout)
    if not acquired:
        yield False
        return
    saved = {k: v for k, v in os.environ.items() if k.startswith("CERTBOT_")}
    try:
        yield True
    finally:
        for key in [k for k in os.environ if k.startswith("CERTBOT_")]:
            if key not in saved:
                del os.environ[key]
        os.environ.update(saved)
        _manual_lock.release()


# -- the journal of records --------------------------------------------------------------------

_journals: dict[str, Journal] = {}
_journals_lock = threading.Lock()


def _journal(path: str) -> Journal:
    """One Journal object per file in this process (its lock orders every write)."""
    with _journals_lock:
        if path not in _journals:
            _journals[path] = Journal(path)
        return _journals[path]


@dataclasses.dataclass
class _Record:
    """One challenge of a group: a TXT record (DNS plugins) or one auth-hook call."""
    id: str
    achall: Any
    lineage: str
    conf: str
    plugin: str
    domain: str
    validation_name: str
    validation: str
    settings: dict[str, Any]
    #: the plugin's _perform was called for it (it may exist) / raised (it probably does not)
    attempted: bool = False
    perform_failed: bool = False
    removed: bool = False

    def entry(self) -> dict[str, Any]:
        return {"id": self.id, "lineage": self.lineage, "conf": self.conf,
                "plugin": self.plugin, "domain": self.domain,
                "validation_name": self.validation_name, "validation": self.validation,
                "settings": _jsonable(self.settings)}


# -- members, rounds, waves --------------------------------------------------------------------

class _Member:
    """One lineage's authenticator in a wave. Its perform()/cleanup() are replaced on the
    plugin object (so certbot still sees its own plugin: name, auth_hint, isinstance ...);
    the plugin's original methods are kept for the round that runs them."""

    def __init__(self, wave: _Wave, key: tuple[Any, ...], kind: str, name: str, conf: str,
                 auth: Any, config: Any, settings: dict[str, Any]) -> None:
        self.wave = wave
        self.key = key
        self.kind = kind
        self.name = name
        self.conf = conf
        self.auth = auth
        self.config = config
        self.settings = settings
        self.plugin = str(getattr(auth, "name", "") or getattr(config, "authenticator", ""))
        self.orig_perform = auth.perform
        self.orig_cleanup = auth.cleanup
        self.round: Optional[_Round] = None
        #: arrived at the wave's ChallengeBatch (which then waits for our cleanup)
        self.arrived = False
        #: records the plugin object is creating or removing right now, by (name, value)
        self.active: dict[tuple[str, str], _Record] = {}
        #: failed removals of existing records in a row, in the current cleanup
        self.cleanup_failures = 0
        #: dns_common's own perform()/cleanup(), which create/remove each record through
        #: _perform/_cleanup: then each record is followed; else all count as created and
        #: as removed once cleanup() returned.
        self.per_record = kind == "dns" and \
            type(auth).perform is dns_common.DNSAuthenticator.perform and \
            type(auth).cleanup is dns_common.DNSAuthenticator.cleanup
        if self.per_record:
            self._instrument(auth)
        auth.perform = self.perform
        auth.cleanup = self.cleanup

    def _instrument(self, auth: Any) -> None:
        """Follow each record through the plugin's own _perform/_cleanup (the per-record
        methods of dns_common's contract): which records exist, which are gone; and one
        record that cannot be removed never keeps the others of the group in place."""
        orig_perform_record = auth._perform
        orig_cleanup_record = auth._cleanup

        def _perform(domain: str, validation_name: str, validation: str) -> None:
            record = self.active.get((validation_name, validation))
            if record is not None:
                record.attempted = True
            try:
                orig_perform_record(domain, validation_name, validation)
            except BaseException:
                if record is not None:
                    record.perform_failed = True
                raise

        def _cleanup(domain: str, validation_name: str, validation: str) -> None:
            record = self.active.get((validation_name, validation))
            if record is None:
                orig_cleanup_record(domain, validation_name, validation)
                return
            if not record.attempted:
                record.removed = True  # never created
                return
            if self.cleanup_failures >= CLEANUP_FAILURES_IN_A_ROW and not record.perform_failed:
                logger.debug("certbot-batch: %s: %s left to the next run", self.plugin,
                             validation_name)
                return
            try:
                orig_cleanup_record(domain, validation_name, validation)
                record.removed = True
                self.cleanup_failures = 0
            except Exception as exc:  # noqa: BLE001  (the rest of the group goes on)
                if not record.perform_failed:
                    self.cleanup_failures += 1
                    if self.cleanup_failures == CLEANUP_FAILURES_IN_A_ROW:
                        logger.warning(
                            "certbot-batch: %s: %d removals failed in a row (is the DNS "
                            "server reachable?): the rest of this group's records are left "
                            "for the next certbot run", self.plugin, self.cleanup_failures)
                if record.perform_failed:
                    # Its creation failed with the same settings: almost certainly not
                    # there; not worth a warning on every later run.
                    logger.debug("certbot-batch: %s: removing %s after a failed creation: "
                                 "%s", self.plugin, validation_name, exc)
                    record.removed = True
                else:
                    logger.warning("certbot-batch: %s: could not remove the TXT record %s "
                                   "(lineage %s): %s; the next certbot run tries again",
                                   self.plugin, validation_name, record.lineage, exc)

        auth._perform = _perform
        auth._cleanup = _cleanup

    def records(self, achalls: list[Any]) -> list[_Record]:
        out = []
        for achall in achalls:
            domain = _identifier(achall)
            try:
                validation_name = str(achall.validation_domain_name(domain))
            except AttributeError:  # manual http-01
                validation_name = ""
            out.append(_Record(id=uuid.uuid4().hex, achall=achall, lineage=self.name,
                               conf=self.conf, plugin=self.plugin, domain=domain,
                               validation_name=validation_name,
                               validation=str(achall.validation(achall.account_key)),
                               settings=self.settings))
        return out

    # -- what certbot calls ---------------------------------------------------------------
    def perform(self, achalls: list[Any]) -> list[Any]:
        achalls = list(achalls)
        if not achalls:
            return []
        batch = self.wave.batch
        if batch is None or not batch.is_participant(self.name):
            return self._solo(achalls)
        rnd = self.wave.join(self, achalls)
        try:
            # The wave's barrier: released once every lineage of the wave has arrived
            # (with its challenge files, or none, as here) or dropped out.
            self.arrived = True
            batch.perform(self.name, [])
        except BaseException:
            if rnd.withdraw(self):
                self.round = None
            raise
        rnd.run(self)
        if rnd.state == _SPLIT:
            return self._solo(achalls)
        return rnd.result_for(self)

    def _solo(self, achalls: list[Any]) -> list[Any]:
        rnd = _Round(self.wave, self.key, self.kind, self.plugin)
        rnd.add(self, achalls)
        self.round = rnd
        rnd.run(self)
        return rnd.result_for(self)

    def cleanup(self, achalls: list[Any]) -> None:
        rnd, self.round = self.round, None
        if rnd is not None:
            rnd.member_done(self)
        batch = self.wave.batch
        if self.arrived and batch is not None:
            # Done with the wave's barrier too (its http-01 files need not wait for us).
            self.arrived = False
            batch.cleanup(self.name)


class _Round:
    """The lineages of one group that are performed together (one perform(), one
    cleanup())."""

    def __init__(self, wave: _Wave, key: tuple[Any, ...], kind: str, plugin: str) -> None:
        self.wave = wave
        self.key = key
        self.kind = kind
        self.plugin = plugin
        self.cond = threading.Condition()
        self.members: list[_Member] = []
        self.achalls: dict[int, list[Any]] = {}
        self.state = _OPEN
        self.leader: Optional[_Member] = None
        self.records: list[_Record] = []
        self.responses: dict[int, list[Any]] = {}
        self.error: Optional[BaseException] = None
        self.outstanding: set[int] = set()
        #: the plugin's perform() was called (so there may be something to remove)
        self.performed = False
        self.cleaned = False

    def add(self, member: _Member, achalls: list[Any]) -> bool:
        """Join the round, unless it has started already."""
        with self.cond:
            if self.state != _OPEN:
                return False
            self.members.append(member)
            self.achalls[id(member)] = achalls
            member.round = self
            return True

    def withdraw(self, member: _Member) -> bool:
        """Take the member's challenges out again, if the round has not started yet."""
        with self.cond:
            if self.state != _OPEN:
                return False
            self.members.remove(member)
            self.achalls.pop(id(member), None)
            return True

    def run(self, member: _Member) -> None:
        """The first member to get here runs the plugin for the whole round; the others
        wait for it."""
        with self.cond:
            lead = self.state == _OPEN
            if lead:
                # From here on the members are fixed (add and withdraw need an open round).
                self.state = _SEALED
                self.leader = member
                self.outstanding = {id(m) for m in self.members}
            else:
                while self.state == _SEALED:
                    self.cond.wait(1.0)
        if lead:
            self.wave.sealed(self)
            self._perform()

    def _perform(self) -> None:
        leader = self.leader
        assert leader is not None
        achalls = [a for m in self.members for a in self.achalls[id(m)]]
        lineages = len(self.members)
        state, error = _DONE, None
        responses: list[Any] = []
        try:
            self.records = [r for m in self.members for r in m.records(self.achalls[id(m)])]
            ctx = self.wave.ctx
            if ctx.stopping.is_set():
                from certbot_batch.challenges import replaces

                raise replaces.Stopped("certbot-batch: the run is stopping; no challenge "
                                       "was set up for this lineage")
            # Journaled (and fsynced) before the plugin creates anything.
            self.wave.journal.record_dns([r.entry() for r in self.records])
            leader.active = {(r.validation_name, r.validation): r for r in self.records}
            self.performed = True
            _certbot.notify(f"certbot-batch: {self.plugin}: one perform() for "
                            f"{len(achalls)} challenge(s) of {lineages} lineage(s)")
            if not leader.per_record:
                for record in self.records:
                    record.attempted = True
            if self.kind == "manual":
                with _manual_environment():
                    responses = list(leader.orig_perform(achalls))
            else:
                responses = list(leader.orig_perform(achalls))
            if len(responses) != len(achalls):
                raise errors.PluginError(f"{self.plugin} answered {len(responses)} of "
                                         f"{len(achalls)} challenge(s)")
        except BaseException as exc:  # noqa: BLE001  (handed to every member)
            error = exc
            state = _FAILED
            from certbot_batch.challenges import replaces

            if lineages > 1 and not isinstance(exc, replaces.Stopped) \
                    and isinstance(exc, Exception):
                state = _SPLIT
                logger.warning("certbot-batch: %s: the grouped perform() of %d lineage(s) "
                               "failed (%s); trying each of them on its own", self.plugin,
                               lineages, exc)
            # Whatever the plugin created goes at once.
            self._cleanup()
        if state == _DONE:
            offset = 0
            for m in self.members:
                count = len(self.achalls[id(m)])
                self.responses[id(m)] = responses[offset:offset + count]
                offset += count
        with self.cond:
            self.state = state
            self.error = error
            self.cond.notify_all()

    def result_for(self, member: _Member) -> list[Any]:
        with self.cond:
            if self.state == _DONE:
                return list(self.responses[id(member)])
            error = self.error
        if member.round is self:
            member.round = None  # nothing left to clean up for this member
        assert error is not None
        if len(self.members) > 1:
            # Each lineage gets an exception object of its own (a traceback is per raise,
            # and these are raised in many threads, then kept for certbot's loop).
            try:
                copied = type(error)(*error.args)
            except Exception:  # noqa: BLE001  (an exception type with another signature)
                copied = None
            if copied is not None:
                raise copied from error
        raise error

    def member_done(self, member: _Member) -> None:
        with self.cond:
            self.outstanding.discard(id(member))
            if self.outstanding or self.state != _DONE or self.cleaned:
                return
        self._cleanup()

    def _cleanup(self) -> None:
        """The plugin's own cleanup(), once for the whole round (the leader's plugin
        object: it created the records)."""
        with self.cond:
            if self.cleaned:
                return
            self.cleaned = True
        leader = self.leader
        assert leader is not None
        achalls = [r.achall for r in self.records]
        try:
            if not self.performed or not achalls:
                return
            leader.active = {(r.validation_name, r.validation): r for r in self.records}
            leader.cleanup_failures = 0
            if self.kind == "manual":
                with _manual_environment():
                    self._manual_cleanup(leader, achalls)
            else:
                try:
                    leader.orig_cleanup(achalls)
                    if not leader.per_record:
                        for record in self.records:
                            record.removed = True
                except Exception as exc:  # noqa: BLE001  (reported; the journal keeps it)
                    logger.warning("certbot-batch: %s: cleanup failed: %s; the next certbot "
                                   "run tries again", self.plugin, exc)
            logger.info("certbot-batch: %s: one cleanup() for %d challenge(s) of %d "
                        "lineage(s)", self.plugin, len(achalls), len(self.members))
            self.wave.journal.dns_removed([r.id for r in self.records if r.removed])
        finally:
            self.wave.cleaned(self)

    def _manual_cleanup(self, leader: _Member, achalls: list[Any]) -> None:
        try:
            leader.orig_cleanup(achalls)
        except Exception:  # noqa: BLE001
            # certbot's manual cleanup stops at the first challenge whose auth hook never
            # ran: the rest one by one.
            for achall in achalls:
                try:
                    leader.orig_cleanup([achall])
                except Exception:  # noqa: BLE001
                    logger.debug("certbot-batch: manual cleanup of %s", achall,
                                 exc_info=True)
        # The cleanup hook ran for every challenge it could (its failures are reported by
        # certbot, as for a stock run); nothing is left for the journal.
        for record in self.records:
            record.removed = True

    def emergency_cleanup(self) -> bool:
        """At interpreter exit: records of a round still up (its workers were given up).
        True when they were removed here."""
        with self.cond:
            if self.cleaned or not self.performed or self.leader is None:
                return False
        if self.kind == "manual":
            # Its perform() may still hold the lock (a hook that hangs): then the journal
            # leaves it to the next run.
            with _manual_environment(timeout=5.0) as acquired:
                if not acquired:
                    return False
                with self.cond:
                    self.cleaned = True
                self._manual_cleanup(self.leader, [r.achall for r in self.records])
                self.wave.journal.dns_removed([r.id for r in self.records])
            return True
        self._cleanup()
        return True


class _Wave:
    """The groups of one wave (one ChallengeBatch)."""

    def __init__(self, ctx: Any, batch: ChallengeBatch, journal: Journal) -> None:
        self.ctx = ctx
        # Weakly: the wave's entry in _waves (keyed by the batch) goes with the batch.
        self._batch = weakref.ref(batch)
        self.journal = journal
        self.lock = threading.Lock()
        self.open: dict[tuple[Any, ...], _Round] = {}

    @property
    def batch(self) -> Optional[ChallengeBatch]:
        return self._batch()

    def join(self, member: _Member, achalls: list[Any]) -> _Round:
        with self.lock:
            rnd = self.open.get(member.key)
            if rnd is None or not rnd.add(member, achalls):
                rnd = _Round(self, member.key, member.kind, member.plugin)
                self.open[member.key] = rnd
                rnd.add(member, achalls)
            return rnd

    def sealed(self, rnd: _Round) -> None:
        with self.lock:
            if self.open.get(rnd.key) is rnd:
                del self.open[rnd.key]
        with _live_lock:
            _live.add(rnd)

    def cleaned(self, rnd: _Round) -> None:
        with _live_lock:
            _live.discard(rnd)


_waves: weakref.WeakKeyDictionary[ChallengeBatch, _Wave] = weakref.WeakKeyDictionary()
_waves_lock = threading.Lock()
#: rounds whose records may be up (sealed, not cleaned up yet)
_live: set[_Round] = set()
_live_lock = threading.Lock()


def _at_exit() -> None:
    with _live_lock:
        rounds = list(_live)
    for rnd in rounds:
        try:
            if rnd.emergency_cleanup():
                logger.warning("certbot-batch: %s: removed the %d challenge(s) of %d "
                               "lineage(s) whose renewal was given up (the run stopped)",
                               rnd.plugin, len(rnd.records), len(rnd.members))
        except Exception:  # noqa: BLE001  (the journal lets the next run finish the job)
            logger.debug("certbot-batch: cleanup at exit failed", exc_info=True)


# Registered when the module is imported (by the session or recovery, in the main thread),
# not from a worker thread; a no-op when no round is live.
atexit.register(_at_exit)


def wrap_authenticator(auth: Any, lineage_config: Any) -> Any:
    """``RunContext.wrap_authenticator``: make a DNS plugin's (or manual's) perform() and
    cleanup() join its group in the wave in flight; any other authenticator is returned as
    it is."""
    ctx = _certbot.current()
    batch = ctx.batch if ctx is not None else None
    if ctx is None or not isinstance(batch, ChallengeBatch):
        return auth
    kind = _kind(auth, lineage_config)
    name = ctx.current_lineage()
    if kind is None or not name:
        return auth
    settings = plugin_settings(auth, lineage_config)
    key = (str(getattr(auth, "name", "")), kind,
           tuple(sorted((k, repr(v)) for k, v in settings.items())))
    with _waves_lock:
        wave = _waves.get(batch)
        if wave is None:
            wave = _Wave(ctx, batch, _journal(journal_path(ctx.config)))
            _waves[batch] = wave
    conf = os.path.join(str(getattr(lineage_config, "renewal_configs_dir", "") or ""),
                        f"{name}.conf")
    _Member(wave, key, kind, name, conf, auth, lineage_config, settings)
    return auth


# -- recovery ----------------------------------------------------------------------------------

def recover(config: Any, budget: Optional[float] = None) -> int:
    """Remove the records an interrupted run left behind, with each lineage's own plugin.
    Returns how many were removed; the ones that could not be stay journaled."""
    path = journal_path(config)
    if not os.path.exists(path):
        return 0
    return _journal(path).recover_dns(lambda entries: _remove_entries(config, entries))


def _remove_entries(config: Any, entries: list[dict[str, Any]]) -> list[str]:
    # One plugin object per plugin and settings, as in the run that created them.
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        marker = json.dumps([entry.get("plugin"), entry.get("settings")], sort_keys=True,
                            default=str)
        groups.setdefault(marker, []).append(entry)
    removed: list[str] = []
    for group in groups.values():
        first = group[0]
        plugin = str(first.get("plugin") or "")
        try:
            cfg = _config_for(config, str(first.get("conf") or ""),
                              dict(first.get("settings") or {}))
            if plugin == MANUAL:
                removed += _run_cleanup_hook(cfg, group)
            else:
                removed += _dns_cleanup(cfg, plugin, group)
        except Exception as exc:  # noqa: BLE001  (kept for the next run)
            logger.warning("certbot-batch: could not remove %d %s record(s) left by an "
                           "interrupted run (%s); the next certbot run tries again",
                           len(group), plugin, exc)
            logger.debug("certbot-batch: recovery of %s", plugin, exc_info=True)
    return removed


def _config_for(config: Any, conf: str, settings: dict[str, Any]) -> Any:
    """The config of the lineage that created the records: its renewal conf, then the
    settings the interrupted run actually used (command-line overrides included)."""
    cfg = copy.deepcopy(config)
    if conf and os.path.exists(conf):
        try:
            _certbot.reconstitute(cfg, conf)
        except Exception:  # noqa: BLE001  (the journaled settings are enough)
            logger.debug("certbot-batch: could not load %s", conf, exc_info=True)
    for key, value in settings.items():
        setattr(cfg, key, value)
    return cfg


def _dns_cleanup(cfg: Any, plugin: str, entries: list[dict[str, Any]]) -> list[str]:
    cls = plugin_class(plugin)
    if cls is None or not issubclass(cls, dns_common.DNSAuthenticator):
        raise errors.PluginError(f"the DNS plugin {plugin} is not installed")
    auth = cls(cfg, plugin)
    auth._setup_credentials()
    removed = []
    for i, entry in enumerate(entries):
        try:
            auth._cleanup(str(entry["domain"]), str(entry["validation_name"]),
                          str(entry["validation"]))
            removed.append(str(entry["id"]))
        except Exception as exc:  # noqa: BLE001  (this one stays journaled)
            logger.warning("certbot-batch: could not remove the TXT record %s (lineage %s) "
                           "left by an interrupted run: %s", entry.get("validation_name"),
                           entry.get("lineage"), exc)
            if not removed and len(entries) > i + 1:
                # Not one removed yet: the server is probably unreachable, and every record
                # would cost the plugin's network timeout to this certbot command, whatever
                # it is. The rest stay journaled for the next run.
                logger.warning("certbot-batch: %d more %s record(s) left for the next "
                               "certbot run", len(entries) - i - 1, plugin)
                break
    if removed:
        logger.warning("certbot-batch: removed %d TXT record(s) left behind by an interrupted "
                       "run (%s)", len(removed), plugin)
    return removed


def _run_cleanup_hook(cfg: Any, entries: list[dict[str, Any]]) -> list[str]:
    """certbot's manual cleanup hook, with the variables certbot gives it (the auth hook's
    output is unknown here: empty)."""
    from certbot.compat import misc

    hook = getattr(cfg, "manual_cleanup_hook", None)
    if not isinstance(hook, str) or not hook.strip():
        return [str(e["id"]) for e in entries]  # no cleanup hook: nothing to undo
    removed = []
    for entry in entries:
        domain = str(entry["domain"])
        env = dict(os.environ, CERTBOT_DOMAIN=domain, CERTBOT_IDENTIFIER=domain,
                   CERTBOT_VALIDATION=str(entry["validation"]), CERTBOT_ALL_DOMAINS=domain,
                   CERTBOT_ALL_IDENTIFIERS=domain, CERTBOT_REMAINING_CHALLENGES="0",
                   CERTBOT_AUTH_OUTPUT="")
        code, err, _ = misc.execute_command_status("manual-cleanup-hook", hook, env=env)
        if code == 0:
            removed.append(str(entry["id"]))
        else:
            logger.warning("certbot-batch: the manual cleanup hook for %s (left by an "
                           "interrupted run) exited %d: %s", domain, code, err.strip())
    return removed
