"""``batch-nginx``: nginx installer (and http-01 authenticator) for many lineages per run.

It reads the settings certbot's own nginx plugin saved (``nginx_server_root``,
``nginx_ctl``: ``--nginx-server-root``/``--nginx-ctl``), so ``-i nginx`` becomes ``-i
batch-nginx`` without another option. Unlike certbot's plugin:

* no full configuration parse on renewal: when the server blocks already name the
  lineage's ``live/`` files (a text walk, ``servers/nginx.py``), ``deploy_cert`` has nothing
  to do; only a certificate for new names goes through certbot's own nginx installer code
  (found through its public ``certbot.plugins`` entry point, whichever package ships it);
* inside a renewal session ``restart()`` only records that a reload is due; the session
  does one ``nginx -t`` and one confirmed reload per nginx instance at the end of the run;
* ``nginx -t`` runs before any CA contact: a lineage whose nginx configuration is already
  broken is not renewed (``NginxServer.ctl_problem``, once per instance);
* as authenticator, the http-01 challenges of a whole wave are served with one reload
  (``challenges/nginx.py``), and the user's files are byte-identical afterwards.
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
from certbot_batch.challenges import nginx as nginx_challenges
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.journal import Journal
from certbot_batch.challenges.nginx import NginxChallengeProvisioner
from certbot_batch.challenges.webroot import ChallengeFile
from certbot_batch.deploy import reload
from certbot_batch.plugins.webroot import achall_identifier
from certbot_batch.servers import nginx as nginx_server
from certbot_batch.servers.base import ServerRef

logger = logging.getLogger(__name__)

_NOT_INSTALLED = ("certbot's nginx plugin is not installed, and batch-nginx edits nginx's "
                  "configuration for new names through it. Install it: pip install "
                  "'certbot-batch[nginx]' (PyPI certbot) or apt-get install "
                  "python3-certbot-nginx (Debian).")


def stock_nginx_class() -> Any:
    """certbot's nginx configurator, found through its public plugin entry point
    (``certbot_nginx._internal`` up to 5.4, inside certbot from 5.5)."""
    for ep in importlib.metadata.entry_points(group="certbot.plugins"):
        if ep.name == "nginx":
            try:
                return ep.load()
            except Exception as exc:  # a broken optional dependency must not crash
                raise errors.NoInstallationError(f"{_NOT_INSTALLED} ({exc})") from exc
    raise errors.NoInstallationError(_NOT_INSTALLED)


# certbot < 1.x... 2.0 has no common.Configurator (Installer + Authenticator in one).
_Configurator: Any = getattr(common, "Configurator", None)
if _Configurator is None:
    class _Configurator(common.Installer, interfaces.Authenticator):  # type: ignore[no-redef]
        pass


class BatchNginxConfigurator(_Configurator):  # type: ignore[misc,valid-type]
    """nginx installer + http-01 authenticator with one reload per run."""

    description = ("nginx installer for many lineages: one nginx -t and one confirmed reload "
                   "per renewal run, no configuration parse on renewal (certbot-batch).")

    @classmethod
    def add_parser_arguments(cls, add: Callable[..., None]) -> None:
        # nginx settings are certbot's own --nginx-* options (and saved nginx_* values).
        pass

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._delegate: Optional[Any] = None
        self._provisioner = NginxChallengeProvisioner(Journal(paths.journal_paths(self.config)))
        self._batch: Optional[ChallengeBatch] = None
        self._stock_challenges = False

    # -- helpers ----------------------------------------------------------------------
    def ref(self) -> ServerRef:
        """The nginx instance this lineage's settings name."""
        return nginx_server.ref_of(self.config)

    def server(self) -> nginx_server.NginxServer:
        return nginx_server.NginxServer(self.ref())

    def delegate(self) -> Any:
        """certbot's nginx configurator, prepared (its full parse) on first use only."""
        if self._delegate is None:
            shared = reload.shared_delegate(self.ref())
            if shared is not None:
                self._delegate = shared
            else:
                cls = stock_nginx_class()
                logger.debug("certbot-batch: preparing certbot's nginx configurator "
                             "(full configuration parse)")
                delegate = cls(config=self.config, name="nginx")
                delegate.prepare()
                reload.remember_delegate(self.ref(), self.config, delegate)
                self._delegate = delegate
        return self._delegate

    # -- Plugin -----------------------------------------------------------------------
    def prepare(self) -> None:
        # Cheap checks only: certbot's parse is deferred until an edit is really needed.
        nginx_server.find_ctl(self.ref().ctl)
        # Leftovers of an interrupted run go first (not while a batch is live: its files
        # are in the same journal).
        if _active_batch() is None:
            self._provisioner.journal.recover()

    def more_info(self) -> str:
        return ("Deploys certificates to nginx with one nginx -t and one confirmed reload per "
                "renewal run; edits server blocks through certbot's nginx plugin only for "
                "new names.")

    # -- Installer --------------------------------------------------------------------
    def get_all_names(self) -> Iterable[str]:
        # The text walk: every plain server_name (certbot's own filters out the rest too).
        found = nginx_server.walk(self.ref().root)
        return {n for b in found.servers for n in b.names
                if n and n != "_" and "*" not in n and not n.startswith(("~", "."))}

    def deploy_cert(self, domain: str, cert_path: str, key_path: str, chain_path: str,
                    fullchain_path: str) -> None:
        if reload.already_deployed(self.ref(), cert_path, key_path, fullchain_path) or \
                self._served_outside_session(key_path, fullchain_path):
            logger.debug("nginx already serves %s from %s; no edit needed",
                         domain, fullchain_path)
            return
        self.delegate().deploy_cert(domain, cert_path, key_path, chain_path, fullchain_path)
        reload.mark_edited(self.ref())

    def _served_outside_session(self, key_path: str, fullchain_path: str) -> bool:
        if reload.active() is not None:
            return False  # already_deployed answered for the session
        refs = nginx_server.walk(self.ref().root).cert_paths
        return key_path in refs and fullchain_path in refs

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
        self.server().configtest()

    def restart(self) -> None:
        if reload.defer_reload(self.ref(), self._delegate):
            logger.info("nginx reload deferred to the end of the run (certbot-batch)")
            return
        outcome = reload.deploy(self.server(), str(getattr(self.config, "config_dir", "")
                                                   or "") or None, [])
        if not outcome.ok:
            raise errors.MisconfigurationError(outcome.message)

    # -- Authenticator ----------------------------------------------------------------
    def get_chall_pref(self, identifier: str) -> Iterable[type[challenges.Challenge]]:
        return [challenges.HTTP01]

    def perform(self, achalls: list[AnnotatedChallenge]) -> list[challenges.ChallengeResponse]:
        settings = nginx_challenges.settings_for(self.config)
        names = [achall_identifier(a) for a in achalls]
        _, unserved = nginx_challenges.plan(
            nginx_challenges.walk_for_run(settings.server_root), names)
        if unserved:
            # No plain-HTTP server block at all answers these names: certbot's own nginx
            # authenticator (it adds a server block of its own), for this lineage.
            logger.warning("certbot-batch: no nginx server block answers %s over plain "
                           "HTTP; using certbot's own nginx authenticator for them",
                           ", ".join(unserved))
            self._stock_challenges = True
            return list(self.delegate().perform(achalls))
        items = []
        responses = []
        lineage = run.current_lineage()
        for achall, name in zip(achalls, names):
            response, validation = achall.response_and_validation()
            items.append(ChallengeFile(
                identifier=name, webroot=settings.marker,
                token=achall.chall.encode("token"), content=validation.encode(),
                lineage=lineage))
            responses.append(response)
        batch = _active_batch()
        if (batch is not None and lineage is not None and batch.is_participant(lineage)
                and isinstance(batch.provisioner, NginxChallengeProvisioner)):
            # Inside a batch session: one snippet + one reload serve the whole wave.
            batch.provisioner.configure_nginx(settings)
            self._batch = batch
            batch.perform(lineage, items)
            return responses
        self._provisioner.configure_nginx(settings)
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
