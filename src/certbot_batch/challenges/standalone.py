"""HTTP-01 challenges answered by a listener of our own, for a whole wave (certbot's
standalone plugin binds its port once per lineage; lineages of a wave validated together
would fight for it).

One :class:`Listener` per (address, port) and wave serves the responses of every lineage of
the wave that uses it (acme's own ``HTTP01DualNetworkedServers``, the server certbot's
standalone plugin runs); lineages add their responses as they come and take them away on
cleanup; the wave stops its listeners when it ends.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Iterable, Optional

from acme import challenges
from acme import standalone as acme_standalone
from certbot import errors

logger = logging.getLogger(__name__)


class Listener:
    """acme's HTTP-01 server on one address and port, with a set of responses shared by
    the lineages that use it."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.resources: set[Any] = set()
        self._servers: Optional[Any] = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._servers is not None:
                return
            try:
                servers = acme_standalone.HTTP01DualNetworkedServers(
                    (self.address, self.port), self.resources)
            except OSError as exc:
                raise errors.StandaloneBindError(exc, self.port) from exc
            servers.serve_forever()
            self._servers = servers
            logger.info("certbot-batch: answering http-01 challenges on %s:%d",
                        self.address or "*", self.port)

    def add(self, resources: Iterable[Any]) -> None:
        with self._lock:
            self.resources.update(resources)

    def remove(self, resources: Iterable[Any]) -> None:
        with self._lock:
            self.resources.difference_update(resources)

    def stop(self) -> None:
        with self._lock:
            servers, self._servers = self._servers, None
        if servers is not None:
            servers.shutdown_and_server_close()


def resource(achall: Any) -> tuple[Any, Any]:
    """(the response to answer, the resource the listener serves) of one http-01 challenge."""
    response, validation = achall.response_and_validation()
    return response, acme_standalone.HTTP01RequestHandler.HTTP01Resource(
        chall=achall.chall, response=response, validation=validation)


def is_http01(achall: Any) -> bool:
    return isinstance(getattr(achall, "chall", None), challenges.HTTP01)
