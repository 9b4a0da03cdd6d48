"""In-process tests of the status scan (scan/engine.py + scan/state.py).

Lineages come from the farm generator, the CA's ARI and OCSP answers from our responder
(the lineages' ``server`` is the responder's directory). Time is the Scanner's injectable
clock, so warm runs and Retry-After are tested without sleeping.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
from cryptography import x509

from certbot_batch.scan.engine import Scanner, ScanReport, ScanSettings
from certbot_batch.scan.state import LineageState, StateDB
from tests.bed import farm
from tests.bed.farm import FarmCA
from tests.bed.responder import Responder

UTC = datetime.timezone.utc
DAY = datetime.timedelta(days=1)
HOUR = 3600.0


@pytest.fixture(scope="module")
def ca() -> FarmCA:
    return FarmCA.create("Scan Engine Test")


@pytest.fixture()
def responder(ca: FarmCA) -> Iterator[Responder]:
    with Responder(ca) as r:
        yield r


class Bed:
    """A farm in ``tmp/config`` whose lineages point at ``responder``; scans in-process."""

    def __init__(self, tmp: Path, ca: FarmCA, responder: Responder) -> None:
        self.config_dir = tmp / "config"
        self.db_path = str(tmp / "work" / "certbot-batch" / "state.sqlite")
        self.ca = ca
        self.r = responder
        self.last_db: Optional[StateDB] = None

    def add(self, count: int, prefix: str, *, age_days: float = 10, lifetime_days: float = 90,
            **kwargs: Any) -> list[str]:
        return farm.make_farm(str(self.config_dir), count, ca=self.ca,
                              server=kwargs.pop("server", self.r.directory_url),
                              lifetime=lifetime_days, age=age_days,
                              name_fmt=prefix + "{i}.test", **kwargs)

    def confs(self) -> list[str]:
        rdir = self.config_dir / "renewal"
        return sorted(str(rdir / f) for f in os.listdir(rdir) if f.endswith(".conf"))

    def cert(self, name: str) -> x509.Certificate:
        return farm.load_lineage_cert(str(self.config_dir), name)

    def scan(self, clock: Optional[Callable[[], float]] = None, **settings: Any) -> ScanReport:
        settings.setdefault("workers", 8)
        settings.setdefault("timeout", 2.0)
        db = StateDB(self.db_path)
        self.last_db = db
        try:
            scanner = Scanner(ScanSettings(**settings), db, clock=clock or time.time)
            return scanner.scan(self.confs())
        finally:
            db.close()


@pytest.fixture()
def bed(tmp_path: Path, ca: FarmCA, responder: Responder) -> Bed:
    return Bed(tmp_path, ca, responder)


def at(t: float) -> Callable[[], float]:
    return lambda: t


def whole_seconds_from_now(delta: datetime.timedelta) -> datetime.datetime:
    return (datetime.datetime.now(UTC) + delta).replace(microsecond=0)


# -- decisions -----------------------------------------------------------------------------

def test_ari_window_decides_over_default_rule(bed: Bed) -> None:
    # Young certs with a window in the past: due. Old certs (the default 2/3 rule says due)
    # with a window in the future: not due.
    young = bed.add(2, "young", age_days=10)
    old = bed.add(2, "old", age_days=70)
    for name in young:
        bed.r.set_window(bed.cert(name), -2 * DAY, -1 * DAY)
    for name in old:
        bed.r.set_window(bed.cert(name), 5 * DAY, 6 * DAY)
    report = bed.scan()
    states = report.by_name()
    assert report.broken == {}
    for name in young:
        assert states[name].due, states[name]
        assert states[name].reason.startswith("ARI"), states[name].reason
    for name in old:
        assert not states[name].due, states[name]
        assert "(ARI)" in states[name].reason
    assert bed.r.ari_requests == 4
    assert {s.name for s in report.due} == set(young)


def test_chosen_time_inside_window_and_kept_across_runs(bed: Bed) -> None:
    [name] = bed.add(1, "keep")
    start = whole_seconds_from_now(5 * DAY)
    end = start + DAY
    bed.r.set_window(bed.cert(name), start, end)
    t0 = time.time()
    first = bed.scan(at(t0)).by_name()[name]
    assert first.chosen_time is not None
    assert start.timestamp() <= first.chosen_time < end.timestamp()
    assert (first.window_start, first.window_end) == (start.timestamp(), end.timestamp())

    # Warm run after Retry-After (6 h): asked again, same window -> same time.
    second = bed.scan(at(t0 + 7 * HOUR)).by_name()[name]
    assert bed.r.ari_requests == 2
    assert second.chosen_time == first.chosen_time

    # The CA moves the window: a new time inside the new one.
    start2, end2 = start + 10 * DAY, start + 11 * DAY
    bed.r.set_window(bed.cert(name), start2, end2)
    third = bed.scan(at(t0 + 14 * HOUR)).by_name()[name]
    assert bed.r.ari_requests == 3
    assert third.chosen_time is not None
    assert start2.timestamp() <= third.chosen_time < end2.timestamp()
    assert (third.window_start, third.window_end) == (start2.timestamp(), end2.timestamp())


def test_warm_scan_only_asks_where_retry_after_passed(bed: Bed) -> None:
    short = bed.add(3, "short")
    long_ = bed.add(3, "long")
    for name in short:
        bed.r.set_window(bed.cert(name), 5 * DAY, 6 * DAY, retry_after=120)
    for name in long_:
        bed.r.set_window(bed.cert(name), 5 * DAY, 6 * DAY, retry_after=7200)
    t0 = time.time()
    cold = bed.scan(at(t0))
    assert bed.r.ari_requests == 6 and cold.ari_requests == 6
    states = cold.by_name()
    for name in short:
        assert states[name].next_check == pytest.approx(t0 + 120)
    for name in long_:
        assert states[name].next_check == pytest.approx(t0 + 7200)

    # Nothing passed yet: no request at all, decisions unchanged.
    warm = bed.scan(at(t0 + 60))
    assert bed.r.ari_requests == 6 and warm.ari_requests == 0
    assert warm.due == []

    # Only the short Retry-After lineages are asked again.
    bed.r.reset_counters()
    warm2 = bed.scan(at(t0 + 600))
    assert warm2.ari_requests == 3
    assert bed.r.ari_requests == 3
    for name in short:
        assert bed.r.ari_requests_for(bed.cert(name)) == 1
    for name in long_:
        assert bed.r.ari_requests_for(bed.cert(name)) == 0


def test_retry_after_is_clamped(bed: Bed) -> None:
    [tiny] = bed.add(1, "tiny")
    [huge] = bed.add(1, "huge")
    bed.r.set_window(bed.cert(tiny), 5 * DAY, 6 * DAY, retry_after=1)
    bed.r.set_window(bed.cert(huge), 5 * DAY, 6 * DAY, retry_after=10 ** 7)
    t0 = time.time()
    states = bed.scan(at(t0)).by_name()
    assert states[tiny].next_check == pytest.approx(t0 + 60)      # at least a minute
    assert states[huge].next_check == pytest.approx(t0 + 86400)   # at most a day


def test_autorenew_false_is_never_due(bed: Bed) -> None:
    names = bed.add(2, "manual", age_days=89, autorenew=False)  # would be due by any rule
    for name in names:
        bed.r.set_window(bed.cert(name), -2 * DAY, -1 * DAY)
    report = bed.scan()
    for name in names:
        state = report.by_name()[name]
        assert not state.due
        assert "autorenew" in state.reason
    assert bed.r.ari_requests == 0  # nothing to ask about a lineage that never renews


def test_renew_before_expiry(bed: Bed) -> None:
    # ARI window in the future, but renew_before_expiry says due (certbot: either is enough).
    [early] = bed.add(1, "early", age_days=10, renew_before_expiry="85 days")
    bed.r.set_window(bed.cert(early), 5 * DAY, 6 * DAY)
    # No ARI answer (404), renew_before_expiry says not yet although 2/3 of the lifetime passed:
    # certbot uses the default rule only when neither ARI nor renew_before_expiry has a value.
    [late] = bed.add(1, "late", age_days=70, renew_before_expiry="10 days")
    bed.r.set_fault("http404", key=bed.cert(late))
    states = bed.scan().by_name()
    assert states[early].due
    assert "85 days" in states[early].reason
    assert not states[late].due
    assert "renew_before_expiry" in states[late].reason


def test_default_rule_without_ari(bed: Bed) -> None:
    bed.r.renewal_info = False
    young = bed.add(3, "young", age_days=10)
    old = bed.add(3, "old", age_days=70)
    short = bed.add(1, "short", lifetime_days=6, age_days=4)  # < 10 days: half the lifetime
    states = bed.scan().by_name()
    assert bed.r.directory_requests == 1   # the directory is read once per run, not per lineage
    assert bed.r.ari_requests == 0
    for name in young:
        assert not states[name].due and "default rule" in states[name].reason
    for name in old + short:
        assert states[name].due
    for state in states.values():
        assert state.last_error is None  # a CA without ARI is not a failure


@pytest.mark.parametrize("setting", ["force", "dry_run"])
def test_force_and_dry_run_make_all_due(bed: Bed, setting: str) -> None:
    names = bed.add(3, "any", age_days=1)
    report = bed.scan(None, **{setting: True})
    assert sorted(s.name for s in report.due) == sorted(names)
    assert bed.r.ari_requests == 0 and bed.r.ocsp_requests == 0


def test_ocsp_only_without_ari_answer_and_with_ocsp_url(bed: Bed) -> None:
    with_url = bed.add(3, "ocsp", ocsp_url=bed.r.ocsp_url)
    without = bed.add(2, "plain")
    report = bed.scan()
    assert bed.r.ari_requests == 5
    assert bed.r.ocsp_requests == 0 and report.ocsp_requests == 0  # ARI answered

    # A CA without ARI: OCSP for the certs that have an OCSP URL, and only for those.
    bed.r.renewal_info = False
    bed.r.reset_counters()
    shutil.rmtree(os.path.dirname(bed.db_path))
    report = bed.scan()
    assert bed.r.ocsp_requests == 3 and report.ocsp_requests == 3
    by_serial = bed.r.ocsp_requests_by_serial()
    for name in with_url:
        assert by_serial.get(bed.cert(name).serial_number) == 1
        assert report.by_name()[name].ocsp_status == "good"
    for name in without:
        assert bed.cert(name).serial_number not in by_serial
    assert report.due == []


def test_ocsp_revoked_is_due(bed: Bed) -> None:
    bed.r.renewal_info = False
    revoked, good = bed.add(2, "rev", ocsp_url=bed.r.ocsp_url)
    bed.r.set_ocsp_status(bed.cert(revoked), "revoked")
    states = bed.scan().by_name()
    assert states[revoked].due and "revoked" in states[revoked].reason
    assert states[revoked].ocsp_status == "revoked"
    assert not states[good].due


def test_progress_only_when_asked(bed: Bed, capsys: pytest.CaptureFixture[str]) -> None:
    bed.add(3, "prog")
    bed.scan(progress=False)
    assert capsys.readouterr().err == ""
    shutil.rmtree(os.path.dirname(bed.db_path))  # cold again: the CA is asked again
    bed.scan(progress=True)
    assert "certbot-batch: checked 3/3 lineages" in capsys.readouterr().err


# -- faults --------------------------------------------------------------------------------

ARI_FAULT_CASES = {
    # mode: words the lineage's last_error must contain
    "timeout": ["ARI", "within"],
    "http500": ["ARI", "HTTP 500"],
    "malformed_json": ["ARI", "not JSON"],
    "inverted_window": ["ARI", "not after its start"],
    "empty_window": ["ARI", "not after its start"],
    "missing_window": ["ARI", "suggestedWindow"],
}


@pytest.mark.parametrize("mode", sorted(ARI_FAULT_CASES))
def test_ari_fault_falls_back_to_expiry_rule(bed: Bed, mode: str) -> None:
    [victim_old] = bed.add(1, "vold", age_days=70)
    [victim_young] = bed.add(1, "vyoung", age_days=10)
    others = bed.add(3, "ok")
    for name in others:
        bed.r.set_window(bed.cert(name), -2 * DAY, -1 * DAY)
    for name in (victim_old, victim_young):
        bed.r.set_fault(mode, key=bed.cert(name), hold=10)
    t0 = time.time()
    report = bed.scan(at(t0), timeout=1.0)
    states = report.by_name()
    assert report.broken == {}
    for name in (victim_old, victim_young):
        err = states[name].last_error or ""
        for word in ARI_FAULT_CASES[mode]:
            assert word in err, (mode, err)
        assert states[name].failures == 1
        assert states[name].window_start is None and states[name].chosen_time is None
        next_check = states[name].next_check
        assert next_check is not None and next_check > t0
    assert states[victim_old].due and "lifetime" in states[victim_old].reason
    assert not states[victim_young].due
    for name in others:  # the scan went on
        assert states[name].due and states[name].last_error is None


def test_ari_503_storm_backs_off_everyone(bed: Bed) -> None:
    names = bed.add(5, "storm", age_days=70)
    bed.r.set_fault("http503", retry_after=300)
    t0 = time.time()
    report = bed.scan(at(t0), workers=1)
    states = report.by_name()
    # One request got the 503; the four others were not sent while the CA is backed off.
    assert bed.r.ari_requests == 1
    assert report.ari_requests == 5
    messages = [states[n].last_error or "" for n in names]
    assert sum("answered HTTP 503" in m for m in messages) == 1, messages
    assert sum("not asking it again" in m for m in messages) == 4, messages
    for name in names:
        assert states[name].due  # the expiry rule still renews them
        next_check = states[name].next_check
        assert next_check is not None
        assert next_check >= t0 + 0.85 * 300  # honours Retry-After (minus jitter)
    # Warm run before the back-off ends: nothing is sent.
    bed.r.clear_faults()
    report = bed.scan(at(t0 + 120))
    assert bed.r.ari_requests == 1 and report.ari_requests == 0


def test_directory_without_renewal_info_is_read_once(bed: Bed) -> None:
    bed.r.set_fault("no_renewal_info", kind="directory")
    names = bed.add(6, "noari", age_days=70)
    t0 = time.time()
    report = bed.scan(at(t0))
    assert bed.r.directory_requests == 1
    assert bed.r.ari_requests == 0
    for name in names:
        state = report.by_name()[name]
        assert state.due and "lifetime" in state.reason
        assert state.last_error is None
        assert state.next_check is not None and state.next_check > t0 + HOUR


OCSP_FAULT_CASES = {
    "garbage": "not an OCSP response",
    "malformed": "not an OCSP response",
    "unsigned": "responseStatus",
    "wrong_key": "signature",
    "wrong_responder": "not issued by",
}


@pytest.mark.parametrize("mode", sorted(OCSP_FAULT_CASES))
def test_ocsp_fault(bed: Bed, mode: str) -> None:
    bed.r.renewal_info = False
    victim_old, = bed.add(1, "vold", age_days=70, ocsp_url=bed.r.ocsp_url)
    victim_young, = bed.add(1, "vyoung", age_days=10, ocsp_url=bed.r.ocsp_url)
    revoked, good = bed.add(2, "other", ocsp_url=bed.r.ocsp_url)
    bed.r.set_ocsp_status(bed.cert(revoked), "revoked")
    for name in (victim_old, victim_young):
        bed.r.set_fault(mode, kind="ocsp", key=bed.cert(name))
    states = bed.scan().by_name()
    for name in (victim_old, victim_young):
        err = states[name].last_error or ""
        assert err.startswith("OCSP:"), (mode, err)
        assert OCSP_FAULT_CASES[mode] in err, (mode, err)
        assert states[name].ocsp_status is None  # a bad answer is no answer
    assert states[victim_old].due and "lifetime" in states[victim_old].reason
    assert not states[victim_young].due
    assert states[revoked].due and "revoked" in states[revoked].reason
    assert not states[good].due and states[good].last_error is None


def _break_conf_dir(bed: Bed, name: str) -> str:
    path = bed.config_dir / "renewal" / f"{name}.conf"
    path.unlink()
    path.mkdir()
    return str(path)


def _break_conf_content(bed: Bed, name: str) -> str:
    path = bed.config_dir / "renewal" / f"{name}.conf"
    path.write_text("cert = /nowhere\n[renewalparams\nthis is = not = configobj\n[[[x\n")
    return str(path)


def _break_conf_bytes(bed: Bed, name: str) -> str:
    path = bed.config_dir / "renewal" / f"{name}.conf"
    path.write_bytes(b"cert = /x\n[renewalparams]\nauthenticator = \xff\xfe\xc3\x28\n")
    return str(path)


def _break_conf_nocert(bed: Bed, name: str) -> str:
    path = bed.config_dir / "renewal" / f"{name}.conf"
    path.write_text("[renewalparams]\nauthenticator = webroot\n")
    return str(path)


def _missing_pem(bed: Bed, name: str) -> str:
    path = bed.config_dir / "archive" / name / "cert1.pem"
    path.unlink()
    return str(bed.config_dir / "live" / name / "cert.pem")


def _corrupt_pem(bed: Bed, name: str) -> str:
    path = bed.config_dir / "archive" / name / "cert1.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                     b"-----END CERTIFICATE-----\n")
    return str(bed.config_dir / "live" / name / "cert.pem")


BREAKERS = {
    "conf_is_directory": (_break_conf_dir, "cannot be parsed"),
    "conf_malformed": (_break_conf_content, "cannot be parsed"),
    "conf_invalid_bytes": (_break_conf_bytes, "cannot be parsed"),
    "conf_without_cert": (_break_conf_nocert, "names no 'cert'"),
    "pem_missing": (_missing_pem, "No such file"),
    "pem_corrupt": (_corrupt_pem, "not a valid PEM certificate"),
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_broken_lineage_is_reported_and_scan_goes_on(bed: Bed, case: str) -> None:
    [victim] = bed.add(1, "victim")
    others = bed.add(3, "ok")
    for name in others:
        bed.r.set_window(bed.cert(name), -2 * DAY, -1 * DAY)
    breaker, words = BREAKERS[case]
    where = breaker(bed, victim)
    report = bed.scan()
    states = report.by_name()
    assert set(report.broken) == {victim}
    assert words in report.broken[victim], report.broken
    err = states[victim].last_error or ""
    assert victim in err and words in err, err
    assert where in err, err
    # Handed to certbot (which reports it in its own summary), never silently dropped.
    assert states[victim].due and "certbot will report it" in states[victim].reason
    for name in others:
        assert states[name].due and states[name].last_error is None
    # The next run reads the lineage again (and recovers once it is repaired).
    report = bed.scan()
    assert set(report.broken) == {victim}


@pytest.mark.parametrize("damage", ["garbage", "torn_pages"])
def test_corrupt_state_database_is_rebuilt(bed: Bed, caplog: pytest.LogCaptureFixture,
                                           damage: str) -> None:
    names = bed.add(3, "db")
    bed.r.set_window(bed.cert(names[0]), -2 * DAY, -1 * DAY)
    t0 = time.time()
    assert {s.name for s in bed.scan(at(t0)).due} == {names[0]}
    for suffix in ("-wal", "-shm"):
        if os.path.exists(bed.db_path + suffix):
            os.unlink(bed.db_path + suffix)
    if damage == "garbage":
        with open(bed.db_path, "wb") as fh:
            fh.write(b"this is not an SQLite database" * 200)
    else:  # a valid header, every page after the first overwritten (a torn write)
        size = os.path.getsize(bed.db_path)
        assert size > 4096
        with open(bed.db_path, "r+b") as fh:
            fh.seek(4096)
            fh.write(b"\xde\xad\xbe\xef" * ((size - 4096) // 4))
    bed.r.reset_counters()
    with caplog.at_level(logging.WARNING):
        report = bed.scan(at(t0 + 60))
    assert bed.last_db is not None and bed.last_db.rebuilt_reason
    assert any("state database" in r.getMessage() and "rebuilt" in r.getMessage()
               for r in caplog.records), caplog.text
    assert any(".corrupt-" in f for f in os.listdir(os.path.dirname(bed.db_path)))
    assert {s.name for s in report.due} == {names[0]}
    assert bed.r.ari_requests == 3  # the cache is gone: every lineage is asked again
    # ... and the rebuilt database works warm again.
    bed.r.reset_counters()
    bed.scan(at(t0 + 120))
    assert bed.r.ari_requests == 0
    db = StateDB(bed.db_path, readonly=True)
    try:
        assert set(db.load_all()) == set(names)
    finally:
        db.close()


def test_changed_certificate_invalidates_state(bed: Bed) -> None:
    changed, same = bed.add(2, "chg")
    old_cert = bed.cert(changed)
    bed.r.set_window(old_cert, -2 * DAY, -1 * DAY)
    t0 = time.time()
    before = bed.scan(at(t0)).by_name()
    assert before[changed].due
    # Stock certbot (or anything else) renews the lineage behind our back.
    farm.renew_lineage_version(str(bed.config_dir), changed, bed.ca)
    new_cert = bed.cert(changed)
    assert new_cert.serial_number != old_cert.serial_number
    bed.r.reset_counters()
    after = bed.scan(at(t0 + 60)).by_name()   # Retry-After (6 h) not passed for anyone
    assert bed.r.ari_requests == 1
    assert bed.r.ari_requests_for(new_cert) == 1
    assert bed.r.ari_requests_for(bed.cert(same)) == 0
    state: LineageState = after[changed]
    assert state.serial == format(new_cert.serial_number, "x")
    assert not state.due  # the new cert's window (default policy) is in the future
    assert state.window_start is not None and state.window_start > t0 + 20 * 86400


# -- revocation seen as soon as stock sees it (issue 19 item 5) ---------------------------

def test_timer_run_keeps_ocsp_good_at_most_the_bound(bed: Bed) -> None:
    """A CA without ARI: a timer run believes an OCSP "good" for 6 h at most
    (retry.OCSP_GOOD_MAX), then asks again and sees the revocation."""
    from certbot_batch import retry

    bed.r.renewal_info = False
    [name] = bed.add(1, "rev", ocsp_url=bed.r.ocsp_url)
    t0 = time.time()
    first = bed.scan(at(t0)).by_name()[name]
    assert first.ocsp_status == "good" and not first.due
    assert first.ocsp_next is not None and first.ocsp_next <= t0 + retry.OCSP_GOOD_MAX
    bed.r.set_ocsp_status(bed.cert(name), "revoked")
    bed.r.reset_counters()
    within = bed.scan(at(t0 + retry.OCSP_GOOD_MAX - 60))
    assert bed.r.ocsp_requests == 0 and not within.by_name()[name].due  # the stated bound
    after = bed.scan(at(t0 + retry.OCSP_GOOD_MAX + 1))
    assert bed.r.ocsp_requests == 1
    state = after.by_name()[name]
    assert state.due and "revoked" in state.reason


def test_stale_ocsp_answer_is_asked_again_although_ari_knows_a_window(bed: Bed) -> None:
    from certbot_batch import retry

    bed.r.renewal_info = False
    [name] = bed.add(1, "both", ocsp_url=bed.r.ocsp_url)
    t0 = time.time()
    assert bed.scan(at(t0)).by_name()[name].ocsp_status == "good"
    # The CA starts offering ARI: the window is known from now on ...
    bed.r.renewal_info = True
    bed.r.set_window(bed.cert(name), 30 * DAY, 31 * DAY)
    later = t0 + retry.OCSP_GOOD_MAX + 1
    bed.r.reset_counters()
    state = bed.scan(at(later)).by_name()[name]
    # ... and the stored OCSP answer, older than the bound, is still renewed alongside.
    assert state.window_start is not None
    assert bed.r.ari_requests == 1 and bed.r.ocsp_requests == 1
    bed.r.set_ocsp_status(bed.cert(name), "revoked")
    state = bed.scan(at(later + retry.OCSP_GOOD_MAX + 1)).by_name()[name]
    assert state.due and "revoked" in state.reason


def test_interactive_run_asks_afresh(bed: Bed) -> None:
    """A person at a terminal: OCSP for every certificate with an OCSP URL (a cached "good"
    ignored) and ARI for every lineage, whatever the stored Retry-After says; the opt-out
    (--batch-cached-status) uses the stored answers as a timer run does."""
    revoked, moved, fine = bed.add(3, "tty", ocsp_url=bed.r.ocsp_url)
    plain = bed.add(1, "plain")  # no OCSP URL: never asked OCSP
    for name in (revoked, moved, fine, *plain):
        bed.r.set_window(bed.cert(name), 30 * DAY, 31 * DAY)
    t0 = time.time()
    cold = bed.scan(at(t0))
    assert cold.due == [] and bed.r.ocsp_requests == 0  # ARI answered: no OCSP yet
    bed.r.set_ocsp_status(bed.cert(revoked), "revoked")
    bed.r.set_window(bed.cert(moved), -2 * DAY, -1 * DAY)  # the CA revokes through ARI
    bed.r.reset_counters()
    timer = bed.scan(at(t0 + 60))
    assert timer.due == [] and bed.r.ari_requests == 0 and bed.r.ocsp_requests == 0
    cached = bed.scan(at(t0 + 120), interactive=True, cached_status=True)
    assert cached.due == [] and bed.r.ari_requests == 0 and bed.r.ocsp_requests == 0
    fresh = bed.scan(at(t0 + 180), interactive=True)
    assert bed.r.ari_requests == 4 and fresh.ari_requests == 4
    assert bed.r.ocsp_requests == 3 and fresh.ocsp_requests == 3  # every cert with a URL
    states = fresh.by_name()
    assert states[revoked].due and "revoked" in states[revoked].reason
    assert states[moved].due and states[moved].reason.startswith("ARI")
    assert not states[fine].due and not states[plain[0]].due
    assert sorted(s.name for s in fresh.due) == sorted([revoked, moved])


# -- RFC 9773 4.2: the next run, the lifetime rules ------------------------------------------

def test_renewal_time_before_the_next_run_renews_now(bed: Bed) -> None:
    """--batch-run-interval: a chosen time inside the window but before the next run is
    renewed by this run; one after it waits; a window not open yet waits whatever."""
    soon, later, unopened = bed.add(3, "sched")
    t0 = time.time()
    hour = datetime.timedelta(hours=1)
    bed.r.set_window(bed.cert(soon), -hour, 1.5 * hour)      # open, chosen time < t0+2h
    bed.r.set_window(bed.cert(later), 3 * hour, 5 * hour)    # chosen time after t0+2h
    bed.r.set_window(bed.cert(unopened), hour, 1.5 * hour)   # before the next run, closed
    states = bed.scan(at(t0), run_interval=2 * HOUR).by_name()
    assert states[soon].due and states[soon].reason.startswith("ARI"), states[soon].reason
    assert not states[later].due
    assert not states[unopened].due  # never before its window opens
    # The next run finds the window open and its chosen time passed or before the run after.
    states = bed.scan(at(t0 + 1.2 * HOUR), run_interval=2 * HOUR).by_name()
    assert states[unopened].due


def test_short_lifetimes_renew_at_half_and_not_every_run(bed: Bed) -> None:
    """Without ARI: 1/2 of the lifetime for certificates under 10 days, on every certbot;
    a 24-hour certificate is not due just because it has less than 24 h left."""
    bed.r.renewal_info = False
    [young] = bed.add(1, "day", lifetime_days=1, age_days=0.25)   # 6 h of 24 h
    [old] = bed.add(1, "dayold", lifetime_days=1, age_days=0.55)  # past half
    t0 = time.time()
    states = bed.scan(at(t0), run_interval=HOUR).by_name()
    assert not states[young].due, states[young].reason
    assert "1/2" in states[young].reason or "default rule" in states[young].reason
    assert states[old].due and "1/2" in states[old].reason


def test_cadence_learned_from_timer_runs_only(bed: Bed) -> None:
    """The runs table: timer runs teach the cadence (three at least), runs from a terminal
    and --cert-name runs do not; --batch-run-interval wins."""
    bed.add(1, "cad")
    t0 = time.time()
    first = bed.scan(at(t0))
    assert first.interval is None and first.interval_source == "unknown"
    bed.scan(at(t0 + HOUR))
    bed.scan(at(t0 + 1.5 * HOUR), interactive=True)  # a person: not the timer's cadence
    third = bed.scan(at(t0 + 2 * HOUR))
    assert third.interval == pytest.approx(HOUR)
    assert third.interval_source.startswith("learned")
    explicit = bed.scan(at(t0 + 3 * HOUR), run_interval=600.0)
    assert explicit.interval == 600.0 and explicit.interval_source == "--batch-run-interval"
    db = StateDB(bed.db_path)
    try:
        runs = db.recent_runs()
    finally:
        db.close()
    assert [r.trigger for r in runs] == ["timer", "timer", "interactive", "timer", "timer"]
    assert runs[0].interval == 600.0 and runs[1].interval == pytest.approx(HOUR)


def test_a_bug_is_a_traceback_and_a_lineage_certbot_decides(
        bed: Bed, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A programming error while applying one lineage's check is no decision of ours: the
    traceback is logged, the lineage is handed to certbot (broken, due), the others go on."""
    victim, *others = bed.add(3, "bug")
    original = Scanner._apply

    def buggy(self: Scanner, state: LineageState, res: Any, now: float) -> None:
        if state.name == victim:
            raise KeyError("a bug")
        original(self, state, res, now)

    monkeypatch.setattr(Scanner, "_apply", buggy)
    with caplog.at_level(logging.ERROR):
        report = bed.scan()
    assert set(report.internal_errors) == {victim}
    assert "KeyError" in report.broken[victim]
    states = report.by_name()
    assert states[victim].due and "internal error" in states[victim].reason
    [record] = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    for name in others:
        assert name not in report.broken and states[name].last_error is None


def test_state_database_of_the_previous_release_is_upgraded_in_place(bed: Bed) -> None:
    """New columns (links_sig) and the runs table are added to an existing database; its
    rows, and so the ARI state of every lineage, are kept (no cold scan after an upgrade)."""
    import sqlite3

    [name] = bed.add(1, "upg")
    bed.r.set_window(bed.cert(name), 5 * DAY, 6 * DAY)
    t0 = time.time()
    bed.scan(at(t0))
    conn = sqlite3.connect(bed.db_path)
    try:
        with conn:
            conn.execute("ALTER TABLE lineage DROP COLUMN links_sig")
            conn.execute("DROP TABLE runs")
    finally:
        conn.close()
    bed.r.reset_counters()
    report = bed.scan(at(t0 + 60))
    assert bed.r.ari_requests == 0  # the stored Retry-After survived the upgrade
    assert report.by_name()[name].chosen_time is not None
    db = StateDB(bed.db_path)
    try:
        assert [r.trigger for r in db.recent_runs()] == ["timer"]
    finally:
        db.close()


def test_warm_scan_watches_the_link_directories(bed: Bed) -> None:
    """Once found consistent, a lineage's links are watched through their two directories:
    a link broken later is seen by the next warm run, and only the changed rows are
    rewritten."""
    import sqlite3

    a, b = bed.add(2, "links")
    t0 = time.time()
    bed.scan(at(t0))
    conn = sqlite3.connect(bed.db_path)
    try:
        sigs = dict(conn.execute("SELECT name, links_sig FROM lineage"))
    finally:
        conn.close()
    assert sigs[a].startswith("A|") and "\nL|" in sigs[a]  # archive/ and live/, short form
    warm = bed.scan(at(t0 + 60))
    assert warm.broken == {}
    chain = bed.config_dir / "live" / a / "chain.pem"
    target = os.path.realpath(chain)
    os.unlink(target)  # the archive file behind a link goes away
    report = bed.scan(at(t0 + 120))
    assert a in report.broken and "chain.pem" in report.broken[a]
    assert b not in report.broken
