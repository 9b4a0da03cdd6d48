"""Real run-model objects for in-process tests (no bed): a renewal session on a config of
plain attributes, its state in a temp dir."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

from certbot_batch import session as session_mod
from certbot_batch.run import LineageRecord, Outcome
from certbot_batch.scan.state import LineageState


class Config(SimpleNamespace):
    """certbot's NamespaceConfig as far as a session reads it (nothing set on the command
    line)."""

    def set_by_user(self, name: str) -> bool:
        return False


def config(tmp_path: Path, **values: Any) -> Any:
    """certbot's config, as far as a session reads it."""
    base = {"config_dir": str(tmp_path / "config"), "work_dir": str(tmp_path / "work"),
            "dry_run": False, "certname": None, "renew_by_default": False,
            "batch_size": 100, "random_sleep_on_renew": False, "quiet": True}
    base.update(values)
    return Config(**base)


def session(tmp_path: Path, stock: Optional[Callable[..., Any]] = None,
            clock: Optional[Callable[[], float]] = None,
            **values: Any) -> session_mod.RenewalSession:
    kwargs = {"clock": clock} if clock is not None else {}
    return session_mod.RenewalSession(config(tmp_path, **values), stock or (lambda *a: None),
                                      [], **kwargs)


def add_record(s: session_mod.RenewalSession, name: str,
               outcome: Outcome = Outcome.DUE, **state: Any) -> LineageRecord:
    record = LineageRecord(name, LineageState(name=name, conf_path=f"/renewal/{name}.conf",
                                              **state), outcome)
    s.run.records[name] = record
    return record
