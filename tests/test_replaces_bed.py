"""``replaces`` never blocks a renewal, end to end (issue 19 item 2).

Real certbot (both full flavours), real pebble behind our fault-injecting ACME proxy
(tests/bed/acmeproxy.py), whose directory names our responder's ``renewalInfo``: the
lineages' ARI windows are in the past, so their orders carry ``replaces``. The proxy refuses
the first new order as a CA that cannot find the certID does (``malformed``, as pebble 2.10
answers for some serials; 409 ``alreadyReplaced`` is the other common case): the session
orders once more without ``replaces``, the renewal goes through, and the log says so.
"""
from __future__ import annotations

import datetime
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.bed import farm
from tests.bed.acmeproxy import AcmeProxy
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA
from tests.bed.pebble import Pebble
from tests.bed.responder import Responder

DAY = datetime.timedelta(days=1)


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


class Site:
    def __init__(self, flavour: str, tmp: Path, apache: Apache, pebble: Pebble) -> None:
        self.ca = FarmCA.create("Replaces Bed Test")
        self.responder = Responder(self.ca).start()
        self.proxy = AcmeProxy(pebble, renewal_info=self.responder.renewal_info_url,
                               base_dir=tmp / "proxy").start()
        self.bot = Certbot(flavour, tmp / "cb", self.proxy, env_extra=apache.env())
        self.bot.register()
        self.apache = apache

    def add(self, count: int, prefix: str) -> list[str]:
        names = farm.make_farm(str(self.bot.config_dir), count, ca=self.ca,
                               server=self.proxy.directory_url,
                               webroot=str(self.apache.webroot),
                               authenticator="batch-webroot", name_fmt=prefix + "{i}.test",
                               version=self.bot.version)
        for name in names:  # inside their ARI window: orders carry `replaces`
            self.responder.set_window(farm.load_lineage_cert(str(self.bot.config_dir), name),
                                      -2 * DAY, -1 * DAY)
        return names

    def versions(self, name: str) -> int:
        return len(list((self.bot.config_dir / "archive" / name).glob("cert*.pem")))


@pytest.fixture
def site(certbot_flavour: str, tmp_path: Path, apache: Apache, pebble: Pebble,
         request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(certbot_flavour, tmp_path, apache, pebble)
    try:
        yield s
    finally:
        rep = getattr(request.node, "bed_report_call", None)
        if rep is not None and rep.failed:
            print(f"\n===== certbot log (tail) =====\n{s.bot.log_text()[-15000:]}\n"
                  f"===== proxy =====\n{s.proxy.logs()}")
        s.proxy.cleanup()
        s.responder.stop()


@pytest.mark.parametrize("status,problem", [(400, "malformed"), (409, "alreadyReplaced")])
def test_order_refused_for_replaces_is_sent_again_without(site: Site, status: int,
                                                          problem: str) -> None:
    [name] = site.add(1, f"repl{status}-")
    cert_id = farm.lineage_cert_ids(str(site.bot.config_dir))[name]  # the one replaced
    site.proxy.fail("newOrder", status, problem_type=problem, count=1,
                    detail="no certificate with that certID (replaces)")
    proc = site.bot.run("renew", timeout=300)
    text = out(proc)
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    assert site.versions(name) == 2, text
    orders = site.proxy.log("newOrder")
    # First refused by the proxy (the CA), then forwarded to pebble.
    assert [(o.status, o.forwarded) for o in orders] == [(status, False), (201, True)], orders
    log = site.bot.log_text()
    # certbot's debug log shows each payload: the certID went out once, with the refused order.
    assert len(re.findall(rf'"replaces":\s*"{re.escape(cert_id)}"', log)) == 1, log[-5000:]
    [line] = [ln for ln in log.splitlines() if "ordering once more without 'replaces'" in ln]
    assert name in line and cert_id in line
