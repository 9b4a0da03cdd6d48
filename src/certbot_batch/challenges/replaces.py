"""ARI ``replaces`` (RFC 9773 section 5) in the orders of lineages inside their ARI window.

An order that names the certificate it replaces, sent while that certificate is in its
suggested window, is exempt from Let's Encrypt's rate limits. Neither acme's ``new_order``
nor certbot can send the field, so while a renewal session runs, ``_certbot`` wraps
``ClientV2.new_order`` and ``NewOrder.to_partial_json`` with the functions made here: the
``NewOrder`` payload of the lineage the current thread renews gets ``replaces``. A CA that
answers 409 ``alreadyReplaced`` (an order for that certificate already used it) gets the
same order again without the field, once -- and so does a CA that refuses the order for any
other reason but a rate limit (a server error, ``malformed`` for a certID it cannot find, as
pebble 2.10 answers for some serials): ``replaces`` only buys the rate-limit exemption, it
must never block a renewal (CertMagic and acme.sh do the same). The log says so.

The same wrapper refuses to start a new order once the session is stopping (a stop
signal): what was issued is saved, nothing new is started.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from certbot import errors

logger = logging.getLogger(__name__)

ALREADY_REPLACED = "alreadyReplaced"
RATE_LIMITED = "rateLimited"

_local = threading.local()


class Stopped(errors.Error):
    """The run is stopping: no new order was started for this lineage."""


def _current() -> Optional[str]:
    return getattr(_local, "replaces", None)


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


def wrap_new_order(orig: Callable[..., Any], current: Callable[[], Any]) -> Callable[..., Any]:
    """``ClientV2.new_order`` that sends ``replaces`` when the run context has a certID for
    the calling thread's lineage. ``current`` returns the run context (or None)."""
    from acme import errors as acme_errors
    from acme import messages

    def new_order(self: Any, csr_pem: bytes, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        if ctx is not None and ctx.stopping.is_set():
            raise Stopped("certbot-batch: the run is stopping (signal); no new order started")
        gate = getattr(ctx, "order_gate", None) if ctx is not None else None
        if gate is not None:
            with gate.turn(ctx.current_lineage()):
                if ctx.stopping.is_set():
                    raise Stopped("certbot-batch: the run is stopping (signal); no new order "
                                  "started")
                return _ordered(self, csr_pem, *args, **kwargs)
        return _ordered(self, csr_pem, *args, **kwargs)

    def _ordered(self: Any, csr_pem: bytes, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        pacer = getattr(ctx, "pacer", None) if ctx is not None else None

        def send(client: Any, *a: Any, **kw: Any) -> Any:
            if pacer is not None:
                return pacer.new_order(orig, client, ctx.current_lineage(), *a, **kw)
            return orig(client, *a, **kw)

        lookup = ctx.replaces_for if ctx is not None else None
        cert_id = lookup() if lookup is not None else None
        if not cert_id:
            return send(self, csr_pem, *args, **kwargs)
        _local.replaces = cert_id
        try:
            return send(self, csr_pem, *args, **kwargs)
        except (messages.Error, acme_errors.ClientError) as exc:
            if not refused_for_replaces(exc):
                raise
            lineage = ctx.current_lineage() if ctx is not None else None
            if is_already_replaced(exc):
                why = "says the certificate was already replaced"
            else:
                why = f"refused the order ({_problem(exc)})"
            logger.warning("certbot-batch: the CA %s for lineage %s, whose order named the "
                           "certificate it replaces (ARI 'replaces' %s); ordering once more "
                           "without 'replaces' (this order is not exempt from the CA's rate "
                           "limits)", why, lineage or "?", cert_id)
            _local.replaces = None
            return send(self, csr_pem, *args, **kwargs)
        finally:
            _local.replaces = None
    new_order.__wrapped__ = orig  # type: ignore[attr-defined]
    return new_order


def wrap_to_partial_json(orig: Callable[..., Any]) -> Callable[..., Any]:
    def to_partial_json(self: Any, *args: Any, **kwargs: Any) -> Any:
        data = orig(self, *args, **kwargs)
        cert_id = _current()
        if cert_id:
            data = dict(data)
            data["replaces"] = cert_id
        return data
    to_partial_json.__wrapped__ = orig  # type: ignore[attr-defined]
    return to_partial_json
