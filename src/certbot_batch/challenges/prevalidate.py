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
import contextlib
import copy
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Iterator, Optional

from certbot_batch import _certbot, paths
from certbot_batch.challenges.apache import ApacheChallengeProvisioner
from certbot_batch.challenges.batch import ChallengeBatch
from certbot_batch.challenges.journal import Journal
from certbot_batch.context import RunContext

logger = logging.getLogger(__name__)

#: Authenticators whose perform() can join a batch.
BATCH_AUTHENTICATORS = ("batch-webroot", "batch-apache")

def active_batch() -> Optional[ChallengeBatch]:
    """The challenge batch of the wave in flight (inside a renewal session), or None."""
    ctx = _certbot.current()
    batch = ctx.batch if ctx is not None else None
    return batch if isinstance(batch, ChallengeBatch) else None


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


def _obtain_one(config: Any, conf_file: str, name: str, batch: ChallengeBatch) -> Any:
    with _certbot.lineage_context(name):
        try:
            lineage_config = copy.deepcopy(config)
            lineage = _certbot.reconstitute(lineage_config, conf_file)
            if lineage is None:
                raise ValueError(f"renewal conf {conf_file} could not be loaded")
            # A registry of its own: certbot caches the initialised plugin (built from one
            # lineage's config: webroot map, ...) on the registry's entry points.
            plugins = _certbot.find_plugins()
            obtain = _certbot.prepare_obtain(lineage_config, lineage, plugins)
            return obtain()
        finally:
            batch.depart(name)


#: The signals certbot's own ErrorHandler cleans up on (SIGTERM, SIGHUP, SIGQUIT; SIGXCPU
#: and SIGXFSZ are left to it: they do not come from a user), plus SIGINT, which certbot
#: sees as KeyboardInterrupt in the main thread only.
_STOP_SIGNALS = tuple(getattr(signal, name)
                      for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
                      if hasattr(signal, name))


def _on_stop_signal(signum: int, frame: Any) -> None:
    """A stop signal while a wave is out: remove its challenge files, then die of the signal
    (with its default action, as certbot's ErrorHandler does after its own cleanup).

    The lineages' workers are deep inside certbot's obtain_certificate (polling the CA), where
    neither certbot's own signal handling (main thread only) nor a KeyboardInterrupt reaches
    them, so the process must not wait for them: raising SystemExit here would hang in the
    executor's shutdown and in the interpreter's exit, which join those threads. Holding the
    batch's lock while cleaning up and re-raising keeps any worker from provisioning again
    in between.
    """
    batch = active_batch()
    if batch is None:
        _die(signum)
        return
    with batch.locked():
        try:
            batch.finish()
            logger.warning("certbot-batch: interrupted by signal %d; challenge files removed",
                           signum)
        except Exception:  # noqa: BLE001  (the journal lets the next run finish the job)
            logger.exception("certbot-batch: cleanup after signal %d failed; the next run "
                             "removes the leftovers (journal)", signum)
        _die(signum)


def _die(signum: int) -> None:
    logging.shutdown()  # flush certbot's log file
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    # Not reached: the default action of every signal in _STOP_SIGNALS ends the process.
    os._exit(128 + signum)


@contextlib.contextmanager
def _stop_signals_cleanup() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in _STOP_SIGNALS:
        handler = signal.getsignal(sig)
        # An ignored signal stays ignored (nohup, `certbot renew &` from a script: SIGINT and
        # SIGQUIT are SIG_IGN there), and a handler set outside Python cannot be restored.
        if handler is None or handler == signal.SIG_IGN:
            continue
        previous[sig] = handler
        signal.signal(sig, _on_stop_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(ctx: RunContext, lineages: list[tuple[str, str]], wave_size: int = 100) -> \
        PrevalidationReport:
    """``lineages``: (name, renewal conf path). Returns each lineage's obtain_certificate
    result, or the exception it raised."""
    with _stop_signals_cleanup():
        return _run(ctx, lineages, wave_size)


def _run(ctx: RunContext, lineages: list[tuple[str, str]], wave_size: int) -> \
        PrevalidationReport:
    config = ctx.config
    t0 = time.monotonic()
    report = PrevalidationReport(results={})
    _certbot.find_plugins()  # fills the session's entry-point cache before the threads start
    journal = Journal(paths.journal_path(config))
    for start in range(0, len(lineages), max(1, wave_size)):
        wave = lineages[start:start + wave_size]
        batch = ChallengeBatch([name for name, _ in wave], ApacheChallengeProvisioner(journal))
        ctx.batch = batch
        try:
            # One thread per lineage of the wave: they must all be able to reach the
            # rendezvous at the same time. The wave size bounds the load on the CA.
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=len(wave), thread_name_prefix="certbot-batch-obtain") as pool:
                futures = {pool.submit(_obtain_one, config, conf, name, batch): name
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
            ctx.batch = None
            report.provision_calls += batch.provision_calls
            report.cleanup_calls += batch.cleanup_calls
            report.files += batch.files_provisioned
    report.elapsed = time.monotonic() - t0
    return report
