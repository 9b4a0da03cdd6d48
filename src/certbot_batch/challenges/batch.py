"""Rendezvous of the lineages validated together: one provisioning call, one cleanup.

certbot's per-lineage pipeline calls ``perform`` once per lineage, from the worker thread
that obtains that lineage's certificate. Each call registers its challenge files and waits
until every lineage of the wave has either arrived or dropped out (order creation failed,
or all its authorizations were already valid); then all files are written in one go.
The last lineage to finish (cleanup or drop-out) triggers the one cleanup.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Optional

from certbot import errors

from certbot_batch.challenges.webroot import ChallengeFile, WebrootProvisioner

logger = logging.getLogger(__name__)


class ChallengeBatch:
    def __init__(self, participants: Iterable[str], provisioner: WebrootProvisioner,
                 wait_timeout: float = 300.0) -> None:
        self._cond = threading.Condition()
        self._pending = set(participants)
        self._arrived: dict[str, list[ChallengeFile]] = {}
        self._errors: dict[str, Exception] = {}
        self._outstanding: set[str] = set()
        self._provisioned = False
        self._cleaned = False
        self._closed = False
        self.provisioner = provisioner
        self.wait_timeout = wait_timeout
        self.provision_calls = 0
        self.cleanup_calls = 0
        self.files_provisioned = 0

    def locked(self) -> threading.Condition:
        """The batch's (reentrant) lock: nothing is provisioned or cleaned up meanwhile."""
        return self._cond

    def is_participant(self, lineage: Optional[str]) -> bool:
        with self._cond:
            return lineage is not None and (lineage in self._pending or
                                            lineage in self._arrived)

    def perform(self, lineage: str, items: list[ChallengeFile]) -> None:
        """Register this lineage's files; returns once they are on disk (or raises its own
        error: one lineage's bad webroot never costs the others their renewal)."""
        with self._cond:
            if self._closed:
                # The wave was given up (stop signal): nothing may be written any more.
                raise errors.PluginError("certbot-batch: the run is stopping; no challenge "
                                         "was provisioned for this lineage")
            if self._provisioned:
                # Arrived after the wave was provisioned (timeout): provision it alone.
                failures = self.provisioner.provision(items)
                self.provision_calls += 1
                if failures:
                    raise failures[0][1]
                self._arrived[lineage] = items
                self._outstanding.add(lineage)
                return
            self._arrived[lineage] = items
            self._pending.discard(lineage)
            self._maybe_provision()
            deadline = time.monotonic() + self.wait_timeout
            while not self._provisioned:
                if self._closed:
                    raise errors.PluginError("certbot-batch: the run is stopping; no "
                                             "challenge was provisioned for this lineage")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning("certbot-batch: %d lineage(s) did not reach validation in "
                                   "time; provisioning the %d that did", len(self._pending),
                                   len(self._arrived))
                    self._pending.clear()
                    self._maybe_provision()
                    break
                self._cond.wait(remaining)
            if lineage in self._errors:
                raise self._errors[lineage]

    def _maybe_provision(self) -> None:
        if self._provisioned or self._pending or self._closed:
            return
        all_items = [item for items in self._arrived.values() for item in items]
        failures = self.provisioner.provision(all_items)
        self.provision_calls += 1
        self.files_provisioned = len(all_items) - len(failures)
        for item, exc in failures:
            if item.lineage is not None:
                self._errors.setdefault(item.lineage, exc)
        self._outstanding = {name for name in self._arrived}
        self._provisioned = True
        logger.info("certbot-batch: provisioned %d challenge file(s) for %d lineage(s) in one "
                    "action", self.files_provisioned, len(self._arrived))
        self._cond.notify_all()

    def cleanup(self, lineage: str) -> None:
        with self._cond:
            self._outstanding.discard(lineage)
            self._maybe_cleanup()

    def depart(self, lineage: str) -> None:
        """The lineage's worker is done (whatever happened)."""
        with self._cond:
            self._pending.discard(lineage)
            self._outstanding.discard(lineage)
            self._maybe_provision()
            self._maybe_cleanup()

    def _maybe_cleanup(self) -> None:
        if self._provisioned and not self._outstanding and not self._cleaned \
                and not self._pending:
            self.provisioner.cleanup()
            self.cleanup_calls += 1
            self._cleaned = True

    def finish(self) -> None:
        """End of the wave: nothing may stay on disk, whatever the workers did."""
        with self._cond:
            if self._provisioned and not self._cleaned:
                self.provisioner.cleanup()
                self.cleanup_calls += 1
                self._cleaned = True
            self._pending.clear()
            self._closed = True
            self._cond.notify_all()
