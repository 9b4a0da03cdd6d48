"""The ``replaces`` field and the 409 alreadyReplaced retry (challenges/replaces.py), through
the seam's real wrappers and the renewal session's hooks.

No CA available here answers ``alreadyReplaced`` (pebble 2.4 has no ARI), so the CA's side
of the retry is a stand-in for ``ClientV2.new_order``; the payload is built by acme's real
``NewOrder``. The field itself is checked end to end in test_session_e2e.py.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from acme import client as acme_client
from acme import messages

from certbot_batch import _certbot, engine
from certbot_batch.challenges import replaces
from certbot_batch.run import Run
from tests import fakes

CERT_ID = "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def _payload() -> dict[str, Any]:
    order = messages.NewOrder(identifiers=[messages.Identifier(
        typ=messages.IDENTIFIER_FQDN, value="a.test")])
    return dict(json.loads(order.json_dumps()))


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[Any]:
    """A renewal session, its lineage a.test inside its ARI window (``window=True``) or not,
    activated through the seam (wrapping whatever ClientV2.new_order is at that moment)."""
    if not engine.install():
        pytest.skip(f"engine disabled here: {_certbot.disabled_reason()}")
    scopes: list[Any] = []

    def start(window: bool = True) -> Run:
        session = fakes.session(tmp_path, clock=lambda: 1000.0)
        fakes.add_record(session, "a.test", ari_cert_id=CERT_ID,
                         window_start=900.0 if window else 2000.0)
        scope = _certbot.activate(session.run)
        scope.__enter__()
        lineage = session.run.lineage_scope("a.test")
        lineage.__enter__()
        scopes.extend([lineage, scope])
        return session.run

    yield start
    for scope in scopes:
        scope.__exit__(None, None, None)


@pytest.fixture
def fake_ca(monkeypatch: pytest.MonkeyPatch) -> list[Optional[str]]:
    """new_order that records the 'replaces' it would send, and answers the first order
    that carries one with 409 alreadyReplaced."""
    seen: list[Optional[str]] = []

    def new_order(self: Any, csr_pem: bytes, *args: Any, **kwargs: Any) -> str:
        sent = _payload().get("replaces")
        seen.append(sent)
        if sent and len(seen) == 1:
            raise messages.Error(typ="urn:ietf:params:acme:error:alreadyReplaced",
                                 detail="already replaced")
        return "order"

    monkeypatch.setattr(acme_client.ClientV2, "new_order", new_order)
    return seen


def test_replaces_sent_then_retried_without_on_409(fake_ca: list[Optional[str]],
                                                     activate: Any) -> None:
    activate()
    assert acme_client.ClientV2.new_order(object(), b"csr") == "order"  # type: ignore
    assert fake_ca == [CERT_ID, None]


def test_no_replaces_outside_the_window(fake_ca: list[Optional[str]],
                                        activate: Any) -> None:
    activate(window=False)
    acme_client.ClientV2.new_order(object(), b"csr")  # type: ignore[arg-type]
    assert fake_ca == [None]


def test_no_new_order_once_stopping(fake_ca: list[Optional[str]], activate: Any) -> None:
    activate().stopping.set()
    with pytest.raises(replaces.Stopped):
        acme_client.ClientV2.new_order(object(), b"csr")  # type: ignore[arg-type]
    assert fake_ca == []


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch,
                                      activate: Any) -> None:
    calls = []

    def new_order(self: Any, csr_pem: bytes, *args: Any, **kwargs: Any) -> str:
        calls.append(_payload().get("replaces"))
        raise messages.Error(typ="urn:ietf:params:acme:error:rateLimited", detail="slow down")

    monkeypatch.setattr(acme_client.ClientV2, "new_order", new_order)
    activate()
    with pytest.raises(messages.Error):
        acme_client.ClientV2.new_order(object(), b"csr")  # type: ignore[arg-type]
    assert calls == [CERT_ID]


def test_replaces_is_thread_local(fake_ca: list[Optional[str]],
                                  monkeypatch: pytest.MonkeyPatch, activate: Any) -> None:
    other_thread: list[Optional[str]] = []
    seen_in_order: list[Optional[str]] = []

    def order_and_peek(self: Any, csr_pem: bytes) -> str:
        seen_in_order.append(_payload().get("replaces"))
        t = threading.Thread(target=lambda: other_thread.append(_payload().get("replaces")))
        t.start()
        t.join()
        return "order"

    monkeypatch.setattr(acme_client.ClientV2, "new_order", order_and_peek)
    activate()
    acme_client.ClientV2.new_order(object(), b"csr")  # type: ignore[arg-type]
    assert seen_in_order == [CERT_ID]
    assert other_thread == [None]
    assert "replaces" not in _payload()


# -- replaces never blocks a renewal (issue 19 item 2) ---------------------------------------

def _refusing_ca(monkeypatch: pytest.MonkeyPatch, error: BaseException,
                 times: int = 1) -> list[Optional[str]]:
    """new_order that records the 'replaces' it would send and refuses the first ``times``
    orders that carry one with ``error``."""
    seen: list[Optional[str]] = []

    def new_order(self: Any, csr_pem: bytes, *args: Any, **kwargs: Any) -> str:
        sent = _payload().get("replaces")
        seen.append(sent)
        if sent and len(seen) <= times:
            raise error
        if not sent and times > 1:
            raise error  # the CA refuses the lineage whatever the order says
        return "order"

    monkeypatch.setattr(acme_client.ClientV2, "new_order", new_order)
    return seen


class _Response:
    status_code = 500
    headers: dict[str, str] = {}
    content = b"<html>Internal Server Error</html>"
    text = "Internal Server Error"


REFUSALS = {
    "alreadyReplaced": messages.Error(typ="urn:ietf:params:acme:error:alreadyReplaced",
                                      detail="already replaced"),
    # A CA that does not find the certID (pebble 2.10 for some serials).
    "malformed": messages.Error(typ="urn:ietf:params:acme:error:malformed",
                                detail="unable to find certificate for replaces"),
    "serverInternal": messages.Error(typ="urn:ietf:params:acme:error:serverInternal",
                                     detail="could not look up the replaced certificate"),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refused_with_replaces_is_sent_once_more_without(
        refusal: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, activate: Any) -> None:
    seen = _refusing_ca(monkeypatch, REFUSALS[refusal])
    activate()
    with caplog.at_level("WARNING", logger="certbot_batch.challenges.replaces"):
        assert acme_client.ClientV2.new_order(object(), b"csr") == "order"  # type: ignore
    assert seen == [CERT_ID, None]
    [record] = [r for r in caplog.records if "without 'replaces'" in r.getMessage()]
    assert CERT_ID in record.getMessage()
    assert record.levelname == "WARNING"
    if refusal != "alreadyReplaced":
        assert refusal in record.getMessage()  # the CA's problem type is named


def test_bare_http_error_with_replaces_is_sent_once_more_without(
        monkeypatch: pytest.MonkeyPatch, activate: Any) -> None:
    from acme import errors as acme_errors

    seen = _refusing_ca(monkeypatch, acme_errors.ClientError(_Response()))
    activate()
    assert acme_client.ClientV2.new_order(object(), b"csr") == "order"  # type: ignore
    assert seen == [CERT_ID, None]


def test_only_one_retry_without_replaces(monkeypatch: pytest.MonkeyPatch,
                                         activate: Any) -> None:
    """A lineage the CA refuses whatever the order says: two orders, then the CA's error."""
    seen = _refusing_ca(monkeypatch, REFUSALS["malformed"], times=5)
    activate()
    with pytest.raises(messages.Error) as info:
        acme_client.ClientV2.new_order(object(), b"csr")  # type: ignore[arg-type]
    assert seen == [CERT_ID, None]
    assert "malformed" in str(info.value.typ)


def test_refusal_without_replaces_is_not_retried(monkeypatch: pytest.MonkeyPatch,
                                                 activate: Any) -> None:
    seen = _refusing_ca(monkeypatch, REFUSALS["malformed"], times=5)
    activate(window=False)
    with pytest.raises(messages.Error):
        acme_client.ClientV2.new_order(object(), b"csr")  # type: ignore[arg-type]
    assert seen == [None]


def test_refused_for_replaces_classification() -> None:
    from acme import errors as acme_errors

    assert replaces.refused_for_replaces(REFUSALS["alreadyReplaced"])
    assert replaces.refused_for_replaces(REFUSALS["malformed"])
    assert replaces.refused_for_replaces(acme_errors.ClientError(_Response()))
    assert not replaces.refused_for_replaces(
        messages.Error(typ="urn:ietf:params:acme:error:rateLimited", detail="slow down"))
    assert not replaces.refused_for_replaces(replaces.Stopped("stopping"))
    assert not replaces.refused_for_replaces(ValueError("a bug"))
