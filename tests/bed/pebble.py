"""A private Pebble ACME server (Debian's pebble 2.4.0) on loopback ports.

Pebble has no TLS certificate of its own in Debian's package, so we make a throw-away CA and
a leaf for localhost/127.0.0.1 for its HTTPS listeners; clients trust it through
``REQUESTS_CA_BUNDLE=pebble.ca_bundle`` (this overrides the machine-wide value).

Name resolution goes through a private ``pebble-challtestsrv`` whose DNS server answers
127.0.0.1 for every name (and nothing for AAAA), so the HTTP-01 validator always connects to
``127.0.0.1:http_port``: the test Apache's HTTP port.

With ``dns_server="127.0.0.1:PORT"`` (e.g. ``tests.bed.bind.Bind().address``) pebble resolves
through that server instead (its ``-dnsserver``; dns-01 TXT lookups included) and no
challtestsrv is started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Callable, Optional

from cryptography import x509

from tests.bed import certs, ports

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"

#: Issuer common names of certificates issued by pebble start with this.
INTERMEDIATE_CN_PREFIX = "Pebble Intermediate CA"


class PebbleError(RuntimeError):
    pass


class Pebble:
    """Pebble + pebble-challtestsrv as a context manager.

    :param http_port: port the HTTP-01 validator connects to (the test Apache's HTTP port).
    :param va_sleeptime: max random validation delay in seconds; None = PEBBLE_VA_NOSLEEP=1.
    :param authz_reuse: PEBBLE_AUTHZREUSE percentage (0 still reuses ~1% of the time).
    :param always_valid: PEBBLE_VA_ALWAYS_VALID=1 (no validation at all).
    :param dns_server: ``HOST:PORT`` of the DNS server pebble resolves with (a test BIND);
        None = a private pebble-challtestsrv that answers 127.0.0.1 for every name.
    :param validity_period: lifetime of every certificate it issues, in seconds (pebble's
        ``certificateValidityPeriod``); None = pebble's default (5 years in 2.4).
    """

    def __init__(self, http_port: int, *, va_sleeptime: Optional[int] = None,
                 authz_reuse: int = 0, always_valid: bool = False,
                 base_dir: Optional[Path] = None, startup_timeout: float = 30.0,
                 dns_server: Optional[str] = None,
                 validity_period: Optional[int] = None) -> None:
        self.http_port = http_port
        self.validity_period = validity_period
        self.va_sleeptime = va_sleeptime
        self.authz_reuse = authz_reuse
        self.always_valid = always_valid
        self.dns_server = dns_server
        self.startup_timeout = startup_timeout
        self._own_dir = base_dir is None
        self.dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="bed-pebble-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # the CA bundle must be readable by certbot run as another user
        self.port = 0
        self.management_port = 0
        self.tls_port = 0
        self.dns_port = 0
        self.challtestsrv_management_port = 0
        self.ca_bundle = self.dir / "ca.pem"
        self.config_path = self.dir / "pebble-config.json"
        self.pebble_log = self.dir / "pebble.log"
        self.challtestsrv_log = self.dir / "challtestsrv.log"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._ssl_context: Optional[ssl.SSLContext] = None

    # -- addresses ------------------------------------------------------------------------
    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    def client_env(self) -> dict[str, str]:
        """Environment for ACME clients (requests) talking to this pebble."""
        return {"REQUESTS_CA_BUNDLE": str(self.ca_bundle), "SSL_CERT_FILE": str(self.ca_bundle)}

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Pebble:
        self.start()
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.cleanup()

    def start(self) -> None:
        if self._procs:
            return
        self._write_tls()
        if self.dns_server is None:
            self.dns_port = ports.free_port(udp_too=True)
            self.challtestsrv_management_port = ports.free_port()
        self.port, self.management_port, self.tls_port = ports.free_ports(3)
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.dir / "pebble-cert.pem"),
            "privateKey": str(self.dir / "pebble-key.pem"),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity_period is not None:
            config["certificateValidityPeriod"] = int(self.validity_period)
        self.config_path.write_text(json.dumps({"pebble": config}, indent=2))
        try:
            if self.dns_server is None:
                self._spawn([CHALLTESTSRV, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                             "-dns01", f"127.0.0.1:{self.dns_port}",
                             "-management", f"127.0.0.1:{self.challtestsrv_management_port}",
                             "-http01", "", "-https01", "", "-tlsalpn01", ""],
                            self.challtestsrv_log, {})
                self._wait(lambda: ports.is_listening(self.challtestsrv_management_port),
                           "pebble-challtestsrv management port")
                dns_server = f"127.0.0.1:{self.dns_port}"
            else:
                dns_server = self.dns_server
            env = {"PEBBLE_WFE_NONCEREJECT": "0",
                   "PEBBLE_AUTHZREUSE": str(self.authz_reuse)}
            if self.va_sleeptime is None:
                env["PEBBLE_VA_NOSLEEP"] = "1"
            else:
                env["PEBBLE_VA_SLEEPTIME"] = str(self.va_sleeptime)
            if self.always_valid:
                env["PEBBLE_VA_ALWAYS_VALID"] = "1"
            self._spawn([PEBBLE, "-config", str(self.config_path),
                         "-dnsserver", dns_server, "-strict=false"],
                        self.pebble_log, env)
            self._wait(self._directory_answers, "pebble directory")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in reversed(self._procs):
            _kill_group(proc)
        self._procs.clear()
        for fh in self._logs:
            fh.close()
        self._logs.clear()

    def cleanup(self) -> None:
        """stop() and remove the temp dir (if we made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def is_running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    # -- queries ---------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context(cafile=str(self.ca_bundle))
        return self._ssl_context

    def get(self, url: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(url, timeout=timeout,  # noqa: S310 (loopback https)
                                    context=self.ssl_context()) as resp:
            return bytes(resp.read())

    def directory(self) -> dict[str, object]:
        return dict(json.loads(self.get(self.directory_url)))

    def intermediate(self) -> x509.Certificate:
        """Pebble's (first) intermediate: the issuer of every certificate it signs."""
        return x509.load_pem_x509_certificate(self.get(f"{self.management_url}/intermediates/0"))

    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.get(f"{self.management_url}/roots/0"))

    def logs(self) -> str:
        out = []
        for path in (self.challtestsrv_log, self.pebble_log):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            out.append(f"--- {path.name} ---\n{text[-20000:]}")
        return "\n".join(out)

    # -- internals -------------------------------------------------------------------------
    def _write_tls(self) -> None:
        ca = certs.make_ca("certbot-batch test bed pebble CA")
        leaf = certs.make_leaf(["localhost", "127.0.0.1"], issuer=ca)
        leaf.write(self.dir / "pebble-cert.pem", self.dir / "pebble-key.pem")
        self.ca_bundle.write_bytes(ca.cert_pem())
        self._ssl_context = None

    def _spawn(self, cmd: list[str], log: Path, env_extra: dict[str, str]) -> None:
        env = dict(os.environ)
        env.update(env_extra)
        fh = open(log, "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(fh)
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                cwd=self.dir, start_new_session=True)
        self._procs.append(proc)

    def _directory_answers(self) -> bool:
        try:
            self.get(self.directory_url, timeout=1.0)
            return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise PebbleError(f"{proc.args!r} exited {proc.returncode} while waiting "
                                      f"for the {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.05)
        raise PebbleError(f"timed out waiting for the {what}\n{self.logs()}")



def _kill_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
