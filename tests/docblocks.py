"""The shell blocks of the docs, for the tests that run them.

A block is a fenced ``sh`` block right after a marker line ``<!-- test: NAME -->``;
``tests/test_docs.py`` checks that every ``sh`` block has one and that a runner exists for
every name. ``python3 tests/docblocks.py FILE NAME [OLD=NEW ...]`` prints one block with the
substitutions applied (``scripts/test-deb.sh`` runs the Debian package blocks this way).
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!-- test: ([a-z0-9-]+) -->\s*$")


class Block(NamedTuple):
    name: str  # "" when the block has no marker
    lang: str
    text: str
    line: int  # of the opening fence, 1-based


def parse(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = _MARKER.match(prev)
        out.append(Block(marker.group(1) if marker else "", fence.group(1),
                         "\n".join(lines[start + 1:j]) + "\n", start + 1))
        i = j + 1
    return out


def shell_blocks(path: Path) -> list[Block]:
    return [b for b in parse(path) if b.lang in ("sh", "bash", "shell", "console")]


def block(path: Path, name: str) -> str:
    found = [b.text for b in shell_blocks(path) if b.name == name]
    if len(found) != 1:
        raise KeyError(f"{path}: {len(found)} blocks marked {name!r}")
    return found[0]


def substitute(text: str, pairs: list[tuple[str, str]]) -> str:
    """Replace each OLD by NEW; an OLD that does not occur is an error (the docs changed
    under the test)."""
    for old, new in pairs:
        if old not in text:
            raise ValueError(f"{old!r} is not in the block any more:\n{text}")
        text = text.replace(old, new)
    return text


# -- running blocks ----------------------------------------------------------------------------

def cli_ini_env(tmp: Path, extra: str = "") -> dict[str, str]:
    """An environment whose certbot (and certbot-batch status) keeps its directories under
    ``tmp``: $XDG_CONFIG_HOME/letsencrypt/cli.ini, certbot's user config file."""
    ini = tmp / "xdg" / "letsencrypt" / "cli.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    ini.write_text(f"config-dir = {tmp / 'config'}\nwork-dir = {tmp / 'work'}\n"
                   f"logs-dir = {tmp / 'logs'}\n{extra}")
    env = _clean_env()
    env.update(XDG_CONFIG_HOME=str(tmp / "xdg"), TMPDIR=str(tmp), HOME=str(tmp),
               PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def run_block(text: str, env: dict[str, str], cwd: Path,
              timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], capture_output=True,
                          text=True, env=env, cwd=cwd, check=False, timeout=timeout)


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def exec_start(unit_text: str) -> list[str]:
    """The last ExecStart= of a unit file, split as systemd splits it (quotes)."""
    starts = [line.split("=", 1)[1] for line in unit_text.splitlines()
              if line.startswith("ExecStart=")]
    assert starts and starts[-1], unit_text
    return shlex.split(starts[-1])


def verify_command(*units: Path) -> str:
    """What `systemctl daemon-reload` becomes: systemd-analyze verify of certbot's units
    with the drop-ins in place (prints any unknown key or bad value)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not all(u.exists() for u in units):
        return "true"
    return " ".join([analyze, "verify", *map(str, units)])


def _clean_env() -> dict[str, str]:
    from tests.bed import certbots

    return certbots.clean_env()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    pairs = [tuple(a.split("=", 1)) for a in argv[2:]]
    if any(len(p) != 2 for p in pairs):
        print("substitutions are OLD=NEW", file=sys.stderr)
        return 2
    sys.stdout.write(substitute(block(Path(argv[0]), argv[1]),
                                [(p[0], p[1]) for p in pairs]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
