"""ARI ``replaces`` (RFC 9773 section 5) in the orders of lineages inside their ARI window.

An order that names the certificate it replaces, sent while that certificate is in its
suggested window, is exempt from Let's Encrypt's rate limits. Neither acme's ``new_order``
nor certbot can send the field, so for the duration of a renewal session we add it to the
``NewOrder`` payload of the lineage being renewed by the current thread. A CA that answers
409 ``alreadyReplaced`` (an order for that certificate already used it) gets the same
order again without the field, once.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Iterator, Optional

from acme import client as acme_client
from acme import messages

logger = logging.getLogger(__name__)

ALREADY_REPLACED = "alreadyReplaced"

_local = threading.local()
_lock = threading.Lock()


def _current() -> Optional[str]:
    return getattr(_local, "replaces", None)


def _is_already_replaced(exc: BaseException) -> bool:
    typ = str(getattr(exc, "typ", "") or getattr(exc, "code", "") or "")
    return typ.endswith(ALREADY_REPLACED)


@contextlib.contextmanager
def sending_replaces(lookup: Callable[[], Optional[str]]) -> Iterator[None]:
    """While active, ``ClientV2.new_order`` sends ``replaces = lookup()`` (a certID) when
    ``lookup`` returns one for the calling thread's lineage."""
    with _lock:
        original_new_order = acme_client.ClientV2.new_order
        original_to_json = messages.NewOrder.to_partial_json

        def to_partial_json(self: Any) -> Any:
            data = original_to_json(self)
            cert_id = _current()
            if cert_id:
                data = dict(data)
                data["replaces"] = cert_id
            return data

        def new_order(self: Any, csr_pem: bytes, *args: Any, **kwargs: Any) -> Any:
            cert_id = lookup()
            if not cert_id:
                return original_new_order(self, csr_pem, *args, **kwargs)
            _local.replaces = cert_id
            try:
                return original_new_order(self, csr_pem, *args, **kwargs)
            except messages.Error as exc:
                if not _is_already_replaced(exc):
                    raise
                logger.info("The CA says certificate %s was already replaced; ordering "
                            "again without 'replaces'", cert_id)
                _local.replaces = None
                return original_new_order(self, csr_pem, *args, **kwargs)
            finally:
                _local.replaces = None

        acme_client.ClientV2.new_order = new_order  # type: ignore[method-assign]
        messages.NewOrder.to_partial_json = to_partial_json  # type: ignore[method-assign]
    try:
        yield
    finally:
        with _lock:
            acme_client.ClientV2.new_order = original_new_order  # type: ignore[method-assign]
            messages.NewOrder.to_partial_json = original_to_json  # type: ignore[method-assign]
