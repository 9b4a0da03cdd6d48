"""ARI ``replaces`` (RFC 9773 section 5) in the orders of lineages inside their ARI window.

An order that names the certificate it replaces, sent while that certificate is in its
suggested window, is exempt from Let's Encrypt's rate limits. Neither acme's ``new_order``
nor certbot can send the field, so while a renewal session runs the seam forwards
``ClientV2.new_order`` and ``NewOrder.to_partial_json`` to the session, which sends each
order through :func:`send_new_order`: the ``NewOrder`` payload of the lineage the current
thread renews gets ``replaces`` (:func:`payload_replaces` reads it back for the payload). A
CA that answers 409 ``alreadyReplaced`` (an order for that certificate already used it)
gets the same order again without the field, once -- and so does a CA that refuses the
order for any other reason but a rate limit (a server error, ``malformed`` for a certID it
cannot find, as pebble 2.10 answers for some serials): ``replaces`` only buys the rate-limit
exemption, it must never block a renewal (CertMagic and acme.sh do the same). The log says
so.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from certbot import errors

logger = logging.getLogger(__name__)

ALREADY_REPLACED = "alreadyReplaced"
RATE_LIMITED = "rateLimited"


class Stopped(errors.Error):
    """The run is stopping: no new order was started for this lineage."""


def is_already_replaced(exc: BaseException) -> bool:
    typ = str(getattr(exc, "typ", "") or getattr(exc, "code", "") or "")
    return typ.endswith(ALREADY_REPLACED)


def _problem(exc: BaseException) -> str:
    typ = str(getattr(exc, "typ", "") or getattr(exc, "code", "") or "")
    detail = str(getattr(exc, "detail", "") or exc)
    return f"{typ}: {detail}" if typ else detail


def refused_for_replaces(exc: BaseException) -> bool:
    """Is this new-order refusal worth one more try without ``replaces``? Every refusal
    of the CA but a rate limit (which the same order without the field would meet too, and
    without the exemption)."""
    from acme import errors as acme_errors
    from acme import messages

    if isinstance(exc, messages.Error):
        typ = str(getattr(exc, "typ", "") or getattr(exc, "code", "") or "")
        return not typ.endswith(RATE_LIMITED)
    # An HTTP error without a problem document (a bare 500 from a proxy or the CA).
    return isinstance(exc, acme_errors.ClientError) and not isinstance(exc, messages.Error)


def payload_replaces(local: threading.local) -> Optional[str]:
    """The certID the calling thread's NewOrder payload names (set while it is sent)."""
    return getattr(local, "replaces", None)


def send_new_order(send: Callable[..., Any], client: Any, csr_pem: bytes, *args: Any,
                   cert_id: Optional[str], local: threading.local,
                   lineage: Optional[str] = None, **kwargs: Any) -> Any:
    """``send(client, csr_pem, ...)`` with ``replaces`` = ``cert_id`` in the payload (when
    there is one); once more without it when the CA refuses the order for any reason but
    a rate limit."""
    from acme import errors as acme_errors
    from acme import messages

    if not cert_id:
        return send(client, csr_pem, *args, **kwargs)
    local.replaces = cert_id
    try:
        return send(client, csr_pem, *args, **kwargs)
    except (messages.Error, acme_errors.ClientError) as exc:
        if not refused_for_replaces(exc):
            raise
        if is_already_replaced(exc):
            why = "says the certificate was already replaced"
        else:
            why = f"refused the order ({_problem(exc)})"
        logger.warning("certbot-batch: the CA %s for lineage %s, whose order named the "
                       "certificate it replaces (ARI 'replaces' %s); ordering once more "
                       "without 'replaces' (this order is not exempt from the CA's rate "
                       "limits)", why, lineage or "?", cert_id)
        local.replaces = None
        return send(client, csr_pem, *args, **kwargs)
    finally:
        local.replaces = None
