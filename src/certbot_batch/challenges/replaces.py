"""ARI ``replaces`` (RFC 9773 section 5) in the orders of lineages inside their ARI window.

An order that names the certificate it replaces, sent while that certificate is in its
suggested window, is exempt from Let's Encrypt's rate limits. Neither acme's ``new_order``
nor certbot can send the field, so while a renewal session runs the seam forwards
``ClientV2.new_order`` and ``NewOrder.to_partial_json`` to the session, which sends each
order through :func:`send_new_order`: the ``NewOrder`` payload of the lineage the current
thread renews gets ``replaces`` (:func:`payload_replaces` reads it back for the payload). A
CA that answers 409 ``alreadyReplaced`` (an order for that certificate already used it)
gets the same order again without the field, once.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from certbot import errors

logger = logging.getLogger(__name__)

ALREADY_REPLACED = "alreadyReplaced"


class Stopped(errors.Error):
    """The run is stopping: no new order was started for this lineage."""


def is_already_replaced(exc: BaseException) -> bool:
    typ = str(getattr(exc, "typ", "") or getattr(exc, "code", "") or "")
    return typ.endswith(ALREADY_REPLACED)


def payload_replaces(local: threading.local) -> Optional[str]:
    """The certID the calling thread's NewOrder payload names (set while it is sent)."""
    return getattr(local, "replaces", None)


def send_new_order(send: Callable[..., Any], client: Any, csr_pem: bytes, *args: Any,
                   cert_id: Optional[str], local: threading.local, **kwargs: Any) -> Any:
    """``send(client, csr_pem, ...)`` with ``replaces`` = ``cert_id`` in the payload (when
    there is one); once more without it when the CA says it was already replaced."""
    from acme import messages

    if not cert_id:
        return send(client, csr_pem, *args, **kwargs)
    local.replaces = cert_id
    try:
        return send(client, csr_pem, *args, **kwargs)
    except messages.Error as exc:
        if not is_already_replaced(exc):
            raise
        logger.info("The CA says certificate %s was already replaced; ordering again "
                    "without 'replaces'", cert_id)
        local.replaces = None
        return send(client, csr_pem, *args, **kwargs)
    finally:
        local.replaces = None
