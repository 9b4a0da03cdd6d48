"""In-process tests of the CA-facing concurrency core: the renewal backoff schedule and its
bypasses (ca/backoff.py), pacing, pauses and rate-limit answers (ca/pacing.py), the order
gate that sends a wave's new orders in urgency order (challenges/prevalidate.py)."""
from __future__ import annotations

import random
import threading
import time
from typing import Any, Optional

import pytest
from acme import messages
from certbot import errors

from certbot_batch.ca import backoff, pacing
from certbot_batch.challenges.prevalidate import OrderGate
from certbot_batch.scan.state import LineageState


class Config:
    def __init__(self, force: bool = False, certname: Optional[str] = None) -> None:
        self.renew_by_default = force
        self.certname = certname


@pytest.mark.parametrize("failures,base", [(1, 60), (2, 600), (3, 6000), (4, 86400),
                                           (9, 86400)])
def test_backoff_schedule(failures: int, base: float) -> None:
    rng = random.Random(1)
    for _ in range(50):
        delay = backoff.delay_after(failures, rng)
        assert base * 0.9 <= delay <= base * 1.1


def test_failure_then_success_and_bypasses() -> None:
    state = LineageState(name="a.test", conf_sig="1:10")
    now = 1_000_000.0
    backoff.record_failure(state, now, "404 from the CA")
    assert state.renew_failures == 1 and state.renew_failing_since == now
    assert now + 54 <= (state.renew_next_attempt or 0) <= now + 66
    assert backoff.backing_off(state, now + 1, Config())
    assert not backoff.backing_off(state, now + 100, Config())  # waited long enough
    assert not backoff.backing_off(state, now + 1, Config(force=True))
    assert not backoff.backing_off(state, now + 1, Config(certname="a.test"))
    state.conf_sig = "2:11"  # the admin edited the renewal conf
    assert not backoff.backing_off(state, now + 1, Config())
    state.conf_sig = "1:10"
    backoff.record_failure(state, now + 100, "again")
    assert state.renew_failures == 2 and state.renew_failing_since == now
    assert "2 failed attempt(s)" in backoff.describe(state)
    backoff.record_success(state)
    assert state.renew_failures == 0 and state.renew_next_attempt is None


def test_rate_limit_answer_does_not_count_as_failure() -> None:
    state = LineageState(name="b.test")
    backoff.record_failure(state, 0.0, "rate limited", retry_after=120, counts=False)
    assert state.renew_failures == 0 and state.renew_next_attempt == 120
    backoff.record_failure(state, 0.0, "rate limited", retry_after=5, counts=False)
    assert state.renew_next_attempt == backoff.MIN_RETRY_AFTER  # clamped
    backoff.record_failure(state, 0.0, "rate limited", retry_after=10 ** 9, counts=False)
    assert state.renew_next_attempt == backoff.MAX_RETRY_AFTER


class Response:
    def __init__(self, status: int, retry_after: Optional[str] = None,
                 problem: Optional[str] = None) -> None:
        self.status_code = status
        self.headers = {"Retry-After": retry_after} if retry_after else {}
        self._problem = problem
        if problem:
            self.headers["Content-Type"] = "application/problem+json"

    def json(self) -> Any:
        return {"type": self._problem, "detail": "x"}


class FakeClock:
    """The pacer's clock and wait: waiting advances the clock (no real time passes)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.t

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.t += seconds


CA = "https://ca.test"
NEW_ORDER = f"{CA}/acme/new-order"
NEW_NONCE = f"{CA}/acme/new-nonce"
AUTHZ = f"{CA}/acme/authz/1"
DIRECTORY = {"newOrder": NEW_ORDER, "newNonce": NEW_NONCE,
             "newAccount": f"{CA}/acme/new-acct"}


class FakeCA:
    """Answers each request with the next answer queued for its URL (200 when none), and
    records (clock time, method, url) of every request that was sent."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.answers: dict[str, list[Response]] = {}
        self.sent: list[tuple[float, str, str]] = []

    def __call__(self, net: Any, method: str, url: str) -> Response:
        self.sent.append((self.clock.t, method, url))
        queue = self.answers.get(url) or []
        return queue.pop(0) if queue else Response(200)


def fake_pacer() -> tuple[pacing.AcmePacer, FakeClock, FakeCA]:
    clock = FakeClock()
    pacer = pacing.AcmePacer(rate=1000.0, clock=clock, wait=clock.wait)
    pacer.learn(DIRECTORY)
    return pacer, clock, FakeCA(clock)


def acme_request(pacer: pacing.AcmePacer, ca: FakeCA, url: str, method: str = "POST") -> str:
    """One ACME request as acme's _post_once makes it: raises on an error answer."""
    def once(net: Any) -> str:
        resp = pacer.send(ca, net, method, url)
        if resp.status_code >= 400:
            raise messages.Error(typ="urn:ietf:params:acme:error:serverInternal",
                                 detail="busy")
        return "ok"
    return pacer.retrying(once, lambda: False, object())  # type: ignore[no-any-return]


def test_503_pauses_the_endpoint_and_the_request_is_sent_again() -> None:
    pacer, clock, ca = fake_pacer()
    ca.answers[NEW_ORDER] = [Response(503, "1"), Response(503, "1"), Response(200)]
    assert acme_request(pacer, ca, NEW_ORDER) == "ok"
    assert pacer.retries == 2 and pacer.pauses == 2
    # every retry waited out the pause (Retry-After: 1) on the pacer's clock
    assert [t for t, _, _ in ca.sent] == [0.0, 1.0, 2.0]
    assert pacer.limiter.clock is clock  # the token bucket runs on the same clock


def test_a_new_order_pause_stalls_nothing_else() -> None:
    """new-order answered 503 Retry-After 30: new orders wait 30 s; authorizations,
    challenges, finalization, downloads (the per-resource URLs), new nonces and other CAs
    do not wait at all. A 503 on those pauses them, not new-order."""
    pacer, clock, ca = fake_pacer()
    ca.answers[NEW_ORDER] = [Response(503, "30")]
    assert pacer.send(ca, None, "POST", NEW_ORDER).status_code == 503  # pauses new-order
    for method, url in (("POST", AUTHZ), ("POST", f"{CA}/acme/chall/1"),
                        ("POST", f"{CA}/acme/finalize/1"), ("POST", f"{CA}/acme/cert/1"),
                        ("HEAD", NEW_NONCE), ("POST", "https://other-ca.test/acme/new-order")):
        assert acme_request(pacer, ca, url, method) == "ok"
    assert clock.t == 0.0 and clock.waits == []  # none of them waited
    assert acme_request(pacer, ca, NEW_ORDER) == "ok"
    assert ca.sent[-1] == (30.0, "POST", NEW_ORDER)  # the new order waited for its pause

    ca.answers[AUTHZ] = [Response(503, "20")]
    assert acme_request(pacer, ca, AUTHZ) == "ok"  # paused 20 s, then answered
    assert ca.sent[-1] == (50.0, "POST", AUTHZ)
    ca.answers[f"{CA}/acme/chall/2"] = [Response(429, "10")]  # 429 "slow down", not a limit
    before = clock.t
    assert acme_request(pacer, ca, f"{CA}/acme/chall/2") == "ok"
    assert ca.sent[-1] == (before + 10, "POST", f"{CA}/acme/chall/2")
    clock.waits.clear()
    assert acme_request(pacer, ca, NEW_ORDER) == "ok"
    assert clock.waits == []  # new-order was not paused by the other endpoints' pauses


def test_an_endpoint_refusing_longer_than_the_bound_is_unavailable() -> None:
    """new-order answered 503 Retry-After 60 for good: sent at 0 s and 60 s; the next try
    would come at 120 s, the bound, so the endpoint is unavailable at 60 s: the request
    fails with CAUnavailable (the session's CA problem: fallback CA or deferral, with the
    CA's Retry-After), and every later new order fails at once without being sent."""
    from certbot_batch import session

    assert pacing.UNAVAILABLE_AFTER == 120.0
    pacer, clock, ca = fake_pacer()
    ca.answers[NEW_ORDER] = [Response(503, "60") for _ in range(100)]
    with pytest.raises(pacing.CAUnavailable) as info:
        acme_request(pacer, ca, NEW_ORDER)
    assert [t for t, _, _ in ca.sent] == [0.0, 60.0]
    exc = info.value
    assert isinstance(exc.__cause__, messages.Error)  # the CA's own answer
    assert exc.retry_after == 60.0 and "new-order" in str(exc) and "503" in str(exc)
    assert session._ca_problem(exc) and pacing.deferral(exc) is exc
    wrapped = errors.Error("certbot's words")
    wrapped.__cause__ = exc
    assert pacing.deferral(wrapped) is exc and session._ca_problem(wrapped)
    assert pacer.unavailable(CA, pacing.NEW_ORDER)
    # Every further new order: at once, nothing sent, no waiting.
    sent, now = len(ca.sent), clock.t
    for _ in range(3):
        with pytest.raises(pacing.CAUnavailable):
            acme_request(pacer, ca, NEW_ORDER)
    assert len(ca.sent) == sent and clock.t == now and pacer.not_sent == 3
    # The orders already made go on.
    assert acme_request(pacer, ca, AUTHZ) == "ok" and clock.t == now
    assert not pacer.unavailable(CA, pacing.OTHER)


@pytest.mark.parametrize("retry_after,times", [
    (None, [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0]),  # 1, 2, 4 ... s: 63 + 64 > 120
    ("300", [0.0]),  # the pause asked for alone outlasts the bound: unavailable at once
    ("119", [0.0, 119.0]),  # the second refusal's pause would end after the bound
])
def test_the_bound_is_never_exceeded(retry_after: Optional[str], times: list[float]) -> None:
    pacer, clock, ca = fake_pacer()
    ca.answers[AUTHZ] = [Response(503, retry_after) for _ in range(100)]
    with pytest.raises(pacing.CAUnavailable):
        acme_request(pacer, ca, AUTHZ)
    assert [t for t, _, _ in ca.sent] == times
    assert clock.t <= pacing.UNAVAILABLE_AFTER
    assert pacer.unavailable(CA, pacing.OTHER) and not pacer.unavailable(CA,
                                                                         pacing.NEW_ORDER)


def test_refusals_of_requests_in_flight_together_count_once() -> None:
    """Eight requests sent before the CA's first 503 (no Retry-After) come back refused
    during the pause the first one caused: one refusal (a 1 s pause), not eight (2^7 s,
    beyond the bound: the endpoint would be unavailable at once)."""
    pacer, clock, ca = fake_pacer()
    in_flight = [f"{CA}/acme/authz/{i}" for i in range(8)]

    def answer(net: Any, method: str, url: str) -> Response:
        ca.sent.append((clock.t, method, url))
        if in_flight:  # the next one was sent before this answer came back
            assert pacer.send(answer, net, "POST", in_flight.pop(0)).status_code == 503
        return Response(503)

    assert pacer.send(answer, None, "POST", AUTHZ).status_code == 503
    assert len(ca.sent) == 9 and pacer.pauses == 9
    assert not pacer.unavailable(CA, pacing.OTHER)
    assert acme_request(pacer, ca, AUTHZ) == "ok"
    assert ca.sent[-1] == (1.0, "POST", AUTHZ)  # paused 1 s: the first refusal's pause


def test_an_answer_ends_the_streak() -> None:
    """Refusals with answers in between are not one streak: 50 s pauses around a success
    never add up to the bound."""
    pacer, clock, ca = fake_pacer()
    ca.answers[NEW_ORDER] = [Response(503, "50"), Response(200), Response(503, "50"),
                             Response(503, "50"), Response(200)]
    assert acme_request(pacer, ca, NEW_ORDER) == "ok"
    assert acme_request(pacer, ca, NEW_ORDER) == "ok"
    assert [t for t, _, _ in ca.sent] == [0.0, 50.0, 50.0, 100.0, 150.0]
    assert not pacer.unavailable(CA, pacing.NEW_ORDER)


def test_rate_limited_new_order_is_not_retried_and_defers_the_account() -> None:
    pacer = pacing.AcmePacer(rate=1000.0)

    class Client:
        directory = {"newOrder": "https://ca.test/acme/new-order"}

        class net:  # noqa: N801  (acme's attribute name)
            class account:  # noqa: N801
                uri = "https://ca.test/acme/acct/1"

    calls = []

    def new_order(client: Any, csr: bytes) -> Any:
        calls.append(csr)
        resp = pacer.send(lambda *a: Response(429, "3600", pacing.RATE_LIMITED), None,
                          "POST", "https://ca.test/acme/new-order")
        assert resp.status_code == 429
        raise messages.Error(typ=pacing.RATE_LIMITED,
                             detail="too many new orders (300) in the last 3h0m0s")

    with pytest.raises(messages.Error):
        pacer.retrying(lambda: pacer.new_order(new_order, Client(), "a.test", b"csr"),
                       lambda: False)
    assert calls == [b"csr"]  # not retried
    limit = pacer.rate_limited["a.test"]
    assert limit.account_wide and limit.retry_after == 3600
    with pytest.raises(pacing.Deferred) as info:
        pacer.new_order(new_order, Client(), "b.test", b"csr2")
    assert calls == [b"csr"]  # never sent
    assert info.value.retry_after == 3600
    # a 429 for the name only (exact set limit) would not stop the account
    assert not pacing.is_account_wide("too many certificates (5) already issued for this "
                                      "exact set of identifiers")


def test_order_gate_sends_in_urgency_order() -> None:
    names = [f"l{i}" for i in range(8)]
    stopping = threading.Event()
    gate = OrderGate(names, stopping, width=1)
    entered: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        if name == "l3":
            gate.done(name)  # dropped out before ordering (e.g. a bad webroot)
            return
        with gate.turn(name):
            with lock:
                entered.append(name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in reversed(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert entered == [n for n in names if n != "l3"]


def test_order_gate_two_at_a_time_in_order() -> None:
    names = [f"l{i}" for i in range(10)]
    gate = OrderGate(names, threading.Event(), width=2)
    inside: set[str] = set()
    most = []
    violations = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        with gate.turn(name):
            with lock:
                rank = names.index(name)
                # everyone ranked two or more before this one has ordered already
                if any(n in inside or n not in done for n in names[:max(0, rank - 1)]):
                    violations.append(name)
                inside.add(name)
                most.append(len(inside))
            time.sleep(0.01)
            with lock:
                inside.discard(name)
                done.add(name)

    done: set[str] = set()
    threads = [threading.Thread(target=worker, args=(n,)) for n in reversed(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not violations and max(most) <= 2 and len(done) == 10


def test_order_gate_does_not_hang_on_stop() -> None:
    stopping = threading.Event()
    gate = OrderGate(["first", "second", "third"], stopping, width=2)
    released = threading.Event()

    def third() -> None:
        with gate.turn("third"):
            released.set()

    t = threading.Thread(target=third)
    t.start()
    assert not released.wait(0.3)  # "first" never ordered: "third" waits for its turn
    stopping.set()
    assert released.wait(5)
    t.join(5)
