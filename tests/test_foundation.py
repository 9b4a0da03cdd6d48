"""Acceptance tests of the foundation: both plugins work with real certbot (PyPI 5.x and
Debian 2.1), a real pebble and a real Apache, and fail with clear messages."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tests.bed import certs
from tests.bed.apache import Apache, write_ctl_wrapper
from tests.bed.certbots import Certbot
from tests.bed.pebble import INTERMEDIATE_CN_PREFIX, Pebble

NAME = "site1.example.test"

WEBROOT_DESCRIPTION = "Webroot authenticator for many lineages"
APACHE_DESCRIPTION = "Apache installer for many lineages"


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def one_line(text: str) -> str:
    """certbot wraps its messages at 80 columns: compare with whitespace collapsed."""
    return " ".join(text.split())


def assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    out = output_of(proc)
    assert proc.returncode != 0, f"expected a failure, got exit 0:\n{out}"
    assert "Traceback" not in out, f"Python traceback on the console:\n{out}"
    flat = one_line(out)
    for needle in needles:
        assert one_line(needle) in flat, f"{needle!r} not in the output:\n{out}"
    return out


def lineage_cert(certbot: Certbot, name: str) -> x509.Certificate:
    return certs.load_pem_chain(certbot.live(name) / "cert.pem")[0]


def get_cert(certbot: Certbot, webroot: Path, name: str = NAME) -> x509.Certificate:
    certbot.run("certonly", "-a", "batch-webroot", "-w", str(webroot), "-d", name, check=True)
    return lineage_cert(certbot, name)


def assert_apache_private(apache: Apache) -> None:
    """The test Apache listens on its two loopback ports and nothing else (no 443, no 80)."""
    proc = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return
    pid = apache.pid()
    mine = [line.split()[3] for line in proc.stdout.splitlines() if f"pid={pid}," in line]
    assert sorted(mine) == sorted([f"127.0.0.1:{apache.http_port}",
                                   f"127.0.0.1:{apache.https_port}"]), mine


# -- plugins ---------------------------------------------------------------------------------

def test_plugins_are_listed(certbot: Certbot) -> None:
    assert certbot.version_info >= (2, 1)
    proc = certbot.run("plugins", check=True)
    flat = one_line(output_of(proc))
    assert "* batch-webroot" in flat
    assert "* batch-apache" in flat
    assert f"Description: {WEBROOT_DESCRIPTION}" in flat
    assert f"Description: {APACHE_DESCRIPTION}" in flat


# -- batch-webroot ---------------------------------------------------------------------------

def test_certonly_batch_webroot(certbot: Certbot, pebble: Pebble, apache: Apache,
                                webroot: Path) -> None:
    assert list(webroot.iterdir()) == []
    cert = get_cert(certbot, webroot)

    assert (certbot.renewal_conf(NAME)).is_file()
    for f in ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"):
        assert (certbot.live(NAME) / f).exists(), f
    assert certs.san_names(cert) == [NAME]
    issuer = pebble.intermediate()
    assert cert.issuer == issuer.subject
    assert issuer.subject.rfc4514_string().startswith(f"CN={INTERMEDIATE_CN_PREFIX}")
    # the HTTP-01 answer came from the real Apache serving the webroot
    access_log = (apache.log_dir / "access.log").read_text()
    assert "GET /.well-known/acme-challenge/" in access_log
    assert '" 200 ' in access_log
    # nothing we created is left behind: no challenge file, no .well-known, no journal
    assert list(webroot.iterdir()) == []
    assert not (certbot.work_dir / "certbot-batch" / "challenges.journal").exists()
    renewal = certbot.renewal_conf(NAME).read_text()
    assert "authenticator = batch-webroot" in renewal


def test_certonly_keeps_existing_well_known(certbot: Certbot, webroot: Path) -> None:
    """Only what we created is removed: a pre-existing .well-known (and its files) stay."""
    well_known = webroot / ".well-known"
    well_known.mkdir(mode=0o755)
    (well_known / "security.txt").write_text("Contact: mailto:test@example.org\n")
    get_cert(certbot, webroot)
    assert sorted(p.name for p in well_known.iterdir()) == ["security.txt"]


# -- batch-apache ----------------------------------------------------------------------------

def test_install_batch_apache(certbot: Certbot, apache: Apache, webroot: Path) -> None:
    apache.add_ssl_vhost(NAME)
    apache.reload()
    placeholder = apache.served_cert(NAME)
    cert = get_cert(certbot, webroot)
    assert placeholder != cert
    apache.reset_counts()

    certbot.run("install", "--installer", "batch-apache", "--cert-name", NAME,
                "--no-redirect", *apache.certbot_args(), check=True)

    assert apache.wait_for_cert(NAME, cert) == cert
    counts = apache.counts()
    calls = apache.ctl_calls()
    assert counts.configtest >= 1, calls
    assert counts.graceful == 1, calls
    assert calls.index("configtest") < calls.index("graceful"), calls
    assert str(certbot.live(NAME) / "fullchain.pem") in (
        apache.vhost_root / f"{NAME}-ssl.conf").read_text()
    assert apache.is_running()
    assert_apache_private(apache)


def test_run_webroot_and_apache(certbot: Certbot, apache: Apache, pebble: Pebble,
                                webroot: Path) -> None:
    apache.add_ssl_vhost(NAME)
    apache.reload()
    placeholder = apache.served_cert(NAME)

    certbot.run("run", "-a", "batch-webroot", "-w", str(webroot), "-i", "batch-apache",
                "-d", NAME, "--no-redirect", *apache.certbot_args(), check=True)

    cert = lineage_cert(certbot, NAME)
    assert cert != placeholder
    assert cert.issuer == pebble.intermediate().subject
    assert apache.wait_for_cert(NAME, cert) == cert
    counts = apache.counts()
    assert counts.configtest >= 1 and counts.graceful >= 1, apache.ctl_calls()
    assert list(webroot.iterdir()) == []
    renewal = certbot.renewal_conf(NAME).read_text()
    assert "installer = batch-apache" in renewal
    assert_apache_private(apache)


# -- errors: a clear message, no traceback ----------------------------------------------------

def test_error_missing_webroot(certbot: Certbot, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "webroot"
    proc = certbot.run("certonly", "-a", "batch-webroot", "-w", str(missing), "-d", NAME)
    assert_clean_failure(proc, str(missing), "does not exist")
    assert not certbot.live(NAME).exists()


def test_error_no_webroot_given(certbot: Certbot) -> None:
    proc = certbot.run("certonly", "-a", "batch-webroot", "-d", NAME)
    assert_clean_failure(proc, "No webroot is configured", NAME)
    assert not certbot.live(NAME).exists()


def test_error_webroot_is_a_file(certbot: Certbot, tmp_path: Path) -> None:
    a_file = tmp_path / "regular-file"
    a_file.write_text("not a directory\n")
    proc = certbot.run("certonly", "-a", "batch-webroot", "-w", str(a_file), "-d", NAME)
    assert_clean_failure(proc, str(a_file), "not a directory")


def test_error_unwritable_challenge_dir(certbot: Certbot, webroot: Path) -> None:
    """As root every directory is writable; a regular FILE where .well-known must go is
    not: the challenge file cannot be written, and the message names the path."""
    blocker = webroot / ".well-known"
    blocker.write_text("a file, not a directory\n")
    proc = certbot.run("certonly", "-a", "batch-webroot", "-w", str(webroot), "-d", NAME)
    assert_clean_failure(proc, str(blocker))
    assert blocker.is_file()
    assert sorted(p.name for p in webroot.iterdir()) == [".well-known"]
    assert not certbot.live(NAME).exists()


def test_error_unwritable_webroot_as_other_user(certbot_flavour: str, pebble: Pebble,
                                                apache: Apache) -> None:
    """A webroot the certbot user may not write to (certbot run as nobody)."""
    setpriv = shutil.which("setpriv")
    if os.getuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run certbot as another user")
    base = apache.dir / "as-nobody"
    base.mkdir(mode=0o755)
    shutil.chown(base, "nobody")
    webroot = apache.dir / "root-owned-webroot"
    webroot.mkdir(mode=0o755)
    bot = Certbot(certbot_flavour, base, pebble)
    for d in (bot.config_dir, bot.work_dir, bot.logs_dir, bot.tmp_dir):
        shutil.chown(d, "nobody")
    cmd = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
           *bot.command("certonly", "-a", "batch-webroot", "-w", str(webroot), "-d", NAME)]
    env = bot.env()
    env["HOME"] = str(base)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=base,
                          timeout=240, check=False)
    assert_clean_failure(proc, str(webroot), "not writable")
    assert list(webroot.iterdir()) == []


def test_error_apache_ctl_missing(certbot: Certbot, apache: Apache, webroot: Path) -> None:
    apache.add_ssl_vhost(NAME)
    get_cert(certbot, webroot)
    proc = certbot.run("install", "--installer", "batch-apache", "--cert-name", NAME,
                       "--no-redirect", *apache.certbot_args(ctl=Path("/nonexistent")))
    assert_clean_failure(proc, "/nonexistent")


@pytest.mark.parametrize(("fail_on", "pass_first", "needle"), [
    # broken from the start: certbot's Apache parser (stock prepare) refuses to go on
    (("configtest", "graceful"), 0, "configtest"),
    # the configuration is broken after the edit: our restart's configtest fails
    (("configtest",), 1, "Apache configtest failed"),
    # the reload itself fails
    (("graceful",), 0, "Apache graceful reload failed"),
], ids=["always", "after-edit", "graceful"])
def test_error_apache_ctl_fails(certbot: Certbot, apache: Apache, webroot: Path,
                                fail_on: tuple[str, ...], pass_first: int, needle: str) -> None:
    apache.add_ssl_vhost(NAME)
    apache.reload()
    placeholder = apache.served_cert(NAME)
    get_cert(certbot, webroot)
    apache.reset_counts()
    failing = write_ctl_wrapper(apache.dir / "bin" / "failing-apachectl", apache.root,
                                apache.ctl_log, fail_on=fail_on, pass_first=pass_first)
    proc = certbot.run("install", "--installer", "batch-apache", "--cert-name", NAME,
                       "--no-redirect", *apache.certbot_args(ctl=failing))
    assert_clean_failure(proc, str(failing), needle)
    # Apache was not reloaded: it still runs and serves the previous certificate
    assert apache.is_running()
    assert apache.served_cert(NAME) == placeholder
    # certbot rolled the edit back (through batch-apache): the config is as before
    vhost = (apache.vhost_root / f"{NAME}-ssl.conf").read_text()
    assert str(certbot.live(NAME)) not in vhost, vhost
    assert apache.apache2ctl("configtest", check=False).returncode == 0
