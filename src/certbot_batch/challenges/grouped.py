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

One lineage per validation name at a time: a lineage whose validation name another lineage
of the open round has (``x.test`` and ``*.x.test`` in two lineages) goes to a later round of
its group, which performs only once every earlier round with that name is validated and
cleaned up (many DNS APIs and hooks *set* a name's records: one lineage's would replace the
other's). Earlier rounds never wait for later ones, and the later round's lineages are past
the wave's barrier, waiting on their round only.

Failures stay per lineage: when a group's ``perform()`` fails (a wrong TSIG key, a zone the
server does not serve), its records are removed at once and each lineage of the group
tries again on its own (its own ``perform()``, concurrently), so only the lineages that
really cannot be validated fail, each with its own error. No validation is ever retried at
the CA: a lineage whose records could not be created never answers its challenges.

Crash safety: every record is written to a journal (``WORK_DIR/certbot-batch/dns.journal``,
fsynced: renewal conf, plugin, domain, validation name and value, the plugin's settings, the
time) before the plugin creates it, and marked removed once its cleanup succeeded (or once
the run's cleanup tried a record that was never created); for manual, what each auth hook
ran with and printed is added as soon as it returned. A run killed in between leaves the
journal behind; the next certbot command (any: ``recovery.py``) rebuilds the plugin from the
lineage's renewal conf and the journaled settings and calls the plugin's own cleanup (for
manual: runs the cleanup hook with the auth hook's variables, as certbot would), for at
most a few seconds outside ``renew``; entries that fail for :data:`EXPIRY_SECONDS` are given
up with an error. Records still up when a stopping run exits (workers given up after the
grace period) are removed at interpreter exit.

certbot's manual plugin sets ``os.environ`` for its hooks (process-wide): manual groups run
one at a time under one lock, and the ``CERTBOT_*`` variables are put back afterwards.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Iterable, Iterator, Optional

from certbot import errors
from certbot.plugins import dns_common

from certbot_batch import _certbot, paths, run
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

#: How long recovery keeps trying to remove a record an interrupted run left, counted from
#: when it was journaled; then it is given up with an error naming it. A week is 14 runs of
#: certbot's twice-daily timer, each of which said it could not be removed, and the value
#: answered a challenge whose authorization is long gone (pending ones live 7 days at Let's
#: Encrypt): what is left is for the admin.
EXPIRY_SECONDS = 7 * 24 * 3600.0


def journal_path(config: Any) -> str:
    return os.path.join(paths.state_dir(config), JOURNAL_NAME)


def journal_paths(config: Any) -> list[str]:
    """Where the DNS journal is written (the state directory, else the mirror directory
    in certbot's config directory: durable.py); recovery reads both."""
    return paths.record_paths(config, JOURNAL_NAME)


# -- which authenticators are grouped ---------------------------------------------------------

def plugin_class(name: str) -> Optional[type]:
    """The class of the certbot plugin registered as ``name`` (public entry points, as
    certbot finds them), or None."""
    cache = run.PROCESS.plugin_classes
    with run.PROCESS.lock:
        if name in cache:
            return cache[name]
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
    with run.PROCESS.lock:
        cache[name] = found
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


def _validation_name(achall: Any) -> str:
    try:
        return str(achall.validation_domain_name(_identifier(achall)))
    except AttributeError:  # manual http-01
        return ""


# -- manual: os.environ is process-wide --------------------------------------------------------

@contextlib.contextmanager
def _manual_environment(timeout: Optional[float] = None) -> Iterator[bool]:
    """certbot's manual plugin passes the hooks' variables through ``os.environ``: one
    manual perform()/cleanup() at a time, and the CERTBOT_* variables as they were after."""
    lock = run.PROCESS.environ_lock
    acquired = lock.acquire(timeout=-1 if timeout is None else timeout)
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
        lock.release()


# -- the journal of records --------------------------------------------------------------------

def _journal(where: list[str]) -> Journal:
    """One Journal object per journal in this process (its lock orders every write)."""
    key = tuple(where)
    journals = run.PROCESS.dns_journals
    with run.PROCESS.lock:
        if key not in journals:
            journals[key] = Journal(list(where))
        return journals[key]


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
        out: dict[str, Any] = {
            "id": self.id, "lineage": self.lineage, "conf": self.conf, "plugin": self.plugin,
            "domain": self.domain, "validation_name": self.validation_name,
            "validation": self.validation, "settings": _jsonable(self.settings)}
        if self.plugin == MANUAL:
            # An "env" update follows once its auth hook returned: without one, the hook
            # never finished (recovery tries its cleanup hook once, then forgets it).
            out["env_journaled"] = True
        return out


# -- members, rounds, waves --------------------------------------------------------------------

class _Member:
    """One lineage's authenticator in a wave. Its perform()/cleanup() are replaced on the
    plugin object (so certbot still sees its own plugin: name, auth_hint, isinstance ...);
    the plugin's original methods are kept for the round that runs them."""

    def __init__(self, wave: DnsWave, key: tuple[Any, ...], kind: str, name: str, conf: str,
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
        #: (manual) the records whose auth hooks this plugin object runs, by id(achall)
        self.hooked: dict[int, _Record] = {}
        #: failed removals of existing records in a row, in the current cleanup
        self.cleanup_failures = 0
        #: dns_common's own perform()/cleanup(), which create/remove each record through
        #: _perform/_cleanup: then each record is followed; else all count as created and
        #: as removed once cleanup() returned.
        self.per_record = kind == "dns" and _certbot.is_dns_common_flow(auth)
        if self.per_record:
            self._instrument(auth)
        if kind == "manual":
            _certbot.observe_manual_env(auth, self._auth_hook_ran)
        auth.perform = self.perform
        auth.cleanup = self.cleanup

    def _auth_hook_ran(self, achall: Any, env: dict[str, str]) -> None:
        """certbot's manual plugin has just kept what a challenge's auth hook ran with and
        printed: journaled, so that recovery gives the cleanup hook the same variables
        (hooks that delete by the record id their auth hook printed)."""
        record = self.hooked.get(id(achall))
        if record is None:
            return
        try:
            self.wave.journal.dns_update([(record.id, {"env": env})])
        except OSError as exc:  # the record is up; recovery would run its hook without it
            logger.warning("certbot-batch: could not journal the auth hook's output for %s: "
                           "%s", record.domain, exc)

    def _instrument(self, auth: Any) -> None:
        """Follow each record through the plugin's own _perform/_cleanup (the per-record
        methods of dns_common's contract): which records exist, which are gone; and one
        record that cannot be removed never keeps the others of the group in place."""
        orig_perform_record, orig_cleanup_record = _certbot.dns_record_methods(auth)

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

        _certbot.follow_dns_records(auth, _perform, _cleanup)

    def records(self, achalls: list[Any]) -> list[_Record]:
        return [_Record(id=uuid.uuid4().hex, achall=achall, lineage=self.name,
                        conf=self.conf, plugin=self.plugin, domain=_identifier(achall),
                        validation_name=_validation_name(achall),
                        validation=str(achall.validation(achall.account_key)),
                        settings=self.settings)
                for achall in achalls]

    def names_of(self, achalls: list[Any]) -> dict[str, set[str]]:
        """validation name -> {this lineage}, for the round's collision check."""
        return {n: {self.name} for n in map(_validation_name, achalls) if n}

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
            if self.wave.withdraw(rnd, self):
                self.round = None
            raise
        rnd.run(self)
        if rnd.state == _SPLIT:
            return self._solo(achalls)
        return rnd.result_for(self)

    def _solo(self, achalls: list[Any]) -> list[Any]:
        rnd = self.wave.solo(self, achalls)
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
    cleanup()). Never two lineages with a record of the same validation name: many DNS
    APIs (and hooks) *set* a name's TXT records rather than add one, so one lineage's record
    would replace the other's. Such a lineage goes to a later round (``seq``), which
    performs only once every earlier round with that name is finished (``DnsWave.wait_turn``),
    as stock certbot validates one lineage after the other."""

    def __init__(self, wave: DnsWave, key: tuple[Any, ...], kind: str, plugin: str,
                 seq: int = 0) -> None:
        self.wave = wave
        self.key = key
        self.kind = kind
        self.plugin = plugin
        self.seq = seq
        #: validation name -> lineages with a record of that name (changed under the
        #: wave's lock)
        self.names: dict[str, set[str]] = {}
        #: cleaned up, or never to perform: no record of it is up any more
        self.finished = False
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

    def collides(self, names: dict[str, set[str]]) -> bool:
        """Would records of ``names`` be up together with a record of the same name of
        another lineage?"""
        for name, lineages in names.items():
            mine = self.names.get(name)
            if mine and len(mine | lineages) > 1:
                return True
        return False

    def add(self, member: _Member, achalls: list[Any]) -> bool:
        """(wave's lock held) Join the round, unless it has started already."""
        with self.cond:
            if self.state != _OPEN:
                return False
            self.members.append(member)
            self.achalls[id(member)] = achalls
            member.round = self
            for name, lineages in member.names_of(achalls).items():
                self.names.setdefault(name, set()).update(lineages)
            return True

    def withdraw(self, member: _Member) -> bool:
        """(wave's lock held) Take the member's challenges out again, if the round has not
        started yet."""
        with self.cond:
            if self.state != _OPEN:
                return False
            self.members.remove(member)
            self.achalls.pop(id(member), None)
            self.names = {}
            for m in self.members:
                for name, lineages in m.names_of(self.achalls[id(m)]).items():
                    self.names.setdefault(name, set()).update(lineages)
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
            self.wave.wait_turn(self)
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
            if self.wave.stopping.is_set():
                from certbot_batch.challenges import replaces

                raise replaces.Stopped("certbot-batch: the run is stopping; no challenge "
                                       "was set up for this lineage")
            # Journaled (and fsynced) before the plugin creates anything.
            self.wave.journal.record_dns([r.entry() for r in self.records])
            leader.active = {(r.validation_name, r.validation): r for r in self.records}
            leader.hooked = {id(r.achall): r for r in self.records}
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
                finally:
                    if leader.per_record:
                        # Never created (the plugin failed before its _perform, e.g. a
                        # missing credentials file: dns_common's cleanup() then skips
                        # every record) or its creation failed: nothing for the journal.
                        for record in self.records:
                            if not record.attempted or record.perform_failed:
                                record.removed = True
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


class DnsWave:
    """The DNS groups of one wave (kept in the run model's Wave: ``wave.dns``)."""

    def __init__(self, stopping: threading.Event, batch: ChallengeBatch,
                 journal: Journal) -> None:
        self.stopping = stopping
        self.batch = batch
        self.journal = journal
        #: guards the rounds' membership and names; notified when a round finishes
        self.cond = threading.Condition()
        #: group key -> its open rounds, earliest first
        self.open: dict[tuple[Any, ...], list[_Round]] = {}
        #: every round not finished yet, of any group, in creation order
        self.rounds: list[_Round] = []
        self._seq = itertools.count()

    def _new_round(self, member: _Member) -> _Round:
        rnd = _Round(self, member.key, member.kind, member.plugin, next(self._seq))
        self.rounds.append(rnd)
        return rnd

    def join(self, member: _Member, achalls: list[Any]) -> _Round:
        """The group's first open round where none of the member's validation names is
        taken by another lineage; a new (later) round if there is none."""
        names = member.names_of(achalls)
        with self.cond:
            chain = self.open.setdefault(member.key, [])
            for rnd in chain:
                if rnd.collides(names):
                    logger.info("certbot-batch: %s: %s goes to a later round (a record of "
                                "the same name as another lineage's: %s)", member.plugin,
                                member.name, ", ".join(sorted(set(names) & set(rnd.names))))
                    continue
                if rnd.add(member, achalls):
                    return rnd
            rnd = self._new_round(member)
            chain.append(rnd)
            rnd.add(member, achalls)
            return rnd

    def solo(self, member: _Member, achalls: list[Any]) -> _Round:
        """A round of the member alone (a late lineage, or the retry of a failed group)."""
        with self.cond:
            rnd = self._new_round(member)
            rnd.add(member, achalls)
            return rnd

    def withdraw(self, rnd: _Round, member: _Member) -> bool:
        with self.cond:
            if not rnd.withdraw(member):
                return False
            if not rnd.members:
                self._finish(rnd)
            self.cond.notify_all()  # fewer names in the round: a later one may go
            return True

    def sealed(self, rnd: _Round) -> None:
        with self.cond:
            chain = self.open.get(rnd.key, [])
            if rnd in chain:
                chain.remove(rnd)
        with run.PROCESS.lock:
            run.PROCESS.live_rounds.add(rnd)

    def wait_turn(self, rnd: _Round) -> None:
        """Wait until no earlier round has a record of one of ``rnd``'s validation names
        for another lineage up (or about to be): the earlier round's lineages are validated
        and its records removed. Earlier rounds never wait for later ones, so this ends;
        a stop signal ends it at once (the round then sets nothing up)."""
        with self.cond:
            said = False
            while not self.stopping.is_set():
                earlier = [q for q in self.rounds if q.seq < rnd.seq and q.collides(rnd.names)]
                if not earlier:
                    return
                if not said:
                    said = True
                    logger.info("certbot-batch: %s: %d lineage(s) wait for %d earlier "
                                "round(s) with records of the same name(s)", rnd.plugin,
                                len(rnd.members), len(earlier))
                # Bounded: the stop signal is an Event, not a notification of this lock.
                self.cond.wait(1.0)

    def _finish(self, rnd: _Round) -> None:
        rnd.finished = True
        if rnd in self.rounds:
            self.rounds.remove(rnd)
        chain = self.open.get(rnd.key, [])
        if rnd in chain:
            chain.remove(rnd)

    def cleaned(self, rnd: _Round) -> None:
        with run.PROCESS.lock:
            run.PROCESS.live_rounds.discard(rnd)
        with self.cond:
            self._finish(rnd)
            self.cond.notify_all()


def cleanup_at_exit() -> None:
    """At interpreter exit: the records of rounds whose workers were given up (a stopping
    run) are removed (``engine.py`` registers this from the main thread)."""
    with run.PROCESS.lock:
        rounds = list(run.PROCESS.live_rounds)
    for rnd in rounds:
        try:
            if rnd.emergency_cleanup():
                logger.warning("certbot-batch: %s: removed the %d challenge(s) of %d "
                               "lineage(s) whose renewal was given up (the run stopped)",
                               rnd.plugin, len(rnd.records), len(rnd.members))
        except Exception:  # noqa: BLE001  (the journal lets the next run finish the job)
            logger.debug("certbot-batch: cleanup at exit failed", exc_info=True)


def join_wave(auth: Any, lineage_config: Any, wave: run.Wave, name: str,
              stopping: threading.Event, config: Any) -> Any:
    """Make a DNS plugin's (or manual's) perform() and cleanup() join its group in
    ``wave`` (the session's ``authenticator`` hook); any other authenticator is returned
    as it is. ``config``: the run's config (where the journal is)."""
    kind = _kind(auth, lineage_config)
    if kind is None:
        return auth
    settings = plugin_settings(auth, lineage_config)
    key = (str(getattr(auth, "name", "")), kind,
           tuple(sorted((k, repr(v)) for k, v in settings.items())))
    journal = _journal(journal_paths(config))
    with run.PROCESS.lock:
        if wave.dns is None:
            wave.dns = DnsWave(stopping, wave.batch, journal)
        dns_wave = wave.dns
    conf = os.path.join(str(getattr(lineage_config, "renewal_configs_dir", "") or ""),
                        f"{name}.conf")
    _Member(dns_wave, key, kind, name, conf, auth, lineage_config, settings)
    return auth


# -- recovery ----------------------------------------------------------------------------------

def recover(config: Any, *, budget: Optional[float] = None) -> int:
    """Remove the records an interrupted run left behind, with each lineage's own plugin
    (manual: its cleanup hook, with the variables its auth hook ran with and printed).
    Returns how many were removed; the others stay journaled for the next run, unless they
    have failed for :data:`EXPIRY_SECONDS` (then they are given up with an error each).

    ``budget`` (seconds): the removals run in a daemon thread and this returns once the
    budget is spent, saying in one line what is left to the next ``certbot renew`` (a DNS
    server that does not answer costs each removal the plugin's whole network timeout: no
    ``certbot certificates`` should pay that). None: until done, each group (plugin and
    settings) stopping at its first failure."""
    where = journal_paths(config)
    if not any(os.path.exists(p) for p in where):
        return 0
    journal = _journal(where)
    entries = journal.dns_records()
    if not entries:
        journal.dns_removed([])  # only removed records in it: the file goes
        return 0
    now = time.time()
    undated = [e for e in entries if not isinstance(e.get("ts"), (int, float))]
    if undated:
        # Lines of a version that wrote no time: their first recovery counts as their
        # journaling.
        for entry in undated:
            entry["ts"] = now
        journal.dns_update([(str(e["id"]), {"ts": now}) for e in undated])
    # The configs are built here, in the caller's thread (certbot's renewal-conf parsing
    # touches process-wide state); the worker only talks to the DNS servers and hooks.
    job = _Recovery(journal, _leftover_groups(config, entries), now)
    if budget is None:
        job.run()
    else:
        worker = threading.Thread(target=job.run, name="certbot-batch-dns-recovery",
                                  daemon=True)
        worker.start()
        worker.join(max(0.0, budget))
    job.stop()
    job.report(budget)
    return job.removed_count


def outstanding(config: Any) -> list[dict[str, Any]]:
    """The records interrupted runs left that are still journaled, for ``certbot-batch
    status``: plugin, lineage, domain, validation_name, validation, since (epoch seconds;
    None for a line of a version that wrote no time). ``config``: anything with a
    ``work_dir``. Read-only; raises OSError when the journal cannot be read."""
    out = []
    for entry in Journal(journal_paths(config)).dns_records():
        ts = entry.get("ts")
        out.append({"plugin": str(entry.get("plugin") or ""),
                    "lineage": str(entry.get("lineage") or ""),
                    "domain": str(entry.get("domain") or ""),
                    "validation_name": str(entry.get("validation_name") or ""),
                    "validation": str(entry.get("validation") or ""),
                    "since": float(ts) if isinstance(ts, (int, float)) else None})
    return out


@dataclasses.dataclass
class _Leftovers:
    """The journaled records of one plugin with the same settings: one plugin object (or
    cleanup hook) removes them, as in the run that created them."""
    plugin: str
    cfg: Any
    entries: list[dict[str, Any]]
    error: Optional[Exception] = None


def _leftover_groups(config: Any, entries: list[dict[str, Any]]) -> list[_Leftovers]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        marker = json.dumps([entry.get("plugin"), entry.get("settings")], sort_keys=True,
                            default=str)
        groups.setdefault(marker, []).append(entry)
    out = []
    for group in groups.values():
        first = group[0]
        plugin = str(first.get("plugin") or "")
        try:
            settings = first.get("settings") or {}
            cfg = _config_for(config, str(first.get("conf") or ""),
                              dict(settings) if isinstance(settings, dict) else {})
            out.append(_Leftovers(plugin, cfg, group))
        except Exception as exc:  # noqa: BLE001  (counted as a failed removal)
            logger.debug("certbot-batch: recovery of %s", plugin, exc_info=True)
            out.append(_Leftovers(plugin, None, group, exc))
    return out


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


def _describe(entry: dict[str, Any]) -> str:
    """How an error names a record, so that it can be found and removed by hand."""
    plugin = str(entry.get("plugin") or "")
    lineage = entry.get("lineage") or "?"
    if plugin == MANUAL:
        what = f"the manual challenge of {entry.get('domain')}"
        if entry.get("validation_name"):
            what += f" (TXT record {entry.get('validation_name')})"
    else:
        what = f"the TXT record {entry.get('validation_name')}"
    return f"{what} = \"{entry.get('validation')}\" (lineage {lineage}, plugin {plugin})"


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "?"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")


def _by_plugin(counts: collections.Counter[str]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{plugin}: {n}" for plugin, n in sorted(counts.items()))


class _Recovery:
    """The removals of one recovery (in the caller's thread, or a worker given a budget).

    Once :meth:`stop` has been called the caller has reported: the worker starts nothing
    new and logs nothing more (a removal in flight still journals its result)."""

    def __init__(self, journal: Journal, groups: list[_Leftovers], now: float) -> None:
        self.journal = journal
        self.groups = groups
        self.now = now
        self.lock = threading.Lock()
        self.stopped = False
        #: record ids settled by this recovery (removed, given up, forgotten, failed)
        self.settled: set[str] = set()
        self.removed: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.errors: dict[str, str] = {}
        self.expired = 0
        self.left: collections.Counter[str] = collections.Counter()
        #: (manual) records whose auth hook never returned and whose cleanup hook failed
        self.interrupted: list[str] = []

    @property
    def removed_count(self) -> int:
        return sum(self.removed.values())

    # -- worker -------------------------------------------------------------------------------
    def _log(self, level: int, msg: str, *args: Any) -> bool:
        with self.lock:
            if self.stopped:
                return False
            logger.log(level, msg, *args)
            return True

    def run(self) -> None:
        for group in self.groups:
            if self.stopped:
                return
            try:
                if group.error is not None:
                    raise group.error
                if group.plugin == MANUAL:
                    self._run_cleanup_hooks(group)
                else:
                    self._dns_cleanup(group)
            except Exception as exc:  # noqa: BLE001  (kept for the next run)
                logger.debug("certbot-batch: recovery of %s", group.plugin, exc_info=True)
                self._failed([e for e in group.entries if str(e.get("id")) not in self.settled],
                             exc)

    # The counts only change before stop(): after it, the caller reports them.
    def _removed(self, entry: dict[str, Any]) -> None:
        ident = str(entry.get("id"))
        self.journal.dns_removed([ident])
        with self.lock:
            if not self.stopped:
                self.settled.add(ident)
                self.removed[str(entry.get("plugin") or "")] += 1

    def _forget(self, entries: Iterable[dict[str, Any]]) -> None:
        ids = [str(e.get("id")) for e in entries]
        self.journal.dns_removed(ids)
        with self.lock:
            if not self.stopped:
                self.settled.update(ids)

    def _failed(self, entries: list[dict[str, Any]], exc: BaseException) -> None:
        """These could not be removed (or were not tried after their group's first
        failure): kept for the next run, unless they have failed for too long."""
        expired = [e for e in entries
                   if isinstance(e.get("ts"), (int, float))
                   and self.now - float(e["ts"]) >= EXPIRY_SECONDS]
        for entry in expired:
            if not self._log(logging.ERROR, "certbot-batch: giving up on %s, left by an "
                             "interrupted run on %s: it could not be removed for %d days "
                             "(%s). Remove it by hand.", _describe(entry), _when(entry["ts"]),
                             EXPIRY_SECONDS // 86400, exc):
                return
            self._forget([entry])
            with self.lock:
                self.expired += 0 if self.stopped else 1
        gone = {id(e) for e in expired}
        kept = [e for e in entries if id(e) not in gone]
        with self.lock:
            if self.stopped:
                return
            for entry in kept:
                self.settled.add(str(entry.get("id")))
                plugin = str(entry.get("plugin") or "")
                self.failed[plugin] += 1
                self.errors.setdefault(plugin, str(exc).strip() or type(exc).__name__)

    def _dns_cleanup(self, group: _Leftovers) -> None:
        cls = plugin_class(group.plugin)
        if cls is None or not issubclass(cls, dns_common.DNSAuthenticator):
            raise errors.PluginError(f"the DNS plugin {group.plugin} is not installed")
        auth = cls(group.cfg, group.plugin)
        _certbot.dns_setup_credentials(auth)
        for i, entry in enumerate(group.entries):
            if not self._log(logging.INFO, "certbot-batch: removing the TXT record %s "
                             "(lineage %s, %s) left by an interrupted run",
                             entry.get("validation_name"), entry.get("lineage"), group.plugin):
                return
            try:
                _certbot.dns_remove_record(auth, str(entry.get("domain") or ""),
                                           str(entry.get("validation_name") or ""),
                                           str(entry.get("validation") or ""))
            except Exception as exc:  # noqa: BLE001  (this one and the rest stay journaled)
                self._log(logging.INFO, "certbot-batch: could not remove the TXT record %s: "
                          "%s", entry.get("validation_name"), exc)
                # Probably the server: every further record would cost the plugin's
                # network timeout to this certbot command, whatever it is.
                self._failed(group.entries[i:], exc)
                return
            self._removed(entry)

    def _run_cleanup_hooks(self, group: _Leftovers) -> None:
        """certbot's manual cleanup hook, with the variables certbot gives it."""
        from certbot.compat import misc

        hook = getattr(group.cfg, "manual_cleanup_hook", None)
        if not isinstance(hook, str) or not hook.strip():
            self._log(logging.INFO, "certbot-batch: no manual cleanup hook: nothing to undo "
                      "for %d challenge(s) left by an interrupted run", len(group.entries))
            self._forget(group.entries)
            return
        for entry in group.entries:
            domain = str(entry.get("domain") or "")
            if not self._log(logging.INFO, "certbot-batch: running the manual cleanup hook "
                             "for %s (left by an interrupted run)", domain):
                return
            code, err, _ = misc.execute_command_status("manual-cleanup-hook", hook,
                                                       env=_hook_env(entry))
            if code == 0:
                self._removed(entry)
            elif entry.get("env_journaled") and not isinstance(entry.get("env"), dict):
                # Its auth hook never returned (the run was killed during it), so what it
                # printed is unknown: one try without it, then said once and forgotten.
                self._log(logging.INFO, "certbot-batch: the manual cleanup hook for %s "
                          "exited %d; its auth hook had not returned when the run was "
                          "interrupted: forgotten", domain, code)
                self._forget([entry])
                with self.lock:
                    if not self.stopped:
                        self.interrupted.append(str(entry.get("validation_name") or domain))
            else:
                self._log(logging.INFO, "certbot-batch: the manual cleanup hook for %s "
                          "exited %d: %s", domain, code, err.strip())
                detail = " ".join(err.split())[:200]
                self._failed([entry], errors.PluginError(
                    f"the cleanup hook exited {code}" + (f": {detail}" if detail else "")))

    # -- caller -------------------------------------------------------------------------------
    def stop(self) -> None:
        """No more work or lines from the worker; what is not settled yet is left."""
        with self.lock:
            self.stopped = True
            for group in self.groups:
                for entry in group.entries:
                    if str(entry.get("id")) not in self.settled:
                        self.left[str(entry.get("plugin") or "")] += 1

    def report(self, budget: Optional[float]) -> None:
        """One warning line: what recovery did, could not do, and left."""
        parts = []
        if self.removed:
            parts.append(f"removed {self.removed_count} TXT record(s) left by an interrupted "
                         f"run ({_by_plugin(self.removed)})")
        if self.failed:
            what = "" if parts else " TXT record(s) left by an interrupted run"
            detail = "; ".join(f"{p}: {e}" for p, e in sorted(self.errors.items()))
            parts.append(f"could not remove {sum(self.failed.values())}{what} ({detail}); "
                         "the next certbot run tries again")
        if self.interrupted:
            parts.append(f"the cleanup hook failed for {len(self.interrupted)} challenge(s) "
                         "whose auth hook had not returned (its output is unknown): "
                         f"{', '.join(self.interrupted[:5])}"
                         f"{' ...' if len(self.interrupted) > 5 else ''}; remove such "
                         "records by hand if they exist")
        if self.expired:
            parts.append(f"gave up on {self.expired} that could not be removed for "
                         f"{EXPIRY_SECONDS // 86400:.0f} days (see the errors above)")
        if self.left:
            what = ("the remaining {n} TXT record(s)" if parts else
                    "{n} TXT record(s) left by an interrupted run")
            parts.append(what.format(n=sum(self.left.values()))
                         + f" ({_by_plugin(self.left)}) are left to the next `certbot renew`"
                         + (f" (recovery stops after {budget:g} s in other commands)"
                            if budget is not None else ""))
        if parts:
            logger.warning("certbot-batch: %s", "; ".join(parts))


def _hook_env(entry: dict[str, Any]) -> dict[str, str]:
    """The cleanup hook's environment: the variables its auth hook ran with and printed
    (journaled once it returned), as certbot passes them; for a line without them, the
    ones certbot would set (the auth hook's output then unknown: empty)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTBOT_")}
    journaled = entry.get("env")
    if isinstance(journaled, dict):
        env.update({str(k): str(v) for k, v in journaled.items()})
        return env
    domain = str(entry.get("domain") or "")
    env.update(CERTBOT_DOMAIN=domain, CERTBOT_IDENTIFIER=domain,
               CERTBOT_VALIDATION=str(entry.get("validation") or ""),
               CERTBOT_ALL_DOMAINS=domain, CERTBOT_ALL_IDENTIFIERS=domain,
               CERTBOT_REMAINING_CHALLENGES="0", CERTBOT_AUTH_OUTPUT="")
    return env
