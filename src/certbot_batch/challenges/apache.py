"""HTTP-01 challenges served by Apache for many lineages with one graceful reload.

All challenge files of a wave go into one directory (``<apache challenge location>/
certbot-batch-http01/.well-known/acme-challenge/``) and one configuration snippet
(``<server root>/conf-enabled/certbot-batch-acme.conf``, read before the vhosts) maps
``/.well-known/acme-challenge/`` to it for every vhost:

* a server-wide ``Alias`` (inherited by every vhost), and
* a server-wide ``RewriteRule ... [END]`` with ``RewriteOptions InheritDownBefore``, so
  vhosts that redirect HTTP to HTTPS with mod_rewrite (certbot's own ``--redirect``) still
  serve the challenge: the inherited rule runs before their own rules.
  A vhost redirecting with mod_alias ``Redirect /`` cannot be overridden from outside the
  vhost (mod_rewrite is not enabled in a vhost without its own ``RewriteEngine on``, and
  mod_alias checks the vhost's redirects before any Alias); the CA follows the redirect
  (Let's Encrypt and pebble do), and an HTTPS vhost of this Apache serves the challenge
  through the inherited server-wide Alias (tests/test_apache_deploy.py).

Then one configtest + one graceful reload, and a readiness probe over HTTP. Cleanup removes
the files and the snippet and asks the session for a reload at the end of the run (folded
into the deployment reload); outside a session it reloads at once. Snippet, files and
directories are journaled before they are created (crash safety, see journal.py).
"""
from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import secrets
import threading
import time
from typing import Iterable, Optional

from certbot import errors

from certbot_batch import paths, servers
from certbot_batch.challenges.journal import Journal
from certbot_batch.challenges.webroot import ChallengeFile, WebrootProvisioner
from certbot_batch.deploy import reload
from certbot_batch.servers import apache as apache_server
from certbot_batch.servers.base import ServerRef

logger = logging.getLogger(__name__)

SNIPPET_NAME = "certbot-batch-acme.conf"  # = journal.SNIPPET
CHALLENGE_DIR_NAME = "certbot-batch-http01"
#: How long to wait for the reloaded Apache to serve the challenges.
READY_TIMEOUT = 60.0
#: ... and how long, when Apache answers the probe with something else (403, 404, ...).
ANSWER_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class ApacheSettings:
    ctl: str
    server_root: str
    challenge_root: str
    #: reload at cleanup instead of at the end of the run (--dry-run: no final flush)
    reload_at_cleanup: bool = False
    #: certbot's config dir: the lineages whose live/ links are checked before a reload
    config_dir: str = ""

    @property
    def snippet_dir(self) -> str:
        return os.path.join(self.server_root, "conf-enabled")

    @property
    def snippet_path(self) -> str:
        return os.path.join(self.snippet_dir, SNIPPET_NAME)

    @property
    def files_dir(self) -> str:
        return os.path.join(self.challenge_root, ".well-known", "acme-challenge")


def settings_for(ctl: str, server_root: str, challenge_location: Optional[str],
                 reload_at_cleanup: bool = False,
                 config_dir: str = "") -> Optional[ApacheSettings]:
    """None when the layout has no conf-enabled/ (non-Debian): the caller falls back to
    certbot's own per-lineage Apache authenticator."""
    if not os.path.isdir(os.path.join(server_root, "conf-enabled")):
        return None
    base = challenge_location or server_root
    return ApacheSettings(ctl=ctl, server_root=server_root,
                          challenge_root=os.path.join(base, CHALLENGE_DIR_NAME),
                          reload_at_cleanup=reload_at_cleanup, config_dir=config_dir)


def snippet_text(settings: ApacheSettings) -> str:
    files = settings.files_dir
    rewrite_load = ""
    load_file = os.path.join(settings.server_root, "mods-available", "rewrite.load")
    try:
        with open(load_file, encoding="utf-8") as fh:
            rewrite_load = "".join(line for line in fh if line.strip().lower()
                                   .startswith("loadmodule"))
    except OSError:
        pass
    load_block = (f"<IfModule !rewrite_module>\n\t{rewrite_load.strip()}\n</IfModule>\n"
                  if rewrite_load else "")
    return (
        "# certbot-batch: ACME http-01 challenges of the running `certbot renew`.\n"
        "# Temporary: removed (and Apache reloaded) at the end of the run.\n"
        f"{load_block}"
        f"Alias /.well-known/acme-challenge/ {files}/\n"
        f"<Directory {settings.challenge_root}>\n"
        "\tOptions None\n"
        "\tAllowOverride None\n"
        "\tRequire all granted\n"
        "</Directory>\n"
        "<IfModule rewrite_module>\n"
        "\tRewriteEngine on\n"
        "\tRewriteOptions InheritDownBefore\n"
        f"\tRewriteRule ^/\\.well-known/acme-challenge/([A-Za-z0-9_-]+)$ {files}/$1 [END]\n"
        "</IfModule>\n")


def _fetch(host: str, port: int, vhost: str, path: str) -> tuple[Optional[int], bytes]:
    """(HTTP status, body), or (None, b"") when nothing answered."""
    conn = http.client.HTTPConnection(host, port, timeout=3)
    try:
        conn.request("GET", path, headers={"Host": vhost})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def ensure_served_dir(path: str) -> None:
    """Create ``path`` (and parents) readable and searchable by Apache's user (0755), and
    repair one of ours left 0700 (Apache then answers 403 to the CA). Modes are set with
    chmod, never through the umask: that is process-wide, shared with worker threads."""
    for directory in paths.missing_dirs(path):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass
        os.chmod(directory, 0o755)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o055 != 0o055:
        os.chmod(path, mode | 0o755)


class ApacheChallengeProvisioner(WebrootProvisioner):
    """A WebrootProvisioner that, for challenge files in the Apache challenge directory,
    also installs the snippet and reloads Apache once. Files in other webroots (batch-
    webroot lineages of the same wave) are written as by WebrootProvisioner."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.settings: Optional[ApacheSettings] = None
        self._snippet_installed = False
        self._lock = threading.Lock()
        self.reloads = 0

    def configure(self, settings: ApacheSettings) -> None:
        with self._lock:
            if self.settings is None:
                self.settings = settings
            elif self.settings != settings:
                logger.warning("certbot-batch: lineages of this run name different Apache "
                               "settings; challenges are served through %s",
                               self.settings.server_root)

    def _is_apache(self, item: ChallengeFile) -> bool:
        return self.settings is not None and item.webroot == self.settings.challenge_root

    def provision(self, items: Iterable[ChallengeFile]) -> list[tuple[ChallengeFile, Exception]]:
        items = list(items)
        apache_items = [i for i in items if self._is_apache(i)]
        if apache_items:
            assert self.settings is not None
            try:
                ensure_served_dir(self.settings.challenge_root)
            except OSError as exc:
                err = errors.PluginError(f"Cannot create {self.settings.challenge_root}: {exc}")
                return [(i, err) for i in items if self._is_apache(i)] + \
                    super().provision([i for i in items if not self._is_apache(i)])
        failures = super().provision(items)
        failed = {id(i) for i, _ in failures}
        ok_apache = [i for i in apache_items if id(i) not in failed]
        if ok_apache and not self._snippet_installed:
            try:
                self._serve(ok_apache)
            except errors.Error as exc:
                failures.extend((i, exc) for i in ok_apache)
        return failures

    def _serve(self, items: list[ChallengeFile]) -> None:
        settings = self.settings
        assert settings is not None
        snippet = settings.snippet_path
        if os.path.lexists(snippet):
            raise errors.PluginError(
                f"{snippet} exists: another certbot-batch run may be serving challenges. "
                "Remove it if no certbot is running.")
        # The reload entry lets the next run drop the snippet from a running Apache too.
        self.journal.record("server", [settings.ctl], root=settings.server_root,
                            server_kind="apache", ctl=settings.ctl)
        self.journal.record("file", [snippet])
        probe = ChallengeFile(identifier=items[0].identifier, webroot=settings.challenge_root,
                              token="certbot-batch-probe-" + secrets.token_hex(8),
                              content=secrets.token_hex(16).encode())
        super().provision([probe])
        with open(snippet, "w", encoding="utf-8") as fh:
            fh.write(snippet_text(settings))
        self._snippet_installed = True
        # The same careful reload as a deployment: live/ links safe, configtest, the reload
        # confirmed (a server taken down here would stop every site, not only validation).
        server = servers.server_for(ServerRef(apache_server.KIND, settings.ctl,
                                              settings.server_root))
        outcome = reload.deploy(server, settings.config_dir or None, [],
                                timeout=READY_TIMEOUT)
        if not outcome.ok:
            self._remove_snippet()
            raise errors.PluginError(
                f"Could not serve the http-01 challenges through Apache: {outcome.message}")
        run = reload.active()
        self.reloads += 1
        if run is not None:
            run.challenge_reloads += 1
        logger.info("certbot-batch: Apache reloaded once to serve %d challenge(s)", len(items))
        self._wait_ready(settings, probe)

    def _wait_ready(self, settings: ApacheSettings, probe: ChallengeFile) -> None:
        candidates = apache_server.http_ports(settings.server_root)
        path = "/.well-known/acme-challenge/" + probe.token
        start = time.monotonic()
        last: dict[tuple[str, int], Optional[int]] = {}
        while candidates:
            for host, port in candidates:
                status, body = _fetch(host, port, probe.identifier, path)
                if status == 200 and body == probe.content:
                    logger.debug("Apache serves the challenges on %s:%d", host, port)
                    return
                last[(host, port)] = status
            waited = time.monotonic() - start
            # Apache answering, but not with the probe, for a while: the CA would get the
            # same answer (e.g. 403 for a directory Apache may not read). Not answering at
            # all: a big config may still be loading.
            answering = any(status is not None for status in last.values())
            if waited > READY_TIMEOUT or (answering and waited > ANSWER_TIMEOUT):
                break
            time.sleep(0.1)
        answers = ", ".join(f"{h}:{p} -> {'HTTP ' + str(st) if st else 'no answer'}"
                            for (h, p), st in last.items())
        logger.warning("certbot-batch: could not confirm that Apache serves the challenges "
                       "from %s (%s); validating anyway", settings.files_dir,
                       answers or "no Listen port found")

    def _remove_snippet(self) -> bool:
        if not self._snippet_installed or self.settings is None:
            return False
        try:
            os.remove(self.settings.snippet_path)
        except FileNotFoundError:
            pass
        self._snippet_installed = False
        return True

    def cleanup(self) -> None:
        removed = self._remove_snippet()
        super().cleanup()
        if removed and self.settings is not None:
            ref = ServerRef(apache_server.KIND, self.settings.ctl, self.settings.server_root)
            if self.settings.reload_at_cleanup or not reload.request_reload(ref):
                # No renewal session (or a dry run): nobody reloads at the end, do it now.
                outcome = reload.deploy(servers.server_for(ref), self.settings.config_dir or
                                        None, [], timeout=READY_TIMEOUT)
                if not outcome.ok:
                    logger.warning("Could not reload Apache after removing the challenge "
                                   "configuration: %s", outcome.message)
