"""``batch-webroot``: certbot's webroot authenticator, able to provision many lineages at once.

It reads certbot webroot's own settings (``-w``/``--webroot-path``, ``--webroot-map`` and the
``webroot_path``/``webroot_map`` saved in renewal confs), so switching from ``-a webroot`` to
``-a batch-webroot`` needs no other change.
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
    paths,
    run,
)
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.journal import Journal
from certbot_batch.challenges.webroot import ChallengeFile, WebrootProvisioner

logger = logging.getLogger(__name__)


def achall_identifier(achall: AnnotatedChallenge) -> str:
    ident = getattr(achall, "identifier", None)
    if ident is not None:  # certbot >= 5 (IP identifiers)
        return str(ident.value)
    return str(achall.domain)


def webroot_for(config: Any, identifier: str) -> str:
    """certbot webroot's rule: --webroot-map first, then the last -w for the rest."""
    webroot_map = getattr(config, "webroot_map", None) or {}
    if identifier in webroot_map:
        return str(webroot_map[identifier])
    webroot_path = getattr(config, "webroot_path", None) or []
    if isinstance(webroot_path, str):
        webroot_path = [webroot_path]
    return str(webroot_path[-1]) if webroot_path else ""


class BatchWebrootAuthenticator(common.Plugin, interfaces.Authenticator):
    """Webroot authenticator that provisions the challenges of all due lineages at once."""

    description = ("Webroot authenticator for many lineages: provisions, validates and cleans "
                   "up the challenges of all due lineages together (certbot-batch).")

    @classmethod
    def add_parser_arguments(cls, add: Callable[..., None]) -> None:
        # Deliberately none of our own: we read certbot webroot's -w / --webroot-map.
        pass

    @classmethod
    def inject_parser_options(cls, parser: Any, name: str) -> None:
        super().inject_parser_options(parser, name)
        # Run-wide options of the batch suite (not plugin-prefixed; usable in cli.ini as
        # e.g. "batch-engine = true"). Registered here once for the whole suite.
        from certbot_batch import options

        options.add_run_options(parser)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._provisioner = WebrootProvisioner(Journal(paths.journal_paths(self.config)))
        self._batch: Optional[ChallengeBatch] = None

    def more_info(self) -> str:
        return ("Saves HTTP-01 validation files below .well-known/acme-challenge/ in the "
                "webroot of each name (-w / --webroot-map, as certbot's webroot plugin), for "
                "all due lineages of a renewal run in one go.")

    def prepare(self) -> None:
        # Leftovers of an interrupted run go first, so nothing outlives the next run
        # (not while a batch is live: its files are in the same journal).
        if active_batch() is None:
            self._provisioner.journal.recover()

    def get_chall_pref(self, identifier: str) -> Iterable[type[challenges.Challenge]]:
        return [challenges.HTTP01]

    def perform(self, achalls: list[AnnotatedChallenge]) -> list[challenges.ChallengeResponse]:
        items = []
        responses = []
        for achall in achalls:
            response, validation = achall.response_and_validation()
            ident = achall_identifier(achall)
            items.append(ChallengeFile(
                identifier=ident, webroot=webroot_for(self.config, ident),
                token=achall.chall.encode("token"), content=validation.encode(),
                lineage=run.current_lineage()))
            responses.append(response)
        lineage = run.current_lineage()
        batch = active_batch()
        joined = batch if batch is not None and batch.is_participant(lineage) else None
        self._batch = hand_over(joined, lineage, items, self._provisioner)
        return responses

    def cleanup(self, achalls: list[AnnotatedChallenge]) -> None:
        release(self._batch, run.current_lineage(), self._provisioner)

    def auth_hint(self, failed_achalls: list[AnnotatedChallenge]) -> str:
        roots = sorted({webroot_for(self.config, achall_identifier(a)) for a in failed_achalls})
        return ("The Certificate Authority failed to download the challenge files written to "
                f"{', '.join(roots)}. Make sure these directories are what your web server "
                "serves under /.well-known/acme-challenge/ for the names concerned, over "
                "plain HTTP on port 80.")


def active_batch() -> Optional[ChallengeBatch]:
    """The challenge batch of the wave in flight (inside a renewal session), or None."""
    current = run.current()
    return current.batch() if current is not None else None


def hand_over(batch: Optional[ChallengeBatch], lineage: Optional[str],
              items: list[ChallengeFile], provisioner: WebrootProvisioner
              ) -> Optional[ChallengeBatch]:
    """A lineage's challenges, from an http-01 plugin's perform(). With ``batch`` (the wave
    it takes part in): wait for the other lineages of the wave, then one provisioning action
    serves everyone's; returns the batch, for cleanup. Without: the lineage's own, cleaned up
    again at once when one fails."""
    if batch is not None and lineage is not None:
        batch.perform(lineage, items)
        return batch
    failures = provisioner.provision(items)
    if failures:
        provisioner.cleanup()
        raise failures[0][1]
    return None


def release(batch: Optional[ChallengeBatch], lineage: Optional[str],
            provisioner: WebrootProvisioner) -> None:
    """The cleanup() of a lineage ``hand_over`` served: the wave cleans up once its last
    lineage is done; a lineage served alone cleans up its own."""
    if batch is not None and lineage is not None:
        batch.cleanup(lineage)
    else:
        provisioner.cleanup()
