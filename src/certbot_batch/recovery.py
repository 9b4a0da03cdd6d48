"""Recovery on every certbot command: finish what an interrupted run left behind.

``_certbot`` calls :func:`on_certbot_start` right after certbot created its directories and
took its lock, for every command (stock ``certbot renew`` from certbot's timer included), so
that the leftovers of a killed batched run never outlive the next certbot run, whatever it
is: challenge files and the Apache challenge snippet are removed (and Apache reloaded when
the snippet was live), and a pending deployment (certificates saved, Apache not yet
reloaded or batch hooks not yet run) is finished. Costs two stats when there is nothing to
do; never changes the command's own result (problems are warnings, and stay recorded for
the next run and for ``certbot-batch status``).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from certbot_batch import paths
from certbot_batch.challenges.journal import Journal
from certbot_batch.deploy import pending

logger = logging.getLogger(__name__)


def on_certbot_start(config: Any) -> None:
    work_dir = getattr(config, "work_dir", None)
    if not isinstance(work_dir, str):
        return
    journal = Journal(paths.journal_path(config))
    if os.path.exists(journal.path):
        journal.recover()
    from certbot_batch.challenges import grouped

    if os.path.exists(grouped.journal_path(config)):
        # TXT records, with each lineage's own DNS plugin; a few seconds at most outside
        # renew (a dead DNS server is left to the next renew)
        grouped.recover(config, budget=None if getattr(config, "verb", None) == "renew"
                        else 3.0)
    if os.path.exists(pending.path_for(config)):
        error = finish_pending(config)
        if error:
            logger.warning("certbot-batch: %s", error)


def finish_pending(config: Any) -> Optional[str]:
    """Deploy what an earlier run saved but did not deploy. Returns an error, or None."""
    from certbot import errors

    from certbot_batch.deploy import apachectl
    from certbot_batch.deploy import hooks as batch_hooks

    record = pending.PendingDeployment(pending.path_for(config))
    data = record.get()
    if data is None:
        return None
    lineages = [str(n) for n in data.get("lineages") or []]
    reload = data.get("reload") or None
    result = "none"
    if reload and reload.get("ctl"):
        ctl = str(reload["ctl"])
        try:
            apachectl.configtest(ctl)
        except errors.Error as exc:
            msg = (f"the certificates of {len(lineages)} lineage(s) renewed earlier are still "
                   f"not deployed: Apache's configtest fails ({exc}). Fix the configuration; "
                   "the next certbot run reloads Apache.")
            record.failed(msg)
            return msg
        try:
            apachectl.graceful(ctl)
        except errors.Error as exc:
            msg = f"reloading Apache for {len(lineages)} renewed lineage(s) failed: {exc}"
            record.failed(msg)
            return msg
        result = "reloaded"
        logger.warning("certbot-batch: reloaded Apache for %d lineage(s) renewed by an "
                       "interrupted run: %s", len(lineages), ", ".join(lineages[:20]))
    hooks = [str(h) for h in data.get("hooks") or []]
    if hooks and lineages:
        described = [batch_hooks.describe_lineage(config, n) for n in lineages]
        error = batch_hooks.run_batch_hooks(config, described, result, commands=hooks)
        if error:
            record.failed(error)
            return error
    record.clear()
    return None
