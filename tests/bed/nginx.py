"""A private nginx (Debian's 1.22) on loopback ports, for certbot's and our nginx plugins.

Layout (all inside one temp dir, 0755 so nginx's workers can read the webroot)::

    conf/           the server root: nginx.conf (absolute pid, error_log, access_log and
                    *_temp_path), mime.types, conf.d/, sites-available/ + sites-enabled/
                    (symlinks, as Debian lays them out)
    www/            root of the default HTTP server (the HTTP-01 webroot)
    run/ log/ tmp/  pid file, logs, temp paths
    bin/nginx       counting wrapper: logs its argv to ctl.log, then execs /usr/sbin/nginx

nginx opens its compiled-in error log before it reads the configuration; Debian's is
``stderr`` (``--error-log-path=stderr``), so no ``-e`` is needed (nginx >= 1.19.5 has it).
/etc/nginx and any nginx of the host are never touched: every call names ``-c
conf/nginx.conf`` (certbot's plugin calls ``CTL -c SERVER_ROOT/nginx.conf ...`` too).
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterable, Optional

from cryptography import x509

from tests.bed import certs, ports, tls

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclasses.dataclass(frozen=True)
class CtlCounts:
    configtest: int
    reload: int
    version: int
    start: int


def write_ctl_wrapper(path: Path, log: Path, *, fail_reload: bool = False,
                      hup_reload: Optional[str] = None, before_reload: str = "") -> Path:
    """An nginx that appends its argv to ``log`` and runs /usr/sbin/nginx.

    ``fail_reload``: ``-s reload`` is logged and fails (exit 1, an nginx-like message).
    ``hup_reload``: a pid file; ``-s reload`` sends SIGHUP to that master itself instead of
    letting nginx parse the configuration first (so a configuration the master cannot load
    reaches the master, which refuses it and keeps its workers). ``before_reload``: shell
    run before a reload (e.g. swap a key file between the configtest and the reload)."""
    reload_case = ""
    if fail_reload or hup_reload or before_reload:
        body = f"\t{before_reload}\n" if before_reload else ""
        if fail_reload:
            body += ('\techo "nginx: [emerg] test bed: reload made to fail" >&2\n'
                     "\texit 1\n")
        elif hup_reload:
            body += f"\tkill -HUP \"$(cat '{hup_reload}')\"\n\texit $?\n"
        reload_case = f'case "$*" in *"-s reload"*)\n{body}\t;;\nesac\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        "# certbot-batch test bed: counting nginx wrapper\n"
        f"printf '%s\\n' \"$*\" >> '{log}'\n"
        f"{reload_case}"
        f"exec {NGINX} \"$@\"\n")
    path.chmod(0o755)
    return path


class NginxError(RuntimeError):
    pass


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every symlink) below ``root``."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(filenames + [d for d in dirnames
                                        if os.path.islink(os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            else:
                with open(path, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


class Nginx:
    def __init__(self, base_dir: Optional[Path] = None, *, http_port: Optional[int] = None,
                 https_port: Optional[int] = None, startup_timeout: float = 30.0) -> None:
        self._own_dir = base_dir is None
        self.dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="bed-nginx-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.root = self.dir / "conf"
        self.conf = self.root / "nginx.conf"
        self.webroot = self.dir / "www"
        self.run_dir = self.dir / "run"
        self.log_dir = self.dir / "log"
        self.tmp_dir = self.dir / "tmp"
        self.pid_file = self.run_dir / "nginx.pid"
        self.error_log = self.log_dir / "error.log"
        self.ctl = self.dir / "bin" / "nginx"
        self.ctl_log = self.dir / "ctl.log"
        self.placeholder_dir = self.dir / "placeholder"
        self.http_port = http_port or ports.free_port()
        self.https_port = https_port or ports.free_port()
        self.startup_timeout = startup_timeout
        self._setup()

    # -- layout ----------------------------------------------------------------------------
    @property
    def sites_available(self) -> Path:
        return self.root / "sites-available"

    @property
    def sites_enabled(self) -> Path:
        return self.root / "sites-enabled"

    def certbot_args(self, ctl: Optional[Path] = None) -> list[str]:
        """certbot's --nginx-* options that point its nginx plugin at this root."""
        return ["--nginx-server-root", str(self.root), "--nginx-ctl", str(ctl or self.ctl)]

    def _setup(self) -> None:
        for d in (self.root, self.webroot, self.run_dir, self.log_dir, self.tmp_dir,
                  self.placeholder_dir, self.sites_available, self.sites_enabled,
                  self.root / "conf.d"):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            d.chmod(0o755)
        shutil.copy("/etc/nginx/mime.types", self.root / "mime.types")
        temps = "".join(f"\t{kind}_temp_path {self.tmp_dir / kind};\n"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf.write_text(
            "# certbot-batch test bed: private nginx\n"
            "user www-data;\n"
            "worker_processes 1;\n"
            f"pid {self.pid_file};\n"
            f"error_log {self.error_log} notice;\n"
            "events {\n\tworker_connections 512;\n}\n"
            "http {\n"
            "\tinclude mime.types;\n"
            "\tdefault_type application/octet-stream;\n"
            f"\taccess_log {self.log_dir / 'access.log'};\n"
            f"{temps}"
            "\tserver_names_hash_bucket_size 128;\n"
            "\tssl_session_cache off;\n"
            "\tinclude conf.d/*.conf;\n"
            "\tinclude sites-enabled/*;\n"
            "}\n")
        self.write_site("000-default", (
            "server {\n"
            f"\tlisten 127.0.0.1:{self.http_port} default_server;\n"
            "\tserver_name localhost;\n"
            f"\troot {self.webroot};\n"
            "}\n"))
        write_ctl_wrapper(self.ctl, self.ctl_log)

    def write_site(self, filename: str, text: str, enabled: bool = True) -> Path:
        path = self.sites_available / filename
        path.write_text(text)
        link = self.sites_enabled / filename
        if enabled and not link.is_symlink():
            link.symlink_to(Path("..") / "sites-available" / filename)
        return path

    def add_http_server(self, name: str, *, redirect: bool = False,
                        aliases: Iterable[str] = ()) -> Path:
        """A plain-HTTP server block for ``name``: serving www/, or redirecting to HTTPS
        the way certbot's --redirect writes it (a server-level ``if ... return 301``)."""
        names = " ".join([name, *aliases])
        if redirect:
            body = (f"\tif ($host = {name}) {{\n"
                    f"\t\treturn 301 https://$host:{self.https_port}$request_uri;\n"
                    "\t}\n\treturn 404;\n")
        else:
            body = f"\troot {self.webroot};\n"
        return self.write_site(f"{name}-http", (
            "server {\n"
            f"\tlisten 127.0.0.1:{self.http_port};\n"
            f"\tserver_name {names};\n{body}}}\n"))

    def ssl_block(self, name: str, cert_path: Path, key_path: Path,
                  aliases: Iterable[str] = ()) -> str:
        return ("server {\n"
                f"\tlisten 127.0.0.1:{self.https_port} ssl;\n"
                f"\tserver_name {' '.join([name, *aliases])};\n"
                f"\tssl_certificate {cert_path};\n"
                f"\tssl_certificate_key {key_path};\n"
                f"\troot {self.webroot};\n"
                "}\n")

    def add_ssl_server(self, name: str, cert_path: Optional[Path] = None,
                       key_path: Optional[Path] = None, aliases: Iterable[str] = ()) -> Path:
        """An SSL server block on the HTTPS port (placeholder self-signed cert if none)."""
        if cert_path is None or key_path is None:
            cert_path, key_path = self.placeholder(name)
        return self.write_site(f"{name}-ssl", self.ssl_block(name, cert_path, key_path,
                                                             aliases))

    def placeholder(self, name: str) -> tuple[Path, Path]:
        cert_path = self.placeholder_dir / f"{name}.crt"
        key_path = self.placeholder_dir / f"{name}.key"
        if not cert_path.exists():
            certs.make_leaf([name]).write(cert_path, key_path)
        return cert_path, key_path

    # -- control ---------------------------------------------------------------------------
    def nginx(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real nginx on this configuration (not counted)."""
        proc = subprocess.run([NGINX, "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=120, check=False)
        if check and proc.returncode != 0:
            raise NginxError(f"nginx {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc

    def pid(self) -> Optional[int]:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and _alive(pid)

    def workers(self) -> set[int]:
        pid = self.pid()
        return set(_children(pid)) if pid is not None and _alive(pid) else set()

    def start(self) -> None:
        if self.is_running():
            return
        self.nginx()
        self._wait(lambda: self.is_running() and bool(self.workers())
                   and ports.is_listening(self.http_port), "nginx to listen")

    def reload(self) -> None:
        """Reload (not counted) and wait until a new generation of workers runs."""
        before = self.workers()
        self.nginx("-s", "reload")
        self._wait(lambda: bool(self.workers() - before), "nginx's new workers")

    def _own_processes(self) -> list[int]:
        """Every nginx master started on this configuration, and their children."""
        needle = str(self.conf).encode()
        masters = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read()
            except OSError:
                continue
            if needle in cmdline and b"nginx" in cmdline:
                masters.append(int(entry))
        pid = self.pid()
        if pid is not None and pid not in masters and _alive(pid):
            masters.append(pid)
        return masters + [c for m in masters for c in _children(m)]

    def stop(self) -> None:
        own = self._own_processes()
        pid = self.pid()
        if pid is not None and _alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)  # fast shutdown
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + self.startup_timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        for p in own + self._own_processes():
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Nginx:
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
        raise NginxError(f"timed out waiting for {what}\n{self.logs()}")

    # -- observation -----------------------------------------------------------------------
    def ctl_calls(self) -> list[str]:
        try:
            return self.ctl_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def counts(self) -> CtlCounts:
        calls = [c.split() for c in self.ctl_calls()]
        return CtlCounts(
            configtest=sum("-t" in c for c in calls),
            reload=sum("-s" in c and "reload" in c for c in calls),
            version=sum("-V" in c for c in calls),
            start=sum(c == ["-c", str(self.conf)] for c in calls))

    def reset_counts(self) -> None:
        self.ctl_log.unlink(missing_ok=True)

    def digest(self) -> dict[str, str]:
        """sha256 of every file of the server root (the user's configuration)."""
        return tree_digest(self.root)

    def served_cert(self, name: str, timeout: float = 5.0) -> x509.Certificate:
        """The leaf certificate served on the HTTPS port for SNI ``name``."""
        cert = tls.served_leaf(self.https_port, name, timeout)
        if cert is None:
            raise NginxError(f"no certificate served for {name}")
        return cert

    def wait_for_cert(self, name: str, expected: x509.Certificate,
                      timeout: float = 20.0) -> x509.Certificate:
        """Poll until ``expected`` is served for ``name`` (old workers finish their
        connections after a reload); returns the last served certificate either way."""
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


def _alive(pid: int) -> bool:
    """Alive and not a zombie (a master that exited stays a zombie where nothing reaps
    it, e.g. in a container whose init does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()[:1] not in (["Z"], ["X"])
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out
