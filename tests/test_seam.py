"""In-process tests of the seam (_certbot.py): the boundary table, session-scoped patches
that are undone, return values passed through, the thread-safe makedirs."""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from certbot_batch import _certbot, engine, run
from tests import fakes


def _current_values() -> dict[tuple[str, str], Any]:
    out = {}
    for entry in _certbot.BOUNDARY:
        try:
            owner, attr = _certbot.resolve(entry)
        except _certbot.Unavailable:
            continue
        out[(entry.module, entry.attr)] = _certbot._raw(owner, attr)
    return out


@pytest.fixture(autouse=True)
def installed() -> None:
    if not engine.install():
        pytest.skip(f"engine disabled here: {_certbot.disabled_reason()}")


@pytest.fixture
def a_run(tmp_path: Path) -> run.Run:
    return fakes.session(tmp_path).run


def test_every_entry_exists_on_this_certbot() -> None:
    missing = []
    for entry in _certbot.BOUNDARY:
        try:
            _certbot._check(entry)
        except _certbot.Unavailable as exc:
            if entry.required:
                missing.append(str(exc))
    assert not missing


def test_table_entries_have_reasons_and_known_uses() -> None:
    for entry in _certbot.BOUNDARY:
        assert entry.why and entry.use in ("call", "wrap", "wrap-always", "read"), entry
    keys = [(e.module, e.attr) for e in _certbot.BOUNDARY]
    assert len(keys) == len(set(keys))


def test_session_patches_are_undone(a_run: run.Run) -> None:
    before = _current_values()
    session_entries = [(e.module, e.attr) for e in _certbot.BOUNDARY if e.use == "wrap"]
    with _certbot.activate(a_run):
        assert run.current() is a_run
        during = _current_values()
        changed = {k for k in before if before[k] is not during[k]}
        assert changed == set(session_entries)
    assert run.current() is None
    after = _current_values()
    assert all(after[k] is before[k] for k in before)
    # A method a class only inherits is not left pinned on the class.
    from acme import messages
    assert ("to_partial_json" in messages.NewOrder.__dict__) == (
        "to_partial_json" in vars(messages.NewOrder))


def test_activate_fails_cleanly_and_restores(monkeypatch: pytest.MonkeyPatch,
                                             a_run: run.Run) -> None:
    before = _current_values()
    real = _certbot._replacement
    calls = []

    def broken(entry: _certbot.Internal, raw: Any) -> Any:
        calls.append(entry.attr)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(entry, raw)

    monkeypatch.setattr(_certbot, "_replacement", broken)
    with pytest.raises(_certbot.Unavailable):
        with _certbot.activate(a_run):
            pass
    after = _current_values()
    assert all(after[k] is before[k] for k in before)
    assert run.current() is None


def test_wrappers_pass_return_values_through(a_run: run.Run) -> None:
    from certbot._internal import renewal, storage

    sentinel = object()

    def fake_orig(config: Any) -> Any:
        return sentinel
    wrapped = _certbot._wrap_conf_files(fake_orig)
    assert wrapped(None) is sentinel
    a_run.conf_files = ["a.conf"]
    with _certbot.activate(a_run):
        assert storage.renewal_conf_files(None) == ["a.conf"]
        assert renewal.should_renew is not _certbot.original(
            "certbot._internal.renewal", "should_renew")
    # handle_renewal_request: the session is not engaged for a config with no batch option,
    # so certbot's own result comes back unchanged (a tuple on certbot 2.7 .. 4.1).
    result = (["a.test"], ["b.test"])
    hrr = _certbot._wrap_handle_renewal_request(lambda config: result)

    class Config:
        batch_engine = False
        authenticator = "webroot"
        installer = None
        certname = None
        renewal_configs_dir = "/nonexistent"
    assert hrr(Config()) is result


def test_mock_config_never_engages() -> None:
    from unittest import mock

    from certbot_batch import session
    cfg = mock.MagicMock()
    result = object()
    assert session.handle_renewal_request(cfg, lambda: result) is result


def test_makedirs_does_not_touch_umask(tmp_path: Path, a_run: run.Run) -> None:
    from certbot.compat import filesystem

    old = os.umask(0o022)
    try:
        stop = threading.Event()
        seen: set[int] = set()

        def watch() -> None:
            while not stop.is_set():
                mask = os.umask(0o022)  # reading the umask means setting it: same value
                os.umask(mask)
                seen.add(mask)

        with _certbot.activate(a_run):
            watcher = threading.Thread(target=watch)
            watcher.start()
            threads = [threading.Thread(target=lambda i=i: [
                filesystem.makedirs(str(tmp_path / f"t{i}" / f"d{j}" / "x"), 0o700)
                for j in range(200)]) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stop.set()
            watcher.join()
        assert seen == {0o022}
        for i in range(4):
            for j in range(200):
                for d in (tmp_path / f"t{i}" / f"d{j}", tmp_path / f"t{i}" / f"d{j}" / "x"):
                    assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        with pytest.raises(FileExistsError):
            with _certbot.activate(a_run):
                filesystem.makedirs(str(tmp_path / "t0"), 0o700)
    finally:
        os.umask(old)


class _Immutable(Exception):
    """Like acme 2.x's messages.Error (an immutable josepy object): no attribute can be set,
    ``__traceback__`` included."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("can't set attribute")


def test_errors_cross_our_scopes_untouched(a_run: run.Run) -> None:
    """@contextlib.contextmanager sets exc.__traceback__ on the way out, which turns acme
    2.x's rate-limit or CA errors into "AttributeError: can't set attribute" (Python 3.11):
    none of the scopes a CA error crosses may do that."""
    from acme import messages

    from certbot_batch import session
    from certbot_batch.challenges.prevalidate import OrderGate

    scopes = {
        "lineage scope": lambda: a_run.lineage_scope("a.test"),
        "order gate": lambda: OrderGate(["a.test"], threading.Event()).turn("a.test"),
        "stop signals": lambda: session.stop_signals(a_run),
        "activate": lambda: _certbot.activate(a_run),
    }
    errors = [_Immutable("the CA said no"),
              messages.Error(typ="urn:ietf:params:acme:error:rateLimited", detail="slow")]
    for label, scope in scopes.items():
        for err in errors:
            with pytest.raises(type(err)) as info:
                with scope():
                    raise err
            assert info.value is err, label
