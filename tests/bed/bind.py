"""A private BIND 9 (Debian's ``named``) on a loopback port: the DNS of dns-01 tests.

Everything lives in one temp dir (config, zone files and their journals, pid file, session
key, log); /etc/bind and any named running on the host are never touched::

    named.conf   options { listen-on port P { 127.0.0.1; }; recursion no; notify no; ... };
                 controls { };  (no rndc channel)  and one primary zone per name in ``zones``
    ZONE.zone    $TTL 5, SOA, NS, ``@``/``ns``/``*`` IN A 127.0.0.1 (every name resolves)
    named.log    ``named -g`` output (config errors, updates, transfers, query log)

``named -g -4 -n 1 -c named.conf`` (plus ``-u root`` when run as root) stays in the
foreground in its own process group: :meth:`Bind.stop` kills that group, so no named is left
behind whatever a test did.

Three hmac-sha256 TSIG keys with random secrets:

* ``good``: may update (RFC 2136) and transfer (AXFR) every zone;
* ``bad``: known to named (signatures verify) but in no ``allow-update``: an update signed
  with it gets ``REFUSED`` -- the "wrong TSIG key" case;
* ``unknown``: not configured in named at all: a signed request gets ``NOTAUTH`` + ``BADKEY``.

A name outside every served zone (e.g. in :attr:`Bind.unserved_zone`) gets ``REFUSED``
(``recursion no``), so certbot-dns-rfc2136 finds no SOA for it.

Pebble validates dns-01 against this server with ``Pebble(..., dns_server=bind.address)``.
``* IN A`` is a wildcard: once a TXT record exists at ``_acme-challenge.a1.test``,
``a1.test`` is an empty non-terminal and the wildcard no longer answers A for it (DNS
wildcard rules) -- harmless for dns-01, which only looks up the TXT record.

Only the BIND command line tools are used (``dig``, ``nsupdate`` from bind9-dnsutils), so the
bed works in any interpreter (no dnspython needed in the test process).
"""
from __future__ import annotations

import base64
import dataclasses
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Callable, Optional, Sequence

from tests.bed import ports

NAMED = shutil.which("named") or "/usr/sbin/named"
DIG = shutil.which("dig") or "/usr/bin/dig"
NSUPDATE = shutil.which("nsupdate") or "/usr/bin/nsupdate"

#: The zone served by default: ``a1.test``, ``*.a1.test`` ... all live in it.
DEFAULT_ZONE = "test"
#: A zone no Bind serves (RFC 2606 reserved name); queries for names in it are REFUSED.
UNSERVED_ZONE = "unserved.example"
#: TTL of the zone's records ($TTL) and of records added by the nsupdate helpers.
TTL = 5

KEY_ROLES = ("good", "bad", "unknown")


class BindError(RuntimeError):
    pass


def missing_reason() -> Optional[str]:
    """Why the BIND bed cannot run here (None when it can)."""
    for tool, package in ((NAMED, "bind9"), (DIG, "bind9-dnsutils"),
                          (NSUPDATE, "bind9-dnsutils")):
        if not os.access(tool, os.X_OK):
            return f"{tool} not installed (apt-get install {package})"
    return None


@dataclasses.dataclass(frozen=True)
class TsigKey:
    name: str
    secret: str  # base64, as in named.conf and certbot-dns-rfc2136's ini
    algorithm: str = "hmac-sha256"

    @classmethod
    def generate(cls, name: str) -> TsigKey:
        return cls(name, base64.b64encode(secrets.token_bytes(32)).decode("ascii"))

    @property
    def spec(self) -> str:
        """The ``-y`` argument of dig and nsupdate."""
        return f"{self.algorithm}:{self.name}:{self.secret}"

    def named_conf(self) -> str:
        return f'key "{self.name}" {{\n\talgorithm {self.algorithm};\n' \
               f'\tsecret "{self.secret}";\n}};\n'


class Bind:
    """named serving ``zones`` on 127.0.0.1:port, as a context manager.

    :param zones: primary zones to serve (each with a wildcard A record to 127.0.0.1).
    :param base_dir: use this dir instead of a fresh temp dir (then it is not removed).
    :param port: the port (TCP and UDP); default a free one.
    """

    def __init__(self, zones: Sequence[str] = (DEFAULT_ZONE,), *,
                 base_dir: Optional[Path] = None, port: Optional[int] = None,
                 startup_timeout: float = 20.0) -> None:
        if not zones:
            raise ValueError("Bind needs at least one zone")
        self.zones = [z.strip(".").lower() for z in zones]
        if UNSERVED_ZONE in self.zones or any(
                UNSERVED_ZONE.endswith("." + z) for z in self.zones):
            raise ValueError(f"{UNSERVED_ZONE} must stay unserved")
        self.unserved_zone = UNSERVED_ZONE
        self._own_dir = base_dir is None
        self.dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="bed-bind-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # hook scripts and inis may be read by certbot as another user
        self.port = port or 0
        self.startup_timeout = startup_timeout
        self.keys = {role: TsigKey.generate(f"bed-{role}") for role in KEY_ROLES}
        self.conf_path = self.dir / "named.conf"
        self.log_path = self.dir / "named.log"
        self.pid_file = self.dir / "named.pid"
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._log: Optional[IO[bytes]] = None

    # -- addresses and keys --------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: pebble's ``-dnsserver`` (``Pebble(dns_server=...)``)."""
        return f"{ports.LOOPBACK}:{self.port}"

    @property
    def key(self) -> TsigKey:
        """The key that may update and transfer the zones."""
        return self.keys["good"]

    @property
    def bad_key(self) -> TsigKey:
        """Known to named, allowed nothing: updates signed with it are REFUSED."""
        return self.keys["bad"]

    def zone_of(self, name: str) -> Optional[str]:
        """The served zone ``name`` belongs to (the longest match), or None."""
        name = name.strip(".").lower()
        matches = [z for z in self.zones if name == z or name.endswith("." + z)]
        return max(matches, key=len) if matches else None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> Bind:
        self.start()
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.cleanup()

    def start(self) -> None:
        if self._proc is not None:
            return
        reason = missing_reason()
        if reason:
            raise BindError(reason)
        own_port = not self.port
        for attempt in range(3):
            if own_port:
                self.port = ports.free_port(udp_too=True)
            self._write_config()
            cmd = [NAMED, "-g", "-4", "-n", "1", "-c", str(self.conf_path)]
            if os.geteuid() == 0:
                cmd[1:1] = ["-u", "root"]
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
            log_start = self._log.tell()
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                          stderr=subprocess.STDOUT, cwd=self.dir,
                                          start_new_session=True)
            try:
                self._wait(self._serves_all_zones, "named to serve its zones")
                return
            except BindError:
                self.stop()
                # Someone took the free port in the meantime: named exits by itself
                # ("unable to listen on any configured interfaces"). Take another one.
                this_attempt = self.log_text()[log_start:]
                if not (own_port and attempt < 2 and "unable to listen" in this_attempt):
                    raise
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_group(proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """stop() and remove the temp dir (if we made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    # -- queries -------------------------------------------------------------------------------
    def dig(self, *args: str, key: Optional[str] = None,
            timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run dig against this server (``-p PORT @127.0.0.1``), signed with a key role."""
        cmd = [DIG, "-p", str(self.port), f"@{ports.LOOPBACK}", "+tries=1", "+time=2", *args]
        if key is not None:
            cmd += ["-y", self.keys[key].spec]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL)

    def query(self, name: str, rdtype: str = "A") -> list[str]:
        """The answer's rdata as dig +short prints it (no recursion, UDP)."""
        proc = self.dig("+short", "+norecurse", name, rdtype)
        if proc.returncode != 0:
            raise BindError(f"dig {name} {rdtype} failed ({proc.returncode}): "
                            f"{proc.stdout}{proc.stderr}")
        return [line for line in proc.stdout.splitlines() if line and not line.startswith(";")]

    def status(self, name: str, rdtype: str = "A") -> str:
        """The rcode of a query (NOERROR, NXDOMAIN, REFUSED ...)."""
        proc = self.dig("+norecurse", name, rdtype)
        match = re.search(r"status: ([A-Z]+)", proc.stdout)
        if not match:
            raise BindError(f"no answer to {name} {rdtype}: {proc.stdout}{proc.stderr}")
        return match.group(1)

    def axfr(self, zone: Optional[str] = None, key: Optional[str] = "good") -> list[str]:
        """Every record of a zone (master-file lines), by AXFR signed with ``key``."""
        zone = zone or self.zones[0]
        proc = self.dig("+noall", "+answer", "+onesoa", "AXFR", zone, key=key)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        failed = [line for line in lines if line.startswith(";")]
        records = [line for line in lines if not line.startswith(";")]
        if proc.returncode != 0 or failed or not any(
                _fields(r)[3:4] == ["SOA"] for r in records):
            raise BindError(f"AXFR of {zone} with key {key!r} failed ({proc.returncode}): "
                            f"{proc.stdout}{proc.stderr}")
        return records

    def txt_records(self, key: Optional[str] = "good") -> list[tuple[str, str]]:
        """(name, value) of every TXT record in the served zones, sorted; names without the
        final dot, multi-string values joined. Raises BindError when a transfer fails."""
        out = []
        for zone in self.zones:
            for record in self.axfr(zone, key=key):
                match = _TXT_RECORD.match(record)
                if match:
                    out.append((match.group(1).rstrip("."), _txt_value(match.group(2))))
        return sorted(out)

    # -- dynamic updates -----------------------------------------------------------------------
    def nsupdate(self, commands: Sequence[str], *, key: Optional[str] = "good",
                 check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Send one update (``server``, then ``commands``, then ``send``) with nsupdate."""
        script = "".join(f"{c}\n" for c in
                         [f"server {ports.LOOPBACK} {self.port}", *commands, "send"])
        cmd = [NSUPDATE, "-t", "5"]
        if key is not None:
            cmd += ["-y", self.keys[key].spec]
        proc = subprocess.run(cmd, input=script, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise BindError(f"nsupdate with key {key!r} failed ({proc.returncode}):\n{script}"
                            f"{proc.stdout}{proc.stderr}")
        return proc

    def _zone_line(self, name: str) -> list[str]:
        zone = self.zone_of(name)
        # Outside every zone: let nsupdate look for the SOA itself (and fail).
        return [f"zone {zone}"] if zone else []

    def nsupdate_add(self, name: str, txt: str, *, key: Optional[str] = "good",
                     ttl: int = TTL, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Add the TXT record ``name`` = ``txt`` (other values at that name stay)."""
        return self.nsupdate([*self._zone_line(name),
                              f"update add {name.rstrip('.')}. {ttl} TXT {_quote(txt)}"],
                             key=key, check=check)

    def nsupdate_delete(self, name: str, txt: str, *, key: Optional[str] = "good",
                        check: bool = True) -> subprocess.CompletedProcess[str]:
        """Delete the TXT record ``name`` = ``txt`` (only that value)."""
        return self.nsupdate([*self._zone_line(name),
                              f"update delete {name.rstrip('.')}. TXT {_quote(txt)}"],
                             key=key, check=check)

    # -- certbot -------------------------------------------------------------------------------
    def rfc2136_ini(self, path: Path, key: str = "good") -> Path:
        """certbot-dns-rfc2136 credentials (mode 0600) for this server and a key role.

        The algorithm is upper case: certbot-dns-rfc2136 2.1 looks it up case-sensitively
        and silently falls back to HMAC-MD5 for anything else."""
        tsig = self.keys[key]
        text = (f"# certbot-batch test bed BIND ({key} key)\n"
                f"dns_rfc2136_server = {ports.LOOPBACK}\n"
                f"dns_rfc2136_port = {self.port}\n"
                f"dns_rfc2136_name = {tsig.name}\n"
                f"dns_rfc2136_secret = {tsig.secret}\n"
                f"dns_rfc2136_algorithm = {tsig.algorithm.upper()}\n")
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        path.chmod(0o600)
        return path

    @property
    def hook_log(self) -> Path:
        """Where the manual hook scripts log ``auth|cleanup DOMAIN VALIDATION`` lines."""
        return self.dir / "hooks.log"

    def manual_hook_scripts(self, directory: Path, key: str = "good",
                            replace: bool = False) -> tuple[Path, Path]:
        """(auth, cleanup) scripts for certbot's ``--manual-auth-hook`` /
        ``--manual-cleanup-hook``: nsupdate adds / deletes the TXT record
        ``_acme-challenge.$CERTBOT_DOMAIN`` = ``$CERTBOT_VALIDATION`` (signed with ``key``),
        and a line goes to :attr:`hook_log`. A failed update fails the hook. ``replace``:
        the auth hook *sets* the name's TXT records (deletes them all, then adds its own, in
        one update), as many DNS APIs do."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for action, verb, extra in (("auth", "add", f" {TTL}"), ("cleanup", "delete", "")):
            path = directory / f"bind-{action}-hook.sh"
            first = ("update delete _acme-challenge.%s. TXT\\n"
                     if replace and action == "auth" else "")
            args = '"$domain" "$domain"' if first else '"$domain"'
            path.write_text(
                "#!/bin/sh\n"
                f"# certbot --manual-{action}-hook: dns-01 TXT record {verb} by RFC 2136\n"
                "# (certbot-batch test bed BIND)\n"
                "set -eu\n"
                'domain=${CERTBOT_DOMAIN#\\*.}\n'
                f'echo "{action} $CERTBOT_DOMAIN $CERTBOT_VALIDATION" >> {_sh(self.hook_log)}\n'
                f"printf 'server {ports.LOOPBACK} {self.port}\\n{first}"
                f"update {verb} _acme-challenge.%s.{extra} TXT \"%s\"\\nsend\\n' "
                f'{args} "$CERTBOT_VALIDATION" \\\n'
                f"  | {NSUPDATE} -t 5 -y {_sh(self.keys[key].spec)}\n")
            path.chmod(0o755)
            out.append(path)
        return out[0], out[1]

    def hook_calls(self) -> list[str]:
        try:
            return self.hook_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    # -- observation ---------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def logs(self) -> str:
        out = [f"--- {self.conf_path} ---\n{_read(self.conf_path)}"]
        for zone in self.zones:
            path = self.dir / f"{zone}.zone"
            out.append(f"--- {path} ---\n{_read(path)}")
        if self.hook_log.exists():
            out.append(f"--- {self.hook_log} ---\n{_read(self.hook_log)}")
        out.append(f"--- {self.log_path} ---\n{self.log_text()[-20000:]}")
        return "\n".join(out)

    # -- internals -----------------------------------------------------------------------------
    def _write_config(self) -> None:
        d = self.dir
        (d / "bind.keys").write_text("# no trust anchors: dnssec-validation no\n")
        good, bad = self.keys["good"], self.keys["bad"]
        parts = [
            "# certbot-batch test bed: private named on a loopback port\n",
            "options {\n"
            f'\tdirectory "{d}";\n'
            f'\tpid-file "{self.pid_file}";\n'
            f'\tsession-keyfile "{d}/session.key";\n'
            f'\tmanaged-keys-directory "{d}";\n'
            f'\tbindkeys-file "{d}/bind.keys";\n'
            f'\tdump-file "{d}/named_dump.db";\n'
            f'\tstatistics-file "{d}/named.stats";\n'
            f'\tmemstatistics-file "{d}/named.memstats";\n'
            f"\tlisten-on port {self.port} {{ {ports.LOOPBACK}; }};\n"
            "\tlisten-on-v6 { none; };\n"
            "\trecursion no;\n"
            "\tnotify no;\n"  # the NS name resolves to 127.0.0.1: never NOTIFY port 53
            "\tdnssec-validation no;\n"
            "\tquerylog yes;\n"
            "\tallow-transfer { none; };\n"
            "};\n",
            "controls { };\n",
            good.named_conf(),
            bad.named_conf(),
        ]
        for zone in self.zones:
            (d / f"{zone}.zone").write_text(
                f"$ORIGIN {zone}.\n"
                f"$TTL {TTL}\n"
                f"@\tIN\tSOA\tns.{zone}. hostmaster.{zone}. 1 3600 600 86400 {TTL}\n"
                f"@\tIN\tNS\tns.{zone}.\n"
                "@\tIN\tA\t127.0.0.1\n"
                "ns\tIN\tA\t127.0.0.1\n"
                "*\tIN\tA\t127.0.0.1\n")
            parts.append(
                f'zone "{zone}" {{\n'
                "\ttype primary;\n"
                f'\tfile "{d}/{zone}.zone";\n'
                f'\tallow-update {{ key "{good.name}"; }};\n'
                f'\tallow-transfer {{ key "{good.name}"; }};\n'
                "};\n")
        self.conf_path.write_text("".join(parts))

    def _serves_all_zones(self) -> bool:
        for zone in self.zones:
            proc = self.dig("+norecurse", "+noall", "+answer", zone, "SOA", timeout=5.0)
            if proc.returncode != 0 or f"hostmaster.{zone}." not in proc.stdout:
                return False
        return True

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc is not None else None
                raise BindError(f"named exited {code} while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.02)
        raise BindError(f"timed out waiting for {what}\n{self.logs()}")


# -- helpers -----------------------------------------------------------------------------------

def _fields(record: str) -> list[str]:
    return record.split()


_TXT_RECORD = re.compile(r"^(\S+)\s+\d+\s+IN\s+TXT\s+(.*)$")
_TXT_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
_ESCAPE = re.compile(r"\\(\d{3}|.)")


def _txt_value(rdata: str) -> str:
    """The text of a TXT rdata as dig prints it: strings joined, escapes undone."""
    parts = []
    for quoted, bare in _TXT_STRING.findall(rdata):
        raw = quoted if quoted or not bare else bare
        parts.append(_ESCAPE.sub(
            lambda m: chr(int(m.group(1))) if m.group(1).isdigit() else m.group(1), raw))
    return "".join(parts)


def _quote(txt: str) -> str:
    return '"' + txt.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sh(value: object) -> str:
    return "'" + str(value).replace("'", "'\\''") + "'"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        return f"({exc})"


def _kill_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM named's process group, SIGKILL it if it does not go away in time."""
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
