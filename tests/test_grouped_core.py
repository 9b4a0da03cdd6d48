"""In-process tests of grouped dns-01 (challenges/grouped.py): how a wave's lineages are
split into rounds by validation name, and recovery's budget. Fake DNS plugins (real
subclasses of certbot's ``dns_common.DNSAuthenticator``, so certbot's own perform() and
cleanup() run) over a fake zone; a real :class:`ChallengeBatch` as the wave's barrier; one
thread per lineage doing what certbot's auth handler does (perform, check the records as the
CA would, cleanup) and what the wave's worker does after (depart). No sleeps: threads meet
through the barrier, events and a log handler."""
from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import pytest
from certbot import errors
from certbot.display import util as display_util
from certbot.plugins import dns_common

from certbot_batch.challenges import grouped
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.journal import Journal

JOIN_TIMEOUT = 60.0


class Zone:
    """The DNS provider's zone. ``replace``: its API *sets* a name's TXT records (deletes the
    others), as many do; else it adds one. ``overlaps`` lists every time a record was added
    while a record of the same name of another lineage was meant to be up."""

    def __init__(self, replace: bool) -> None:
        self.replace = replace
        self.lock = threading.Lock()
        self.txt: dict[str, list[str]] = {}
        #: value -> lineage (the test registers every challenge's value)
        self.owner: dict[str, str] = {}
        #: name -> lineages whose record of that name should be up (added, not deleted)
        self.meant: dict[str, set[str]] = {}
        self.overlaps: list[tuple[str, set[str]]] = []
        #: one list per perform() call of a plugin object: the lineages of its records
        self.performs: list[list[str]] = []
        self.events: list[tuple[str, str]] = []
        self.added = threading.Event()
        #: set when a second perform() starts
        self.second_perform = threading.Event()

    def add(self, name: str, value: str) -> None:
        with self.lock:
            lineage = self.owner[value]
            meant = self.meant.setdefault(name, set())
            if meant - {lineage}:
                self.overlaps.append((name, meant | {lineage}))
            meant.add(lineage)
            self.txt[name] = ([] if self.replace else self.txt.get(name, [])) + [value]
            self.events.append(("add", lineage))
            self.added.set()

    def delete(self, name: str, value: str) -> None:
        with self.lock:
            lineage = self.owner[value]
            if value in self.txt.get(name, []):
                self.txt[name].remove(value)
            self.meant.get(name, set()).discard(lineage)
            self.events.append(("delete", lineage))

    def has(self, name: str, value: str) -> bool:
        with self.lock:
            return value in self.txt.get(name, [])

    def empty(self) -> bool:
        with self.lock:
            return not any(self.txt.values())


def fake_plugin(zone: Zone, *, setup_error: Optional[str] = None,
                refused: Callable[[str], bool] = lambda value: False) -> type:
    """A DNS plugin over ``zone`` (certbot's own perform()/cleanup() drive it)."""

    class FakeDNS(dns_common.DNSAuthenticator):
        description = "fake DNS"

        def more_info(self) -> str:
            return "fake"

        def _setup_credentials(self) -> None:  # once per perform() call
            if setup_error:
                raise errors.PluginError(setup_error)
            self.current: list[str] = []
            with zone.lock:
                zone.performs.append(self.current)
                if len(zone.performs) > 1:
                    zone.second_perform.set()

        def _perform(self, domain: str, validation_name: str, validation: str) -> None:
            if refused(validation):
                raise errors.PluginError("Received response from server: REFUSED")
            self.current.append(zone.owner[validation])
            zone.add(validation_name, validation)

        def _cleanup(self, domain: str, validation_name: str, validation: str) -> None:
            zone.delete(validation_name, validation)

    return FakeDNS


class Achall:
    """What certbot's auth handler hands the plugin: one dns-01 challenge (the identifier of
    a wildcard's authorization is its base name, as in ACME)."""

    def __init__(self, zone: Zone, lineage: str, name: str) -> None:
        self.domain = name[2:] if name.startswith("*.") else name
        self.identifier = SimpleNamespace(value=self.domain)
        self.account_key = "key"
        self.value = f"{lineage}-{uuid.uuid4().hex[:8]}"
        zone.owner[self.value] = lineage

    def validation_domain_name(self, domain: str) -> str:
        return f"_acme-challenge.{domain}"

    def validation(self, account_key: Any) -> str:
        return self.value

    def response(self, account_key: Any) -> tuple[str, str]:
        return ("response", self.value)


class Wave:
    """A wave of lineages, each with its own plugin object (as certbot builds them), joined
    to its group by ``grouped._Member``; run() plays certbot's part for each lineage in a
    thread of its own."""

    def __init__(self, tmp_path: Path, zone: Zone, lineages: dict[str, list[str]],
                 groups: Optional[dict[str, str]] = None,
                 plugins: Optional[dict[str, type]] = None,
                 hold: Optional[dict[str, threading.Event]] = None) -> None:
        self.zone = zone
        self.stopping = threading.Event()
        self.batch = ChallengeBatch(list(lineages), NoFiles(),  # type: ignore[arg-type]
                                    wait_timeout=JOIN_TIMEOUT)
        self.journal = Journal(str(tmp_path / "dns.journal"))
        self.wave = grouped.DnsWave(self.stopping, self.batch, self.journal)
        self.achalls = {n: [Achall(zone, n, name) for name in names]
                        for n, names in lineages.items()}
        self.results: dict[str, Any] = {}
        #: lineage -> an event its "CA" waits for before validating (and cleaning up)
        self.hold = hold or {}
        self.auths = {}
        for name in lineages:
            group = (groups or {}).get(name, "g")
            cls = (plugins or {}).get(name) or fake_plugin(zone)
            config = SimpleNamespace(fake_propagation_seconds=0)
            auth = cls(config, "fake")
            settings = {"fake_credentials": f"/etc/{group}.ini"}
            key = ("fake", "dns", (("fake_credentials", group),))
            grouped._Member(self.wave, key, "dns", name, f"/renewal/{name}.conf", auth, config,
                            settings)
            self.auths[name] = auth

    def _lineage(self, name: str) -> None:
        auth, achalls = self.auths[name], self.achalls[name]
        try:
            try:
                auth.perform(achalls)
                if name in self.hold:
                    assert self.hold[name].wait(JOIN_TIMEOUT)
                # The CA looks the records up: all of this lineage's must be there.
                missing = [a.value for a in achalls
                           if not self.zone.has(a.validation_domain_name(a.domain), a.value)]
                self.results[name] = "valid" if not missing else f"not found: {missing}"
            finally:
                auth.cleanup(achalls)  # certbot's ExitHandler, whatever perform() did
        except Exception as exc:  # noqa: BLE001  (the lineage's result)
            self.results[name] = exc
        finally:
            self.batch.depart(name)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._lineage, args=(n,), daemon=True)
                   for n in self.achalls]
        for thread in threads:
            thread.start()
        return threads

    def run(self) -> dict[str, Any]:
        self.join(self.start())
        return self.results

    def join(self, threads: list[threading.Thread]) -> None:
        for thread in threads:
            thread.join(JOIN_TIMEOUT)
        assert not any(t.is_alive() for t in threads), "a lineage never finished (deadlock)"
        self.batch.finish()


class NoFiles:
    """The wave's challenge-file provisioner: DNS lineages bring no file."""

    def provision(self, items: list[Any]) -> list[Any]:
        assert not items
        return []

    def cleanup(self) -> None:
        pass


@pytest.fixture(autouse=True)
def quiet_display(monkeypatch: pytest.MonkeyPatch) -> None:
    """certbot's notifications need certbot's display, which only a certbot command sets."""
    monkeypatch.setattr(display_util, "notify", lambda *a, **k: None)
    monkeypatch.setattr(grouped._certbot, "notify", lambda message: None)


class LogEvent(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@pytest.fixture
def log_event() -> Iterator[Callable[[str], threading.Event]]:
    handlers: list[LogEvent] = []
    logger = logging.getLogger(grouped.__name__)
    level = logger.level

    def watch(text: str) -> threading.Event:
        handler = LogEvent(text)
        handlers.append(handler)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        return handler.event

    yield watch
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(level)


def pairs(count: int) -> dict[str, list[str]]:
    """``count`` apex/wildcard pairs in two lineages each (certbot's names)."""
    out = {}
    for i in range(count):
        out[f"x{i}.test"] = [f"x{i}.test"]
        out[f"x{i}.test-0001"] = [f"*.x{i}.test"]
    return out


# -- rounds ----------------------------------------------------------------------------------------

def test_colliding_lineages_go_to_a_later_round(tmp_path: Path) -> None:
    """3 apex/wildcard pairs in 6 lineages, a provider that replaces a name's records: two
    performs of 3 lineages (one of each pair in each), the second only once the first's
    records are removed; every lineage finds its records."""
    zone = Zone(replace=True)
    wave = Wave(tmp_path, zone, pairs(3))
    results = wave.run()
    assert results == {name: "valid" for name in pairs(3)}, results
    assert zone.overlaps == []
    assert len(zone.performs) == 2, zone.performs
    first, second = (sorted(p) for p in zone.performs)
    assert len(first) == len(second) == 3
    for i in range(3):
        pair = {f"x{i}.test", f"x{i}.test-0001"}
        assert len(pair & set(first)) == len(pair & set(second)) == 1, zone.performs
    # every record of the first round was deleted before the second round added one
    events = zone.events
    last_delete_first = max(i for i, (what, n) in enumerate(events)
                            if what == "delete" and n in first)
    first_add_second = min(i for i, (what, n) in enumerate(events)
                           if what == "add" and n in second)
    assert last_delete_first < first_add_second, events
    assert zone.empty()
    assert not Path(wave.journal.path).exists()


def test_same_name_twice_in_one_lineage_stays_one_round(tmp_path: Path) -> None:
    """x.test and *.x.test in ONE lineage: as stock, one perform with both (and the other
    lineages of the group), no later round."""
    zone = Zone(replace=False)
    wave = Wave(tmp_path, zone, {"x.test": ["x.test", "*.x.test"], "y.test": ["y.test"],
                                 "z.test": ["z.test", "*.z.test"]})
    results = wave.run()
    assert results == {"x.test": "valid", "y.test": "valid", "z.test": "valid"}, results
    assert [sorted(p) for p in zone.performs] == [
        ["x.test", "x.test", "y.test", "z.test", "z.test"]]
    assert zone.overlaps == []
    assert zone.empty()


def test_non_colliding_lineages_keep_one_perform(tmp_path: Path) -> None:
    zone = Zone(replace=False)
    names = {f"n{i}.test": [f"n{i}.test", f"*.n{i}.test"] for i in range(8)}
    results = Wave(tmp_path, zone, names).run()
    assert set(results.values()) == {"valid"}, results
    assert len(zone.performs) == 1 and len(zone.performs[0]) == 16


def test_colliding_lineages_of_different_groups_take_turns(
        tmp_path: Path, log_event: Callable[[str], threading.Event]) -> None:
    """The same name in two groups (other plugin settings: other credentials): the groups
    run concurrently, but the two lineages' records are never up together. (The CA
    validates once the later group waits for the earlier one, or once the second perform()
    started: whichever comes first.)"""
    zone = Zone(replace=True)
    lineages = {"a.test": ["a.test"], "a.test-0001": ["*.a.test"], "b.test": ["b.test"]}
    either = log_event("wait for 1 earlier round(s)")
    zone.second_perform = either
    wave = Wave(tmp_path, zone, lineages,
                groups={"a.test": "one", "b.test": "one", "a.test-0001": "two"},
                hold={n: either for n in lineages})
    results = wave.run()
    assert results == {n: "valid" for n in lineages}, results
    assert zone.overlaps == []
    assert sorted(sorted(p) for p in zone.performs) == [["a.test", "b.test"],
                                                        ["a.test-0001"]]


def test_failed_group_retries_wait_for_the_later_round(tmp_path: Path) -> None:
    """Round 1 = {one of the pair, c}; its group perform fails (c's record is refused), so
    each of its lineages tries alone: the pair's member that retries alone is after the
    round that has the other member of the pair, and waits for it. c fails with its own
    error; its record was never created, so nothing stays journaled."""
    zone = Zone(replace=True)
    lineages = {"p.test": ["p.test"], "p.test-0001": ["*.p.test"], "c.test": ["c.test"]}
    refusing = fake_plugin(zone, refused=lambda value: zone.owner[value] == "c.test")
    wave = Wave(tmp_path, zone, lineages, plugins={n: refusing for n in lineages})
    results = wave.run()
    assert results["p.test"] == "valid" and results["p.test-0001"] == "valid", results
    assert isinstance(results["c.test"], errors.PluginError), results
    assert "REFUSED" in str(results["c.test"])
    assert zone.overlaps == []
    assert zone.empty()
    assert not Path(wave.journal.path).exists()


def test_records_never_created_are_not_journaled(tmp_path: Path) -> None:
    """The plugin fails before creating anything (credentials file missing): dns_common's
    cleanup() then skips every record, and none may stay in the journal."""
    zone = Zone(replace=False)
    lineages = {"m.test": ["m.test", "*.m.test"], "n.test": ["n.test"]}
    missing = fake_plugin(zone, setup_error="File not found: /etc/missing.ini")
    wave = Wave(tmp_path, zone, lineages, plugins={n: missing for n in lineages})
    results = wave.run()
    assert all(isinstance(r, errors.PluginError) for r in results.values()), results
    assert not Path(wave.journal.path).exists()
    assert grouped.outstanding(SimpleNamespace(work_dir=str(tmp_path),
                                               config_dir=str(tmp_path / "config"))) == []


def test_stop_while_waiting_for_an_earlier_round(
        tmp_path: Path, log_event: Callable[[str], threading.Event]) -> None:
    """A later round waiting for an earlier one's records to go sets nothing up once the run
    is stopping; the earlier round finishes as usual."""
    zone = Zone(replace=True)
    waiting = log_event("wait for 1 earlier round(s)")
    held = {n: threading.Event() for n in ("s.test", "s.test-0001")}
    wave = Wave(tmp_path, zone, {"s.test": ["s.test"], "s.test-0001": ["*.s.test"]},
                hold=held)
    threads = wave.start()
    try:
        assert waiting.wait(JOIN_TIMEOUT)
        assert zone.added.wait(JOIN_TIMEOUT)  # the earlier round's record is up
        wave.stopping.set()
    finally:
        for event in held.values():
            event.set()
    wave.join(threads)
    outcomes = sorted(str(type(r).__name__) if isinstance(r, Exception) else r
                      for r in wave.results.values())
    assert outcomes == ["Stopped", "valid"], wave.results
    assert len(zone.performs) == 1
    assert zone.overlaps == []
    assert zone.empty()
    assert not Path(wave.journal.path).exists()


# -- recovery ------------------------------------------------------------------------------------

def _journal_entries(config: Any, count: int, plugin: str = "fake") -> Journal:
    journal = grouped._journal(grouped.journal_paths(config))
    journal.record_dns([{"id": f"r{i}", "lineage": f"l{i}.test", "conf": "", "plugin": plugin,
                         "domain": f"l{i}.test", "validation_name": f"_acme-challenge.l{i}.test",
                         "validation": f"v{i}", "settings": {}} for i in range(count)])
    return journal


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name == grouped.__name__]


def test_recover_with_a_budget_leaves_a_dead_server_to_renew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A removal that hangs (a DNS server that does not answer): with a budget, recover()
    returns once it is spent, keeps every record and says so in one line."""
    release = threading.Event()
    calls: list[str] = []

    class Hanging(fake_plugin(Zone(replace=False))):  # type: ignore[misc]
        def _setup_credentials(self) -> None:
            pass

        def _cleanup(self, domain: str, validation_name: str, validation: str) -> None:
            calls.append(validation)
            release.wait(JOIN_TIMEOUT)
            raise errors.PluginError("The DNS operation timed out.")

    monkeypatch.setattr(grouped, "plugin_class", lambda name: Hanging)
    config = SimpleNamespace(work_dir=str(tmp_path), config_dir=str(tmp_path / "config"),
                             fake_propagation_seconds=0)
    journal = _journal_entries(config, 3)
    caplog.set_level(logging.INFO, logger=grouped.__name__)
    try:
        assert grouped.recover(config, budget=0.2) == 0
        assert len(journal.dns_records()) == 3
    finally:
        release.set()
    assert _warnings(caplog) == [
        "certbot-batch: 3 TXT record(s) left by an interrupted run (fake) are left to the "
        "next `certbot renew` (recovery stops after 0.2 s in other commands)"]
    assert calls == ["v0"]


def test_recover_without_a_budget_stops_a_group_at_its_first_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    class Refusing(fake_plugin(Zone(replace=False))):  # type: ignore[misc]
        def _setup_credentials(self) -> None:
            pass

        def _cleanup(self, domain: str, validation_name: str, validation: str) -> None:
            calls.append(validation)
            raise errors.PluginError("Received response from server: REFUSED")

    monkeypatch.setattr(grouped, "plugin_class", lambda name: Refusing)
    config = SimpleNamespace(work_dir=str(tmp_path), config_dir=str(tmp_path / "config"),
                             fake_propagation_seconds=0)
    journal = _journal_entries(config, 3)
    caplog.set_level(logging.INFO, logger=grouped.__name__)
    assert grouped.recover(config) == 0
    assert calls == ["v0"]
    assert len(journal.dns_records()) == 3
    assert _warnings(caplog) == [
        "certbot-batch: could not remove 3 TXT record(s) left by an interrupted run (fake: "
        "Received response from server: REFUSED); the next certbot run tries again"]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("removing the TXT record _acme-challenge.l0.test (lineage l0.test, fake)" in m
               for m in infos), infos


# -- more of the core: recovery that works, manual hooks, the session's joining, exit ------------

def test_recover_removes_every_record_and_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zone = Zone(replace=False)
    plugin = fake_plugin(zone)

    class Quiet(plugin):  # type: ignore[misc, valid-type]
        def _setup_credentials(self) -> None:
            pass

    monkeypatch.setattr(grouped, "plugin_class", lambda name: Quiet)
    config = SimpleNamespace(work_dir=str(tmp_path), config_dir=str(tmp_path / "config"),
                             fake_propagation_seconds=0)
    for i in range(3):
        zone.owner[f"v{i}"] = f"l{i}.test"
        zone.add(f"_acme-challenge.l{i}.test", f"v{i}")
    _journal_entries(config, 3)
    assert grouped.recover(config) == 3
    assert zone.empty()
    assert grouped.outstanding(config) == []
    assert not any(Path(p).exists() for p in grouped.journal_paths(config))


def test_manual_recovery_runs_the_cleanup_hook_with_the_auth_hooks_output(
        tmp_path: Path) -> None:
    out = tmp_path / "cleanup.out"
    config = SimpleNamespace(work_dir=str(tmp_path), config_dir=str(tmp_path / "config"),
                             noninteractive_mode=True)
    hook = f'echo "$CERTBOT_DOMAIN $CERTBOT_VALIDATION $CERTBOT_AUTH_OUTPUT" >> {out}'
    journal = grouped._journal(grouped.journal_paths(config))
    journal.record_dns([{"id": "m1", "lineage": "m.test", "conf": "", "plugin": "manual",
                         "domain": "m.test", "validation_name": "_acme-challenge.m.test",
                         "validation": "val1", "env_journaled": True,
                         "settings": {"manual_cleanup_hook": hook}}])
    journal.dns_update([("m1", {"env": {"CERTBOT_DOMAIN": "m.test",
                                        "CERTBOT_VALIDATION": "val1",
                                        "CERTBOT_AUTH_OUTPUT": "record-42"}})])
    assert grouped.recover(config) == 1
    assert out.read_text().split() == ["m.test", "val1", "record-42"]
    assert grouped.outstanding(config) == []


def test_join_wave_groups_the_wave_and_cleans_up_at_exit(tmp_path: Path) -> None:
    from certbot_batch import run as run_model

    zone = Zone(replace=False)
    plugin = fake_plugin(zone)
    config = SimpleNamespace(work_dir=str(tmp_path), config_dir=str(tmp_path / "config"),
                             fake_propagation_seconds=0, authenticator="fake")
    batch = ChallengeBatch(["a.test", "b.test"], NoFiles(),  # type: ignore[arg-type]
                           wait_timeout=JOIN_TIMEOUT)
    wave = run_model.Wave(0, [], batch, None, Journal(str(tmp_path / "x")))  # type: ignore[arg-type]
    stopping = threading.Event()
    auths = {}
    for name in ("a.test", "b.test"):
        auths[name] = grouped.join_wave(plugin(config, "fake"), config, wave, name, stopping,
                                        config)
    assert wave.dns is not None
    achalls = {n: [Achall(zone, n, n)] for n in auths}
    performed = threading.Barrier(2)
    done: dict[str, Any] = {}

    def lineage(name: str) -> None:
        try:
            auths[name].perform(achalls[name])
            performed.wait(JOIN_TIMEOUT)  # both records up together: one perform()
            done[name] = "ok"
        except Exception as exc:  # noqa: BLE001
            done[name] = exc

    threads = [threading.Thread(target=lineage, args=(n,)) for n in auths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert done == {"a.test": "ok", "b.test": "ok"}
    assert len(zone.performs) == 1 and sorted(zone.performs[0]) == ["a.test", "b.test"]
    # The run stops with the records up and the workers given up: removed at exit.
    assert run_model.PROCESS.live_rounds
    grouped.cleanup_at_exit()
    assert zone.empty()
    assert not run_model.PROCESS.live_rounds


def test_which_authenticators_are_grouped() -> None:
    manual = SimpleNamespace(authenticator="manual", noninteractive_mode=True,
                             manual_auth_hook="/bin/true")
    assert grouped.groupable(manual)
    assert not grouped.groupable(SimpleNamespace(authenticator="manual",
                                                 noninteractive_mode=False,
                                                 manual_auth_hook="/bin/true"))
    assert not grouped.groupable(SimpleNamespace(authenticator="webroot"))
    assert not grouped.groupable(SimpleNamespace(authenticator="no-such-plugin"))
    assert not grouped.groupable(SimpleNamespace(authenticator=None))
    if grouped.plugin_class("dns-rfc2136") is not None:
        assert grouped.groupable(SimpleNamespace(authenticator="dns-rfc2136"))
