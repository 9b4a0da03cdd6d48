"""Issue 18: batch-nginx (installer and http-01 authenticator) with real certbot (both
flavours), real pebble validating against a private nginx (tests/bed/nginx.py), real nginx.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509

from tests.bed import certs
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA, make_farm
from tests.bed.nginx import Nginx
from tests.bed.pebble import Pebble
from tests.conftest import _failed

K = 4


@pytest.fixture
def nginx(request: pytest.FixtureRequest) -> Iterator[Nginx]:
    server = Nginx()
    try:
        server.start()
        yield server
    finally:
        if _failed(request):
            print(f"\n===== nginx ({server.dir}) =====\n{server.logs()}")
        server.cleanup()


@pytest.fixture
def npebble(nginx: Nginx, request: pytest.FixtureRequest) -> Iterator[Pebble]:
    server = Pebble(http_port=nginx.http_port)
    try:
        server.start()
        yield server
    finally:
        if _failed(request):
            print(f"\n===== pebble ({server.dir}) =====\n{server.logs()}")
        server.cleanup()


@pytest.fixture
def bot(certbot_flavour: str, tmp_path: Path, npebble: Pebble,
        request: pytest.FixtureRequest) -> Iterator[Certbot]:
    b = Certbot(certbot_flavour, tmp_path / "certbot", npebble)
    yield b
    if _failed(request):
        print(f"\n===== certbot {certbot_flavour} letsencrypt.log (tail) =====\n"
              f"{b.log_text()[-20000:]}")


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def one_line(text: str) -> str:
    return " ".join(text.split())


def live_cert(bot: Certbot, name: str) -> x509.Certificate:
    return certs.load_pem_chain(bot.live(name) / "cert.pem")[0]


def setup_lineages(bot: Certbot, nginx: Nginx, pebble: Pebble, count: int,
                   prefix: str = "site", http: str = "default") -> list[str]:
    """``count`` lineages whose SSL server blocks serve live/NAME/*.pem; nginx reloaded
    (uncounted), the ctl log reset. ``http``: "default" (the names reach the default
    server on the HTTP port), "own" (a plain server block per name), "redirect"."""
    bot.register()
    names = make_farm(str(bot.config_dir), count, ca=FarmCA.create(),
                      server=pebble.directory_url, webroot=str(nginx.webroot),
                      name_fmt=prefix + "{i}.example.test", version=bot.version)
    for name in names:
        live = bot.live(name)
        nginx.add_ssl_server(name, cert_path=live / "fullchain.pem",
                             key_path=live / "privkey.pem")
        if http != "default":
            nginx.add_http_server(name, redirect=http == "redirect")
    nginx.reload()
    for name in names:
        assert nginx.wait_for_cert(name, live_cert(bot, name)) == live_cert(bot, name)
    nginx.reset_counts()
    return names


def assert_serves_live(bot: Certbot, nginx: Nginx, names: list[str]) -> None:
    for name in names:
        expected = live_cert(bot, name)
        served = nginx.wait_for_cert(name, expected)
        assert served.serial_number == expected.serial_number, name


def renew(bot: Certbot, nginx: Nginx, *args: str) -> subprocess.CompletedProcess[str]:
    return bot.run("renew", *args, *nginx.certbot_args())


def test_batch_nginx_both(bot: Certbot, nginx: Nginx, npebble: Pebble) -> None:
    names = setup_lineages(bot, nginx, npebble, K, http="own")
    old = {n: live_cert(bot, n).serial_number for n in names}
    before = nginx.digest()
    proc = renew(bot, nginx, "--force-renewal", "-a", "batch-nginx", "-i", "batch-nginx")
    assert proc.returncode == 0, output_of(proc) + bot.log_text()[-6000:]
    counts = nginx.counts()
    assert (counts.configtest, counts.reload, counts.version) == (3, 2, 0), nginx.ctl_calls()
    for name in names:
        assert live_cert(bot, name).serial_number != old[name]
    assert_serves_live(bot, nginx, names)
    assert nginx.digest() == before
