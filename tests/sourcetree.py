"""Copies of the source tree and Debian's interpreter, for the tests that build or install
certbot-batch (the copy, never the checkout: building writes *.egg-info and build/ into the
tree it builds)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bed import certbots

ROOT = Path(__file__).resolve().parent.parent
# Build products and local state; debian/ only at the top (dpkg-buildpackage's copy of
# packaging/debian, see docs/debian.md).
_JUNK = re.compile(r"(^|/)(\.venv[^/]*|\.git|build|dist|__pycache__|[^/]*\.egg-info|"
                   r"\.[a-z]+_cache|\.pybuild)(/|$)|^debian/")


def copy_source_tree(dest: Path) -> Path:
    """The checkout's files (tracked and new, not ignored) in ``dest``, or, outside a git
    checkout (an unpacked sdist), every file that is not a build product. Skips when the
    tests do not sit in a source tree (a distribution's build directory)."""
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip(f"no source tree here ({ROOT} has no pyproject.toml: an installed "
                    "package's tests)")
    files: list[str] = []
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-c", "-o",
                                 "--exclude-standard"], capture_output=True, check=True)
        files = [f for f in listed.stdout.decode().split("\0") if f]
    else:
        files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                 if p.is_file() and not _JUNK.search(p.relative_to(ROOT).as_posix())]
    for name in files:
        src = ROOT / name
        if not src.is_file():
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def system_python_with(*modules: str) -> Path:
    """Debian's /usr/bin/python3, when it has these modules (else skip)."""
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("no /usr/bin/python3")
    probe = subprocess.run([str(python), "-c", "import " + ", ".join(modules)],
                           capture_output=True, text=True, check=False,
                           env=certbots.clean_env())
    if probe.returncode != 0:
        pytest.skip(f"/usr/bin/python3 lacks one of {', '.join(modules)}: "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    return python


def deb_installed() -> bool:
    """python3-certbot-batch (or another copy) in Debian's dist-packages: apt's certbot then
    loads that one, and a second copy on its path would be a duplicate plugin."""
    return Path("/usr/lib/python3/dist-packages/certbot_batch").exists()
