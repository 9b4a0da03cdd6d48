"""Fixtures of the integration test bed: a private Apache, a private pebble, both certbots.

Everything is per test (Apache starts in ~0.2 s, pebble in ~0.4 s) so tests cannot leak
state (pebble keeps accounts/authorizations in memory) into each other. Logs of the bed are
printed in the report of a failing test.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Generator, Iterator

import pytest

from tests.bed import certbots
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.pebble import Pebble

#: Fixtures that start the real test bed (pebble, Apache, BIND) or run certbot in a
#: subprocess of a configured flavour: a test that uses one (directly or through another
#: fixture) is marked ``bed``.
_BED_FIXTURES = frozenset({"apache", "pebble", "certbot", "certbot_flavour", "bind", "webroot",
                           "nginx"})
#: End-to-end files: everything in them needs the bed, whatever fixtures a test names.
_BED_FILES = frozenset({"test_apache_deploy.py", "test_bed_acmeproxy.py", "test_bed_bind.py",
                        "test_challenges.py", "test_compat.py", "test_deb.py",
                        "test_foundation.py", "test_nginx.py", "test_session_e2e.py"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``pytest -m "not bed"`` is the in-process subset a distribution runs at build time
    (no pebble, no Apache, no nginx, no certbot subprocess)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _BED_FIXTURES or Path(str(item.fspath)).name in _BED_FILES:
            item.add_marker(pytest.mark.bed)


_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy")


@pytest.fixture(autouse=True, scope="session")
def _no_proxy_for_loopback() -> Iterator[None]:
    """Every server of the tests listens on loopback; requests/urllib in this process must
    not send those requests to a proxy from the environment (pybuild sets
    http_proxy=http://127.0.0.1:9/ and no_proxy=localhost, which does not cover 127.0.0.1)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.lower() in _PROXY_VARS:
            del os.environ[key]
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"bed_report_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    for when in ("setup", "call"):
        report = getattr(request.node, f"bed_report_{when}", None)
        if report is not None and report.failed:
            return True
    return False


@pytest.fixture
def apache(request: pytest.FixtureRequest) -> Iterator[Apache]:
    """A private Apache (copy of /etc/apache2) on loopback ports, started."""
    server = Apache()
    try:
        server.start()
        yield server
    finally:
        if _failed(request):
            print(f"\n===== Apache ({server.dir}) =====\n{server.logs()}")
        server.cleanup()


@pytest.fixture
def pebble(apache: Apache, request: pytest.FixtureRequest) -> Iterator[Pebble]:
    """Pebble whose HTTP-01 validator connects to the test Apache's HTTP port."""
    server = Pebble(http_port=apache.http_port)
    try:
        server.start()
        yield server
    finally:
        if _failed(request):
            print(f"\n===== pebble ({server.dir}) =====\n{server.logs()}")
        server.cleanup()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "versions: representative end-to-end test, run on every certbot flavour "
        "(the rest of the suite runs on the full flavours only, see tests/bed/certbots.py)")
    config.addinivalue_line(
        "markers", "bed: needs the real test bed (pebble, Apache, BIND) on loopback ports")
    # Also in pyproject.toml; here for runs without it (the autopkgtest's copy of tests/).
    config.addinivalue_line("markers", "slow: long-running end-to-end test")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses a certbot flavour runs on the full flavours; the ones marked
    ``versions`` on every configured flavour (certbot 2.1 .. latest)."""
    if "certbot_flavour" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("versions") is not None:
        names = certbots.flavours()
    else:
        names = certbots.full_flavours()
    metafunc.parametrize("certbot_flavour", names, indirect=True)


@pytest.fixture
def certbot_flavour(request: pytest.FixtureRequest) -> str:
    flavour = str(request.param)
    reason = certbots.missing_reason(flavour)
    if reason:
        pytest.skip(reason)
    return flavour


@pytest.fixture
def certbot(certbot_flavour: str, tmp_path: Path, pebble: Pebble, apache: Apache,
            request: pytest.FixtureRequest) -> Iterator[Certbot]:
    """certbot of one flavour (pypi, deb), own dirs, pointed at the test pebble."""
    bot = Certbot(certbot_flavour, tmp_path / "certbot", pebble, env_extra=apache.env())
    yield bot
    if _failed(request):
        print(f"\n===== certbot {certbot_flavour} letsencrypt.log (tail) =====\n"
              f"{bot.log_text()[-20000:]}")


@pytest.fixture
def webroot(apache: Apache) -> Path:
    """The DocumentRoot of the test Apache's default HTTP vhost."""
    return apache.webroot
