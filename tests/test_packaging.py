"""Packaging and the certbot-internals boundary.

- Debian's /usr/bin/certbot finds the plugins installed the distro way
  (pip --no-deps --target DIR + CERTBOT_PLUGIN_PATH, dependencies from apt);
- exactly one module touches certbot._internal;
- on a certbot it does not know, certbot-batch switches its engine off with a warning and
  certbot runs as stock (no crash).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bed.certbots import venv_for

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "certbot_batch"


def test_only_one_module_touches_certbot_internal() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if re.search(r"certbot\._internal|certbot_apache\._internal", text):
            offenders.append(path.relative_to(SRC).as_posix())
    assert offenders == ["_certbot.py"]


@pytest.mark.skipif(not os.path.exists("/usr/bin/certbot"), reason="Debian certbot missing")
def test_debian_certbot_finds_plugins_via_plugin_path(tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip = subprocess.run(
        ["/usr/bin/python3", "-m", "pip", "install", "-q", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, check=False)
    if pip.returncode != 0 and "No module named pip" in pip.stderr:
        pytest.skip("python3-pip is not installed")
    assert pip.returncode == 0, pip.stderr
    env = dict(os.environ, CERTBOT_PLUGIN_PATH=str(target), TMPDIR=str(tmp_path))
    dirs = ["--config-dir", str(tmp_path / "c"), "--work-dir", str(tmp_path / "w"),
            "--logs-dir", str(tmp_path / "l")]
    proc = subprocess.run(["/usr/bin/certbot", *dirs, "plugins", "--text"],
                          capture_output=True, text=True, env=env, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "* batch-webroot" in proc.stdout and "* batch-apache" in proc.stdout
    # Without the variable, apt's certbot knows nothing of us: nothing was installed into
    # the system's dist-packages.
    env.pop("CERTBOT_PLUGIN_PATH")
    proc = subprocess.run(["/usr/bin/certbot", *dirs, "plugins", "--text"],
                          capture_output=True, text=True, env=env, check=False, timeout=120)
    assert "batch-webroot" not in proc.stdout


_BOOT_UNKNOWN = """
import sys, certbot
certbot.__version__ = "99.0.0"
from certbot.main import main
sys.exit(main())
"""

_BOOT_MOVED = """
import sys
from certbot._internal import renewal
del renewal.should_renew
from certbot.main import main
sys.exit(main())
"""


@pytest.mark.parametrize("flavour", ["pypi", "deb"])
@pytest.mark.parametrize("boot,reason", [(_BOOT_UNKNOWN, "99.0.0"),
                                         (_BOOT_MOVED, "should_renew")])
def test_unknown_certbot_disables_engine_with_warning(tmp_path: Path, flavour: str, boot: str,
                                                      reason: str) -> None:
    venv = venv_for(flavour)
    if venv is None:
        pytest.skip(f"no venv for {flavour}")
    dirs = ["--config-dir", str(tmp_path / "c"), "--work-dir", str(tmp_path / "w"),
            "--logs-dir", str(tmp_path / "l")]
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", boot, *dirs, "renew", "--non-interactive",
         "--no-random-sleep-on-renew", "--batch-engine"],
        capture_output=True, text=True, check=False, timeout=120,
        env=dict(os.environ, TMPDIR=str(tmp_path)))
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "renewal engine disabled" in out and reason in out
    assert proc.returncode == 0, out
    assert "No renewals were attempted" in out or "No simulated renewals" in out
    # certbot ran as stock: no certbot-batch scan, no state database.
    assert "certbot-batch: checked" not in out
    assert not (tmp_path / "w" / "certbot-batch" / "state.sqlite").exists()


def test_python_version_floor() -> None:
    assert sys.version_info >= (3, 9)
