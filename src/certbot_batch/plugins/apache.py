"""``batch-apache``: Apache installer (and http-01 authenticator) for many lineages per run.

Editing Apache's configuration is delegated to certbot's own Apache plugin (so behaviour and
saved settings, ``apache_*`` in renewal confs, are the same), but:

* the Augeas parse only happens when a configuration edit is actually needed, and at most
  once per run (renewals of vhosts that already point at ``live/`` need none);
* inside a batch renewal session ``restart()`` only records that a reload is due; the session
  does one configtest and one graceful reload at the end of the run.
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
from certbot_batch.challenges.apache import (
    ApacheChallengeProvisioner,
    ApacheSettings,
    settings_for,
)
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.journal import Journal
from certbot_batch.challenges.webroot import ChallengeFile
from certbot_batch.deploy import reload
from certbot_batch.plugins.webroot import achall_identifier
from certbot_batch.servers import apache as apache_server
from certbot_batch.servers.base import ServerRef

logger = logging.getLogger(__name__)

_NOT_INSTALLED = ("certbot's Apache plugin is not installed, and batch-apache edits Apache's "
                  "configuration through it. Install it: pip install 'certbot-batch[apache]' "
                  "(PyPI certbot) or apt-get install python3-certbot-apache (Debian).")


def stock_apache_class() -> Any:
    """certbot's Apache configurator, found through its public plugin entry point."""
    for ep in importlib.metadata.entry_points(group="certbot.plugins"):
        if ep.name == "apache":
            try:
                return ep.load()
            except Exception as exc:  # a broken optional dependency (augeas) must not crash
                raise errors.NoInstallationError(f"{_NOT_INSTALLED} ({exc})") from exc
    raise errors.NoInstallationError(_NOT_INSTALLED)


# certbot < 1.x... 2.0 has no common.Configurator (Installer + Authenticator in one).
_Configurator: Any = getattr(common, "Configurator", None)
if _Configurator is None:
    class _Configurator(common.Installer, interfaces.Authenticator):  # type: ignore[no-redef]
        pass


class BatchApacheConfigurator(_Configurator):  # type: ignore[misc,valid-type]
    """Apache installer + http-01 authenticator with one reload per run."""

    description = ("Apache installer for many lineages: one configtest and one graceful "
                   "reload per renewal run, config parsed at most once (certbot-batch).")

    @classmethod
    def add_parser_arguments(cls, add: Callable[..., None]) -> None:
        # Apache settings are certbot's own --apache-* options (and saved apache_* values).
        pass

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._delegate: Optional[Any] = None
        self._provisioner = ApacheChallengeProvisioner(Journal(paths.journal_paths(self.config)))
        self._batch: Optional[ChallengeBatch] = None
        self._stock_challenges = False

    # -- helpers ----------------------------------------------------------------------
    def ctl(self) -> str:
        return apache_server.ctl_of(self.config)

    def ref(self) -> ServerRef:
        """The Apache instance this lineage's settings name."""
        return apache_server.ref_of(self.config)

    def delegate(self) -> Any:
        """certbot's Apache configurator, prepared (Augeas parse) on first use only."""
        if self._delegate is None:
            shared = reload.shared_delegate(self.ref())
            if shared is not None:
                self._delegate = shared
            else:
                cls = stock_apache_class()
                logger.debug("certbot-batch: preparing certbot's Apache configurator "
                             "(full configuration parse)")
                delegate = cls(config=self.config, name="apache")
                delegate.prepare()
                reload.remember_delegate(self.ref(), self.config, delegate)
                self._delegate = delegate
        return self._delegate

    # -- Plugin -----------------------------------------------------------------------
    def challenge_settings(self) -> Optional[ApacheSettings]:
        return settings_for(self.ctl(), apache_server.root_of(self.config),
                            getattr(self.config, "apache_challenge_location", None),
                            reload_at_cleanup=bool(getattr(self.config, "dry_run", False)),
                            config_dir=str(getattr(self.config, "config_dir", "") or ""))

    def prepare(self) -> None:
        # Cheap checks only: the parse is deferred until an edit is really needed.
        apache_server.find_ctl(self.ctl())
        stock_apache_class()
        # Leftover challenge files/snippet of an interrupted run go first (not while a
        # batch is live: its files are in the same journal).
        if _active_batch() is None:
            self._provisioner.journal.recover()

    def more_info(self) -> str:
        return ("Deploys certificates to Apache through certbot's Apache plugin, with one "
                "configtest and one graceful reload per renewal run.")

    # -- Installer --------------------------------------------------------------------
    def get_all_names(self) -> Iterable[str]:
        return set(self.delegate().get_all_names())

    def deploy_cert(self, domain: str, cert_path: str, key_path: str, chain_path: str,
                    fullchain_path: str) -> None:
        if reload.already_deployed(self.ref(), cert_path, key_path, fullchain_path):
            logger.debug("Apache already serves %s from %s; no edit needed",
                         domain, fullchain_path)
            return
        self.delegate().deploy_cert(domain, cert_path, key_path, chain_path, fullchain_path)
        reload.mark_edited(self.ref())

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

    def config_test(self) -> None:
        apache_server.configtest(self.ctl())

    def restart(self) -> None:
        if reload.defer_reload(self.ref(), self._delegate):
            logger.info("Apache reload deferred to the end of the run (certbot-batch)")
            return
        self.config_test()
        apache_server.graceful(self.ctl())

    # -- Authenticator ----------------------------------------------------------------
    def get_chall_pref(self, identifier: str) -> Iterable[type[challenges.Challenge]]:
        return [challenges.HTTP01]

    def perform(self, achalls: list[AnnotatedChallenge]) -> list[challenges.ChallengeResponse]:
        settings = self.challenge_settings()
        if settings is None:
            # Not a Debian-style layout (no conf-enabled/): certbot's own, per lineage.
            self._stock_challenges = True
            return list(self.delegate().perform(achalls))
        items = []
        responses = []
        lineage = run.current_lineage()
        for achall in achalls:
            response, validation = achall.response_and_validation()
            items.append(ChallengeFile(
                identifier=achall_identifier(achall), webroot=settings.challenge_root,
                token=achall.chall.encode("token"), content=validation.encode(),
                lineage=lineage))
            responses.append(response)
        batch = _active_batch()
        if (batch is not None and lineage is not None and batch.is_participant(lineage)
                and isinstance(batch.provisioner, ApacheChallengeProvisioner)):
            # Inside a batch session: one snippet + one reload serve the whole wave.
            batch.provisioner.configure(settings)
            self._batch = batch
            batch.perform(lineage, items)
            return responses
        self._provisioner.configure(settings)
        failures = self._provisioner.provision(items)
        if failures:
            self._provisioner.cleanup()
            raise failures[0][1]
        return responses

    def cleanup(self, achalls: list[AnnotatedChallenge]) -> None:
        if self._stock_challenges:
            self.delegate().cleanup(achalls)
            return
        lineage = run.current_lineage()
        if self._batch is not None and lineage is not None:
            self._batch.cleanup(lineage)
            return
        self._provisioner.cleanup()


def _active_batch() -> Optional[ChallengeBatch]:
    """The challenge batch of the wave in flight (inside a renewal session), or None."""
    current = run.current()
    return current.batch() if current is not None else None
