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
  (``challenges/http01.py``, ``servers/nginx.py``), and the user's files are
  byte-identical afterwards.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

from certbot import errors

from certbot_batch.challenges.http01 import ServedBy, server_for_run
from certbot_batch.deploy import reload
from certbot_batch.plugins.server import ServerConfigurator
from certbot_batch.servers import nginx as nginx_server
from certbot_batch.servers.base import ServerRef

logger = logging.getLogger(__name__)


class BatchNginxConfigurator(ServerConfigurator):
    """nginx installer + http-01 authenticator with one reload per run."""

    description = ("nginx installer for many lineages: one nginx -t and one confirmed reload "
                   "per renewal run, no configuration parse on renewal (certbot-batch).")
    STOCK = "nginx"
    NOT_INSTALLED = ("certbot's nginx plugin is not installed, and batch-nginx edits nginx's "
                     "configuration for new names through it. Install it: pip install "
                     "'certbot-batch[nginx]' (PyPI certbot) or apt-get install "
                     "python3-certbot-nginx (Debian).")

    def ref(self) -> ServerRef:
        return nginx_server.ref_of(self.config)

    def server(self) -> nginx_server.NginxServer:
        return nginx_server.NginxServer(self.ref())

    def served_by(self, names: list[str]) -> Optional[ServedBy]:
        unserved = server_for_run(self.ref()).challenge_unserved(names)
        if unserved:
            # No plain-HTTP server block at all answers these names: certbot's own nginx
            # authenticator (it adds a server block of its own), for this lineage.
            logger.warning("certbot-batch: no nginx server block answers %s over plain "
                           "HTTP; using certbot's own nginx authenticator for them",
                           ", ".join(unserved))
            return None
        return ServedBy.for_lineage(self.ref(), self.config)

    # -- Plugin -----------------------------------------------------------------------
    def prepare(self) -> None:
        # Cheap checks only: certbot's parse is deferred until an edit is really needed.
        nginx_server.find_ctl(self.ref().ctl)
        self.recover_leftovers()

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
