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
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_503_pauses_the_ca_and_the_request_is_sent_again() -> None:
    pacer = pacing.AcmePacer(rate=1000.0)
    answers = [Response(503, "1"), Response(503, "1"), Response(200)]
    sent: list[float] = []

    def send(net: Any, method: str, url: str) -> Response:
        sent.append(time.monotonic())
        return answers.pop(0)

    def post_once(net: Any) -> str:
        resp = pacer.send(send, net, "POST", "https://ca.test/acme/new-order")
        if resp.status_code >= 400:
            raise messages.Error(typ="urn:ietf:params:acme:error:serverInternal",
                                 detail="busy")
        return "ok"

    assert pacer.retrying(post_once, lambda: False, object()) == "ok"
    assert len(sent) == 3 and pacer.retries == 2 and pacer.pauses == 2
    # every retry waited for the CA-wide pause (Retry-After: 1, clamped to >= 1 s)
    assert sent[1] - sent[0] >= 0.9 and sent[2] - sent[1] >= 0.9


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
