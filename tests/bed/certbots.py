"""The certbot flavours the project is tested against, run as real subprocesses.

* ``pypi``: certbot 5.x from PyPI (+ certbot[apache]) in a venv;
* ``deb``: Debian 12's certbot 2.1.0 + python3-certbot-apache, through a venv made with
  ``--system-site-packages`` (it has no ``certbot`` script and no ``python -m certbot``,
  so certbot is started as ``python -c 'from certbot.main import main; ...'``).

Venvs: $CERTBOT_BATCH_VENV_PYPI / $CERTBOT_BATCH_VENV_DEB; unset, /work/main/.venv-pypi and
.venv-deb, else /tmp/venv58 and /tmp/venvdeb (local development) if those exist.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Protocol

REPO = Path(__file__).resolve().parents[2]

_VENVS = {
    "pypi": ("CERTBOT_BATCH_VENV_PYPI", REPO / ".venv-pypi", Path("/tmp/venv58")),
    "deb": ("CERTBOT_BATCH_VENV_DEB", REPO / ".venv-deb", Path("/tmp/venvdeb")),
}

_BOOT = "import sys; from certbot.main import main; sys.exit(main())"

#: Verbs that may create an account (and so take --agree-tos / -m).
_ACCOUNT_VERBS = {"run", "certonly", "register", "renew", "install"}
_DEFAULT_VERB = "run"


class AcmeServer(Protocol):
    @property
    def directory_url(self) -> str: ...

    ca_bundle: Path


def flavours() -> list[str]:
    return list(_VENVS)


def venv_for(flavour: str) -> Optional[Path]:
    """The venv of a flavour, or None when it is not there (tests then skip)."""
    env_var, default, local = _VENVS[flavour]
    explicit = os.environ.get(env_var)
    if explicit:
        return Path(explicit) if (Path(explicit) / "bin" / "python").exists() else None
    for candidate in (default, local):
        if (candidate / "bin" / "python").exists():
            return candidate
    return None


def missing_reason(flavour: str) -> Optional[str]:
    if venv_for(flavour) is not None:
        return None
    env_var, default, local = _VENVS[flavour]
    where = os.environ.get(env_var) or f"{default} or {local}"
    return f"certbot flavour {flavour!r}: no venv at {where} (set ${env_var})"


class Certbot:
    """One certbot flavour with its own config/work/logs dirs, pointed at one pebble."""

    def __init__(self, flavour: str, base_dir: Path, pebble: Optional[AcmeServer],
                 env_extra: Optional[Mapping[str, str]] = None,
                 email: str = "test@example.org") -> None:
        venv = venv_for(flavour)
        if venv is None:
            raise FileNotFoundError(missing_reason(flavour))
        self.flavour = flavour
        self.venv = venv
        self.python = venv / "bin" / "python"
        self.base_dir = Path(base_dir)
        self.config_dir = self.base_dir / "config"
        self.work_dir = self.base_dir / "work"
        self.logs_dir = self.base_dir / "logs"
        self.tmp_dir = self.base_dir / "tmp"
        for d in (self.config_dir, self.work_dir, self.logs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.pebble = pebble
        self.email = email
        self.env_extra = dict(env_extra or {})

    # -- paths -----------------------------------------------------------------------------
    def live(self, name: str) -> Path:
        return self.config_dir / "live" / name

    def renewal_conf(self, name: str) -> Path:
        return self.config_dir / "renewal" / f"{name}.conf"

    def log_text(self) -> str:
        try:
            return (self.logs_dir / "letsencrypt.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- running ---------------------------------------------------------------------------
    def command(self, *args: str) -> list[str]:
        verb = args[0] if args and not args[0].startswith("-") else None
        cmd = [str(self.python), "-c", _BOOT, *args]
        if verb is None and any(a in ("--version", "-h", "--help") for a in args):
            return cmd
        cmd += ["--config-dir", str(self.config_dir), "--work-dir", str(self.work_dir),
                "--logs-dir", str(self.logs_dir)]
        if self.pebble is not None:
            cmd += ["--server", self.pebble.directory_url]
        if (verb or _DEFAULT_VERB) in _ACCOUNT_VERBS:
            cmd += ["--non-interactive", "--agree-tos", "-m", self.email]
        else:
            cmd += ["--non-interactive"]
        if verb == "renew":
            cmd += ["--no-random-sleep-on-renew"]
        return cmd

    def env(self, env_extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("CERTBOT_BATCH_VENV_PYPI", "CERTBOT_BATCH_VENV_DEB", "PYTHONPATH"):
            env.pop(key, None)
        # certbot logs to a temp dir until it has parsed its options: keep that in base_dir
        env["TMPDIR"] = str(self.tmp_dir)
        if self.pebble is not None:
            env["REQUESTS_CA_BUNDLE"] = str(self.pebble.ca_bundle)
        env.update(self.env_extra)
        env.update(env_extra or {})
        return env

    def run(self, *args: str, check: bool = False, env_extra: Optional[Mapping[str, str]] = None,
            timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
        cmd = self.command(*args)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env(env_extra),
                              cwd=self.base_dir, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"[{self.flavour}] certbot {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}\n"
                f"--- letsencrypt.log (tail) ---\n{self.log_text()[-8000:]}")
        return proc

    def register(self) -> subprocess.CompletedProcess[str]:
        return self.run("register", check=True)

    def version(self) -> str:
        proc = self.run("--version", check=True)
        match = re.search(r"certbot\s+(\S+)", proc.stdout + proc.stderr)
        if not match:
            raise AssertionError(f"no version in {proc.stdout!r} {proc.stderr!r}")
        return match.group(1)
