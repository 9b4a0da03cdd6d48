"""``batch-standalone``: certbot's standalone authenticator for the lineages of a wave.

Inside a renewal session the lineages of a wave validated together share one listener per
address and port (``challenges/standalone.py``), instead of each binding the port in turn;
it reads certbot's own ``--http-01-port`` / ``--http-01-address`` (saved as ``http01_port`` /
``http01_address`` in renewal confs). Outside a session it behaves like certbot's standalone
plugin: a listener for the challenges of this one certificate, stopped at cleanup.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

from acme import challenges
from certbot import interfaces
from certbot.achallenges import AnnotatedChallenge
from certbot.plugins import common

from certbot_batch import (
    engine,  # noqa: F401  (wires the renewal engine into certbot)
    run,
)
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.standalone import Listener, resource

logger = logging.getLogger(__name__)


class BatchStandaloneAuthenticator(common.Plugin, interfaces.Authenticator):
    """Standalone http-01 authenticator: one listener per wave (certbot-batch)."""

    description = ("Standalone authenticator for many lineages: one listener answers the "
                   "http-01 challenges of a whole renewal wave (certbot-batch).")

    @classmethod
    def add_parser_arguments(cls, add: Callable[..., None]) -> None:
        # certbot's own --http-01-port / --http-01-address.
        pass

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listener: Optional[Listener] = None
        self._own = False
        self._resources: list[Any] = []
        self._batch: Optional[ChallengeBatch] = None

    def more_info(self) -> str:
        return ("Answers HTTP-01 challenges from a web server of its own on --http-01-port, "
                "one for all the lineages a renewal run validates together.")

    def prepare(self) -> None:
        pass

    def get_chall_pref(self, identifier: str) -> Iterable[type[challenges.Challenge]]:
        return [challenges.HTTP01]

    def _address(self) -> tuple[str, int]:
        port = getattr(self.config, "http01_port", None)
        address = getattr(self.config, "http01_address", None)
        return str(address or ""), int(port if port is not None else 80)

    def perform(self, achalls: list[AnnotatedChallenge]) -> list[challenges.ChallengeResponse]:
        pairs = [resource(a) for a in achalls]
        responses = [response for response, _ in pairs]
        self._resources = [res for _, res in pairs]
        current = run.current()
        wave = current.wave if current is not None else None
        lineage = run.current_lineage()
        address, port = self._address()
        if wave is not None and lineage is not None and wave.batch.is_participant(lineage):
            with current.lock:  # type: ignore[union-attr]
                listener = wave.listeners.get((address, port))
                if listener is None:
                    listener = wave.listeners[(address, port)] = Listener(address, port)
            listener.add(self._resources)
            listener.start()
            self._listener = listener
            # At the wave's barrier with no file: the file-based lineages of the wave are
            # provisioned once everyone arrived (or dropped out).
            self._batch = wave.batch
            wave.batch.perform(lineage, [])
            return responses
        listener = Listener(address, port)
        listener.add(self._resources)
        listener.start()
        self._listener, self._own = listener, True
        return responses

    def cleanup(self, achalls: list[AnnotatedChallenge]) -> None:
        if self._listener is not None:
            self._listener.remove(self._resources)
            if self._own:
                self._listener.stop()
        lineage = run.current_lineage()
        if self._batch is not None and lineage is not None:
            self._batch.cleanup(lineage)
