"""What the deployment needs from a web server, whatever its kind.

A *server instance* is one running web server, named by its kind, its control program and
its configuration root (two Apaches on one machine are two instances; the lineages of a run
name theirs through their renewal confs). The deployment and recovery code speak to this
interface only; ``servers/apache.py`` implements it (a second kind implements the same).

A reload is confirmed from outside, without trusting exit codes: the server's master process
(from its pid file) must still be alive and have started a new generation of worker
processes, which only happens once the new configuration -- certificates included -- was
loaded; a master that exits instead took the server down.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import os
import socket
import ssl
import time
from typing import Any, Callable, ClassVar, Optional

from cryptography import x509

#: How often the confirmation looks at the processes (they change within milliseconds).
POLL = 0.05


@dataclasses.dataclass(frozen=True)
class ServerRef:
    """Names one server instance; stored in the pending-deployment record."""
    kind: str
    ctl: str
    root: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.ctl}:{self.root}"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "ctl": self.ctl, "root": self.root}

    @classmethod
    def from_dict(cls, data: Any) -> Optional[ServerRef]:
        if not isinstance(data, dict):
            return None
        kind, ctl, root = data.get("kind"), data.get("ctl"), data.get("root")
        if not all(isinstance(v, str) for v in (kind, ctl, root)) or not kind or not ctl:
            return None
        return cls(str(kind), str(ctl), str(root))


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a certificate is served: connect to host:port, send ``sni``."""
    host: str
    port: int
    sni: str


@dataclasses.dataclass(frozen=True)
class ChallengePlan:
    """What a server needs to serve a wave's http-01 challenges (``Server.challenge_plan``);
    ``challenges/http01.py`` journals and applies it, the same way for every kind."""
    #: the text of the snippet at ``Server.challenge_snippet_path()``
    snippet: str
    #: configuration file (as walked) -> offsets in its walked text where
    #: ``Server.challenge_insert()`` goes (nginx: after each chosen server block's "{")
    inserts: dict[str, tuple[int, ...]]
    #: configuration file -> digest of the text the offsets are in (``text_digest``)
    digests: dict[str, str]
    #: (host, port, Host header) that must serve the challenges once reloaded
    probes: list[tuple[str, int, str]]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The server's processes before a reload."""
    master: Optional[int]
    children: frozenset[int]


class Server(abc.ABC):
    """One web server instance (see the module docstring)."""

    def __init__(self, ref: ServerRef) -> None:
        self.ref = ref

    #: the server's name in messages ("Apache")
    title = "server"

    def where(self) -> str:
        """Which instance: "(/usr/sbin/apache2ctl, /etc/apache2)"."""
        return f"({self.ref.ctl}, {self.ref.root})"

    def label(self) -> str:
        """How messages name it: "Apache (/usr/sbin/apache2ctl, /etc/apache2)"."""
        return f"{self.title} {self.where()}"

    @abc.abstractmethod
    def ctl_problem(self) -> Optional[str]:
        """Why its control program cannot run (missing, not executable), or None."""

    @abc.abstractmethod
    def configtest(self) -> None:
        """Raise certbot's ``errors.MisconfigurationError`` when the configuration is broken."""

    @abc.abstractmethod
    def reload(self) -> str:
        """Ask the server to load its configuration again (starting it if it is stopped).
        Returns what the control program said; raises MisconfigurationError."""

    @abc.abstractmethod
    def pid_file(self) -> Optional[str]:
        """The master's pid file, when it can be found."""

    @abc.abstractmethod
    def referenced_paths(self) -> set[str]:
        """Every certificate and key file the configuration names (a text walk, no parse)."""

    @abc.abstractmethod
    def endpoints(self) -> dict[str, list[Endpoint]]:
        """Certificate file -> where the configuration serves it."""

    # -- http-01 challenges (batch-apache / batch-nginx as the authenticator) ------------
    #: the challenge snippet's file name: the journal and recovery remove files of this
    #: name only where ``snippet_misplaced`` allows
    SNIPPET_NAME: ClassVar[str] = ""
    #: challenge files are written into a directory the snippet serves (True: Apache's
    #: Alias), or the snippet answers them itself (False: nginx's ``return 200``)
    SERVES_FILES: ClassVar[bool] = False

    # A kind that only deploys (no snippet) keeps these defaults: its lineages are
    # validated by certbot's own authenticator of that server.
    def challenge_snippet_path(self) -> str:
        """Where this instance's challenge snippet goes."""
        raise NotImplementedError(f"{self.title} does not serve http-01 challenges")

    @classmethod
    def snippet_misplaced(cls, path: str, root: Optional[str]) -> Optional[str]:
        """Why a journaled snippet ``path`` (written for server root ``root``) must not be
        removed, or None."""
        return f"not a challenge snippet of {cls.title}"

    def challenge_insert(self) -> str:
        """The text inserted into configuration files to include the snippet ("": none)."""
        return ""

    @classmethod
    def owns_insert(cls, text: str) -> bool:
        """Is ``text`` (a journaled insert) exactly what ``challenge_insert`` makes?"""
        return False

    def challenge_unserved(self, names: list[str]) -> list[str]:
        """The names no part of the configuration answers over plain HTTP."""
        return []

    def challenge_plan(self, names: list[str], tokens: dict[str, bytes],
                       files_root: Optional[str], first: bool) -> ChallengePlan:
        """The snippet, edits and probes that serve ``tokens`` (token -> key authorization)
        for ``names`` (when ``SERVES_FILES``: as files below ``files_root``'s
        ``.well-known/acme-challenge/``, a webroot of their own). ``first``: nothing of
        this run is in the files yet (a configuration edited since it was read is read
        again). Raises certbot's ``errors.PluginError`` for names nothing answers."""
        raise NotImplementedError(f"{self.title} does not serve http-01 challenges")

    def rejection(self) -> Optional[str]:
        """After a reload: why the server refused the new configuration while its master
        kept running with the old one (nginx logs it and keeps its old workers), or None.
        Apache's master exits instead (the confirmation sees it as "down")."""
        return None

    # -- processes -----------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        master = _alive_pid(self.pid_file())
        return Snapshot(master, frozenset(children_of(master)) if master else frozenset())

    def confirm(self, before: Snapshot, timeout: float,
                clock: Callable[[], float] = time.monotonic) -> str:
        """After a reload: "reloaded" (a new generation of workers runs under a live
        master), "down" (the master is gone), "rejected" (the master kept its old workers
        and said why: :meth:`rejection`), "unconfirmed" (still the old workers when
        ``timeout`` ran out) or "unverifiable" (no pid file to watch)."""
        deadline = clock() + timeout
        pid_file = self.pid_file()
        if pid_file is None:
            return "unverifiable"
        while True:
            master = _alive_pid(pid_file)
            if master is not None:
                kids = set(children_of(master))
                if master != before.master and kids:
                    return "reloaded"  # (re)started: a new master with its workers
                if master == before.master and kids - before.children:
                    return "reloaded"
            elif before.master is not None and not pid_alive(before.master):
                return "down"
            if master is not None and master == before.master and \
                    self.rejection() is not None:
                return "rejected"
            if clock() >= deadline:
                return "unconfirmed" if master is not None else "down"
            time.sleep(POLL)


def text_digest(text: str) -> str:
    """What ``ChallengePlan.digests`` hold: the sha256 of a configuration file's text."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def read_pid(pid_file: Optional[str]) -> Optional[int]:
    if not pid_file:
        return None
    try:
        with open(pid_file, encoding="ascii", errors="replace") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat.rpartition(")")[2].split()[:1]
    return state != ["Z"] and state != ["X"]


def _alive_pid(pid_file: Optional[str]) -> Optional[int]:
    pid = read_pid(pid_file)
    return pid if pid is not None and pid_alive(pid) else None


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
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


def served_serial(endpoint: Endpoint, timeout: float = 3.0) -> Optional[int]:
    """The serial of the certificate served at ``endpoint`` for its SNI, or None when
    nothing answered with TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=endpoint.sni or None) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError, ValueError):
        return None
    if not der:
        return None
    try:
        return int(x509.load_der_x509_certificate(der).serial_number)
    except ValueError:
        return None
