"""The backoff ledger: each lineage's renewal backoff, kept where the state DB cannot lose it.

The state database is a cache: deleted, locked by another process, unwritable or corrupt, it
is rebuilt or replaced by an in-memory one, and with it would go the backoff of lineages
whose renewal failed -- the next run would send their dead names to the CA again at once
(each failed validation counts against Let's Encrypt's limits). So every backoff decision
(``backoff.py``) is also appended to this ledger, a mirrored record (``durable.py``: one
copy in the state directory, one in ``CONFIG_DIR/certbot-batch``), one JSON line per change
(fsynced), and applied over the database's rows at the start of each run: the newest line
per lineage wins, across both copies. A line is tied to the certificate it was written for
(its serial): once the lineage has a new certificate it no longer applies.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Iterable, Optional

from certbot_batch import durable, paths
from certbot_batch.scan.state import LineageState

logger = logging.getLogger(__name__)

FILE_NAME = "backoff.log"
FIELDS = ("renew_failures", "renew_failing_since", "renew_last_error", "renew_next_attempt",
          "renew_fail_conf_sig")
#: Rewrite a copy without its superseded lines once it has this many more than needed.
COMPACT_SLACK = 1000


class Ledger:
    def __init__(self, config: Any) -> None:
        self.paths = paths.record_paths(config, FILE_NAME)
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []

    # -- reading -------------------------------------------------------------------------
    def load(self) -> dict[str, dict[str, Any]]:
        """lineage -> its newest line, across every trusted copy."""
        newest: dict[str, dict[str, Any]] = {}
        counts = []
        for path in self.paths:
            lines = durable.read_lines(path)
            counts.append((path, len(lines)))
            for item in lines:
                name = item.get("name")
                if not isinstance(name, str):
                    continue
                t = float(item.get("t") or 0)
                if name not in newest or t >= float(newest[name].get("t") or 0):
                    newest[name] = item
        for path, count in counts:
            if count > len(newest) + COMPACT_SLACK:
                self._compact(path, newest)
        return newest

    def _compact(self, path: str, newest: dict[str, dict[str, Any]]) -> None:
        live = [item for item in newest.values() if item.get("renew_next_attempt")]
        try:
            durable.write_atomic(path, "".join(json.dumps(i) + "\n" for i in live))
        except OSError:
            pass  # the long copy still says the same

    def apply(self, states: Iterable[LineageState]) -> int:
        """Put the ledger's backoff over the states read from the database. Returns how
        many states it changed."""
        ledger = self.load()
        changed = 0
        for state in states:
            item = ledger.get(state.name)
            if item is None or (item.get("serial") or None) != (state.serial or None):
                continue  # nothing noted, or noted for a certificate that is gone
            values = {f: item.get(f) for f in FIELDS}
            values["renew_failures"] = int(values["renew_failures"] or 0)
            if all(getattr(state, f) == v for f, v in values.items()):
                continue
            for field, value in values.items():
                setattr(state, field, value)
            changed += 1
        return changed

    # -- writing -------------------------------------------------------------------------
    def note(self, state: LineageState, now: Optional[float] = None) -> None:
        """Queue the state's current backoff (or its end) for the next :meth:`flush`."""
        item: dict[str, Any] = {"name": state.name, "t": now or time.time(),
                                "serial": state.serial}
        for field in FIELDS:
            item[field] = getattr(state, field)
        with self._lock:
            self._pending.append(item)

    def flush(self) -> None:
        """Append what was noted to every copy that can be written (one fsync each)."""
        with self._lock:
            items, self._pending = self._pending, []
        if not items:
            return
        text = "".join(json.dumps(i) + "\n" for i in items)
        written = 0
        for path in self.paths:
            try:
                durable.append_line(path, text)
                written += 1
            except OSError as exc:
                durable.warn_once(f"ledger:{path}", "certbot-batch: could not write the "
                                  "backoff ledger %s (%s); the other copy keeps it", path,
                                  exc.strerror or exc)
        if not written:
            durable.warn_once("ledger-none", "certbot-batch: the backoff of failing "
                              "lineages could not be recorded anywhere (%s): the next run "
                              "may ask the CA for them again", ", ".join(self.paths))

    def exists(self) -> bool:
        return any(os.path.exists(p) for p in self.paths)
