"""Issue 5: batched Apache deployment (one configtest + one graceful reload per run),
batched deploy hooks, and batch-apache as http-01 authenticator (<= 2 reloads per run).

Real certbot (both flavours), real pebble, a real private Apache whose apachectl wrapper
logs every call (tests/bed/apache.py). Lineages are written by tests/bed/farm.py (issued by a
local CA, renewed against pebble) or by certbot itself (switching from --installer apache).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
from cryptography import x509

from tests.bed import certs
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA, make_farm
from tests.bed.pebble import Pebble

K = 5


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def one_line(text: str) -> str:
    return " ".join(text.split())


def live_cert(certbot: Certbot, name: str) -> x509.Certificate:
    return certs.load_pem_chain(certbot.live(name) / "cert.pem")[0]


def parse_calls(apache: Apache) -> list[str]:
    """apachectl calls that only certbot's Apache configurator makes when it prepares
    (parses) the configuration: `-t -D DUMP_INCLUDES`, `-t -D DUMP_MODULES`, `-v`
    (`-t -D DUMP_RUN_CFG` is also how certbot-batch learns Apache's pid file, to confirm
    its reload: not a parse of ours)."""
    return [c for c in apache.ctl_calls()
            if "DUMP_MODULES" in c or "DUMP_INCLUDES" in c or c.strip() == "-v"]


def setup_lineages(certbot: Certbot, apache: Apache, pebble: Pebble, count: int,
                   prefix: str = "site") -> list[str]:
    """``count`` lineages (not due) whose SSL vhosts already serve live/NAME/*.pem; Apache
    reloaded (uncounted) and the ctl log reset."""
    certbot.register()
    names = make_farm(str(certbot.config_dir), count, ca=FarmCA.create(),
                      server=pebble.directory_url, webroot=str(apache.webroot),
                      name_fmt=prefix + "{i}.example.test",
                      version=certbot.version)
    for name in names:
        live = certbot.live(name)
        apache.add_ssl_vhost(name, cert_path=live / "fullchain.pem",
                             key_path=live / "privkey.pem")
    apache.reload()
    for name in names:
        assert apache.wait_for_cert(name, live_cert(certbot, name)) == live_cert(certbot, name)
    apache.reset_counts()
    return names


def renew(certbot: Certbot, apache: Apache, *args: str, apache_args: bool = True,
          ctl: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    extra = apache.certbot_args(ctl) if apache_args else []
    return certbot.run("renew", *args, *extra)


def write_hook(path: Path, out: Path) -> Path:
    """An executable recording its environment and a copy of the manifest, once per call."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f"n=$(ls '{out}' 2>/dev/null | wc -l)\n"
        f"mkdir -p '{out}/call'$n\n"
        f"printf '%s' \"$RENEWED_LINEAGES\" > '{out}/call'$n/lineages\n"
        f"printf '%s' \"$RENEWED_DOMAINS\" > '{out}/call'$n/domains\n"
        f"printf '%s' \"$CERTBOT_BATCH_APACHE_RELOAD\" > '{out}/call'$n/reload\n"
        f"cp \"$CERTBOT_BATCH_MANIFEST\" '{out}/call'$n/manifest.json\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def hook_calls(out: Path) -> list[Path]:
    return sorted(out.iterdir()) if out.is_dir() else []


def assert_serves_live(certbot: Certbot, apache: Apache, names: list[str]) -> None:
    for name in names:
        expected = live_cert(certbot, name)
        served = apache.wait_for_cert(name, expected)
        assert served.serial_number == expected.serial_number, name


# -- 1 + 5: one configtest, one reload, no parse; batched and per-lineage hooks ---------------

@pytest.mark.versions
def test_renew_k_lineages_one_reload_and_hooks(certbot: Certbot, apache: Apache,
                                               pebble: Pebble, tmp_path: Path) -> None:
    names = setup_lineages(certbot, apache, pebble, K)
    old = {n: live_cert(certbot, n).serial_number for n in names}
    cli_hook_out = tmp_path / "cli-hook"
    dir_hook_out = tmp_path / "dir-hook"
    cli_hook = write_hook(tmp_path / "cli-hook.sh", cli_hook_out)
    write_hook(certbot.config_dir / "renewal-hooks" / "batch-deploy" / "10-record",
               dir_hook_out)
    per_lineage = tmp_path / "per-lineage.log"

    proc = renew(certbot, apache, "--force-renewal", "-a", "batch-webroot",
                 "--installer", "batch-apache", "--batch-deploy-hook", str(cli_hook),
                 "--deploy-hook", f"echo $RENEWED_LINEAGE >> {per_lineage}")
    assert proc.returncode == 0, output_of(proc) + certbot.log_text()[-6000:]

    counts = apache.counts()
    assert (counts.configtest, counts.graceful) == (1, 1), apache.ctl_calls()
    assert parse_calls(apache) == [], "certbot's Apache configurator parsed the config"
    assert "preparing certbot's Apache configurator" not in certbot.log_text()
    for name in names:
        assert live_cert(certbot, name).serial_number != old[name]
    assert_serves_live(certbot, apache, names)

    # certbot's own --deploy-hook: once per lineage
    lines = per_lineage.read_text().split()
    assert sorted(lines) == sorted(str(certbot.live(n)) for n in names)
    # batch hooks (command line + renewal-hooks/batch-deploy/): once each, all lineages
    for out in (cli_hook_out, dir_hook_out):
        calls = hook_calls(out)
        assert len(calls) == 1, calls
        call = calls[0]
        assert sorted((call / "lineages").read_text().split()) == \
            sorted(str(certbot.live(n)) for n in names)
        assert sorted((call / "domains").read_text().split()) == sorted(names)
        assert (call / "reload").read_text() == "reloaded"
        manifest = json.loads((call / "manifest.json").read_text())["renewed"]
        by_name = {item["lineage"]: item for item in manifest}
        assert sorted(by_name) == sorted(names)
        for name in names:
            cert = live_cert(certbot, name)
            item = by_name[name]
            assert item["live_dir"] == str(certbot.live(name))
            assert item["names"] == [name]
            assert int(item["serial"], 16) == cert.serial_number
            assert item["not_after"].startswith(
                certs.not_valid_after(cert).strftime("%Y-%m-%dT%H:%M"))

    # nothing due: no configtest, no reload, no batch hook
    apache.reset_counts()
    proc = renew(certbot, apache, "-a", "batch-webroot", "--installer", "batch-apache",
                 "--batch-deploy-hook", str(cli_hook))
    assert proc.returncode == 0, output_of(proc)
    assert apache.ctl_calls() == []
    assert len(hook_calls(cli_hook_out)) == 1


# -- 2: switching from --installer apache keeps the saved apache_* settings -------------------

def test_switch_from_stock_apache_keeps_settings(certbot: Certbot, apache: Apache,
                                                 pebble: Pebble) -> None:
    name = "switch.example.test"
    apache.add_ssl_vhost(name)
    apache.reload()
    certbot.run("run", "-a", "webroot", "-w", str(apache.webroot), "-i", "apache",
                *apache.certbot_args(), "-d", name, check=True)
    conf = certbot.renewal_conf(name).read_text()
    assert "installer = apache" in conf and f"apache_ctl = {apache.ctl}" in conf
    first = live_cert(certbot, name)
    assert apache.wait_for_cert(name, first) == first  # stock deployed it into the vhost

    for run in range(2):  # the second run reads the conf the first batch run saved
        apache.reset_counts()
        proc = renew(certbot, apache, "--force-renewal", "-a", "batch-webroot",
                     "--installer", "batch-apache", apache_args=False)
        assert proc.returncode == 0, output_of(proc) + certbot.log_text()[-6000:]
        counts = apache.counts()
        # the saved apache_ctl (the counting wrapper) is the one invoked
        assert (counts.configtest, counts.graceful) == (1, 1), (run, apache.ctl_calls())
        assert parse_calls(apache) == []
        assert_serves_live(certbot, apache, [name])
        conf = certbot.renewal_conf(name).read_text()
        assert "installer = batch-apache" in conf
        assert f"apache_ctl = {apache.ctl}" in conf
        assert f"apache_server_root = {apache.root}" in conf


# -- 3: configtest failing at flush ----------------------------------------------------------

def test_configtest_failure_rolls_back_and_keeps_certs(certbot: Certbot, apache: Apache,
                                                        pebble: Pebble) -> None:
    names = setup_lineages(certbot, apache, pebble, 2)
    old = {n: live_cert(certbot, n) for n in names}
    broken = apache.root / "conf-enabled" / "zz-broken.conf"
    broken.write_text("Include /nonexistent/certbot-batch-broken.conf\n")

    proc = renew(certbot, apache, "--force-renewal", "-a", "batch-webroot",
                 "--installer", "batch-apache")
    out = output_of(proc)
    assert proc.returncode != 0, out
    assert "Traceback" not in out
    flat = one_line(out)
    assert "Apache was NOT reloaded" in flat
    assert "certbot-batch-broken.conf" in flat  # the cause, from apachectl configtest
    counts = apache.counts()
    assert (counts.configtest, counts.graceful) == (1, 0), apache.ctl_calls()
    assert apache.is_running()
    for name in names:
        new = live_cert(certbot, name)
        assert new.serial_number != old[name].serial_number  # renewed cert kept in live/
        assert apache.served_cert(name).serial_number == old[name].serial_number
    assert broken.read_text().startswith("Include")  # not ours: left alone


# -- 4: Apache not running, apachectl missing, a failing batch hook --------------------------

def test_apache_stopped_before_flush_is_started(certbot: Certbot, apache: Apache,
                                                pebble: Pebble, tmp_path: Path) -> None:
    names = setup_lineages(certbot, apache, pebble, 1)
    stop = tmp_path / "stop-apache.sh"
    stop.write_text("#!/bin/sh\n"
                    f"/usr/sbin/apache2ctl stop\n"
                    "i=0\n"
                    f"while [ -e '{apache.pid_file}' ] && [ $i -lt 200 ]; do\n"
                    "  sleep 0.1; i=$((i+1))\ndone\nexit 0\n")
    stop.chmod(0o755)
    # certbot's per-lineage deploy hook runs before the session's flush: it stops Apache
    proc = renew(certbot, apache, "--force-renewal", "-a", "batch-webroot",
                 "--installer", "batch-apache", "--deploy-hook", str(stop))
    out = output_of(proc)
    assert proc.returncode == 0, out + certbot.log_text()[-4000:]
    assert "Apache was not running" in one_line(out)
    assert apache.counts().graceful == 1
    assert apache.is_running()
    assert_serves_live(certbot, apache, names)


def test_apache_ctl_missing_fails_before_renewal(certbot: Certbot, apache: Apache,
                                                 pebble: Pebble) -> None:
    names = setup_lineages(certbot, apache, pebble, 1)
    before = live_cert(certbot, names[0])
    proc = renew(certbot, apache, "--force-renewal", "-a", "batch-webroot",
                 "--installer", "batch-apache", ctl=Path("/nonexistent"))
    out = output_of(proc)
    assert proc.returncode != 0, out
    assert "Traceback" not in out
    assert "Apache's control program '/nonexistent' was not found" in one_line(out)
    assert live_cert(certbot, names[0]) == before  # no renewal work was done


def test_failing_batch_hook(certbot: Certbot, apache: Apache, pebble: Pebble) -> None:
    names = setup_lineages(certbot, apache, pebble, 2)
    proc = renew(certbot, apache, "--force-renewal", "-a", "batch-webroot",
                 "--installer", "batch-apache",
                 "--batch-deploy-hook", "echo hook-went-wrong >&2; exit 3")
    out = output_of(proc)
    assert proc.returncode != 0, out
    assert "Traceback" not in out
    flat = one_line(out)
    assert "exited 3: hook-went-wrong" in flat
    assert "the certificates were renewed and deployed" in flat
    assert apache.counts().graceful == 1
    assert_serves_live(certbot, apache, names)


# -- 6: batch-apache as authenticator: <= 2 reloads for K lineages ----------------------------

def test_batch_apache_authenticator_two_reloads(certbot: Certbot, apache: Apache,
                                                pebble: Pebble) -> None:
    names = setup_lineages(certbot, apache, pebble, K, prefix="auth")
    # Two names redirect HTTP to HTTPS. names[0] with mod_rewrite (as certbot's --redirect
    # does): the snippet's inherited RewriteRule answers before the vhost's redirect.
    # names[1] with mod_alias `Redirect /`, which nothing outside the vhost can override:
    # the CA follows the redirect (Let's Encrypt and pebble do) to the SSL vhost, which
    # serves the challenge through the snippet's server-wide Alias.
    link = apache.root / "mods-enabled" / "rewrite.load"
    link.symlink_to(Path("..") / "mods-available" / "rewrite.load")
    apache.write_site("redirect.conf", (
        f"<VirtualHost *:{apache.http_port}>\n"
        f"\tServerName {names[0]}\n"
        "\tRewriteEngine on\n"
        "\tRewriteRule ^ https://%{SERVER_NAME}%{REQUEST_URI} [END,NE,R=permanent]\n"
        "</VirtualHost>\n"
        f"<VirtualHost *:{apache.http_port}>\n"
        f"\tServerName {names[1]}\n"
        f"\tRedirect permanent / https://{names[1]}:{apache.https_port}/\n"
        "</VirtualHost>\n"))
    apache.reload()
    for name in names[:2]:
        assert apache.get("/.well-known/acme-challenge/x", host=name)[0] == 301
    apache.reset_counts()
    old = {n: live_cert(certbot, n).serial_number for n in names}
    # Our challenge directory, left 0700 by an earlier run (a umask race in certbot's worker
    # threads once produced that; Apache then answers 403): repaired, not trusted.
    challenge_root = apache.challenge_location / "certbot-batch-http01"
    challenge_root.mkdir(mode=0o700)
    challenge_root.chmod(0o700)

    proc = renew(certbot, apache, "--force-renewal", "-a", "batch-apache",
                 "-i", "batch-apache")
    assert proc.returncode == 0, output_of(proc) + certbot.log_text()[-6000:]
    counts = apache.counts()
    assert counts.graceful == 2, apache.ctl_calls()  # serve challenges + final deployment
    # names[1]'s challenge was answered by its SSL vhost after pebble followed the redirect
    access = (apache.log_dir / "other_vhosts_access.log").read_text()
    # (vhost_combined: "%v:%p ..." with the canonical port, so the SSL vhost logs 443)
    assert any(line.startswith(f"{names[1]}:")
               and not line.startswith(f"{names[1]}:{apache.http_port} ")
               and "GET /.well-known/acme-challenge/" in line and '" 200 ' in line
               for line in access.splitlines()), access[-3000:]
    assert counts.configtest == 2, apache.ctl_calls()
    assert parse_calls(apache) == []
    for name in names:
        assert live_cert(certbot, name).serial_number != old[name]
    assert_serves_live(certbot, apache, names)
    # nothing left behind: no snippet, no challenge files, and Apache no longer serves them
    assert not (apache.root / "conf-enabled" / "certbot-batch-acme.conf").exists()
    assert challenge_root.stat().st_mode & 0o777 == 0o755
    assert not any(p.is_file() for p in challenge_root.rglob("*"))
    journal = certbot.work_dir / "certbot-batch" / "challenges.journal"
    assert not journal.exists() or journal.read_text() == ""
    for name in names[:2]:
        assert apache.get("/.well-known/acme-challenge/x", host=name)[0] == 301
    conf = certbot.renewal_conf(names[0]).read_text()
    assert "authenticator = batch-apache" in conf and "installer = batch-apache" in conf
    assert os.environ.get("APACHE_CONFDIR") != str(apache.root)  # the test process untouched


def test_batch_apache_authenticator_outside_a_session(certbot: Certbot, apache: Apache,
                                                      pebble: Pebble) -> None:
    """certonly (no renewal session): serve + clean up with a reload each; a --dry-run
    renewal reloads at cleanup (there is no final deployment reload in a dry run)."""
    name = "single.example.test"
    certbot.run("certonly", "-a", "batch-apache", *apache.certbot_args(), "-d", name,
                check=True)
    snippet = apache.root / "conf-enabled" / "certbot-batch-acme.conf"
    assert apache.counts().graceful == 2, apache.ctl_calls()
    assert not snippet.exists()
    assert "authenticator = batch-apache" in certbot.renewal_conf(name).read_text()
    apache.reset_counts()
    proc = certbot.run("renew", "--dry-run", "-i", "batch-apache", *apache.certbot_args())
    assert proc.returncode == 0, output_of(proc) + certbot.log_text()[-6000:]
    assert apache.counts().graceful == 2, apache.ctl_calls()
    assert parse_calls(apache) == []
    assert not snippet.exists()


def test_batch_apache_authenticator_killed_leftovers_removed(certbot: Certbot, apache: Apache,
                                                             pebble: Pebble) -> None:
    """SIGKILL while the challenge snippet is live: the journal names snippet and files; the
    next run removes them first, then serves its own challenges (no "snippet exists")."""
    names = setup_lineages(certbot, apache, pebble, 2, prefix="kill")
    old = {n: live_cert(certbot, n).serial_number for n in names}
    snippet = apache.root / "conf-enabled" / "certbot-batch-acme.conf"
    files_dir = apache.challenge_location / "certbot-batch-http01" / ".well-known"
    journal = certbot.work_dir / "certbot-batch" / "challenges.journal"
    cmd = certbot.command("renew", "--force-renewal", "-a", "batch-apache", "-i",
                          "batch-apache", *apache.certbot_args())
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=certbot.env(), cwd=certbot.base_dir)
    try:
        deadline = time.monotonic() + 90
        # the snippet lives from before the challenge reload until the authorizations are
        # valid (certbot polls them once a second), so a 10 ms poll sees it
        while not snippet.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert snippet.exists(), "the run never installed the challenge snippet"
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert snippet.exists()
    recorded = journal.read_text()
    assert str(snippet) in recorded and str(files_dir) in recorded

    # the next run recovers first, then serves its own challenges again
    apache.reset_counts()
    proc2 = renew(certbot, apache, "--force-renewal", "-a", "batch-apache", "-i",
                  "batch-apache")
    assert proc2.returncode == 0, output_of(proc2) + certbot.log_text()[-6000:]
    assert "left behind by an interrupted run" in one_line(certbot.log_text())
    # One reload serves this run's challenges, one deploys -- and drops the dead snippet the
    # running Apache still had from the killed run (recovery made it a pending reload).
    assert apache.counts().graceful == 2, apache.ctl_calls()
    for name in names:
        assert live_cert(certbot, name).serial_number != old[name]
    assert not snippet.exists()
    assert not any(p.is_file() for p in files_dir.parent.rglob("*"))
    assert not journal.exists() or journal.read_text() == ""
    assert_serves_live(certbot, apache, names)
