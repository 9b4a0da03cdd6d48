"""nginx: its control program, its configuration files as text, and one instance as a ``Server``.

certbot's nginx plugin parses the whole configuration with pyparsing for every lineage it
touches (17.6 s per lineage at 1,000 SSL server blocks, FACTS.md). Everything here is a
*text walk* instead: a tokenizer that knows nginx's lexical rules (words, quotes, ``;``,
``{``/``}``, comments) and follows ``include`` (globs, relative to the directory of the main
configuration file) from ``SERVER_ROOT/nginx.conf``, as nginx itself does. It collects what
the deployment needs -- the ``pid`` and ``error_log`` of the main context, every
``ssl_certificate``/``ssl_certificate_key``, and per ``http { server { ... } }`` block its
``listen`` sockets, ``server_name``\\ s, certificates and where its ``{`` is (the batch-nginx
authenticator inserts one ``include`` there for the duration of a run). Milliseconds for
thousands of server blocks. ``if``/variables are not evaluated, so a walk may see a little
more than nginx uses -- never less, for files reachable from the main configuration.

The instance: ``nginx -c SERVER_ROOT/nginx.conf -t`` / ``-s reload`` through the control
program certbot's plugin was given (``nginx_ctl``, saved in renewal confs). nginx's master
does not exit when a reload fails (a port it cannot bind, a certificate it cannot load): it
logs ``[emerg]`` to its error log and keeps its old workers; :meth:`NginxServer.rejection`
reads that log so the confirmation says so at once, instead of waiting out its timeout.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import logging
import os
import re
import shutil
import subprocess
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from certbot import errors

from certbot_batch import run
from certbot_batch.servers.base import (
    POLL,
    ChallengePlan,
    Endpoint,
    Server,
    ServerRef,
    Snapshot,
    pid_alive,
    text_digest,
)

logger = logging.getLogger(__name__)

KIND = "nginx"
#: certbot's nginx plugin defaults (its --nginx-ctl / --nginx-server-root on Linux)
DEFAULT_CTL = "nginx"
DEFAULT_ROOT = "/etc/nginx"
MAIN_CONFIG = "nginx.conf"
#: http-01 as authenticator: the snippet, in the server root (see ``challenge_plan``)
SNIPPET_NAME = "certbot-batch-acme-nginx.conf"
#: what is inserted after a server block's "{" to include it (and nothing else is ever
#: removed from a user's file: ``owns_insert``)
_INCLUDE = re.compile(r'^ include "(/[^"\\]*/' + re.escape(SNIPPET_NAME) + r')";$')
#: what a token and a key authorization may hold to be written into the snippet
_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")
#: include nesting nginx would never need; a loop of includes stops here
MAX_DEPTH = 32

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<special>[;{}])
  | (?P<quoted>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<word>(?:\$\{[^}]*\}|\\.|[^\s;{}"'\\])+)
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)
_EMERG = re.compile(r"\[(?:emerg|alert|crit)\][^\n]*")


# -- the control program -----------------------------------------------------------------

def ctl_of(config: Any) -> str:
    return str(getattr(config, "nginx_ctl", None) or DEFAULT_CTL)


def root_of(config: Any) -> str:
    return str(getattr(config, "nginx_server_root", None) or DEFAULT_ROOT)


def ref_of(config: Any) -> ServerRef:
    """The nginx instance a lineage's (or the command line's) settings name."""
    return ServerRef(KIND, ctl_of(config), root_of(config))


def main_config(root: str) -> str:
    return os.path.join(root, MAIN_CONFIG)


def find_ctl(ctl: str) -> str:
    path = ctl if os.path.sep in ctl else shutil.which(ctl)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise errors.NoInstallationError(
            f"nginx's control program '{ctl}' was not found or is not executable. Install "
            "nginx (Debian: apt-get install nginx) or point --nginx-ctl at the nginx binary "
            "(saved as nginx_ctl in the renewal conf).")
    return path


def run_ctl(ctl: str, root: str, args: Sequence[str], what: str) -> str:
    """``CTL -c ROOT/nginx.conf ARGS`` (the way certbot's nginx plugin calls it). Returns
    its output; raises MisconfigurationError when it fails."""
    cmd = [find_ctl(ctl), "-c", main_config(root), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    except OSError as exc:
        raise errors.MisconfigurationError(f"Could not run {' '.join(cmd)}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise errors.MisconfigurationError(f"{' '.join(cmd)} timed out") from exc
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise errors.MisconfigurationError(
            f"nginx {what} failed ({' '.join(cmd)} exited {proc.returncode}): {output}")
    return output


# -- the configuration, as text ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Listen:
    host: str
    port: int
    ssl: bool
    default: bool


@dataclasses.dataclass
class ServerBlock:
    """One ``server { }`` of the http context."""
    file: str
    #: offset in ``file`` just after the block's ``{``
    open_end: int
    listens: list[Listen] = dataclasses.field(default_factory=list)
    names: list[str] = dataclasses.field(default_factory=list)
    certs: list[str] = dataclasses.field(default_factory=list)
    keys: list[str] = dataclasses.field(default_factory=list)
    #: a server-level return / rewrite / if: it may answer before any location
    redirects: bool = False
    ssl_on: bool = False
    #: position in the configuration (nginx's "first server of a port" is the default)
    order: int = 0


@dataclasses.dataclass
class Walk:
    """What a text walk of one nginx configuration found."""
    root: str
    files: list[str] = dataclasses.field(default_factory=list)
    pid: Optional[str] = None
    error_logs: list[str] = dataclasses.field(default_factory=list)
    servers: list[ServerBlock] = dataclasses.field(default_factory=list)
    cert_paths: set[str] = dataclasses.field(default_factory=set)
    http_certs: list[str] = dataclasses.field(default_factory=list)
    #: files that could not be read (a broken include: nginx -t says more)
    unreadable: list[str] = dataclasses.field(default_factory=list)
    #: file -> sha256 of the text walked (an edit checks the file is still the same)
    digests: dict[str, str] = dataclasses.field(default_factory=dict)


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            return fh.read()
    except OSError:
        return None


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        token = token[1:-1]
    # nginx unescapes only \" \' \\ \t \r \n (a regex's \d stays as it is)
    return re.sub(r"\\([\"'\\trn])", lambda m: {"t": "\t", "r": "\r", "n": "\n"}.get(
        m.group(1), m.group(1)), token)


def tokens(text: str) -> Iterator[tuple[str, int, int, bool]]:
    """(token, start, end, is_special) of nginx configuration text, comments skipped."""
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind in ("ws", "comment"):
            continue
        value = match.group()
        yield (value if kind == "special" else _unquote(value)), match.start(), \
            match.end(), kind == "special"


def _parse_listen(args: list[str], ssl_on: bool) -> Optional[Listen]:
    if not args:
        return None
    addr = args[0]
    if addr.startswith("unix:"):
        return None
    flags = set(args[1:])
    if "quic" in flags:
        return None  # UDP: not where certificates are probed or challenges answered
    host, port = "*", 80
    if addr.startswith("["):
        end = addr.find("]")
        host = addr[1:end]
        rest = addr[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif addr.isdigit():
        port = int(addr)
    elif ":" in addr:
        h, _, p = addr.rpartition(":")
        host = h or "*"
        if p.isdigit():
            port = int(p)
    else:
        host = addr
    return Listen(host, port, "ssl" in flags or ssl_on,
                  "default_server" in flags or "default" in flags)


class _Walker:
    def __init__(self, root: str) -> None:
        self.walk = Walk(root)
        self.prefix = os.path.dirname(main_config(root))
        self._order = 0

    def resolve(self, pattern: str) -> list[str]:
        if not os.path.isabs(pattern):
            pattern = os.path.join(self.prefix, pattern)
        if glob.has_magic(pattern):
            return sorted(glob.glob(pattern))
        return [pattern]

    def path(self, value: str) -> str:
        return value if os.path.isabs(value) else os.path.join(self.prefix, value)

    def file(self, path: str, stack: list[str], server: Optional[ServerBlock],
             depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        text = _read(path)
        if text is None:
            self.walk.unreadable.append(path)
            return
        self.walk.files.append(path)
        self.walk.digests[path] = text_digest(text)
        self._statements(path, text, stack, server, depth)

    def _statements(self, path: str, text: str, stack: list[str],
                    server: Optional[ServerBlock], depth: int) -> None:
        """Walk ``text``; ``stack``: the enclosing block names (shared with includes)."""
        words: list[str] = []
        servers: list[Optional[ServerBlock]] = [server]
        base = len(stack)
        for token, _start, end, special in tokens(text):
            if not special:
                words.append(token)
                continue
            if token == "{":
                name = words[0] if words else ""
                current = servers[-1]
                if name == "server" and stack == ["http"]:
                    block = ServerBlock(path, end, order=self._order)
                    self._order += 1
                    self.walk.servers.append(block)
                    servers.append(block)
                else:
                    if name == "if" and current is not None and stack == ["http", "server"]:
                        current.redirects = True  # a server-level if (certbot's redirect)
                    servers.append(current)
                stack.append(name)
                words = []
            elif token == "}":
                if len(stack) > base:
                    stack.pop()
                    servers.pop()
                words = []
            else:  # ";"
                if words:
                    self._directive(words, stack, servers[-1], depth)
                words = []

    def _directive(self, words: list[str], stack: list[str], server: Optional[ServerBlock],
                   depth: int) -> None:
        name, args = words[0], words[1:]
        walk = self.walk
        if name == "include" and args:
            for path in self.resolve(args[0]):
                self.file(path, stack, server, depth + 1)
            return
        if name in ("ssl_certificate", "ssl_certificate_key") and args and "$" not in args[0]:
            path = self.path(args[0])
            walk.cert_paths.add(path)
            in_server = server is not None and stack[-1:] == ["server"]
            if in_server and server is not None:
                (server.certs if name == "ssl_certificate" else server.keys).append(path)
            elif stack == ["http"] and name == "ssl_certificate":
                walk.http_certs.append(path)
            return
        if not stack:
            if name == "pid" and args:
                walk.pid = args[0]
            elif name == "error_log" and args:
                walk.error_logs.append(args[0])
            return
        if server is None or stack[-1:] != ["server"] or stack[:1] != ["http"]:
            return
        if name == "listen":
            listen = _parse_listen(args, server.ssl_on)
            if listen is not None:
                server.listens.append(listen)
        elif name == "server_name":
            server.names.extend(a.lower() for a in args)
        elif name in ("return", "rewrite"):
            server.redirects = True
        elif name == "ssl" and args[:1] == ["on"]:
            server.ssl_on = True
            server.listens[:] = [dataclasses.replace(x, ssl=True) for x in server.listens]


def walk(root: str) -> Walk:
    """Walk the configuration nginx reads from ``ROOT/nginx.conf`` (module docstring)."""
    walker = _Walker(root)
    walker.file(main_config(root), [], None, 0)
    found = walker.walk
    for block in found.servers:
        if not block.listens:  # nginx's default: *:80 (as root)
            block.listens.append(Listen("*", 80, block.ssl_on, False))
    return found


def server_for_name(blocks: list[ServerBlock], name: str,
                    default: bool = True) -> Optional[ServerBlock]:
    """Which of ``blocks`` (all listening on one port) nginx picks for ``Host: name``:
    exact name, longest leading wildcard, longest trailing wildcard, first matching
    regex, else (``default``) the port's default server (``default_server``, else the
    first block). Addresses are not told apart: blocks are grouped by port."""
    name = name.lower().rstrip(".")
    best: dict[int, tuple[int, ServerBlock]] = {}
    for block in blocks:
        for pattern in block.names:
            rank, length = _match(pattern, name)
            if rank and (rank not in best or (rank != 4 and length > best[rank][0])):
                best[rank] = (length, block)
    for rank in (1, 2, 3, 4):
        if rank in best:
            return best[rank][1]
    if not default:
        return None
    return next((b for b in blocks if any(x.default for x in b.listens)),
                blocks[0] if blocks else None)


def _match(pattern: str, name: str) -> tuple[int, int]:
    """(rank, length): 1 exact, 2 leading wildcard, 3 trailing wildcard, 4 regex; 0 no."""
    if pattern.startswith("~"):
        try:
            return (4, 0) if re.search(pattern[1:], name) else (0, 0)
        except re.error:
            return 0, 0
    if pattern.startswith("."):
        if name == pattern[1:] or name.endswith(pattern):
            return 2, len(pattern)
        return 0, 0
    if pattern.startswith("*."):
        return (2, len(pattern)) if name.endswith(pattern[1:]) else (0, 0)
    if pattern.endswith(".*"):
        return (3, len(pattern)) if name.startswith(pattern[:-1]) else (0, 0)
    if "*" in pattern:
        return (3, len(pattern)) if fnmatch.fnmatchcase(name, pattern) else (0, 0)
    return (1, len(pattern)) if pattern == name else (0, 0)


def _probe_host(host: str) -> str:
    if host in ("*", "", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def endpoints_of(found: Walk) -> dict[str, list[Endpoint]]:
    """Certificate/key file -> (address, port, server name) of each SSL server naming it."""
    out: dict[str, list[Endpoint]] = {}
    for block in found.servers:
        ssl_listens = [x for x in block.listens if x.ssl]
        if not ssl_listens:
            continue
        files = (block.certs or found.http_certs) + block.keys  # certificates inherit
        plain = [n for n in block.names if n and not n.startswith("~") and n != "_"]
        sni = next((n for n in plain if "*" not in n and not n.startswith(".")),
                   plain[0] if plain else "")
        sni = sni.lstrip(".").replace("*.", "certbot-batch-probe.", 1)
        for f in files:
            out.setdefault(f, []).extend(
                Endpoint(_probe_host(x.host), x.port, sni) for x in ssl_listens)
    return out


# -- http-01 challenges ----------------------------------------------------------------------
#
# nginx has no way to add a location to a server block from outside the block (no
# inheritance of locations, no server-wide alias), so for the duration of a wave:
#
# * one snippet, ``SERVER_ROOT/certbot-batch-acme-nginx.conf``, holds one exact-match
#   location per challenge token: ``location = /.well-known/acme-challenge/TOKEN { return
#   200 "KEY_AUTHORIZATION"; }`` (the form certbot's own nginx plugin uses). An exact match
#   wins over every prefix and regex location a server block has, including a user's own
#   ``location /.well-known/acme-challenge/``, and cannot collide with one;
# * the server blocks that answer the wave's names over plain HTTP get one ``include`` of the
#   snippet, inserted right after their ``{`` (one space, the directive, no newline): per
#   name and plain-HTTP port, the block nginx picks for that Host (exact name, wildcards,
#   regex, else the port's default server). When that block redirects at server level
#   (``return``/``rewrite``/``if``, as certbot's ``--redirect`` writes it: it answers before
#   any location) the SSL blocks naming the name get it too, for a CA that follows the
#   redirect.

def include_text(snippet_path: str) -> str:
    """What is inserted after a server block's ``{`` (no newline: a block whose ``{`` is
    followed by directives on the same line stays valid; removed again verbatim)."""
    return f' include "{snippet_path}";'


def snippet_text(tokens: dict[str, bytes]) -> str:
    lines = ["# certbot-batch: ACME http-01 challenges of the running certbot. Temporary:\n",
             "# removed, with the include lines naming it, at the end of the run.\n"]
    for token, content in sorted(tokens.items()):
        lines.append(f"location = /.well-known/acme-challenge/{token} {{\n"
                     "\tdefault_type text/plain;\n"
                     f"\treturn 200 \"{content.decode('ascii')}\";\n"
                     "}\n")
    return "".join(lines)


def _by_port(found: Walk, ssl: bool) -> dict[int, list[ServerBlock]]:
    out: dict[int, list[ServerBlock]] = {}
    for block in found.servers:
        for port in sorted({x.port for x in block.listens if x.ssl == ssl}):
            out.setdefault(port, []).append(block)
    return out


def plan(found: Walk, names: Iterable[str]) -> tuple[list[ServerBlock], list[str]]:
    """(the server blocks that must include the snippet, the names no plain-HTTP server
    block answers)."""
    plain = _by_port(found, ssl=False)
    secure = _by_port(found, ssl=True)
    chosen: dict[tuple[str, int], ServerBlock] = {}
    unserved = []
    for name in names:
        served = False
        for blocks in plain.values():
            block = server_for_name(blocks, name)
            if block is None:
                continue
            served = True
            chosen[(block.file, block.open_end)] = block
            if block.redirects:
                for sblocks in secure.values():
                    match = server_for_name(sblocks, name, default=False)
                    if match is not None:
                        chosen[(match.file, match.open_end)] = match
        if not served:
            unserved.append(name)
    return sorted(chosen.values(), key=lambda b: b.order), unserved


def probes_of(blocks: list[ServerBlock], fallback: str,
              most: int = 3) -> list[tuple[str, int, str]]:
    """(host, port, Host header) of the first ``most`` plain-HTTP listens of ``blocks`` (each
    includes the snippet: one answering is enough)."""
    targets: list[tuple[str, int, str]] = []
    for block in blocks:
        host_name = next((n for n in block.names if n and "*" not in n
                          and not n.startswith(("~", ".")) and n != "_"), fallback)
        for listen in block.listens:
            target = (_probe_host(listen.host), listen.port, host_name)
            if not listen.ssl and target not in targets:
                targets.append(target)
    return targets[:most]


def _unchanged(found: Walk, blocks: list[ServerBlock], inserted: str) -> bool:
    """Are the files of ``blocks`` still what ``found`` read (our own inserts aside)?"""
    for path in {b.file for b in blocks}:
        text = _read(os.path.realpath(path))
        if text is None or text_digest(text.replace(inserted, "")) != found.digests.get(path):
            return False
    return True


def compiled_defaults(ctl: str, root: str) -> dict[str, str]:
    """``--pid-path``, ``--prefix``, ``--error-log-path`` of ``nginx -V``."""
    output = run_ctl(ctl, root, ["-V"], "version query")
    return dict(re.findall(r"--([a-z-]+)=(\S+)", output))


class NginxServer(Server):
    """One nginx instance: its control program and server root (``nginx.conf`` in it)."""

    title = "nginx"

    def __init__(self, ref: ServerRef) -> None:
        super().__init__(ref)
        self._defaults: Optional[dict[str, str]] = None
        self._log_offsets: dict[str, int] = {}
        self._walked: Optional[tuple[tuple[Any, ...], Walk]] = None
        #: the walk the challenge plans of this run are made from (``challenge_plan``)
        self._challenge_walk: Optional[Walk] = None

    def walk(self) -> Walk:
        """The configuration walk, again only when a file it read (or a directory holding
        one) changed since: a deployment asks for it five times."""
        if self._walked is not None and self._walked[0] == _signature(self._walked[1]):
            return self._walked[1]
        found = walk(self.ref.root)
        self._walked = (_signature(found), found)
        return found

    def ctl_problem(self) -> Optional[str]:
        """The control program is missing, or the configuration is broken already
        (``nginx -t``, run once per instance and command: checked before any CA contact,
        a certificate nobody can deploy is not ordered)."""
        try:
            find_ctl(self.ref.ctl)
        except errors.Error as exc:
            return str(exc)
        return preflight_problem(self)

    def configtest(self) -> None:
        run_ctl(self.ref.ctl, self.ref.root, ["-t"], "configtest")

    def reload(self) -> str:
        try:
            return run_ctl(self.ref.ctl, self.ref.root, ["-s", "reload"], "reload")
        except errors.MisconfigurationError as exc:
            if self.snapshot().master is not None:
                raise
            # Not running (as certbot's plugin does: a failed reload starts it).
            logger.warning("%s was not running %s: `%s -c %s` started it.", self.title,
                           self.where(), self.ref.ctl, main_config(self.ref.root))
            logger.debug("reload said: %s", exc)
            return run_ctl(self.ref.ctl, self.ref.root, [], "start")

    def _default(self, key: str) -> Optional[str]:
        if self._defaults is None:
            try:
                self._defaults = compiled_defaults(self.ref.ctl, self.ref.root)
            except errors.Error as exc:
                logger.info("certbot-batch: %s: no compiled-in defaults (%s)", self.label(),
                            exc)
                self._defaults = {}
        return self._defaults.get(key)

    def _absolute(self, path: str) -> str:
        """nginx resolves pid and log paths against its prefix (-p, else compiled-in)."""
        if os.path.isabs(path):
            return path
        return os.path.join(self._default("prefix") or "/usr/share/nginx", path)

    def pid_file(self) -> Optional[str]:
        """The ``pid`` of the main configuration, else the compiled-in default (``nginx
        -V``, asked once)."""
        found = self.walk()
        pid = found.pid or self._default("pid-path")
        return self._absolute(pid) if pid else None

    def error_logs(self) -> list[str]:
        found = self.walk()
        logs = [p for p in found.error_logs if p not in ("stderr",)
                and not p.startswith(("syslog:", "memory:"))]
        if not found.error_logs:
            default = self._default("error-log-path")
            if default and default != "stderr":
                logs.append(default)
        return [self._absolute(p) for p in logs]

    def snapshot(self) -> Snapshot:
        self._log_offsets = {}
        for path in self.error_logs():
            try:
                self._log_offsets[path] = os.path.getsize(path)
            except OSError:
                self._log_offsets[path] = 0
        return super().snapshot()

    def rejection(self) -> Optional[str]:
        """What nginx's master logged since the snapshot when it refused the new
        configuration ([emerg]/[alert]/[crit] lines), or None."""
        for path, offset in self._log_offsets.items():
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    text = fh.read(65536).decode("utf-8", "replace")
            except OSError:
                continue
            lines = _EMERG.findall(text)
            if lines:
                return f"{lines[0].strip()} (in {path})"
        return None

    def confirm(self, before: Snapshot, timeout: float,
                clock: Callable[[], float] = time.monotonic) -> str:
        """As :meth:`Server.confirm`; "reloaded" also waits until the old workers stopped
        accepting: new workers start before the old ones are told to quit, and in between
        both take new connections (a CA's request answered by the old configuration)."""
        deadline = clock() + timeout
        state = super().confirm(before, timeout, clock)
        if state != "reloaded":
            return state
        while any(_accepting_worker(pid) for pid in before.children):
            if clock() >= deadline:
                return "unconfirmed"
            time.sleep(POLL)
        return state

    def referenced_paths(self) -> set[str]:
        return self.walk().cert_paths

    def endpoints(self) -> dict[str, list[Endpoint]]:
        return endpoints_of(self.walk())

    # -- http-01 challenges ----------------------------------------------------------------
    SNIPPET_NAME = SNIPPET_NAME

    def challenge_snippet_path(self) -> str:
        return os.path.join(self.ref.root, SNIPPET_NAME)

    @classmethod
    def snippet_misplaced(cls, path: str, root: Optional[str]) -> Optional[str]:
        if root is None or os.path.normpath(root) != os.path.dirname(path):
            return "not in the nginx server root it was written for"
        return None

    def challenge_insert(self) -> str:
        return include_text(self.challenge_snippet_path())

    @classmethod
    def owns_insert(cls, text: str) -> bool:
        return bool(_INCLUDE.match(text))

    def challenge_unserved(self, names: list[str]) -> list[str]:
        return plan(self.walk(), names)[1]

    def challenge_plan(self, names: list[str], tokens: dict[str, bytes],
                       files_root: Optional[str], first: bool) -> ChallengePlan:
        for token, content in tokens.items():
            if not _SAFE.match(token) or not _SAFE.match(content.decode("ascii", "replace")):
                raise errors.PluginError(f"unexpected characters in a challenge for "
                                         f"{', '.join(names)}")
        # The walk without this run's inserts: offsets and digests are in the text as the
        # user wrote it (the files carry our includes once the first lineages are served).
        found = self._challenge_walk or self.walk()
        blocks, unserved = plan(found, names)
        if first and not _unchanged(found, blocks, self.challenge_insert()):
            # Edited since it was walked (certbot's own nginx code for a new name, an
            # admin): walk again, once.
            found = walk(self.ref.root)
            blocks, unserved = plan(found, names)
        self._challenge_walk = found
        if unserved:
            raise errors.PluginError(f"no nginx server block answers {', '.join(unserved)} "
                                     f"over plain HTTP {self.where()}")
        inserts: dict[str, set[int]] = {}
        for block in blocks:
            inserts.setdefault(block.file, set()).add(block.open_end)
        return ChallengePlan(
            snippet=snippet_text(tokens),
            inserts={path: tuple(sorted(offsets)) for path, offsets in inserts.items()},
            digests={path: found.digests.get(path, "") for path in inserts},
            probes=probes_of(blocks, names[0] if names else "localhost"))


def _signature(found: Walk) -> tuple[Any, ...]:
    """What changes when the configuration nginx reads may have changed: every file walked
    (or missing), and the directories holding them (a file added to an include glob)."""
    out: list[Any] = []
    paths = found.files + found.unreadable
    for path in paths + sorted({os.path.dirname(p) for p in paths}):
        try:
            st = os.stat(path)
            out.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((path,))
    return tuple(out)


def _accepting_worker(pid: int) -> bool:
    """An nginx worker that has not begun its graceful exit (it retitles itself "worker
    process is shutting down" just before it closes its listening sockets)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            title = fh.read().replace(b"\0", b" ")
    except OSError:
        return False
    return b"worker process" in title and b"shutting down" not in title


# -- the configtest before any CA contact ---------------------------------------------------

def preflight_problem(server: NginxServer) -> Optional[str]:
    """``nginx -t`` once per instance and process (a command): why it fails, or None."""
    cache = run.PROCESS.preflight
    with run.PROCESS.preflight_lock:  # (a configtest takes seconds: not the common lock)
        if server.ref.key not in cache:
            try:
                server.configtest()
                cache[server.ref.key] = None
            except errors.Error as exc:
                cache[server.ref.key] = (
                    f"nginx's configuration is broken already {server.where()}: {exc}. "
                    "Fix it (nginx -t) and run certbot again.")
        return cache[server.ref.key]
