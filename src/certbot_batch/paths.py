"""Where certbot-batch keeps its files: inside certbot's own directories."""
from __future__ import annotations

import os
from typing import Any

SUBDIR = "certbot-batch"


def state_dir(config: Any) -> str:
    return os.path.join(str(config.work_dir), SUBDIR)


def mirror_dir(config: Any) -> str:
    """The second home of the records that must survive a lost state directory
    (durable.py): inside certbot's config directory, next to the lineages."""
    return os.path.join(str(config.config_dir), SUBDIR)


def record_paths(config: Any, name: str) -> list[str]:
    """Where a mirrored record lives: the state directory first, then the mirror."""
    return [os.path.join(state_dir(config), name), os.path.join(mirror_dir(config), name)]


def journal_path(config: Any) -> str:
    return os.path.join(state_dir(config), "challenges.journal")


def journal_paths(config: Any) -> list[str]:
    """The challenge journal, and where it goes when the state directory is not writable."""
    return record_paths(config, "challenges.journal")


def state_db_path(config: Any) -> str:
    return os.path.join(state_dir(config), "state.sqlite")


def missing_dirs(path: str) -> list[str]:
    """The directories on the way to ``path`` (itself included) that do not exist yet,
    outermost first: what ``os.makedirs`` would create."""
    missing = []
    cur = os.path.abspath(path)
    while not os.path.isdir(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    missing.reverse()
    return missing
