"""Obtain the certificates of all due batch-capable lineages together, ahead of certbot's loop.

Each lineage runs certbot's own issuance code (same account, server, profile, key and CSR
settings, same authorization handling: pending authorizations are never deactivated) in a
worker thread of its wave. Their ``perform`` calls meet in one :class:`ChallengeBatch`, so
the challenges of the whole wave are provisioned in one action, validated concurrently and
cleaned up once; finalization runs concurrently too. certbot's per-lineage loop then
receives each lineage's result instead of contacting the CA again, and saves the lineage,
runs its hooks and deploys exactly as usual. A lineage that failed here fails in the loop
with the CA's error, without a second validation attempt.
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import logging
import time
from typing import Any, Optional

from certbot_batch import _certbot, paths
from certbot_batch.challenges.apache import ApacheChallengeProvisioner
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.journal import Journal

logger = logging.getLogger(__name__)

#: Authenticators whose perform() can join a batch.
BATCH_AUTHENTICATORS = ("batch-webroot", "batch-apache")

_active: Optional[ChallengeBatch] = None


def active_batch() -> Optional[ChallengeBatch]:
    return _active


@dataclasses.dataclass
class PrevalidationReport:
    results: dict[str, Any]
    provision_calls: int = 0
    cleanup_calls: int = 0
    files: int = 0
    elapsed: float = 0.0

    @property
    def ok(self) -> list[str]:
        return [n for n, r in self.results.items() if not isinstance(r, BaseException)]

    @property
    def failed(self) -> list[str]:
        return [n for n, r in self.results.items() if isinstance(r, BaseException)]


def _obtain_one(config: Any, conf_file: str, name: str, plugins: Any,
                batch: ChallengeBatch) -> Any:
    with _certbot.lineage_context(name):
        try:
            lineage_config = copy.deepcopy(config)
            lineage = _certbot.reconstitute(lineage_config, conf_file)
            if lineage is None:
                raise ValueError(f"renewal conf {conf_file} could not be loaded")
            obtain = _certbot.prepare_obtain(lineage_config, lineage, plugins)
            return obtain()
        finally:
            batch.depart(name)


def run(config: Any, lineages: list[tuple[str, str]], wave_size: int = 100) -> \
        PrevalidationReport:
    """``lineages``: (name, renewal conf path). Returns each lineage's obtain_certificate
    result, or the exception it raised."""
    global _active
    t0 = time.monotonic()
    report = PrevalidationReport(results={})
    plugins = _certbot.find_plugins()
    journal = Journal(paths.journal_path(config))
    for start in range(0, len(lineages), max(1, wave_size)):
        wave = lineages[start:start + wave_size]
        batch = ChallengeBatch([name for name, _ in wave], ApacheChallengeProvisioner(journal))
        _active = batch
        try:
            # One thread per lineage of the wave: they must all be able to reach the
            # rendezvous at the same time. The wave size bounds the load on the CA.
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=len(wave), thread_name_prefix="certbot-batch-obtain") as pool:
                futures = {pool.submit(_obtain_one, config, conf, name, plugins, batch): name
                           for name, conf in wave}
                for fut in concurrent.futures.as_completed(futures):
                    name = futures[fut]
                    try:
                        report.results[name] = fut.result()
                    except BaseException as exc:  # noqa: BLE001  (kept for certbot's loop)
                        logger.debug("Lineage %s failed ahead of certbot's loop", name,
                                     exc_info=True)
                        report.results[name] = exc
        finally:
            batch.finish()
            _active = None
            report.provision_calls += batch.provision_calls
            report.cleanup_calls += batch.cleanup_calls
            report.files += batch.files_provisioned
    report.elapsed = time.monotonic() - t0
    return report
