"""What ``batch-apache`` and ``batch-nginx`` share: an installer that edits the server's
configuration through certbot's own plugin of that server (found through its public
``certbot.plugins`` entry point, prepared -- its full parse -- only when an edit is needed,
once per run and server instance), defers its reload to the end of a renewal session, and
an http-01 authenticator that serves a wave's challenges through the server
(``challenges/http01.py``, the server kind behind the ``servers/`` interface).
"""
from __future__ import annotations

import importlib.metadata
import logging
from typing import Any, Callable, Iterable, Optional

from acme import challenges
from certbot import errors, interfaces
from certbot.achallenges import AnnotatedChallenge
from certbot.plugins import common

from certbot_batch import (
    engine,  # noqa: F401  (wires the renewal engine into certbot)
    paths,
    run,
)
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.http01 import Http01Provisioner, ServedBy
from certbot_batch.challenges.journal import Journal
from certbot_batch.challenges.webroot import ChallengeFile
from certbot_batch.deploy import reload
from certbot_batch.plugins.webroot import achall_identifier, active_batch, hand_over, release
from certbot_batch.servers.base import ServerRef

logger = logging.getLogger(__name__)


# certbot < 1.x... 2.0 has no common.Configurator (Installer + Authenticator in one).
_Configurator: Any = getattr(common, "Configurator", None)
if _Configurator is None:
    class _Configurator(common.Installer, interfaces.Authenticator):  # type: ignore[no-redef]
        pass


class ServerConfigurator(_Configurator):  # type: ignore[misc,valid-type]
    """Installer + http-01 authenticator of one web server kind, one reload per run."""

    #: certbot's own plugin of this server (its entry-point name) and what to say without it
    STOCK = ""
    NOT_INSTALLED = ""

    @classmethod
    def add_parser_arguments(cls, add: Callable[..., None]) -> None:
        # The server's settings are certbot's own --apache-* / --nginx-* options (and the
        # apache_* / nginx_* values saved in renewal confs).
        pass

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._delegate: Optional[Any] = None
        self._provisioner = Http01Provisioner(Journal(paths.journal_paths(self.config)))
        self._batch: Optional[ChallengeBatch] = None
        self._stock_challenges = False

    # -- what each kind says ------------------------------------------------------------
    def ref(self) -> ServerRef:
        """The server instance this lineage's settings name."""
        raise NotImplementedError

    def served_by(self, names: list[str]) -> Optional[ServedBy]:
        """How this lineage's challenges for ``names`` are served through the server, or
        None: certbot's own authenticator of the server, for this lineage."""
        raise NotImplementedError

    @classmethod
    def stock_class(cls) -> Any:
        """certbot's own plugin of this server, found through its public plugin entry
        point."""
        for ep in importlib.metadata.entry_points(group="certbot.plugins"):
            if ep.name == cls.STOCK:
                try:
                    return ep.load()
                except Exception as exc:  # a broken optional dependency (augeas): no crash
                    raise errors.NoInstallationError(f"{cls.NOT_INSTALLED} ({exc})") from exc
        raise errors.NoInstallationError(cls.NOT_INSTALLED)

    # -- helpers ------------------------------------------------------------------------
    def delegate(self) -> Any:
        """certbot's own configurator, prepared (its full parse) on first use only, and
        shared by the lineages of a run that name the same instance."""
        if self._delegate is None:
            shared = reload.shared_delegate(self.ref())
            if shared is not None:
                self._delegate = shared
            else:
                cls = self.stock_class()
                logger.debug("certbot-batch: preparing certbot's %s configurator (full "
                             "configuration parse)", self.STOCK)
                delegate = cls(config=self.config, name=self.STOCK)
                delegate.prepare()
                reload.remember_delegate(self.ref(), self.config, delegate)
                self._delegate = delegate
        return self._delegate

    def recover_leftovers(self) -> None:
        """Leftover challenge files/snippets of an interrupted run go first (not while a
        batch is live: its files are in the same journal)."""
        if active_batch() is None:
            self._provisioner.journal.recover()

    # -- Installer ----------------------------------------------------------------------
    def enhance(self, domain: str, enhancement: str,
                options: Optional[Any] = None) -> None:
        self.delegate().enhance(domain, enhancement, options)
        reload.mark_edited(self.ref())

    def supported_enhancements(self) -> list[str]:
        return list(self.delegate().supported_enhancements())

    def save(self, title: Optional[str] = None, temporary: bool = False) -> None:
        if self._delegate is not None:
            self._delegate.save(title, temporary)

    def rollback_checkpoints(self, rollback: int = 1) -> None:
        self.delegate().rollback_checkpoints(rollback)

    def recovery_routine(self) -> None:
        if self._delegate is not None:
            self._delegate.recovery_routine()

    # -- Authenticator ------------------------------------------------------------------
    def get_chall_pref(self, identifier: str) -> Iterable[type[challenges.Challenge]]:
        return [challenges.HTTP01]

    def perform(self, achalls: list[AnnotatedChallenge]) -> list[challenges.ChallengeResponse]:
        names = [achall_identifier(a) for a in achalls]
        served = self.served_by(names)
        if served is None:
            self._stock_challenges = True
            return list(self.delegate().perform(achalls))
        lineage = run.current_lineage()
        batch = active_batch()
        # Inside a batch session: one snippet + one reload serve the whole wave.
        joined = batch if batch is not None and batch.is_participant(lineage) \
            and isinstance(batch.provisioner, Http01Provisioner) else None
        provisioner = joined.provisioner if joined is not None else self._provisioner
        assert isinstance(provisioner, Http01Provisioner)
        marker = provisioner.serve_through(served)
        items = []
        responses = []
        for achall, name in zip(achalls, names):
            response, validation = achall.response_and_validation()
            items.append(ChallengeFile(identifier=name, webroot=marker,
                                       token=achall.chall.encode("token"),
                                       content=validation.encode(), lineage=lineage))
            responses.append(response)
        self._batch = hand_over(joined, lineage, items, self._provisioner)
        return responses

    def cleanup(self, achalls: list[AnnotatedChallenge]) -> None:
        if self._stock_challenges:
            self.delegate().cleanup(achalls)
            return
        release(self._batch, run.current_lineage(), self._provisioner)
