"""The renewal session in process (issue 17): waves, fallback, backoff, deferral, stop,
summary and exit code, driven through the seam's session hooks by a fake certbot loop.

Real: the session, the scan of real lineages written to a temp dir (farm.py), the state DB,
the backoff ledger, the pending record, the seam's activation (certbot's functions are
patched and put back). Stand-ins: the CA (what ``prevalidate.run_wave`` obtains for each
lineage is scripted), certbot's own loop (``stock``: it calls the session's hooks the way
certbot's loop reaches them through the seam), certbot's reconstitute and pre-hooks.
"""
from __future__ import annotations

import datetime
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import requests
from certbot import errors

from certbot_batch import _certbot, engine, run
from certbot_batch.ca import ledger, pacing
from certbot_batch.challenges import prevalidate, replaces
from certbot_batch.run import Outcome, Run
from certbot_batch.session import RenewalSession
from tests import fakes
from tests.bed.farm import FarmCA, make_farm

DAY = datetime.timedelta(days=1)


class FakeLineage:
    def __init__(self, name: str) -> None:
        self.lineagename = name


class Harness:
    """One session over real lineages; the CA and certbot's loop are scripted."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **config: Any) -> None:
        self.tmp = tmp_path
        self.monkeypatch = monkeypatch
        self.ca = FarmCA.create("Core Session Test")
        self.config = fakes.config(tmp_path, **config)
        #: lineage -> what the CA answers (an object: issued; an exception: raised)
        self.answers: dict[str, Any] = {}
        #: lineage -> what the fallback CA answers
        self.fallback_answers: dict[str, Any] = {}
        self.waves: list[list[str]] = []
        self.fallback_waves: list[list[str]] = []
        self.loops: list[list[str]] = []
        self.saved: list[str] = []
        self.summary: list[tuple[list[str], list[str], list[str], list[str]]] = []
        self.notes: list[str] = []
        self.session: Optional[RenewalSession] = None
        #: called at the start of each loop (e.g. to look at durable state mid-run)
        self.in_loop: Optional[Callable[[Run], None]] = None
        monkeypatch.setattr(prevalidate, "run_wave", self._run_wave)
        monkeypatch.setattr(_certbot, "reconstitute", self._reconstitute)
        monkeypatch.setattr(_certbot, "run_pre_hook", lambda config: None)
        monkeypatch.setattr(_certbot, "notify", self.notes.append)
        monkeypatch.setattr(_certbot, "describe_results",
                            lambda config, *lists: self.summary.append(lists))
        monkeypatch.setattr(_certbot, "run_post_hooks", lambda *a: None)

    def lineages(self, count: int, prefix: str, age: datetime.timedelta = 70 * DAY,
                 lifetime: datetime.timedelta = 90 * DAY) -> list[str]:
        return make_farm(str(self.tmp / "config"), count, ca=self.ca,
                         # loopback, nothing listening: the scan's ARI request fails
                         # at once (tests talk to loopback only)
                         server="https://127.0.0.1:9/dir", webroot=str(self.tmp / "www"),
                         authenticator="batch-webroot", name_fmt=prefix + "{i}.test",
                         version="5.8.0", age=age, lifetime=lifetime)

    def _reconstitute(self, config: Any, conf_path: str) -> Any:
        config.authenticator = "batch-webroot"
        config.installer = None
        return FakeLineage(conf_path.rsplit("/", 1)[1][:-len(".conf")])

    def _run_wave(self, session: Run, index: int,
                  records: list[run.LineageRecord]) -> prevalidate.WaveReport:
        names = [r.name for r in records]
        fallback = any(r.fallback for r in records)
        (self.fallback_waves if fallback else self.waves).append(names)
        source = self.fallback_answers if fallback else self.answers
        results = {}
        for name in names:
            answer = source.get(name, "issued")
            if callable(answer):
                answer = answer(session)
            results[name] = answer
        return prevalidate.WaveReport(results=results, provision_calls=1, cleanup_calls=1)

    def stock(self, cfg: Any) -> Any:
        """certbot's loop: should_renew, renew_cert (obtain -> the session's result), its
        summary held back by the seam."""
        assert self.session is not None
        hooks = self.session
        session = hooks.run
        if self.in_loop is not None:
            self.in_loop(session)
        confs = list(session.conf_files or [])
        names = [c.rsplit("/", 1)[1][:-len(".conf")] for c in confs]
        self.loops.append(names)
        ok, failed = [], []
        for name in names:
            lineage = FakeLineage(name)
            if not hooks.should_renew(cfg, lineage):
                continue
            with session.lineage_scope(name):
                def proceed(n: str = name) -> None:
                    found, result = hooks.obtained(n)
                    assert found, n
                    if isinstance(result, BaseException):
                        raise result
                    self.saved.append(n)
                try:
                    hooks.renew_cert(cfg, lineage, proceed)
                    ok.append(f"/live/{name}/fullchain.pem")
                except Exception:  # noqa: BLE001  (certbot's loop: one lineage's failure)
                    failed.append(f"/live/{name}/fullchain.pem")
        session.summaries.append((ok, failed, [], []))
        if failed:
            raise errors.Error(f"{len(failed)} renew failure(s), 0 parse failure(s)")
        return None

    def run(self, names: Optional[list[str]] = None) -> tuple[Optional[BaseException], Any]:
        confs = sorted(str(p) for p in (self.tmp / "config" / "renewal").glob("*.conf"))
        self.session = RenewalSession(self.config, self.stock, confs)
        try:
            return None, self.session.run_session()
        except errors.Error as exc:
            return exc, None


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    if not engine.install():
        pytest.skip(f"engine disabled here: {_certbot.disabled_reason()}")
    yield Harness(tmp_path, monkeypatch, batch_size=3)
    assert run.current() is None  # the session unpublished itself


def test_waves_in_urgency_order_and_a_clean_exit(harness: Harness) -> None:
    soon = harness.lineages(2, "soon", age=88 * DAY)
    later = harness.lineages(5, "later", age=70 * DAY)
    fresh = harness.lineages(2, "fresh", age=1 * DAY)
    exc, result = harness.run()
    assert exc is None and result is None
    # 7 due, waves of 3, the two closest to expiry first; each wave saved before the next.
    assert [len(w) for w in harness.waves] == [3, 3, 1]
    assert set(harness.waves[0][:2]) == set(soon)
    assert harness.loops == harness.waves
    assert sorted(harness.saved) == sorted(soon + later)
    outcomes = {r.name: r.outcome for r in harness.session.run.records.values()}  # type: ignore[union-attr]
    assert {outcomes[n] for n in soon + later} == {Outcome.RENEWED}
    assert {outcomes[n] for n in fresh} == {Outcome.NOT_DUE}
    assert any("checked 9 lineage(s)" in n for n in harness.notes)
    # A long run says how far it is, wave after wave.
    progress = [n for n in harness.notes if "progress:" in n]
    assert [p.split("progress: ")[1].split(" due")[0] for p in progress] == \
        ["3 of 7", "6 of 7", "7 of 7"]
    assert "(7 renewed)" in progress[-1] and "left" in progress[-1]
    # What a wave needed to be loaded is let go once it is saved.
    assert all(r.config is None and r.lineage is None
               for r in harness.session.run.records.values())  # type: ignore[union-attr]
    # Not-due ones are listed the way certbot lists them.
    skipped = harness.summary[0][2]
    assert len(skipped) == 2 and all("(skipped)" not in s for s in skipped)


def test_failures_back_off_durably_before_the_loop_and_exit_non_zero(
        harness: Harness) -> None:
    names = harness.lineages(3, "dead")
    harness.answers[names[0]] = errors.Error("urn:ietf:params:acme:error:unauthorized")
    seen_in_loop: list[dict[str, Any]] = []
    harness.in_loop = lambda session: seen_in_loop.append(
        ledger.Ledger(harness.config).load())
    exc, _ = harness.run()
    assert exc is not None and "1 renew failure(s)" in str(exc)
    # The ledger held the failure before certbot's loop ran (a kill there keeps it).
    assert names[0] in seen_in_loop[0]
    assert seen_in_loop[0][names[0]]["renew_failures"] == 1
    # The next run does not send it to the CA: it backs off.
    harness.waves.clear()
    exc, _ = harness.run()
    assert names[0] not in [n for wave in harness.waves for n in wave]
    record = harness.session.run.records[names[0]]  # type: ignore[union-attr]
    assert record.outcome is Outcome.BACKING_OFF
    assert any("backing off after failed renewals" in n for n in harness.notes)


def test_fallback_ca_for_the_soon_expiring_only(harness: Harness) -> None:
    harness.config.batch_fallback_server = "https://fallback.test/dir"
    urgent = harness.lineages(1, "urgent", age=86 * DAY)   # 4 days left
    relaxed = harness.lineages(1, "relaxed", age=70 * DAY)  # 20 days left
    down = requests.exceptions.ConnectionError("the CA does not answer")
    harness.answers.update({urgent[0]: down, relaxed[0]: down})
    exc, _ = harness.run()
    assert harness.fallback_waves == [urgent]
    records = harness.session.run.records  # type: ignore[union-attr]
    assert records[urgent[0]].outcome is Outcome.RENEWED
    assert records[urgent[0]].fallback == "https://fallback.test/dir"
    assert records[relaxed[0]].outcome is Outcome.FAILED
    assert exc is not None  # the relaxed one failed
    assert any("renewed from the fallback CA" in n for n in harness.notes)


def test_deferred_by_the_ca_is_not_a_failure(harness: Harness) -> None:
    names = harness.lineages(2, "later")
    harness.answers[names[1]] = pacing.Deferred("the CA's account-wide limit", 3600.0)
    exc, _ = harness.run()
    assert exc is not None and "1 renewal(s) deferred" in str(exc)
    assert harness.loops == [[names[0]]]  # never shown to certbot's loop
    record = harness.session.run.records[names[1]]  # type: ignore[union-attr]
    assert record.outcome is Outcome.DEFERRED
    assert record.state.renew_failures == 0 and record.state.renew_next_attempt


def test_stop_signal_saves_what_was_issued_and_says_what_was_not_attempted(
        harness: Harness) -> None:
    names = harness.lineages(6, "stop")

    def stop_after_issuing(session: Run) -> str:
        session.stopping.set()
        session.stop_signal = "SIGTERM"
        return "issued"

    harness.answers[names[0]] = stop_after_issuing
    exc, _ = harness.run()
    assert exc is not None and "stopped by SIGTERM" in str(exc)
    records = harness.session.run.records  # type: ignore[union-attr]
    first_wave = harness.waves[0]
    assert len(harness.waves) == 1  # no new wave after the signal
    assert set(harness.saved) == set(first_wave)  # what the CA issued is saved
    assert {records[n].outcome for n in names if n not in first_wave} == \
        {Outcome.NOT_ATTEMPTED}


def test_stopped_lineage_is_neither_failure_nor_backoff(harness: Harness) -> None:
    names = harness.lineages(1, "stopped")
    harness.answers[names[0]] = replaces.Stopped("the run is stopping")
    harness.run()
    state = harness.session.run.records[names[0]].state  # type: ignore[union-attr]
    assert state.renew_failures == 0 and state.renew_next_attempt is None


def test_dry_run_records_nothing(harness: Harness) -> None:
    harness.config.dry_run = True
    names = harness.lineages(1, "dry")
    harness.answers[names[0]] = errors.Error("unauthorized")
    harness.run()
    assert not ledger.Ledger(harness.config).load()


def test_seam_hooks_of_the_session(harness: Harness) -> None:
    """What certbot's calls get while the session runs: the fallback CA's client config,
    the CA's reasons for a failed validation, replaces only inside the ARI window."""
    names = harness.lineages(1, "hooks")
    session = RenewalSession(harness.config, harness.stock, [])
    record = fakes.add_record(session, names[0], ari_cert_id="abc.def",
                              window_start=0.0)
    record.fallback = "https://fallback.test/dir"
    cfg = fakes.config(harness.tmp, server="https://ca.test/dir", account="acct")
    with session.run.lineage_scope(names[0]):
        moved = session.client_config(cfg)
        assert (moved.server, moved.account) == ("https://fallback.test/dir", None)
        assert cfg.server == "https://ca.test/dir"
        assert session._replaces_for(names[0]) is None  # not for another CA's order
        record.fallback = None
        assert session._replaces_for(names[0]) == "abc.def"
        session.failed_authorizations(["hooks0.test: unauthorized: 404"])
    assert record.detail == "hooks0.test: unauthorized: 404"
    assert session.client_config(cfg) is cfg  # no lineage on this thread: untouched
    done = threading.Event()
    threading.Thread(target=lambda: (session.failed_authorizations(["x"]), done.set())).start()
    assert done.wait(10)
    assert record.detail == "hooks0.test: unauthorized: 404"


@pytest.mark.parametrize("server,given,rate", [
    ("https://acme-v02.api.letsencrypt.org/directory", None, 100.0),
    ("https://acme-staging-v02.api.letsencrypt.org/directory", None, 20.0),  # --dry-run
    ("https://acme-staging-v02.api.letsencrypt.org/directory", 50.0, 50.0),  # asked for
    ("https://ca.internal:14000/dir", None, 100.0),
    (None, None, 100.0),
])
def test_acme_rate_default_follows_the_ca(tmp_path: Path, server: Optional[str],
                                          given: Optional[float], rate: float) -> None:
    """Let's Encrypt's staging CA (where --dry-run goes) allows one IP 20 requests/s: a
    dry run of thousands of lineages is paced to it unless --batch-acme-rate says more."""
    s = fakes.session(tmp_path, server=server, batch_acme_rate=given)
    assert s.run.pacer.limiter.rate == rate
