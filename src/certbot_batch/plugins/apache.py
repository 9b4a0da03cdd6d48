"""``batch-apache``: Apache installer (and http-01 authenticator) for many lineages per run.

Editing Apache's configuration is delegated to certbot's own Apache plugin (so behaviour and
saved settings, ``apache_*`` in renewal confs, are the same), but:

* the Augeas parse only happens when a configuration edit is actually needed, and at most
  once per run (renewals of vhosts that already point at ``live/`` need none);
* inside a batch renewal session ``restart()`` only records that a reload is due; the session
  does one configtest and one graceful reload at the end of the run.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

from certbot_batch.challenges.http01 import ServedBy
from certbot_batch.deploy import reload
from certbot_batch.plugins.server import ServerConfigurator
from certbot_batch.servers import apache as apache_server
from certbot_batch.servers.base import ServerRef

logger = logging.getLogger(__name__)


class BatchApacheConfigurator(ServerConfigurator):
    """Apache installer + http-01 authenticator with one reload per run."""

    description = ("Apache installer for many lineages: one configtest and one graceful "
                   "reload per renewal run, config parsed at most once (certbot-batch).")
    STOCK = "apache"
    NOT_INSTALLED = ("certbot's Apache plugin is not installed, and batch-apache edits "
                     "Apache's configuration through it. Install it: pip install "
                     "'certbot-batch[apache]' (PyPI certbot) or apt-get install "
                     "python3-certbot-apache (Debian).")

    def ctl(self) -> str:
        return apache_server.ctl_of(self.config)

    def ref(self) -> ServerRef:
        return apache_server.ref_of(self.config)

    def served_by(self, names: list[str]) -> Optional[ServedBy]:
        root = apache_server.challenge_root(
            apache_server.root_of(self.config),
            getattr(self.config, "apache_challenge_location", None))
        # None: not a Debian-style layout (no conf-enabled/): certbot's own, per lineage.
        return ServedBy.for_lineage(self.ref(), self.config, root) if root is not None else None

    # -- Plugin -----------------------------------------------------------------------
    def prepare(self) -> None:
        # Cheap checks only: the parse is deferred until an edit is really needed.
        apache_server.find_ctl(self.ctl())
        self.stock_class()
        self.recover_leftovers()

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

    def config_test(self) -> None:
        apache_server.configtest(self.ctl())

    def restart(self) -> None:
        if reload.defer_reload(self.ref(), self._delegate):
            logger.info("Apache reload deferred to the end of the run (certbot-batch)")
            return
        self.config_test()
        apache_server.graceful(self.ctl())
