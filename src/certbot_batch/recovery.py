"""Recovery on every certbot command: finish what an interrupted run left behind.

``_certbot`` calls :func:`on_certbot_start` right after certbot created its directories and
took its lock, for every command (stock ``certbot renew`` from certbot's timer included), so
that leftovers of a killed batched run (challenge files, the Apache challenge snippet) never
outlive the next certbot run, whatever it is. Costs one stat when there is nothing to do.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from certbot_batch import paths
from certbot_batch.challenges.journal import Journal

logger = logging.getLogger(__name__)


def on_certbot_start(config: Any) -> None:
    work_dir = getattr(config, "work_dir", None)
    if not isinstance(work_dir, str):
        return
    journal = Journal(paths.journal_path(config))
    if os.path.exists(journal.path):
        journal.recover()
