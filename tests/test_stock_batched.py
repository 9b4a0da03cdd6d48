"""Issue 18, item 3: one line batches every stock plugin. Inside a renewal session
(``--batch-engine``) lineages saved with certbot's own ``webroot``, ``apache`` (authenticator
and installer) and ``standalone`` are batched like their batch counterparts, without any
change to their renewal confs; with certbot-batch invisible, the same lineages renew with
stock certbot.

Real certbot subprocesses (both full flavours), real pebble, real private Apache.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.bed import certs, hiding, ports
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA, make_farm
from tests.bed.pebble import Pebble


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def flat(text: str) -> str:
    return " ".join(text.split())


class Site:
    def __init__(self, flavour: str, tmp: Path, apache: Apache, pebble: Pebble) -> None:
        self.tmp = tmp
        self.apache = apache
        self.pebble = pebble
        self.bot = Certbot(flavour, tmp / "cb", pebble, env_extra=apache.env())
        self.bot.register()
        self.ca = FarmCA.create("Stock Batched Test")

    def lineages(self, count: int, prefix: str, authenticator: str,
                 installer: Optional[str] = None, vhosts: bool = False,
                 extra: Optional[dict[str, str]] = None) -> list[str]:
        params = dict(extra or {})
        if installer == "apache" or authenticator == "apache":
            params.update({"apache_server_root": str(self.apache.root),
                           "apache_vhost_root": str(self.apache.vhost_root),
                           "apache_logs_root": str(self.apache.log_dir),
                           "apache_challenge_location": str(self.apache.challenge_location),
                           "apache_ctl": str(self.apache.ctl)})
        names = make_farm(str(self.bot.config_dir), count, ca=self.ca,
                          server=self.pebble.directory_url, webroot=str(self.apache.webroot),
                          authenticator=authenticator, installer=installer,
                          extra_renewalparams=params or None, name_fmt=prefix + "{i}.test",
                          version=self.bot.version)
        if vhosts:
            for name in names:
                live = self.bot.live(name)
                self.apache.add_ssl_vhost(name, cert_path=live / "fullchain.pem",
                                          key_path=live / "privkey.pem")
            self.apache.reload()
        self.apache.reset_counts()
        return names

    def plugins_of(self, name: str) -> tuple[Optional[str], Optional[str]]:
        text = self.bot.renewal_conf(name).read_text()
        auth = re.search(r"^authenticator = (\S+)", text, re.MULTILINE)
        inst = re.search(r"^installer = (\S+)", text, re.MULTILINE)
        return (auth.group(1) if auth else None, inst.group(1) if inst else None)

    def versions(self, name: str) -> int:
        return len(list((self.bot.config_dir / "archive" / name).glob("cert*.pem")))

    def served(self, names: list[str]) -> None:
        for name in names:
            expected = certs.load_pem_chain(self.bot.live(name) / "cert.pem")[0]
            assert self.apache.wait_for_cert(name, expected).serial_number == \
                expected.serial_number, name

    def stock_renew(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The same lineages with certbot-batch invisible: the certbot users had before."""
        hidden = hiding.without_certbot_batch(self.bot.python, self.tmp / "mirror")
        cmd = self.bot.command("renew", *args)
        cmd[2] = hiding.prelude(hidden) + cmd[2]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.bot.env(),
                              cwd=self.bot.base_dir, timeout=300, check=False)


@pytest.fixture
def site(certbot_flavour: str, tmp_path: Path, apache: Apache, pebble: Pebble,
         request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(certbot_flavour, tmp_path, apache, pebble)
    yield s
    rep = getattr(request.node, "bed_report_call", None)
    if rep is not None and rep.failed:
        print(f"\n===== certbot log (tail) =====\n{s.bot.log_text()[-15000:]}")


@pytest.mark.versions
def test_stock_webroot_with_stock_apache_installer(site: Site) -> None:
    names = site.lineages(4, "wa", authenticator="webroot", installer="apache", vhosts=True)
    proc = site.bot.run("renew", "--batch-engine", "--force-renewal")
    text = flat(out(proc))
    assert proc.returncode == 0, text + site.bot.log_text()[-5000:]
    assert "validating 4 lineage(s) together" in text
    assert "(1 provisioning action(s), 1 cleanup(s)" in text
    assert site.apache.counts().graceful == 1  # one reload for the run, not one per lineage
    assert all(site.versions(n) == 2 for n in names)
    site.served(names)
    # The renewal confs still name certbot's own plugins ...
    assert {site.plugins_of(n) for n in names} == {("webroot", "apache")}
    # ... so the certbot users had before renews them as it always did.
    stock = site.stock_renew("--force-renewal", "--cert-name", names[0])
    assert stock.returncode == 0, out(stock)
    assert site.versions(names[0]) == 3


def test_stock_apache_authenticator_and_installer(site: Site) -> None:
    names = site.lineages(3, "aa", authenticator="apache", installer="apache", vhosts=True)
    proc = site.bot.run("renew", "--batch-engine", "--force-renewal")
    text = flat(out(proc))
    assert proc.returncode == 0, text + site.bot.log_text()[-5000:]
    assert "validating 3 lineage(s) together" in text
    # One reload serves the wave's challenges, one deploys (stock: 3 per lineage).
    assert site.apache.counts().graceful == 2, site.apache.ctl_calls()
    assert all(site.versions(n) == 2 for n in names)
    site.served(names)
    assert {site.plugins_of(n) for n in names} == {("apache", "apache")}
    assert not (site.apache.root / "conf-enabled" / "certbot-batch-acme.conf").exists()


def test_stock_standalone_one_listener_for_the_wave(certbot_flavour: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    port = ports.free_port()
    with Apache() as apache, Pebble(port, base_dir=tmp_path / "pebble") as pebble:
        site = Site(certbot_flavour, tmp_path, apache, pebble)
        names = site.lineages(4, "sa", authenticator="standalone",
                              extra={"http01_port": str(port),
                                     "http01_address": "127.0.0.1"})
        proc = site.bot.run("renew", "--batch-engine", "--force-renewal")
        text = flat(out(proc))
        log = flat(site.bot.log_text())
        assert proc.returncode == 0, text + site.bot.log_text()[-5000:]
        assert "validating 4 lineage(s) together" in text
        assert log.count(f"answering http-01 challenges on 127.0.0.1:{port}") == 1, log[-3000:]
        assert all(site.versions(n) == 2 for n in names)
        assert {site.plugins_of(n)[0] for n in names} == {"standalone"}
        assert not ports.is_listening(port)  # the listener went with the wave
        stock = site.stock_renew("--force-renewal", "--cert-name", names[0])
        assert stock.returncode == 0, out(stock)
        assert site.versions(names[0]) == 3
