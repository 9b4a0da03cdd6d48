"""A private Apache (Debian's apache2) on loopback ports, for certbot's and our Apache plugins.

Layout (all inside one temp dir, 0755 so www-data can reach the webroot)::

    conf/          a copy of /etc/apache2 (ServerRoot / APACHE_CONFDIR), own envvars
    www/           DocumentRoot of the default HTTP vhost (the HTTP-01 webroot)
    run/ lock/ log/  pid file, runtime dir, mutexes, logs
    bin/apachectl  counting wrapper: logs its argv to ctl.log, execs apache2ctl with
                   APACHE_CONFDIR=conf/

/etc/apache2 and any Apache running on the host are never touched: apache2ctl is always run
with APACHE_CONFDIR set (it then passes ``-d conf/`` and reads ``conf/envvars``).

Port 443, as found in certbot's Apache configurator (certbot 5.8
``certbot/_internal/plugins/apache/configurator.py`` and 2.1
``certbot_apache/_internal/configurator.py``, same code in both):

* ``_deploy_cert`` always calls ``prepare_server_https("443")`` -- the port is a literal;
  ``config.https_port`` is not consulted by the Apache plugin. ``prepare_server_https``
  enables mod_ssl/socache_shmcb if missing (through a2enmod) and calls
  ``ensure_listen("443", https=True)``.
* ``ensure_listen`` collects the first argument of every ``Listen`` the parser sees and is
  satisfied if any of them is ``443`` or ``IP:443``. Otherwise it adds ``Listen 443`` (when
  a wildcard Listen exists) or ``Listen IP:443`` for every IP-specific Listen, inside
  ``<IfModule mod_ssl.c>`` of ports.conf -- and the next graceful reload then binds 443.
* The parser hides directives inside ``<IfModule>``/``<IfDefine>`` sections that are not
  active (``_exclude_dirs`` filters on the loaded modules and the defines from
  ``-t -D DUMP_RUN_CFG``), but it does not evaluate ``<IfVersion>``.
* A ``Listen`` with a protocol argument (``Listen 127.0.0.1:8443 https``) is also read as a
  separate bare ``https`` Listen, which ensure_listen takes for "all interfaces" and answers
  with ``Listen 443``: never give Listen a protocol argument here.
* A vhost counts as SSL when it has ``SSLEngine on`` (or port 443); ``choose_vhost`` prefers
  an existing SSL vhost whose ServerName matches, and only creates one (``make_vhost_ssl``,
  addresses rewritten to port 443) when there is none.

So the private root has (1) ``Listen 127.0.0.1:HTTP`` and ``Listen 127.0.0.1:HTTPS`` and
(2) a ``Listen 127.0.0.1:443`` inside ``<IfVersion 1.0>``: certbot's parser sees a Listen on
443 and adds none, Apache 2.4 skips the section and never binds 443. Tests create the SSL
vhost for a name up front (``add_ssl_vhost``, ``SSLEngine on`` on the HTTPS port, with a
placeholder cert), so certbot deploys into it instead of making a ``*:443`` vhost.
mod_ssl and socache_shmcb are enabled in the copy, so certbot never runs a2enmod (which
would act on /etc/apache2 unless APACHE_CONFDIR is set; ``env()`` sets it as well).
"""
from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterable, Optional, Sequence

from cryptography import x509

from tests.bed import certs, ports, tls

APACHE2CTL = "/usr/sbin/apache2ctl"
SYSTEM_CONFDIR = Path("/etc/apache2")

# The bed's Apache is built from a known baseline, not from whatever the host has enabled:
# Debian 12's default apache2.conf and enabled modules/confs. Only the package's
# *-available files are taken from /etc/apache2 (a host with an edited conf-enabled/ must
# not change test results).
BASELINE_MODS = (
    "access_compat.load", "alias.conf", "alias.load", "auth_basic.load", "authn_core.load",
    "authn_file.load", "authz_core.load", "authz_host.load", "authz_user.load",
    "autoindex.conf", "autoindex.load", "deflate.conf", "deflate.load", "dir.conf",
    "dir.load", "env.load", "filter.load", "mime.conf", "mime.load", "mpm_event.conf",
    "mpm_event.load", "negotiation.conf", "negotiation.load", "reqtimeout.conf",
    "reqtimeout.load", "setenvif.conf", "setenvif.load", "status.conf", "status.load",
)
BASELINE_CONFS = ("charset.conf", "localized-error-pages.conf",
                  "other-vhosts-access-log.conf", "security.conf", "serve-cgi-bin.conf")
BASELINE_APACHE2_CONF = """# certbot-batch test bed: Debian 12's default apache2.conf
DefaultRuntimeDir ${APACHE_RUN_DIR}
PidFile ${APACHE_PID_FILE}
Timeout 300
KeepAlive On
MaxKeepAliveRequests 100
KeepAliveTimeout 5
User ${APACHE_RUN_USER}
Group ${APACHE_RUN_GROUP}
HostnameLookups Off
ErrorLog ${APACHE_LOG_DIR}/error.log
LogLevel warn
IncludeOptional mods-enabled/*.load
IncludeOptional mods-enabled/*.conf
Include ports.conf
<Directory />
\tOptions FollowSymLinks
\tAllowOverride None
\tRequire all denied
</Directory>
<Directory /usr/share>
\tAllowOverride None
\tRequire all granted
</Directory>
<Directory /var/www/>
\tOptions Indexes FollowSymLinks
\tAllowOverride None
\tRequire all granted
</Directory>
AccessFileName .htaccess
<FilesMatch "^\\.ht">
\tRequire all denied
</FilesMatch>
LogFormat "%v:%p %h %l %u %t \\"%r\\" %>s %O \\"%{Referer}i\\" \\"%{User-Agent}i\\"" vhost_combined
LogFormat "%h %l %u %t \\"%r\\" %>s %O \\"%{Referer}i\\" \\"%{User-Agent}i\\"" combined
LogFormat "%h %l %u %t \\"%r\\" %>s %O" common
LogFormat "%{Referer}i -> %U" referer
LogFormat "%{User-agent}i" agent
IncludeOptional conf-enabled/*.conf
IncludeOptional sites-enabled/*.conf
"""


@dataclasses.dataclass(frozen=True)
class CtlCounts:
    configtest: int
    graceful: int


def write_ctl_wrapper(path: Path, confdir: Path, log: Path,
                      fail_on: Sequence[str] = (), pass_first: int = 0) -> Path:
    """An apachectl that appends its argv to ``log`` and runs apache2ctl on ``confdir``.

    Verbs in ``fail_on`` (e.g. ``configtest``, ``graceful``) are logged and then fail with
    exit status 1 and a message on stderr, like a broken Apache configuration -- except the
    first ``pass_first`` calls of that verb (counted in ``log``), which work."""
    fail_case = ""
    if fail_on:
        verbs = "|".join(fail_on)
        fail_case = (
            f'case "$*" in {verbs})\n'
            f'\tif [ "$(grep -cx -- "$*" \'{log}\')" -gt {pass_first} ]; then\n'
            '\t\techo "AH00526: Syntax error (test bed: apachectl $* made to fail)" >&2\n'
            '\t\texit 1\n'
            '\tfi;;\n'
            'esac\n')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        "# certbot-batch test bed: counting apachectl wrapper\n"
        f"printf '%s\\n' \"$*\" >> '{log}'\n"
        f"{fail_case}"
        f"APACHE_CONFDIR='{confdir}'\n"
        "export APACHE_CONFDIR\n"
        "unset APACHE_ENVVARS APACHE_ARGUMENTS APACHE_HTTPD\n"
        f"exec {APACHE2CTL} \"$@\"\n")
    path.chmod(0o755)
    return path


class ApacheError(RuntimeError):
    pass


class Apache:
    def __init__(self, base_dir: Optional[Path] = None, *, http_port: Optional[int] = None,
                 https_port: Optional[int] = None, startup_timeout: float = 20.0) -> None:
        self._own_dir = base_dir is None
        self.dir = Path(base_dir) if base_dir else Path(
            tempfile.mkdtemp(prefix="bed-apache-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # www-data must reach www/
        self.root = self.dir / "conf"
        self.webroot = self.dir / "www"
        self.run_dir = self.dir / "run"
        self.lock_dir = self.dir / "lock"
        self.log_dir = self.dir / "log"
        self.state_dir = self.dir / "state"
        self.pid_file = self.run_dir / "apache2.pid"
        self.ctl = self.dir / "bin" / "apachectl"
        self.ctl_log = self.dir / "ctl.log"
        self.placeholder_dir = self.dir / "placeholder"
        self.http_port = http_port or ports.free_port()
        self.https_port = https_port or ports.free_port()
        self.startup_timeout = startup_timeout
        self._setup()

    # -- layout ----------------------------------------------------------------------------
    @property
    def vhost_root(self) -> Path:
        return self.root / "sites-available"

    @property
    def challenge_location(self) -> Path:
        return self.root

    def certbot_args(self, ctl: Optional[Path] = None) -> list[str]:
        """certbot's --apache-* options that point its Apache plugin at this root."""
        return ["--apache-server-root", str(self.root),
                "--apache-vhost-root", str(self.vhost_root),
                "--apache-logs-root", str(self.log_dir),
                "--apache-challenge-location", str(self.challenge_location),
                "--apache-ctl", str(ctl or self.ctl)]

    def env(self) -> dict[str, str]:
        """Environment for processes that may run Apache tools (a2enmod, apache2ctl): this
        Apache's config, and a2enmod's markers in this Apache's dir, not the host's
        /var/lib/apache2 (where concurrent tests would also race on them)."""
        return {"APACHE_CONFDIR": str(self.root),
                "APACHE_STATE_DIRECTORY": str(self.state_dir)}

    def _setup(self) -> None:
        shutil.copytree(SYSTEM_CONFDIR, self.root, symlinks=True)
        (self.root / "apache2.conf").write_text(BASELINE_APACHE2_CONF)
        for kind in ("mods", "conf", "sites"):
            enabled = self.root / f"{kind}-enabled"
            shutil.rmtree(enabled, ignore_errors=True)
            enabled.mkdir()
        self._enable("mods", *BASELINE_MODS)
        self._enable("conf", *BASELINE_CONFS)
        for d in (self.webroot, self.run_dir, self.log_dir, self.placeholder_dir):
            d.mkdir(mode=0o755, exist_ok=True)
            d.chmod(0o755)
        self.lock_dir.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(self.lock_dir, "www-data")
        (self.root / "envvars").write_text(
            "# certbot-batch test bed: private Apache\n"
            "unset HOME\n"
            "export APACHE_RUN_USER=www-data\n"
            "export APACHE_RUN_GROUP=www-data\n"
            f"export APACHE_PID_FILE={self.pid_file}\n"
            f"export APACHE_RUN_DIR={self.run_dir}\n"
            f"export APACHE_LOCK_DIR={self.lock_dir}\n"
            f"export APACHE_LOG_DIR={self.log_dir}\n"
            "export LANG=C\n")
        (self.root / "ports.conf").write_text(
            "# certbot-batch test bed: loopback only. No protocol argument on Listen\n"
            "# (certbot would read it as a wildcard Listen and add `Listen 443`).\n"
            f"Listen 127.0.0.1:{self.http_port}\n"
            "<IfModule ssl_module>\n"
            f"\tListen 127.0.0.1:{self.https_port}\n"
            "</IfModule>\n"
            "# certbot's Apache plugin insists on a Listen on port 443 (prepare_server_https\n"
            "# ('443')) and adds one if it sees none; its parser does not evaluate\n"
            "# <IfVersion>, Apache does: certbot sees this Listen, Apache never binds it.\n"
            "<IfVersion 1.0>\n"
            "\tListen 127.0.0.1:443\n"
            "</IfVersion>\n")
        (self.root / "conf-enabled" / "zz-bed.conf").write_text(
            "ServerName localhost\n")
        self._enable("mods", "ssl.load", "ssl.conf", "socache_shmcb.load")
        self.write_site("000-default.conf", (
            f"<VirtualHost *:{self.http_port}>\n"
            "\tServerName localhost\n"
            f"\tDocumentRoot {self.webroot}\n"
            "\tErrorLog ${APACHE_LOG_DIR}/error.log\n"
            "\tCustomLog ${APACHE_LOG_DIR}/access.log combined\n"
            "</VirtualHost>\n"))
        (self.root / "conf-enabled" / "zz-bed-webroots.conf").write_text(
            self._directory_block(self.webroot))
        write_ctl_wrapper(self.ctl, self.root, self.ctl_log)

    def _enable(self, kind: str, *names: str) -> None:
        for name in names:
            link = self.root / f"{kind}-enabled" / name
            if not (link.is_symlink() or link.exists()):
                link.symlink_to(Path("..") / f"{kind}-available" / name)

    @staticmethod
    def _directory_block(path: Path) -> str:
        return (f"<Directory {path}>\n"
                "\tOptions None\n"
                "\tAllowOverride None\n"
                "\tRequire all granted\n"
                "</Directory>\n")

    def write_site(self, filename: str, text: str, enabled: bool = True) -> Path:
        path = self.vhost_root / filename
        path.write_text(text)
        if enabled:
            self._enable("sites", filename)
        return path

    def add_http_vhost(self, name: str, docroot: Optional[Path] = None,
                       aliases: Iterable[str] = ()) -> Path:
        """A name-based HTTP vhost (default docroot: a new dir www-NAME/, 0755)."""
        if docroot is None:
            docroot = self.dir / f"www-{name}"
            docroot.mkdir(mode=0o755, exist_ok=True)
        alias_line = f"\tServerAlias {' '.join(aliases)}\n" if aliases else ""
        return self.write_site(f"{name}.conf", (
            f"<VirtualHost *:{self.http_port}>\n"
            f"\tServerName {name}\n{alias_line}"
            f"\tDocumentRoot {docroot}\n"
            "</VirtualHost>\n" + self._directory_block(docroot)))

    def add_ssl_vhost(self, name: str, cert_path: Optional[Path] = None,
                      key_path: Optional[Path] = None, aliases: Iterable[str] = (),
                      docroot: Optional[Path] = None) -> Path:
        """A name-based SSL vhost on the HTTPS port (placeholder self-signed cert if none)."""
        if cert_path is None or key_path is None:
            cert_path = self.placeholder_dir / f"{name}.crt"
            key_path = self.placeholder_dir / f"{name}.key"
            certs.make_leaf([name]).write(cert_path, key_path)
        alias_line = f"\tServerAlias {' '.join(aliases)}\n" if aliases else ""
        return self.write_site(f"{name}-ssl.conf", (
            "<IfModule mod_ssl.c>\n"
            f"<VirtualHost *:{self.https_port}>\n"
            f"\tServerName {name}\n{alias_line}"
            f"\tDocumentRoot {docroot or self.webroot}\n"
            "\tSSLEngine on\n"
            f"\tSSLCertificateFile {cert_path}\n"
            f"\tSSLCertificateKeyFile {key_path}\n"
            "</VirtualHost>\n"
            "</IfModule>\n"))

    # -- control ---------------------------------------------------------------------------
    def _ctl_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("APACHE_ENVVARS", "APACHE_ARGUMENTS", "APACHE_HTTPD")}
        env["APACHE_CONFDIR"] = str(self.root)
        return env

    def apache2ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real apache2ctl on this root (not counted)."""
        proc = subprocess.run([APACHE2CTL, *args], env=self._ctl_env(), capture_output=True,
                              text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise ApacheError(f"apache2ctl {' '.join(args)} exited {proc.returncode}:\n"
                              f"{proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc

    def pid(self) -> Optional[int]:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # An Apache that exited stays a zombie where nothing reaps it (a container whose
        # init does not): that is not running.
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
                return fh.read().rpartition(")")[2].split()[:1] not in (["Z"], ["X"])
        except OSError:
            return False

    def start(self) -> None:
        if self.is_running():
            return
        self.apache2ctl("start")
        self._wait(lambda: self.is_running() and ports.is_listening(self.http_port)
                   and ports.is_listening(self.https_port), "Apache to listen")

    def reload(self) -> None:
        """Graceful reload (not counted); waits until the HTTP port answers again and every
        child of the old generation is gone (they would serve the old configuration)."""
        old = self._children()
        self.apache2ctl("graceful")
        self._wait(lambda: ports.is_listening(self.http_port) and not (old & self._children()),
                   "Apache's old children after reload")

    def _children(self) -> set[int]:
        master = self.pid()
        return {p for p in self._own_processes() if p != master}

    def _own_processes(self) -> list[int]:
        """Every apache2 process started on this root (pid file or not)."""
        needle = f"-d\0{self.root}\0".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read()
            except OSError:
                continue
            if needle in cmdline + b"\0":
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        try:
            self._stop()
        finally:
            # Whatever a test did to the pid file or the config, never leave a server behind.
            for pid in self._own_processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _stop(self) -> None:
        pid = self.pid()
        if pid is None or not self.is_running():
            return
        proc = self.apache2ctl("stop", check=False)
        if proc.returncode != 0:
            # apache2ctl refuses to stop a server whose configuration is now broken (tests do
            # that on purpose): SIGTERM is what "stop" sends anyway.
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Apache:
        self.start()
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.cleanup()

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.05)
        raise ApacheError(f"timed out waiting for {what}\n{self.logs()}")

    # -- observation -----------------------------------------------------------------------
    def ctl_calls(self) -> list[str]:
        try:
            return self.ctl_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def counts(self) -> CtlCounts:
        calls = [c.strip() for c in self.ctl_calls()]
        return CtlCounts(
            configtest=sum(c in ("configtest", "-t") for c in calls),
            graceful=sum(c in ("graceful", "-k graceful") for c in calls))

    def reset_counts(self) -> None:
        self.ctl_log.unlink(missing_ok=True)

    def served_cert(self, name: str, timeout: float = 5.0) -> x509.Certificate:
        """The leaf certificate served on the HTTPS port for SNI ``name``."""
        cert = tls.served_leaf(self.https_port, name, timeout)
        if cert is None:
            raise ApacheError(f"no certificate served for {name}")
        return cert

    def wait_for_cert(self, name: str, expected: x509.Certificate,
                      timeout: float = 20.0) -> x509.Certificate:
        """Poll until ``expected`` is served for ``name`` (a graceful reload takes a
        moment); returns the last served certificate either way."""
        return tls.wait_for(lambda: self.served_cert(name), expected, timeout)

    def get(self, path: str, host: str = "localhost", timeout: float = 5.0) -> tuple[int, bytes]:
        """Plain HTTP GET on the HTTP port: (status, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def logs(self) -> str:
        out = []
        for path in [self.ctl_log, *sorted(self.log_dir.glob("*.log"))]:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            out.append(f"--- {path} ---\n{text[-20000:]}")
        return "\n".join(out)

