"""Apache: its control program, its configuration files, and one instance as a ``Server``.

Everything here reads Apache's configuration as text (Include/IncludeOptional followed from
the main file, ``${VAR}`` from the environment): milliseconds where certbot's Augeas parse
of a big server takes minutes. ``<IfModule>``/``<IfDefine>`` are not evaluated, so a walk
may see a little more than Apache reads -- never less, for files reachable from the main
configuration.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
from typing import Any, Optional, Sequence

from certbot import errors

from certbot_batch.servers.base import ChallengePlan, Endpoint, Server, ServerRef

logger = logging.getLogger(__name__)

KIND = "apache"
#: certbot's Apache plugin defaults (Debian layout), as its --apache-ctl / --apache-server-root
DEFAULT_CTL = "apache2ctl"
DEFAULT_ROOT = "/etc/apache2"
#: The file Apache starts from, by layout (Debian first).
MAIN_CONFIGS = ("apache2.conf", "httpd.conf", "conf/httpd.conf")
#: http-01 as authenticator: the snippet (in conf-enabled/, read before the vhosts) and the
#: directory (inside the challenge location) whose ``.well-known/acme-challenge/`` it serves
SNIPPET_NAME = "certbot-batch-acme.conf"
SNIPPET_DIR = "conf-enabled"
CHALLENGE_DIR_NAME = "certbot-batch-http01"

_CERT_DIRECTIVE = re.compile(
    r"^\s*SSLCertificate(?:Key|Chain)?File\s+\"?([^\"\s]+)\"?", re.IGNORECASE | re.MULTILINE)
_INCLUDE = re.compile(r"^\s*Include(?:Optional)?\s+\"?([^\"\s]+)\"?", re.IGNORECASE | re.MULTILINE)
_DEFINE_VAR = re.compile(r"\$\{([A-Za-z0-9_]+)\}")
_LISTEN = re.compile(r"^\s*Listen\s+(\S+)", re.IGNORECASE | re.MULTILINE)
_VHOST_OPEN = re.compile(r"^\s*<VirtualHost\s+([^>]+)>", re.IGNORECASE)
_VHOST_CLOSE = re.compile(r"^\s*</VirtualHost\s*>", re.IGNORECASE)
_NAME = re.compile(r"^\s*Server(?:Name|Alias)\s+(.+)$", re.IGNORECASE)
_CERT_FILE = re.compile(r"^\s*SSLCertificate(?:Key)?File\s+\"?([^\"\s]+)\"?", re.IGNORECASE)
_PID_FILE = re.compile(r'^PidFile:\s*"?([^"\n]+)"?\s*$', re.MULTILINE)


# -- the control program -----------------------------------------------------------------

def ctl_of(config: Any) -> str:
    return str(getattr(config, "apache_ctl", None) or DEFAULT_CTL)


def root_of(config: Any) -> str:
    return str(getattr(config, "apache_server_root", None) or DEFAULT_ROOT)


def ref_of(config: Any) -> ServerRef:
    """The Apache instance a lineage's (or the command line's) settings name."""
    return ServerRef(KIND, ctl_of(config), root_of(config))


def find_ctl(ctl: str) -> str:
    path = ctl if os.path.sep in ctl else shutil.which(ctl)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise errors.NoInstallationError(
            f"Apache's control program '{ctl}' was not found or is not executable. Install "
            "Apache (Debian: apt-get install apache2) or point --apache-ctl at apachectl "
            "(saved as apache_ctl in the renewal conf).")
    return path


def _run(cmd: Sequence[str], what: str) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False,
                              timeout=600)
    except OSError as exc:
        raise errors.MisconfigurationError(f"Could not run {' '.join(cmd)}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise errors.MisconfigurationError(f"{' '.join(cmd)} timed out") from exc
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise errors.MisconfigurationError(
            f"Apache {what} failed ({' '.join(cmd)} exited {proc.returncode}): {output}")
    return output


def configtest(ctl: str) -> str:
    return _run([find_ctl(ctl), "configtest"], "configtest")


def graceful(ctl: str) -> str:
    return _run([find_ctl(ctl), "graceful"], "graceful reload")


def said_not_running(output: str) -> bool:
    """httpd -k graceful on a stopped server prints "... not running" and starts it."""
    return "not running" in output


# -- the configuration, as text ------------------------------------------------------------

def _resolve(root: str, pattern: str) -> list[str]:
    pattern = _expand(pattern)
    if not os.path.isabs(pattern):
        pattern = os.path.join(root, pattern)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "*")
    return sorted(glob.glob(pattern))


def _expand(text: str) -> str:
    return _DEFINE_VAR.sub(lambda m: os.environ.get(m.group(1), m.group(0)), text)


def config_files(root: str) -> list[str]:
    """The files Apache reads, following Include/IncludeOptional from the main config."""
    main = next((os.path.join(root, m) for m in MAIN_CONFIGS
                 if os.path.isfile(os.path.join(root, m))), None)
    if main is None:  # unknown layout: every *.conf below the root
        return sorted(glob.glob(os.path.join(root, "**", "*.conf"), recursive=True))
    out: list[str] = []
    seen: set[str] = set()
    todo = [main]
    while todo:
        path = todo.pop(0)
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        out.append(path)
        text = _read(real)
        for pattern in _INCLUDE.findall(text):
            todo.extend(_resolve(root, pattern))
    return out


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def referenced_paths(root: str) -> set[str]:
    """Every certificate/key path that Apache's enabled config files name."""
    found: set[str] = set()
    for path in config_files(root):
        found.update(_expand(p) for p in _CERT_DIRECTIVE.findall(_read(path)))
    return found


def http_ports(server_root: str) -> list[tuple[str, int]]:
    """Plain-HTTP candidates from the Listen directives (443 skipped), loopback first."""
    found: list[tuple[str, int]] = []
    for path in config_files(server_root):
        for arg in _LISTEN.findall(_read(path)):
            host, _, port_s = arg.rpartition(":")
            if not port_s.isdigit() or int(port_s) == 443:
                continue
            host = host.strip("[]")
            if host in ("", "*", "0.0.0.0", "::"):
                host = "127.0.0.1"
            if ":" in host:
                continue  # IPv6: keep it simple, loopback v4 is tried anyway
            if (host, int(port_s)) not in found:
                found.append((host, int(port_s)))
    return found


def _address(arg: str) -> Optional[tuple[str, int]]:
    host, _, port = _expand(arg).rpartition(":")
    if not port.isdigit():
        return None
    host = host.strip("[]")
    if host in ("", "*", "_default_", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


def vhost_endpoints(root: str) -> dict[str, list[Endpoint]]:
    """Certificate/key file -> the (address, port, server name) of each SSL vhost naming it."""
    out: dict[str, list[Endpoint]] = {}
    for path in config_files(root):
        addresses: Optional[list[tuple[str, int]]] = None
        names: list[str] = []
        files: list[str] = []
        for line in _read(path).splitlines():
            if line.lstrip().startswith("#"):
                continue
            opened = _VHOST_OPEN.match(line)
            if opened:
                addresses = [a for a in map(_address, opened.group(1).split()) if a]
                names, files = [], []
                continue
            if addresses is None:
                continue
            if _VHOST_CLOSE.match(line):
                sni = next((n for n in names if "*" not in n), names[0] if names else "")
                sni = sni.replace("*.", "certbot-batch-probe.", 1)
                for f in files:
                    out.setdefault(f, []).extend(Endpoint(h, p, sni) for h, p in addresses)
                addresses = None
                continue
            name = _NAME.match(line)
            if name:
                names.extend(name.group(1).split())
                continue
            cert = _CERT_FILE.match(line)
            if cert:
                files.append(_expand(cert.group(1)))
    return out


# -- http-01 challenges ----------------------------------------------------------------------
#
# All challenge files of a wave go into one directory (``<challenge location>/
# certbot-batch-http01/.well-known/acme-challenge/``) and one snippet maps
# ``/.well-known/acme-challenge/`` to it for every vhost:
#
# * a server-wide ``Alias`` (inherited by every vhost), and
# * a server-wide ``RewriteRule ... [END]`` with ``RewriteOptions InheritDownBefore``, so
#   vhosts that redirect HTTP to HTTPS with mod_rewrite (certbot's own ``--redirect``) still
#   serve the challenge: the inherited rule runs before their own rules.
#   A vhost redirecting with mod_alias ``Redirect /`` cannot be overridden from outside the
#   vhost (mod_rewrite is not enabled in a vhost without its own ``RewriteEngine on``, and
#   mod_alias checks the vhost's redirects before any Alias); the CA follows the redirect
#   (Let's Encrypt and pebble do), and an HTTPS vhost of this Apache serves the challenge
#   through the inherited server-wide Alias (tests/test_apache_deploy.py).

def challenge_root(server_root: str, location: Optional[str]) -> Optional[str]:
    """The directory challenge files are served from, or None when the layout has no
    conf-enabled/ (non-Debian): the caller falls back to certbot's own per-lineage Apache
    authenticator."""
    if not os.path.isdir(os.path.join(server_root, SNIPPET_DIR)):
        return None
    return os.path.join(location or server_root, CHALLENGE_DIR_NAME)


def snippet_text(server_root: str, files_root: str) -> str:
    files = os.path.join(files_root, ".well-known", "acme-challenge")
    rewrite_load = ""
    load_file = os.path.join(server_root, "mods-available", "rewrite.load")
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
        f"<Directory {files_root}>\n"
        "\tOptions None\n"
        "\tAllowOverride None\n"
        "\tRequire all granted\n"
        "</Directory>\n"
        "<IfModule rewrite_module>\n"
        "\tRewriteEngine on\n"
        "\tRewriteOptions InheritDownBefore\n"
        f"\tRewriteRule ^/\\.well-known/acme-challenge/([A-Za-z0-9_-]+)$ {files}/$1 [END]\n"
        "</IfModule>\n")


class ApacheServer(Server):
    """One Apache instance: its control program and server root."""

    def __init__(self, ref: ServerRef) -> None:
        super().__init__(ref)
        self._pid_file: Optional[str] = None
        self._pid_known = False

    title = "Apache"
    SNIPPET_NAME = SNIPPET_NAME
    SERVES_FILES = True

    def ctl_problem(self) -> Optional[str]:
        try:
            find_ctl(self.ref.ctl)
        except errors.Error as exc:
            return str(exc)
        return None

    def configtest(self) -> None:
        configtest(self.ref.ctl)

    def reload(self) -> str:
        output = graceful(self.ref.ctl)
        if said_not_running(output):
            logger.warning("%s was not running %s: `%s graceful` started it.", self.title,
                           self.where(), self.ref.ctl)
        return output

    def pid_file(self) -> Optional[str]:
        """From ``apachectl -t -D DUMP_RUN_CFG`` (envvars and defines applied by apachectl
        itself), asked once."""
        if not self._pid_known:
            self._pid_known = True
            try:
                output = _run([find_ctl(self.ref.ctl), "-t", "-D", "DUMP_RUN_CFG"],
                              "configuration dump")
            except errors.Error as exc:
                logger.info("certbot-batch: %s: no pid file known (%s)", self.label(), exc)
                return None
            match = _PID_FILE.search(output)
            if match:
                path = match.group(1).strip()
                self._pid_file = path if os.path.isabs(path) else \
                    os.path.join(self.ref.root, path)
        return self._pid_file

    def referenced_paths(self) -> set[str]:
        return referenced_paths(self.ref.root)

    def endpoints(self) -> dict[str, list[Endpoint]]:
        return vhost_endpoints(self.ref.root)

    # -- http-01 challenges ----------------------------------------------------------------
    def challenge_snippet_path(self) -> str:
        return os.path.join(self.ref.root, SNIPPET_DIR, SNIPPET_NAME)

    @classmethod
    def snippet_misplaced(cls, path: str, root: Optional[str]) -> Optional[str]:
        if os.path.basename(os.path.dirname(path)) != SNIPPET_DIR:
            return f"not in a {SNIPPET_DIR} directory"
        return None

    def challenge_plan(self, names: list[str], tokens: dict[str, bytes],
                       files_root: Optional[str], first: bool) -> ChallengePlan:
        # The snippet serves whatever is in the directory: the same text for every lineage
        # of the run (a late lineage's files need no reload).
        if files_root is None:
            raise errors.PluginError("Apache serves the challenges from a directory; none "
                                     "was given")
        host = names[0] if names else "localhost"
        return ChallengePlan(snippet=snippet_text(self.ref.root, files_root), inserts={},
                             digests={},
                             probes=[(h, p, host) for h, p in http_ports(self.ref.root)])
