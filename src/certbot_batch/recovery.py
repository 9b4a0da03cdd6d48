"""Recovery on every certbot command: finish what an interrupted run left behind, briefly.

``_certbot`` calls :func:`on_certbot_start` right after certbot created its directories and
took its lock, for every command (stock ``certbot renew`` from certbot's timer included):

* challenge files and batch-apache's / batch-nginx's challenge snippet named by the journal
  are removed (only inside the webroots / challenge directories / server root they were
  written for), and the include batch-nginx inserted into server blocks is taken out again
  (the files byte-identical); a server whose challenge configuration was live gets a
  pending reload;
* TXT records of dns-01 groups are removed with each lineage's own DNS plugin (in commands
  other than ``renew`` within a few seconds: a slow or dead DNS server is left to the next
  ``renew``, in one line);
* deployments: ``certbot renew`` finishes every pending deployment at the end of its run
  (one reload per server, see ``session.py`` and ``_certbot``); every other command
  deploys what an *interrupted* run left (a kill before its reload) with a short
  confirmation, and only mentions, in one line, a deployment that failed in its run (the
  next ``renew`` retries it; ``certbot-batch status`` shows it).

Costs a few stats when there is nothing to do; never changes the command's own result.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from certbot_batch import paths
from certbot_batch.challenges.journal import Journal
from certbot_batch.deploy import finish, pending
from certbot_batch.servers.base import ServerRef

logger = logging.getLogger(__name__)

#: Seconds a command other than ``renew`` may spend removing DNS records.
DNS_BUDGET = 3.0


def renews(config: Any) -> bool:
    """Is this a real ``certbot renew`` (which deploys everything pending at its end)?"""
    return getattr(config, "verb", None) == "renew" and \
        getattr(config, "dry_run", False) is not True


def on_certbot_start(config: Any) -> None:
    work_dir = getattr(config, "work_dir", None)
    config_dir = getattr(config, "config_dir", None)
    if not isinstance(work_dir, str) or not isinstance(config_dir, str):
        return
    renewal = renews(config)
    journal = Journal(paths.journal_paths(config))
    if journal.exists():
        servers = journal.recover()
        refs = [ref for ref in (ServerRef.from_dict(s) for s in servers) if ref is not None]
        if refs:
            # The challenge configuration is gone from disk; the running server drops it
            # at its next reload, which is now pending like any other.
            pending.PendingDeployments(config).begin(
                {ref: [] for ref in refs}, [], [], reason=pending.CHALLENGE_CONFIG,
                owner=None)
    from certbot_batch.challenges import grouped

    if any(os.path.exists(p) for p in grouped.journal_paths(config)):
        grouped.recover(config, budget=None if renewal else DNS_BUDGET)
    if not renewal and pending.PendingDeployments(config).exists():
        finish.finish(config, brief=True)

