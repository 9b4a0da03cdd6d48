"""Where certbot-batch keeps its files: inside certbot's own directories."""
from __future__ import annotations

import os
from typing import Any

SUBDIR = "certbot-batch"


def state_dir(config: Any) -> str:
    return os.path.join(str(config.work_dir), SUBDIR)


def journal_path(config: Any) -> str:
    return os.path.join(state_dir(config), "challenges.journal")


def state_db_path(config: Any) -> str:
    return os.path.join(state_dir(config), "state.sqlite")
