"""The run context: everything that spans one renewal session, in one object.

certbot builds fresh plugin and installer objects for every lineage and calls our wrappers
from its own code, so state that must last for the whole ``certbot renew`` run cannot live on
those objects. It lives here instead, owned by the renewal session (``session.py``) and
published through the seam (``_certbot.current()``) for as long as the session runs; outside
a session there is none, and every wrapper and plugin behaves as stock.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Optional


class Scope:
    """A context manager made of two callables. Unlike ``@contextlib.contextmanager`` it
    never touches the exception passing through it: acme 2.x's ``messages.Error`` is an
    immutable josepy object, and contextlib's ``exc.__traceback__ = ...`` turns it into
    "AttributeError: can't set attribute" on Python 3.11, losing the CA's answer."""

    def __init__(self, enter: Callable[[], Any], leave: Callable[[], None]) -> None:
        self._enter = enter
        self._leave = leave

    def __enter__(self) -> Any:
        return self._enter()

    def __exit__(self, *exc_info: Any) -> None:
        self._leave()


@dataclasses.dataclass
class RunContext:
    config: Any
    #: renewal confs certbot's own loop may see (None: certbot's own list)
    conf_files: Optional[list[str]] = None
    #: (config, lineage) -> True/False, or None to let certbot decide
    should_renew: Optional[Callable[[Any, Any], Optional[bool]]] = None
    #: (config, lineage, proceed) around certbot's renew_cert of one lineage
    renew_cert: Optional[Callable[[Any, Any, Callable[[], None]], None]] = None
    #: lineage -> result of obtain_certificate (or the exception) validated ahead of the loop
    prefetched: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: plugin entry points found once per run (certbot rescans them for every lineage)
    plugin_entry_points: Optional[list[Any]] = None
    #: the challenge batch (rendezvous) of the wave in flight
    batch: Optional[Any] = None
    #: the order in which the wave in flight sends its new orders (urgency first)
    order_gate: Optional[Any] = None
    #: the run's Apache deployment (one configtest + reload at the end)
    deploy: Optional[Any] = None
    #: certID that a new order of the calling thread's lineage replaces (ARI), or None
    replaces_for: Optional[Callable[[], Optional[str]]] = None
    #: (authenticator, lineage config) -> the authenticator the lineage's issuance uses
    #: ahead of certbot's loop (a proxy that joins the wave's batch), or the same object
    wrap_authenticator: Optional[Callable[[Any, Any], Any]] = None
    #: pacing and backoff towards the CA (ca/pacing.py AcmePacer)
    pacer: Optional[Any] = None
    #: lineage -> the CA's reason its validation failed (for its backoff record)
    failure_detail: dict[str, str] = dataclasses.field(default_factory=dict)
    #: lineage -> fallback CA directory URL it is being renewed from
    fallback: dict[str, str] = dataclasses.field(default_factory=dict)
    #: set by a stop signal: start no new orders, finish what was issued
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: the name of the signal that stopped the run ("SIGTERM"), when one did
    stop_signal: Optional[str] = None
    #: what certbot's loop would have printed / run, held back until the end of the run
    summaries: list[tuple[list[str], list[str], list[str], list[str]]] = \
        dataclasses.field(default_factory=list)
    post_hook_calls: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    hold_back_summary: bool = False
    #: per-thread: the lineage the calling thread works on
    local: threading.local = dataclasses.field(default_factory=threading.local)
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)

    def current_lineage(self) -> Optional[str]:
        value = getattr(self.local, "lineage", None)
        return str(value) if value else None
