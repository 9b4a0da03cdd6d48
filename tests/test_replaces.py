"""The ``replaces`` field and the 409 alreadyReplaced retry (challenges/replaces.py).

No CA available here answers ``alreadyReplaced`` (pebble 2.4 has no ARI), so the CA's side
of the retry is a stand-in for ``ClientV2.new_order``; the payload is built by acme's real
``NewOrder``. The field itself is checked end to end in test_session_e2e.py.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Optional

import pytest
from acme import client as acme_client
from acme import messages

from certbot_batch.challenges import replaces

CERT_ID = "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def _payload() -> dict[str, Any]:
    order = messages.NewOrder(identifiers=[messages.Identifier(
        typ=messages.IDENTIFIER_FQDN, value="a.test")])
    return dict(json.loads(order.json_dumps()))


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


def test_replaces_sent_then_retried_without_on_409(fake_ca: list[Optional[str]]) -> None:
    with replaces.sending_replaces(lambda: CERT_ID):
        assert acme_client.ClientV2.new_order(object(), b"csr") == "order"  # type: ignore
    assert fake_ca == [CERT_ID, None]


def test_no_replaces_when_lookup_has_none(fake_ca: list[Optional[str]]) -> None:
    with replaces.sending_replaces(lambda: None):
        acme_client.ClientV2.new_order(object(), b"csr")  # type: ignore[arg-type]
    assert fake_ca == [None]


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def new_order(self: Any, csr_pem: bytes, *args: Any, **kwargs: Any) -> str:
        calls.append(_payload().get("replaces"))
        raise messages.Error(typ="urn:ietf:params:acme:error:rateLimited", detail="slow down")

    monkeypatch.setattr(acme_client.ClientV2, "new_order", new_order)
    with replaces.sending_replaces(lambda: CERT_ID):
        with pytest.raises(messages.Error):
            acme_client.ClientV2.new_order(object(), b"csr")  # type: ignore[arg-type]
    assert calls == [CERT_ID]


def test_patch_is_undone_and_thread_local(fake_ca: list[Optional[str]]) -> None:
    before = acme_client.ClientV2.new_order
    other_thread: list[Optional[str]] = []
    with replaces.sending_replaces(lambda: CERT_ID if threading.current_thread()
                                   is threading.main_thread() else None):
        t = threading.Thread(target=lambda: other_thread.append(_payload().get("replaces")))
        t.start()
        t.join()
    assert other_thread == [None]
    assert acme_client.ClientV2.new_order is before
    assert "replaces" not in _payload()
