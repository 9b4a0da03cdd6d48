"""Issue 18: batch-nginx, the installer and the http-01 authenticator.

Real certbot (both full flavours; the first test on every flavour), real pebble validating
against a private nginx (tests/bed/nginx.py: Debian's nginx 1.22 on loopback ports, its
control program a wrapper that logs every call), real nginx. What is counted: ``-t``
(configtests), ``-s reload``, ``-V`` (certbot's nginx plugin asks it twice in every
prepare(), with its full parse: none may happen on renewal). The user's configuration is
the server root (``conf/``): every file is hashed before and after.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from cryptography import x509

from tests.bed import certbots, certs
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA, make_farm
from tests.bed.nginx import Nginx, write_ctl_wrapper
from tests.bed.pebble import Pebble
from tests.conftest import _failed

K = 4
SNIPPET = "certbot-batch-acme-nginx.conf"


@pytest.fixture
def nginx(request: pytest.FixtureRequest) -> Iterator[Nginx]:
    """A private nginx on loopback ports, started."""
    server = Nginx()
    try:
        server.start()
        yield server
    finally:
        if _failed(request):
            print(f"\n===== nginx ({server.dir}) =====\n{server.logs()}")
        server.cleanup()


@pytest.fixture
def npebble(nginx: Nginx, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pebble]:
    """Pebble whose HTTP-01 validator connects to the private nginx's HTTP port."""
    va_sleeptime = getattr(request, "param", None)
    server = Pebble(http_port=nginx.http_port, va_sleeptime=va_sleeptime,
                    base_dir=tmp_path / "pebble")
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
    b.register()
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


def nginx_params(nginx: Nginx, installer: str = "batch-nginx") -> dict[str, str]:
    return {"installer": installer, "nginx_server_root": str(nginx.root),
            "nginx_ctl": str(nginx.ctl)}


def setup_lineages(bot: Certbot, nginx: Nginx, pebble: Pebble, count: int,
                   prefix: str = "site", http: str = "default",
                   authenticator: str = "batch-nginx", installer: str = "batch-nginx",
                   reload: bool = True) -> list[str]:
    """``count`` lineages saved with ``authenticator``/``installer`` and this nginx's
    settings, whose SSL server blocks serve live/NAME/*.pem; nginx reloaded (uncounted),
    its ctl log reset. ``http``: "default" (the names reach the HTTP port's default server),
    "own" (a plain server block per name), "mixed" (own, redirecting as certbot's
    --redirect, default)."""
    names = make_farm(str(bot.config_dir), count, ca=FarmCA.create(),
                      server=pebble.directory_url, webroot=str(nginx.webroot),
                      authenticator=authenticator, installer=None,
                      extra_renewalparams=nginx_params(nginx, installer),
                      name_fmt=prefix + "{i}.example.test", version=bot.version)
    for i, name in enumerate(names):
        live = bot.live(name)
        nginx.add_ssl_server(name, cert_path=live / "fullchain.pem",
                             key_path=live / "privkey.pem")
        kind = http if http != "mixed" else ("own", "redirect", "default")[i % 3]
        if kind in ("own", "redirect"):
            nginx.add_http_server(name, redirect=kind == "redirect")
    if reload:
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


def journal(bot: Certbot) -> Path:
    return bot.work_dir / "certbot-batch" / "challenges.journal"


def pending_lineages(bot: Certbot) -> list[str]:
    best: dict[str, object] = {}
    for path in (bot.work_dir / "certbot-batch" / "deploy-pending.json",
                 bot.config_dir / "certbot-batch" / "deploy-pending.json"):
        if path.exists():
            data = json.loads(path.read_text())
            if int(data.get("seq", 0)) > int(best.get("seq", 0)):  # type: ignore[call-overload]
                best = data
    names: set[str] = set()
    for entry in dict(best.get("servers") or {}).values():  # type: ignore[call-overload]
        names.update(entry.get("lineages") or [])
    return sorted(names)


def orders(pebble: Pebble) -> int:
    return len(re.findall(r"Issued certificate serial", pebble.pebble_log.read_text(
        errors="replace")))


# -- 1: renew K lineages: one reload for the challenges, one configtest + reload to deploy ----

@pytest.mark.versions
def test_renew_batch_nginx_one_reload_each_no_parse(bot: Certbot, nginx: Nginx,
                                                    npebble: Pebble) -> None:
    names = setup_lineages(bot, nginx, npebble, K + 2, http="mixed")
    old = {n: live_cert(bot, n).serial_number for n in names}
    before = nginx.digest()
    mtimes = {p: p.stat().st_mtime_ns for p in nginx.sites_available.iterdir()}

    proc = bot.run("renew", "--force-renewal")
    assert proc.returncode == 0, output_of(proc) + bot.log_text()[-6000:]
    counts = nginx.counts()
    # -t: before any CA contact, before the challenge reload, before the deployment reload
    assert (counts.configtest, counts.reload) == (3, 2), nginx.ctl_calls()
    assert counts.version == 0, "certbot's nginx configurator was prepared (-V + full parse)"
    assert "preparing certbot's nginx configurator" not in bot.log_text()
    for name in names:
        assert live_cert(bot, name).serial_number != old[name]
    assert_serves_live(bot, nginx, names)
    # the user's configuration: byte-identical, modification times kept; nothing left
    assert nginx.digest() == before
    assert {p: p.stat().st_mtime_ns for p in nginx.sites_available.iterdir()} == mtimes
    assert not (nginx.root / SNIPPET).exists()
    assert not journal(bot).exists() or journal(bot).read_text() == ""
    # the challenges are not served any more (the deployment reload dropped them)
    token = re.findall(r"GET /.well-known/acme-challenge/([A-Za-z0-9_-]{20,})",
                       (nginx.log_dir / "access.log").read_text())
    assert token
    assert nginx.get(f"/.well-known/acme-challenge/{token[-1]}",
                     host=names[0])[0] in (301, 404)
    conf = bot.renewal_conf(names[0]).read_text()
    assert "authenticator = batch-nginx" in conf and "installer = batch-nginx" in conf
    assert f"nginx_ctl = {nginx.ctl}" in conf

    # nothing due: no configtest beyond the one before CA contact, no reload
    nginx.reset_counts()
    proc = bot.run("renew")
    assert proc.returncode == 0, output_of(proc)
    assert nginx.counts().reload == 0, nginx.ctl_calls()


def test_failed_validation_leaves_config_identical(bot: Certbot, nginx: Nginx,
                                                   npebble: Pebble) -> None:
    """One name's plain-HTTP server answers 403 to everything at server level (before any
    location): that lineage fails, the others renew; the files are identical either way."""
    names = setup_lineages(bot, nginx, npebble, 3, prefix="fail", http="own", reload=False)
    nginx.write_site(f"{names[0]}-http", (
        "server {\n"
        f"\tlisten 127.0.0.1:{nginx.http_port};\n"
        f"\tserver_name {names[0]};\n"
        "\treturn 403;\n}\n"))
    nginx.reload()
    nginx.reset_counts()
    before = nginx.digest()
    old = {n: live_cert(bot, n).serial_number for n in names}
    proc = bot.run("renew", "--force-renewal")
    text = output_of(proc)
    assert proc.returncode != 0, text
    assert "Traceback" not in text
    assert f"/live/{names[0]}/fullchain.pem (failure)" in text, text
    assert live_cert(bot, names[0]).serial_number == old[names[0]]
    for name in names[1:]:
        assert live_cert(bot, name).serial_number != old[name]
    assert_serves_live(bot, nginx, names)
    assert nginx.digest() == before
    assert not (nginx.root / SNIPPET).exists()
    assert not journal(bot).exists() or journal(bot).read_text() == ""


# -- 2: -a webroot -i batch-nginx; switching from -i nginx keeps the saved settings -----------

def test_webroot_and_switch_from_stock_nginx(bot: Certbot, nginx: Nginx,
                                             npebble: Pebble) -> None:
    names = setup_lineages(bot, nginx, npebble, K, authenticator="webroot",
                           installer="nginx")
    before = nginx.digest()
    proc = bot.run("renew", "--force-renewal", "-i", "batch-nginx")
    assert proc.returncode == 0, output_of(proc) + bot.log_text()[-6000:]
    counts = nginx.counts()
    assert (counts.configtest, counts.reload, counts.version) == (2, 1, 0), nginx.ctl_calls()
    assert_serves_live(bot, nginx, names)
    assert nginx.digest() == before
    conf = bot.renewal_conf(names[0]).read_text()
    assert "installer = batch-nginx" in conf and "authenticator = webroot" in conf
    assert f"nginx_server_root = {nginx.root}" in conf  # read from the stock settings

    # Asking for certbot's own nginx installer inside a renewal session gets its batch
    # counterpart (issue 18, item 3): no parse, one reload.
    nginx.reset_counts()
    proc = bot.run("renew", "--force-renewal", "-i", "nginx", "--cert-name", names[0])
    assert proc.returncode == 0, output_of(proc)
    assert (nginx.counts().version, nginx.counts().reload) == (0, 1), nginx.ctl_calls()


def challenge_reloads(bot: Certbot, log_from: int) -> int:
    """Reloads a run made to serve challenges (its log from offset ``log_from``): 1, or 0
    when the CA had nothing to validate (pebble reuses a valid authorization about 1 % of
    the time even with reuse set to 0, and these names were validated by the run before)."""
    served = bot.log_text()[log_from:].count("nginx reloaded once to serve")
    assert served <= 1, served
    return served


# -- 3: a new name goes through certbot's own nginx installer ---------------------------------

def test_new_name_is_deployed_through_certbots_nginx_code(bot: Certbot, nginx: Nginx,
                                                          npebble: Pebble) -> None:
    name = "fresh.example.test"
    nginx.add_ssl_server(name)  # a placeholder certificate
    nginx.reload()
    proc = bot.run("run", "-a", "batch-nginx", "-i", "batch-nginx", *nginx.certbot_args(),
                   "-d", name)
    assert proc.returncode == 0, output_of(proc) + bot.log_text()[-6000:]
    text = (nginx.sites_available / f"{name}-ssl").read_text()
    assert str(bot.live(name) / "fullchain.pem") in text  # edited by certbot's own code
    assert_serves_live(bot, nginx, [name])
    assert not (nginx.root / SNIPPET).exists()
    conf = bot.renewal_conf(name).read_text()
    assert "installer = batch-nginx" in conf and "authenticator = batch-nginx" in conf

    # its renewal: no parse, one deployment reload (+1 for the challenge)
    nginx.reset_counts()
    before = nginx.digest()
    log_from = len(bot.log_text())
    proc = bot.run("renew", "--force-renewal")
    assert proc.returncode == 0, output_of(proc)
    assert (nginx.counts().reload, nginx.counts().version) == \
        (1 + challenge_reloads(bot, log_from), 0), \
        nginx.ctl_calls()
    assert nginx.digest() == before
    assert_serves_live(bot, nginx, [name])


def test_authenticator_outside_a_session_and_dry_run(bot: Certbot, nginx: Nginx,
                                                     npebble: Pebble) -> None:
    """certonly (no renewal session): serve + clean up with a reload each; a --dry-run
    renewal reloads at cleanup (a dry run has no deployment reload). Files identical."""
    name = "single.example.test"
    nginx.add_http_server(name)
    nginx.reload()
    nginx.reset_counts()
    before = nginx.digest()
    bot.run("certonly", "-a", "batch-nginx", *nginx.certbot_args(), "-d", name, check=True)
    assert nginx.counts().reload == 2, nginx.ctl_calls()
    assert nginx.digest() == before
    assert "authenticator = batch-nginx" in bot.renewal_conf(name).read_text()
    nginx.reset_counts()
    log_from = len(bot.log_text())
    proc = bot.run("renew", "--dry-run")
    assert proc.returncode == 0, output_of(proc) + bot.log_text()[-6000:]
    # serve + clean up (none when pebble reused the authorization: challenge_reloads)
    assert (nginx.counts().reload, nginx.counts().version) == \
        (2 * challenge_reloads(bot, log_from), 0), \
        nginx.ctl_calls()
    assert nginx.digest() == before
    assert not (nginx.root / SNIPPET).exists()


# -- 4: configtest failing at the end: renewed, not deployed, deployed after the fix ----------

def test_configtest_failure_renewed_not_deployed_then_deployed(bot: Certbot, nginx: Nginx,
                                                               npebble: Pebble,
                                                               tmp_path: Path) -> None:
    names = setup_lineages(bot, nginx, npebble, 2, authenticator="webroot")
    old = {n: live_cert(bot, n).serial_number for n in names}
    broken = nginx.root / "conf.d" / "zz-broken.conf"
    breaker = tmp_path / "break.sh"  # certbot's per-lineage deploy hook breaks the config
    breaker.write_text(f"#!/bin/sh\necho 'include /nonexistent/broken.conf;' > '{broken}'\n")
    breaker.chmod(0o755)
    proc = bot.run("renew", "--force-renewal", "--deploy-hook", str(breaker))
    text = output_of(proc)
    assert proc.returncode != 0, text
    assert "Traceback" not in text
    assert "nginx was NOT reloaded" in one_line(text) and "broken.conf" in one_line(text)
    for name in names:
        assert f"/live/{name}/fullchain.pem (renewed, not deployed)" in text, text
        assert live_cert(bot, name).serial_number != old[name]
        assert nginx.served_cert(name).serial_number == old[name]
    assert nginx.counts().reload == 0
    assert nginx.is_running()
    assert pending_lineages(bot) == sorted(names)

    # still broken: the next renew orders nothing (nginx -t before any CA contact), retries
    # the deployment, exits non-zero
    issued = orders(npebble)
    proc = bot.run("renew", "--force-renewal")
    assert proc.returncode != 0, output_of(proc)
    assert "configuration is broken already" in one_line(output_of(proc))
    assert orders(npebble) == issued
    assert pending_lineages(bot) == sorted(names)

    broken.unlink()
    nginx.reset_counts()
    proc = bot.run("renew")
    assert proc.returncode == 0, output_of(proc)
    assert "renewed earlier" in one_line(output_of(proc))
    assert nginx.counts().reload == 1
    assert pending_lineages(bot) == []
    assert_serves_live(bot, nginx, names)


# -- 5: a reload nginx's master rejects is reported, the deployment stays pending -------------

def test_reload_rejected_by_the_master_stays_pending(bot: Certbot, nginx: Nginx,
                                                     npebble: Pebble, tmp_path: Path) -> None:
    names = setup_lineages(bot, nginx, npebble, 2, authenticator="webroot")
    # A server block with its own (placeholder) certificate outside live/; between the
    # configtest and the reload its key is replaced by one that does not fit (the
    # wrapper signals the master itself, as a service manager would): the master refuses
    # the new configuration, logs [emerg] and keeps its old workers.
    nginx.add_ssl_server("other.example.test")
    nginx.reload()
    nginx.reset_counts()
    key = nginx.placeholder_dir / "other.example.test.key"
    good = key.read_bytes()
    wrong = tmp_path / "wrong.key"
    certs.make_leaf(["x"]).write(tmp_path / "x.crt", wrong)
    flag = tmp_path / "break-once"
    flag.touch()
    write_ctl_wrapper(nginx.ctl, nginx.ctl_log, hup_reload=str(nginx.pid_file),
                      before_reload=f"[ -e '{flag}' ] && rm '{flag}' && "
                                    f"cp '{wrong}' '{key}'")
    old_workers = nginx.workers()
    proc = bot.run("renew", "--force-renewal")
    text = one_line(output_of(proc))
    assert proc.returncode != 0, text
    assert "Traceback" not in text
    assert "rejected the reload" in text and "key values mismatch" in text, text
    for name in names:
        assert f"/live/{name}/fullchain.pem (renewed, not deployed)" in text, text
    # no new generation of workers (one of the old may have finished meanwhile)
    assert nginx.is_running() and nginx.workers() and nginx.workers() <= old_workers
    assert pending_lineages(bot) == sorted(names)

    key.write_bytes(good)  # the admin repairs it; the next renew deploys
    proc = bot.run("renew")
    assert proc.returncode == 0, output_of(proc)
    assert pending_lineages(bot) == []
    assert_serves_live(bot, nginx, names)


# -- 6: two nginx instances ------------------------------------------------------------------

def test_two_nginx_instances_each_reloaded_once(bot: Certbot, nginx: Nginx,
                                                npebble: Pebble) -> None:
    second = Nginx()
    try:
        second.start()
        one = setup_lineages(bot, nginx, npebble, 2, prefix="first", authenticator="webroot")
        two = make_farm(str(bot.config_dir), 2, ca=FarmCA.create(),
                        server=npebble.directory_url, webroot=str(nginx.webroot),
                        authenticator="webroot", installer=None,
                        extra_renewalparams=nginx_params(second),
                        name_fmt="second{i}.example.test", version=bot.version)
        for name in two:
            second.add_ssl_server(name, cert_path=bot.live(name) / "fullchain.pem",
                                  key_path=bot.live(name) / "privkey.pem")
        second.reload()
        second.reset_counts()
        proc = bot.run("renew", "--force-renewal")
        assert proc.returncode == 0, output_of(proc)
        assert nginx.counts().reload == 1 and second.counts().reload == 1
        assert_serves_live(bot, nginx, one)
        assert_serves_live(bot, second, two)
        assert pending_lineages(bot) == []
    finally:
        second.cleanup()


# -- 7: nginx stopped before the deployment: started, with a warning --------------------------

def test_stopped_nginx_is_started(bot: Certbot, nginx: Nginx, npebble: Pebble,
                                  tmp_path: Path) -> None:
    names = setup_lineages(bot, nginx, npebble, 1, authenticator="webroot")
    stop = tmp_path / "stop.sh"
    stop.write_text(f"#!/bin/sh\nkill -QUIT $(cat '{nginx.pid_file}')\n"
                    f"while [ -e '{nginx.pid_file}' ]; do sleep 0.05; done\n")
    stop.chmod(0o755)
    proc = bot.run("renew", "--force-renewal", "--deploy-hook", str(stop))
    assert proc.returncode == 0, output_of(proc)
    assert "nginx was not running" in one_line(output_of(proc))
    assert nginx.counts().start == 1
    assert nginx.is_running()
    assert_serves_live(bot, nginx, names)


# -- 8: stops and kills: the next command (any) leaves the configuration as it was ------------

WAVE = 2


def _trigger(nginx: Nginx, bot: Certbot, names: list[str], phase: str,
             before: dict[str, str]) -> Callable[[], bool]:
    if phase == "provisioning":  # snippet written and the include inserted
        return lambda: (nginx.root / SNIPPET).exists() and nginx.digest() != before
    if phase == "loop":
        return lambda: any(len(list((bot.config_dir / "archive" / n).glob("cert*.pem"))) >= 2
                           for n in names)
    if phase == "reload":  # the deployment's configtest (after 1 preflight + 3 waves)
        return lambda: nginx.counts().configtest >= 2 + len(names) // WAVE
    raise ValueError(phase)


@pytest.mark.parametrize("npebble", [2], indirect=True)
@pytest.mark.parametrize("sig,phase", [
    (signal.SIGTERM, "provisioning"), (signal.SIGKILL, "provisioning"),
    (signal.SIGTERM, "loop"), (signal.SIGKILL, "loop"),
    (signal.SIGTERM, "reload"), (signal.SIGKILL, "reload"),
], ids=lambda v: v.name if isinstance(v, signal.Signals) else str(v))
def test_stopped_or_killed_run_leaves_config_identical(bot: Certbot, nginx: Nginx,
                                                       npebble: Pebble, sig: signal.Signals,
                                                       phase: str) -> None:
    names = setup_lineages(bot, nginx, npebble, 3 * WAVE, prefix="kill", http="mixed")
    before = nginx.digest()
    proc = subprocess.Popen(bot.command("renew", "--force-renewal", "--batch-size", str(WAVE)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=bot.env(), cwd=bot.base_dir,
                            preexec_fn=certbots.default_stop_signals)
    try:
        check = _trigger(nginx, bot, names, phase, before)
        end = time.monotonic() + 180
        while not check() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        assert check(), f"the run never reached {phase}: {proc.poll()}"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in stdout + stderr
    if sig == signal.SIGTERM:
        assert proc.returncode != 0
        assert nginx.digest() == before  # a stopped run cleans up itself
    elif phase == "provisioning":
        assert nginx.digest() != before  # killed with the include in the user's files

    # any certbot command: challenge configuration gone, configuration byte-identical
    follow = bot.run("certificates")
    assert follow.returncode == 0, output_of(follow)
    assert "Traceback" not in output_of(follow)
    assert nginx.digest() == before
    assert not (nginx.root / SNIPPET).exists()
    assert not journal(bot).exists() or journal(bot).read_text() == ""
    assert nginx.is_running()
    # the next renew deploys every saved certificate
    proc2 = bot.run("renew")
    assert "Traceback" not in output_of(proc2)
    assert nginx.digest() == before
    assert pending_lineages(bot) == []
    assert_serves_live(bot, nginx, names)


# -- 9: the text walk agrees with nginx on what it serves -------------------------------------

def test_walk_and_endpoints_of_a_real_configuration(nginx: Nginx) -> None:
    from certbot_batch.servers import nginx as nginx_server
    from certbot_batch.servers.base import ServerRef, served_serial

    nginx.add_ssl_server("a.example.test")
    nginx.add_http_server("b.example.test", redirect=True, aliases=["*.b.example.test"])
    crt, key = nginx.placeholder("c.example.test")
    (nginx.root / "conf.d" / "inline.conf").write_text(
        f"server {{ listen 127.0.0.1:{nginx.https_port} ssl; server_name \"c.example.test\";"
        f" # a comment\n  ssl_certificate {crt}; ssl_certificate_key {key}; "
        "location / { return 204; } }\n")
    nginx.reload()
    server = nginx_server.NginxServer(ServerRef("nginx", str(nginx.ctl), str(nginx.root)))
    assert server.pid_file() == str(nginx.pid_file)
    assert server.error_logs() == [str(nginx.error_log)]
    found = nginx_server.walk(str(nginx.root))
    assert {str(p) for name in ("a.example.test", "c.example.test")
            for p in nginx.placeholder(name)} <= found.cert_paths
    ends = server.endpoints()
    for name in ("a.example.test", "c.example.test"):
        crt = str(nginx.placeholder(name)[0])
        (endpoint,) = ends[crt]
        assert served_serial(endpoint) == nginx.served_cert(name).serial_number
    plain = [b for b in found.servers if any(not x.ssl for x in b.listens)]
    pick = nginx_server.server_for_name
    assert pick(plain, "x.b.example.test").names == ["b.example.test", "*.b.example.test"]
    assert pick(plain, "nowhere.test").names == ["localhost"]  # the default_server
    assert nginx.counts().version == 0  # the pid directive is there: no nginx -V


def test_ctl_missing_is_a_clear_error_before_any_order(bot: Certbot, nginx: Nginx,
                                                       npebble: Pebble) -> None:
    names = setup_lineages(bot, nginx, npebble, 1, authenticator="webroot")
    conf = bot.renewal_conf(names[0])
    conf.write_text(conf.read_text().replace(str(nginx.ctl), "/nonexistent/nginx"))
    issued = orders(npebble)
    proc = bot.run("renew", "--force-renewal")
    text = one_line(output_of(proc))
    assert proc.returncode != 0, text
    assert "Traceback" not in text
    assert "nginx's control program '/nonexistent/nginx' was not found" in text
    assert orders(npebble) == issued


