"""The certbots the project is tested against, run as real subprocesses.

A *flavour* is a name and a Python interpreter that has certbot and certbot-batch:

* ``$CERTBOT_BATCH_FLAVOURS`` (``"name=/path/to/python name2=/other/python"``) lists them;
* unset, the venvs made by ``scripts/setup.sh`` that exist: ``pypi`` (latest 5.x), ``deb``
  (Debian's apt certbot 2.1.0 through a ``--system-site-packages`` venv), ``c290``, ``c330``,
  ``c400``, ``c540`` (certbot 2.9.0, 3.3.0, 4.0.0, 5.4.0 from PyPI); ``$CERTBOT_BATCH_VENV_PYPI`` /
  ``$CERTBOT_BATCH_VENV_DEB`` move the first two;
* none of those: ``system``, the interpreter running the tests (a distribution's build or
  autopkgtest runs the suite against the installed package this way).

``$CERTBOT_BATCH_FULL`` names the flavours that run every test (default: ``pypi deb``, or all
when neither is present); the others run the tests marked ``versions`` (a representative
end-to-end subset). Expectations come from the certbot version a flavour actually runs
(:attr:`Certbot.version_info`), never from its name.

certbot is started as ``python -c 'from certbot.main import main; ...'``: Debian's venv has
no ``certbot`` script and no ``python -m certbot``.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Protocol

REPO = Path(__file__).resolve().parents[2]

#: Default flavours: name -> (env var moving it, venv under the repository).
_DEFAULT_VENVS = {
    "pypi": ("CERTBOT_BATCH_VENV_PYPI", REPO / ".venv-pypi"),
    "deb": ("CERTBOT_BATCH_VENV_DEB", REPO / ".venv-deb"),
    "c290": ("", REPO / ".venv-c290"),
    "c330": ("", REPO / ".venv-c330"),
    "c400": ("", REPO / ".venv-c400"),
    "c540": ("", REPO / ".venv-c540"),
}
_DEFAULT_FULL = ("pypi", "deb")

_BOOT = "import sys; from certbot.main import main; sys.exit(main())"

#: Verbs that may create an account (and so take --agree-tos / -m).
_ACCOUNT_VERBS = {"run", "certonly", "register", "renew", "install"}
_DEFAULT_VERB = "run"


class AcmeServer(Protocol):
    @property
    def directory_url(self) -> str: ...

    ca_bundle: Path


@functools.cache
def _configured() -> dict[str, Path]:
    """flavour name -> python interpreter, in order."""
    spec = os.environ.get("CERTBOT_BATCH_FLAVOURS", "").split()
    if spec:
        out: dict[str, Path] = {}
        for item in spec:
            name, sep, python = item.partition("=")
            if not sep:
                raise ValueError(f"CERTBOT_BATCH_FLAVOURS: {item!r} is not name=/path/python")
            out[name] = Path(python)
        return out
    found: dict[str, Path] = {}
    for name, (env_var, default) in _DEFAULT_VENVS.items():
        explicit = os.environ.get(env_var) if env_var else None
        venv = Path(explicit) if explicit else default
        if (venv / "bin" / "python").exists():
            found[name] = venv / "bin" / "python"
    if not found:
        found["system"] = Path(sys.executable)
    return found


def flavours() -> list[str]:
    return list(_configured())


def full_flavours() -> list[str]:
    """Flavours that run the whole suite."""
    names = flavours()
    spec = os.environ.get("CERTBOT_BATCH_FULL")
    if spec:
        return [n for n in spec.split() if n in names]
    full = [n for n in _DEFAULT_FULL if n in names]
    return full or names


def python_for(flavour: str) -> Optional[Path]:
    python = _configured().get(flavour)
    return python if python is not None and python.exists() else None


def venv_for(flavour: str) -> Optional[Path]:
    """The prefix of a flavour's interpreter (its venv), or None when it is not there."""
    python = python_for(flavour)
    return python.parent.parent if python is not None else None


def missing_reason(flavour: str) -> Optional[str]:
    if python_for(flavour) is not None:
        return None
    return f"certbot flavour {flavour!r}: no interpreter at {_configured().get(flavour)}"


@functools.cache
def version_of(flavour: str) -> str:
    python = python_for(flavour)
    if python is None:
        raise FileNotFoundError(missing_reason(flavour))
    proc = subprocess.run([str(python), "-c", "import certbot; print(certbot.__version__)"],
                          capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return proc.stdout.strip()


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def clean_env(base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment for a subprocess of the bed: no proxies for loopback (pybuild sets
    http_proxy=http://127.0.0.1:9/), no variables of the test runner."""
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key.lower() in ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy"):
            env.pop(key)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    for key in ("CERTBOT_BATCH_VENV_PYPI", "CERTBOT_BATCH_VENV_DEB", "PYTHONPATH",
                "CERTBOT_BATCH_FLAVOURS", "CERTBOT_BATCH_FULL"):
        env.pop(key, None)
    return env


#: The signals the tests stop a run with.
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


def default_stop_signals() -> None:
    """``preexec_fn`` of a certbot the tests will signal: the stop signals at their default,
    whatever the test runner inherited (``nohup`` ignores SIGHUP, a shell's background job
    SIGINT and SIGQUIT; an ignored signal stays ignored through exec, and certbot-batch
    rightly leaves it so)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


class Certbot:
    """One certbot flavour with its own config/work/logs dirs, pointed at one pebble."""

    def __init__(self, flavour: str, base_dir: Path, pebble: Optional[AcmeServer],
                 env_extra: Optional[Mapping[str, str]] = None,
                 email: str = "test@example.org") -> None:
        python = python_for(flavour)
        if python is None:
            raise FileNotFoundError(missing_reason(flavour))
        self.flavour = flavour
        self.python = python
        self.venv = python.parent.parent
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

    # -- what runs -------------------------------------------------------------------------
    @property
    def version(self) -> str:
        """The certbot release this flavour runs, e.g. "2.1.0"."""
        return version_of(self.flavour)

    @property
    def version_info(self) -> tuple[int, ...]:
        return version_tuple(self.version)

    @property
    def has_stock_ari(self) -> bool:
        """certbot's own should_renew asks ARI from 4.1 on."""
        return self.version_info >= (4, 1)

    @property
    def script(self) -> Path:
        """A console script of this flavour's environment (certbot-batch, ...)."""
        return self.python.parent

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
        env = clean_env()
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
                f"[{self.flavour} {self.version}] certbot {' '.join(args)} exited "
                f"{proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n"
                f"{proc.stderr}\n--- letsencrypt.log (tail) ---\n{self.log_text()[-8000:]}")
        return proc

    def register(self) -> subprocess.CompletedProcess[str]:
        return self.run("register", check=True)
