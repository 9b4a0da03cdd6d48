"""Wires the renewal engine into certbot: the top of certbot-batch.

certbot imports every plugin entry point at the start of every command; importing our
plugins runs :func:`install`, which hands the seam (``_certbot.py``) the callbacks it
forwards certbot's calls to: the renewal session (``session.py``) for ``certbot renew``,
recovery (``recovery.py``) once certbot holds its locks, and ``--batch-skip-if-locked``.
Nothing below this module imports it: the seam knows only the protocols it calls. The
session and recovery are imported when first needed (every certbot command imports this
module; most of them never renew).
"""
from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from typing import Any, Callable

from certbot_batch import _certbot


class _Process:
    """certbot-batch's answers to the seam's process-wide questions (ProcessHooks)."""

    def handle_renewal_request(self, config: Any, stock: Callable[[], Any]) -> Any:
        from certbot_batch import session

        return session.handle_renewal_request(config, stock)

    def dirs_ready(self, config: Any) -> None:
        from certbot_batch import recovery

        recovery.on_certbot_start(config)

    def lock_refused(self, config: Any, exc: BaseException) -> bool:
        # --batch-skip-if-locked: another certbot run holds the lock (an hourly timer
        # meeting a long run): one line, exit 0, instead of an error mail every hour.
        if getattr(config, "batch_skip_if_locked", False) is not True:
            return False
        with contextlib.suppress(Exception):
            sys.stderr.write(f"certbot-batch: {exc} Nothing to do for this run "
                             "(--batch-skip-if-locked).\n")
        return True


def install() -> bool:
    """Check this certbot and wire the engine in (once per process). True when active."""
    active = _certbot.install(_Process())
    if active and threading.current_thread() is threading.main_thread():
        # DNS records of rounds whose workers a stopping run gave up go at exit; registered
        # here, in the main thread, once (a no-op when no round is live).
        atexit.unregister(_cleanup_at_exit)
        atexit.register(_cleanup_at_exit)
    return active


def _cleanup_at_exit() -> None:
    from certbot_batch import run

    if run.PROCESS.live_rounds:
        from certbot_batch.challenges import grouped

        grouped.cleanup_at_exit()
