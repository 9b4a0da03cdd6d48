"""Running apachectl: configtest and graceful reload, with errors a user can act on."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Sequence

from certbot import errors

logger = logging.getLogger(__name__)


def find_ctl(ctl: str) -> str:
    path = ctl if os.path.sep in ctl else shutil.which(ctl)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise errors.NoInstallationError(
            f"Apache's control program '{ctl}' was not found or is not executable. Install "
            "Apache (Debian: apt-get install apache2) or point --apache-ctl at apachectl "
            "(saved as apache_ctl in the renewal conf).")
    return path


def _run(cmd: Sequence[str], what: str) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False,
                              timeout=600)
    except OSError as exc:
        raise errors.MisconfigurationError(f"Could not run {' '.join(cmd)}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise errors.MisconfigurationError(f"{' '.join(cmd)} timed out") from exc
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise errors.MisconfigurationError(
            f"Apache {what} failed ({' '.join(cmd)} exited {proc.returncode}): {output}")
    return output


def configtest(ctl: str) -> str:
    return _run([find_ctl(ctl), "configtest"], "configtest")


def graceful(ctl: str) -> str:
    return _run([find_ctl(ctl), "graceful"], "graceful reload")


def said_not_running(output: str) -> bool:
    """httpd -k graceful on a stopped server prints "... not running" and starts it."""
    return "not running" in output
