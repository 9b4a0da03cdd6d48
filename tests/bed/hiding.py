"""Make certbot-batch invisible to an interpreter that has it installed: the certbot its
users had before installing certbot-batch, for side-by-side comparisons in one venv."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

_HIDDEN = ("certbot_batch", "__editable__.certbot_batch", "__editable___certbot_batch")


def without_certbot_batch(python: Path, mirror_root: Path) -> list[str]:
    """``sys.path`` of ``python`` with certbot-batch made invisible: every directory holding
    our package, its metadata or its editable hook is replaced by a mirror of symlinks to
    everything else in it. certbot then finds no batch entry point and never imports us: the
    certbot its users had before installing certbot-batch."""
    probe = subprocess.run([str(python), "-c", "import json, sys; print(json.dumps(sys.path))"],
                           capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    paths: list[str] = json.loads(probe.stdout)
    out: list[str] = []
    for i, entry in enumerate(paths):
        if not entry or not os.path.isdir(entry):
            out.append(entry)
            continue
        names = os.listdir(entry)
        if not any(n.lower().startswith(_HIDDEN) for n in names):
            out.append(entry)
            continue
        mirror = mirror_root / f"path{i}"
        mirror.mkdir(parents=True)
        for n in names:
            if not n.lower().startswith(_HIDDEN):
                (mirror / n).symlink_to(os.path.join(entry, n))
        out.append(str(mirror))
    return out


def prelude(paths: list[str]) -> str:
    return (f"import sys; sys.path[:] = {paths!r}; "
            "sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'certbot_batch' not in repr(f) + getattr(f, '__module__', '')]; ")


VISIBLE_PROBE = (
    "import importlib.util, importlib.metadata as md\n"
    "try:\n"
    "    found = md.entry_points(group='certbot.plugins')\n"
    "except TypeError:  # Python 3.9\n"
    "    found = md.entry_points().get('certbot.plugins', [])\n"
    "eps = [e.name for e in found]\n"
    "try:\n"
    "    import pkg_resources\n"
    "    eps += [e.name for e in pkg_resources.iter_entry_points('certbot.plugins')]\n"
    "except ImportError:\n"
    "    pass\n"
    "print(importlib.util.find_spec('certbot_batch') is not None, "
    "any(e.startswith('batch-') for e in eps))\n")
