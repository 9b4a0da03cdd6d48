"""Issue 19, item 2: ACME profiles in batched orders, and at the fallback CA.

Pebble 2.4 has no profiles: the fault-injecting proxy in front of it (tests/bed/acmeproxy.py,
a stand-in) adds ``meta.profiles`` to the directory and records every newOrder payload, so
the ``profile`` field certbot's client sends is checked where it leaves the client. Real
certbot subprocesses (both full flavours: certbot 2.1 has no profiles, nothing changes).
"""
from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest

from tests.bed.acmeproxy import AcmeProxy
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA, make_farm
from tests.bed.pebble import Pebble

DAY = datetime.timedelta(days=1)
PROFILES = {"classic": "90 days", "shortlived": "160 hours"}


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def _lineages(bot: Certbot, server: str, webroot: Path, count: int, prefix: str,
              profile: str | None, age: datetime.timedelta = 70 * DAY) -> list[str]:
    extra = {"preferred_profile": profile} if profile else None
    return make_farm(str(bot.config_dir), count, ca=FarmCA.create(f"Profiles {prefix}"),
                     server=server, webroot=str(webroot), authenticator="batch-webroot",
                     name_fmt=prefix + "{i}.test", version=bot.version, age=age,
                     extra_renewalparams=extra)


def test_every_batched_order_asks_for_the_saved_profile(certbot_flavour: str, tmp_path: Path,
                                                          apache: Apache,
                                                          pebble: Pebble) -> None:
    with AcmeProxy(pebble, base_dir=tmp_path / "proxy",
                   directory_extra={"meta": {"profiles": PROFILES}}) as proxy:
        bot = Certbot(certbot_flavour, tmp_path / "cb", proxy, env_extra=apache.env())
        bot.register()
        names = _lineages(bot, proxy.directory_url, apache.webroot, 4, "prof", "shortlived")
        plain = _lineages(bot, proxy.directory_url, apache.webroot, 2, "plain", None)
        proxy.reset_counters()
        proc = bot.run("renew", "--force-renewal")
        assert proc.returncode == 0, out(proc)
        payloads = proxy.order_payloads()
        assert len(payloads) == len(names) + len(plain)
        by_name = {p["identifiers"][0]["value"]: p for p in payloads}
        if bot.version_info >= (4, 1):  # saved in the renewal conf and restored from 4.1
            assert {by_name[n].get("profile") for n in names} == {"shortlived"}
        else:  # no profiles in this certbot: nothing changes
            assert all("profile" not in p for p in payloads)
        assert all("profile" not in by_name[n] for n in plain)


def test_fallback_ca_without_the_profile_is_an_error_of_that_lineage(
        certbot_flavour: str, tmp_path: Path, apache: Apache, pebble: Pebble) -> None:
    with AcmeProxy(pebble, base_dir=tmp_path / "proxy",
                   directory_extra={"meta": {"profiles": PROFILES}}) as proxy, \
            Pebble(apache.http_port, base_dir=tmp_path / "fallback") as fallback:
        bot = Certbot(certbot_flavour, tmp_path / "cb", proxy, env_extra=apache.env())
        bot.register()
        if bot.version_info < (4, 1):
            pytest.skip(f"certbot {bot.version} keeps no profile in the renewal conf")
        Certbot(certbot_flavour, bot.base_dir, fallback, env_extra=apache.env()).register()
        bundle = tmp_path / "both-cas.pem"
        bundle.write_text(proxy.ca_bundle.read_text() + fallback.ca_bundle.read_text())
        wants = _lineages(bot, proxy.directory_url, apache.webroot, 2, "wants", "shortlived",
                          age=85 * DAY)
        any_profile = _lineages(bot, proxy.directory_url, apache.webroot, 1, "any", None,
                                age=85 * DAY)
        proxy.down()
        proc = bot.run("renew", "--batch-fallback-server", fallback.directory_url,
                       env_extra={"REQUESTS_CA_BUNDLE": str(bundle)}, timeout=400)
        text = " ".join(out(proc).split()) + " ".join(bot.log_text().split())
        assert proc.returncode != 0, text
        issued = fallback.pebble_log.read_text().count("Issued certificate serial")
        assert issued == 1, text  # only the lineage that asked for no profile
        for name in wants:
            assert len(list((bot.config_dir / "archive" / name).glob("cert*.pem"))) == 1
        assert len(list((bot.config_dir / "archive" / any_profile[0]).glob("cert*.pem"))) == 2
        assert "does not offer the profile 'shortlived'" in text, text[-3000:]
