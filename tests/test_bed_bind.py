"""The BIND 9 test bed (tests/bed/bind.py) and stock certbot's dns-01 routes through it:
certbot-dns-rfc2136 and --manual with nsupdate hooks, pebble validating against BIND."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.bed import bind as bed_bind
from tests.bed import certs, ports
from tests.bed import pebble as bed_pebble
from tests.bed.bind import Bind, BindError
from tests.bed.certbots import Certbot
from tests.bed.pebble import Pebble

pytestmark = pytest.mark.bed

APEX = "a1.test"
WILDCARD = f"*.{APEX}"
VALIDATION_NAME = f"_acme-challenge.{APEX}"


def _failed(request: pytest.FixtureRequest) -> bool:
    """Did the test's setup or call fail (reports stored by tests/conftest.py)?"""
    for when in ("setup", "call"):
        report = getattr(request.node, f"bed_report_{when}", None)
        if report is not None and report.failed:
            return True
    return False


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def bind(request: pytest.FixtureRequest) -> Iterator[Bind]:
    """A private named serving zone "test" on a free loopback port, started."""
    reason = bed_bind.missing_reason()
    if reason:
        pytest.skip(reason)
    server = Bind()
    try:
        server.start()
        yield server
    finally:
        if _failed(request):
            print(f"\n===== BIND ({server.dir}) =====\n{server.logs()}")
        server.cleanup()


@pytest.fixture
def dns_pebble(bind: Bind, request: pytest.FixtureRequest) -> Iterator[Pebble]:
    """Pebble resolving (and validating dns-01) through the test BIND; nothing listens on
    its HTTP-01 port."""
    server = Pebble(http_port=ports.free_port(), dns_server=bind.address)
    try:
        server.start()
        yield server
    finally:
        if _failed(request):
            print(f"\n===== pebble ({server.dir}) =====\n{server.logs()}")
        server.cleanup()


@functools.cache
def _plugins_of(flavour: str) -> str:
    """``certbot plugins`` of a flavour (once per session)."""
    with tempfile.TemporaryDirectory(prefix="bed-plugins-") as base:
        proc = Certbot(flavour, Path(base), None).run("plugins", timeout=120)
    return output_of(proc)


@pytest.fixture
def dns_certbot(certbot_flavour: str, dns_pebble: Pebble, tmp_path: Path,
                request: pytest.FixtureRequest) -> Iterator[Certbot]:
    """Stock certbot of one flavour pointed at the BIND-backed pebble; skipped when the
    flavour has no dns-rfc2136 plugin."""
    listing = _plugins_of(certbot_flavour)
    if "* dns-rfc2136" not in listing:
        pytest.skip(f"certbot flavour {certbot_flavour!r} has no dns-rfc2136 plugin "
                    "(pip install certbot-dns-rfc2136 / apt-get install "
                    "python3-certbot-dns-rfc2136)")
    bot = Certbot(certbot_flavour, tmp_path / "certbot", dns_pebble)
    yield bot
    if _failed(request):
        print(f"\n===== certbot {certbot_flavour} letsencrypt.log (tail) =====\n"
              f"{bot.log_text()[-20000:]}")


def rfc2136_args(ini: Path) -> list[str]:
    return ["--authenticator", "dns-rfc2136", "--dns-rfc2136-credentials", str(ini),
            "--dns-rfc2136-propagation-seconds", "1"]


def update_lines(bind: Bind, action: str) -> list[str]:
    """named's log lines of updates that added / deleted the validation TXT records
    (named quotes the name when adding, not when deleting)."""
    pattern = re.compile(rf"updating zone 'test/IN': {action} an RR at "
                         rf"'?{re.escape(VALIDATION_NAME)}'? TXT")
    return [line for line in bind.log_text().splitlines() if pattern.search(line)]


# -- the bed itself ----------------------------------------------------------------------------

def test_named_serves_the_zone(bind: Bind) -> None:
    assert bind.is_running()
    assert bind.query("test", "SOA") == ["ns.test. hostmaster.test. 1 3600 600 86400 5"]
    for name in (APEX, f"x.{APEX}", "deep.er.name.test", "test"):
        assert bind.query(name, "A") == ["127.0.0.1"], name
    assert bind.query(APEX, "AAAA") == []
    assert bind.status(f"a1.{bind.unserved_zone}") == "REFUSED"
    assert bind.txt_records() == []


def test_nsupdate_round_trip(bind: Bind) -> None:
    odd = 'with "quotes", a \\ and spaces'
    bind.nsupdate_add(VALIDATION_NAME, "first-value")
    bind.nsupdate_add(VALIDATION_NAME, odd)
    bind.nsupdate_add("_acme-challenge.b2.test", "other-name")
    assert bind.txt_records() == sorted([(VALIDATION_NAME, "first-value"),
                                         (VALIDATION_NAME, odd),
                                         ("_acme-challenge.b2.test", "other-name")])
    # what pebble sees: a public (unsigned) query answers both values at once
    assert sorted(bind.query(VALIDATION_NAME, "TXT")) == sorted(
        ['"first-value"', '"with \\"quotes\\", a \\\\ and spaces"'])

    bind.nsupdate_delete(VALIDATION_NAME, odd)
    assert bind.txt_records() == [(VALIDATION_NAME, "first-value"),
                                  ("_acme-challenge.b2.test", "other-name")]
    bind.nsupdate_delete(VALIDATION_NAME, "first-value")
    bind.nsupdate_delete("_acme-challenge.b2.test", "other-name")
    assert bind.txt_records() == []
    assert bind.query(VALIDATION_NAME, "TXT") == []


def test_wrong_keys_are_refused(bind: Bind) -> None:
    bad = bind.nsupdate_add(VALIDATION_NAME, "from-bad-key", key="bad", check=False)
    assert bad.returncode != 0
    assert "REFUSED" in output_of(bad)
    unknown = bind.nsupdate_add(VALIDATION_NAME, "from-unknown-key", key="unknown",
                                check=False)
    assert unknown.returncode != 0
    assert "BADKEY" in output_of(unknown)
    unsigned = bind.nsupdate_add(VALIDATION_NAME, "unsigned", key=None, check=False)
    assert unsigned.returncode != 0
    assert "REFUSED" in output_of(unsigned)
    outside = bind.nsupdate_add(f"_acme-challenge.a1.{bind.unserved_zone}", "outside",
                                check=False)
    assert outside.returncode != 0
    with pytest.raises(BindError, match="failed"):
        bind.nsupdate_add(VALIDATION_NAME, "raises", key="bad")
    # the zone transfer needs the good key too
    for key in ("bad", None):
        with pytest.raises(BindError, match="Transfer failed"):
            bind.txt_records(key=key)
    assert bind.txt_records() == []
    log = bind.log_text()
    assert "update 'test/IN' denied" in log
    assert "BADKEY" in log


def test_rfc2136_ini(bind: Bind, tmp_path: Path) -> None:
    ini = bind.rfc2136_ini(tmp_path / "rfc2136.ini", key="bad")
    assert ini.stat().st_mode & 0o777 == 0o600
    values = dict(line.split(" = ", 1) for line in ini.read_text().splitlines()
                  if " = " in line)
    assert values == {"dns_rfc2136_server": "127.0.0.1",
                      "dns_rfc2136_port": str(bind.port),
                      "dns_rfc2136_name": bind.bad_key.name,
                      "dns_rfc2136_secret": bind.bad_key.secret,
                      "dns_rfc2136_algorithm": "HMAC-SHA256"}
    assert bind.bad_key.secret != bind.key.secret


def test_manual_hook_scripts(bind: Bind, tmp_path: Path) -> None:
    auth, cleanup = bind.manual_hook_scripts(tmp_path / "hooks")
    env = dict(os.environ, CERTBOT_DOMAIN=WILDCARD, CERTBOT_VALIDATION="tok-EN_123")
    subprocess.run([str(auth)], env=env, check=True, timeout=30)
    assert bind.txt_records() == [(VALIDATION_NAME, "tok-EN_123")]
    subprocess.run([str(cleanup)], env=env, check=True, timeout=30)
    assert bind.txt_records() == []
    assert bind.hook_calls() == [f"auth {WILDCARD} tok-EN_123",
                                 f"cleanup {WILDCARD} tok-EN_123"]
    # a hook whose update is refused fails (certbot then reports the hook's error)
    bad_auth, _ = bind.manual_hook_scripts(tmp_path / "bad-hooks", key="bad")
    proc = subprocess.run([str(bad_auth)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0
    assert "REFUSED" in proc.stderr
    assert bind.txt_records() == []


def test_only_loopback_and_nothing_left_behind(tmp_path: Path) -> None:
    reason = bed_bind.missing_reason()
    if reason:
        pytest.skip(reason)
    server = Bind(zones=("test", "second.example"))
    try:
        server.start()
        pid = server.pid
        assert pid is not None and _runs(pid, server.conf_path)
        assert server.query("x.second.example") == ["127.0.0.1"]
        server.nsupdate_add("_acme-challenge.x.second.example", "in-second")
        assert server.txt_records() == [("_acme-challenge.x.second.example", "in-second")]
        ss = shutil.which("ss")
        if ss is not None:
            for flag, proto in (("-ltnpH", "tcp"), ("-lunpH", "udp")):
                proc = subprocess.run([ss, flag], capture_output=True, text=True,
                                      check=True)
                mine = sorted({line.split()[3] for line in proc.stdout.splitlines()
                               if f"pid={pid}," in line})
                assert mine == [server.address], (proto, mine)
    finally:
        server.cleanup()
    assert not server.is_running()
    assert not _runs(pid, server.conf_path)
    assert not server.dir.exists()


def _runs(pid: int, conf: Path) -> bool:
    """Is process ``pid`` (still) a named on ``conf``? (Not once the pid is reused.)"""
    try:
        return str(conf).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _argv(proc: subprocess.Popen[bytes]) -> list[str]:
    args = proc.args
    assert isinstance(args, (list, tuple)), args
    return [str(a) for a in args]


def test_pebble_dns_server_option(bind: Bind) -> None:
    """The default pebble still starts its own challtestsrv; with dns_server it does not and
    resolves through BIND."""
    with Pebble(http_port=ports.free_port()) as default:
        argvs = [_argv(p) for p in default._procs]
        assert [a[0] for a in argvs] == [bed_pebble.CHALLTESTSRV, bed_pebble.PEBBLE]
        assert default.dns_port
        assert argvs[1][3:5] == ["-dnsserver", f"127.0.0.1:{default.dns_port}"]
    with Pebble(http_port=ports.free_port(), dns_server=bind.address) as pebble:
        argvs = [_argv(p) for p in pebble._procs]
        assert [a[0] for a in argvs] == [bed_pebble.PEBBLE]
        assert argvs[0][3:5] == ["-dnsserver", bind.address]
        assert pebble.dns_port == 0
        assert not pebble.challtestsrv_log.exists()
        assert pebble.directory()["newOrder"]


# -- stock certbot, dns-01 through BIND --------------------------------------------------------

def test_certonly_dns_rfc2136(dns_certbot: Certbot, dns_pebble: Pebble, bind: Bind,
                              tmp_path: Path) -> None:
    ini = bind.rfc2136_ini(tmp_path / "rfc2136.ini")
    dns_certbot.run("certonly", *rfc2136_args(ini), "-d", APEX, "-d", WILDCARD, check=True)

    cert = certs.load_pem_chain(dns_certbot.live(APEX) / "cert.pem")[0]
    assert sorted(certs.san_names(cert)) == sorted([APEX, WILDCARD])
    assert cert.issuer == dns_pebble.intermediate().subject
    # one TXT value per authorization (apex and wildcard share the name), all gone again
    assert len(update_lines(bind, "adding")) == 2, bind.log_text()
    assert len(update_lines(bind, "deleting")) == 2, bind.log_text()
    assert f"key {bind.key.name}: updating zone 'test/IN'" in bind.log_text()
    # pebble's validator asked BIND for the record
    assert f"query: {VALIDATION_NAME} IN TXT" in bind.log_text()
    assert bind.txt_records() == []
    renewal = dns_certbot.renewal_conf(APEX).read_text()
    assert "authenticator = dns-rfc2136" in renewal
    assert f"dns_rfc2136_credentials = {ini}" in renewal


@pytest.mark.parametrize("key", ["bad", "unknown"])
def test_certonly_dns_rfc2136_wrong_key(dns_certbot: Certbot, bind: Bind, tmp_path: Path,
                                        key: str) -> None:
    ini = bind.rfc2136_ini(tmp_path / "rfc2136.ini", key=key)
    proc = dns_certbot.run("certonly", *rfc2136_args(ini), "-d", APEX, "-d", WILDCARD)
    out = output_of(proc)
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    flat = one_line(out)
    if key == "bad":
        # known key, not in allow-update: the update is REFUSED (2.1 and 5.x alike)
        assert "Received response from server: REFUSED" in flat, out
        assert "update 'test/IN' denied" in bind.log_text()
    else:
        assert "The peer didn't know the key we used" in flat, out
        assert "BADKEY" in bind.log_text()
        if dns_certbot.version_info >= (2, 6):
            # the SOA lookup is unsigned (2.6+): it works, the signed update fails
            assert "Encountered error adding TXT record" in flat, out
        else:
            # 1.32 .. 2.5 sign the SOA lookup too: that is what fails
            assert "Encountered error when making query" in flat, out
    assert not dns_certbot.live(APEX).exists()
    assert update_lines(bind, "adding") == []
    assert bind.txt_records() == []


def test_certonly_dns_rfc2136_unserved_zone(dns_certbot: Certbot, bind: Bind,
                                            tmp_path: Path) -> None:
    name = f"a1.{bind.unserved_zone}"
    ini = bind.rfc2136_ini(tmp_path / "rfc2136.ini")
    proc = dns_certbot.run("certonly", *rfc2136_args(ini), "-d", name)
    out = output_of(proc)
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert f"Unable to determine base domain for _acme-challenge.{name}" in one_line(out), out
    assert not dns_certbot.live(name).exists()
    assert bind.txt_records() == []


def test_certonly_manual_nsupdate_hooks(dns_certbot: Certbot, dns_pebble: Pebble, bind: Bind,
                                        tmp_path: Path) -> None:
    auth, cleanup = bind.manual_hook_scripts(tmp_path / "hooks")
    dns_certbot.run("certonly", "--manual", "--preferred-challenges", "dns",
                    "--manual-auth-hook", str(auth), "--manual-cleanup-hook", str(cleanup),
                    "-d", APEX, "-d", WILDCARD, check=True)

    cert = certs.load_pem_chain(dns_certbot.live(APEX) / "cert.pem")[0]
    assert sorted(certs.san_names(cert)) == sorted([APEX, WILDCARD])
    assert cert.issuer == dns_pebble.intermediate().subject
    calls = bind.hook_calls()
    assert sorted(c.split()[0] for c in calls) == ["auth", "auth", "cleanup", "cleanup"], calls
    assert {c.split()[1] for c in calls} <= {APEX, WILDCARD}, calls
    assert len({c.split()[2] for c in calls}) == 2, calls  # two distinct validations
    assert len(update_lines(bind, "adding")) == 2, bind.log_text()
    assert f"query: {VALIDATION_NAME} IN TXT" in bind.log_text()
    assert bind.txt_records() == []
    renewal = dns_certbot.renewal_conf(APEX).read_text()
    assert "authenticator = manual" in renewal
    assert f"manual_auth_hook = {auth}" in renewal
