"""The installed Debian package python3-certbot-batch, driven by apt's /usr/bin/certbot.

Runs only with CERTBOT_BATCH_DEB_INSTALLED=1: scripts/test-deb.sh (after it installed the
.deb in a private mount namespace) and the autopkgtest (debian/tests/renew-with-pebble), where
the package is the only certbot-batch that /usr/bin/python3 sees. No environment variable
points certbot at the plugins: they must be found where apt put them.

The bed (pebble, a private Apache on loopback) comes from tests/bed/; certbot's directories
and the CA come from a cli.ini in $XDG_CONFIG_HOME (certbot's own user config file), so the
documented commands and the shipped examples run as written (tests/test_docs.py).
"""
from __future__ import annotations

import fcntl
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests import docblocks
from tests.bed import certbots, certs
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA, make_farm
from tests.bed.pebble import Pebble
from tests.docblocks import output

pytestmark = pytest.mark.skipif(
    os.environ.get("CERTBOT_BATCH_DEB_INSTALLED") != "1",
    reason="the Debian package is not installed (scripts/test-deb.sh sets "
           "CERTBOT_BATCH_DEB_INSTALLED=1 after installing it)")

ROOT = Path(__file__).resolve().parent.parent
CERTBOT = "/usr/bin/certbot"
PACKAGE = "python3-certbot-batch"
DOC = Path("/usr/share/doc") / PACKAGE
EXAMPLES = DOC / "examples"
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
SKIP_IF_LOCKED = "--batch-skip-if-locked"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def apt_flavour() -> str:
    """The configured flavour that runs apt's /usr/bin/python3 (the interpreter of
    /usr/bin/certbot), e.g. CERTBOT_BATCH_FLAVOURS=system=/usr/bin/python3."""
    for name in certbots.flavours():
        if certbots.python_for(name) == Path("/usr/bin/python3"):
            return name
    pytest.skip("no certbot flavour runs /usr/bin/python3 "
                "(CERTBOT_BATCH_FLAVOURS=system=/usr/bin/python3)")


class AptCertbot(Certbot):
    """The bed's certbot, started as /usr/bin/certbot itself."""

    def command(self, *args: str) -> list[str]:
        cmd = super().command(*args)
        assert cmd[1] == "-c"
        return [CERTBOT, *cmd[3:]]


def installed_version() -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE],
                          capture_output=True, text=True, check=True)
    return proc.stdout.rsplit("-", 1)[0]


def skip_if_locked_known() -> bool:
    proc = subprocess.run([CERTBOT, "--help", "batch-webroot"], capture_output=True,
                          text=True, env=certbots.clean_env(), check=False, timeout=120)
    return SKIP_IF_LOCKED in proc.stdout


# -- the package --------------------------------------------------------------------------------

def test_installed_where_apt_puts_it() -> None:
    files = set(subprocess.run(["dpkg-query", "-L", PACKAGE], capture_output=True, text=True,
                               check=True).stdout.split())
    for path in ("/usr/bin/certbot-batch", "/usr/share/man/man1/certbot-batch.1.gz",
                 f"{DOC}/copyright", f"{DIST_PACKAGES}/certbot_batch/__init__.py",
                 f"{EXAMPLES}/systemd/certbot.timer.d/certbot-batch.conf",
                 f"{EXAMPLES}/systemd/certbot.service.d/certbot-batch.conf",
                 f"{EXAMPLES}/cron/certbot-batch"):
        assert path in files, path
    assert not any(f.startswith(("/etc/systemd", "/lib/systemd", "/usr/lib/systemd",
                                 "/etc/cron")) for f in files), "enabled by default?"
    dist_info = [f for f in files if re.search(r"/certbot_batch-[^/]+\.dist-info/"
                                               r"entry_points\.txt$", f)]
    assert len(dist_info) == 1, files
    probe = subprocess.run(["/usr/bin/python3", "-c", "import certbot_batch; "
                            "print(certbot_batch.__file__, certbot_batch.__version__)"],
                           capture_output=True, text=True, check=True,
                           env=certbots.clean_env())
    where, version = probe.stdout.split()
    assert where == f"{DIST_PACKAGES}/certbot_batch/__init__.py"
    assert version == installed_version()


def test_depends_on_the_supported_certbot() -> None:
    depends = subprocess.run(["dpkg-query", "-W", "-f=${Depends}|${Enhances}|${Recommends}",
                              PACKAGE], capture_output=True, text=True, check=True).stdout
    deps, enhances, recommends = depends.split("|")
    for item in ("certbot", "python3-certbot (>= 2.1)", "python3-certbot (<< 6)",
                 "python3-acme", "python3-cryptography", "python3-requests",
                 "python3-urllib3", "python3-configobj"):
        assert item in [d.strip() for d in deps.split(",")], (item, deps)
    assert enhances == "certbot"
    assert recommends == "python3-certbot-apache, python3-certbot-nginx"


def test_usr_bin_certbot_lists_the_plugins(tmp_path: Path) -> None:
    env = docblocks.cli_ini_env(tmp_path)
    assert "CERTBOT_PLUGIN_PATH" not in env and "PYTHONPATH" not in env
    proc = subprocess.run([CERTBOT, "plugins", "--text"], capture_output=True, text=True,
                          env=env, check=False, timeout=120)
    assert proc.returncode == 0, output(proc)
    assert "* batch-webroot" in proc.stdout and "* batch-apache" in proc.stdout
    assert "Duplicate plugin" not in output(proc) and "Traceback" not in output(proc)


def test_man_page_and_version(tmp_path: Path) -> None:
    env = dict(certbots.clean_env(), HOME=str(tmp_path), PATH=PATH, MANWIDTH="80")
    where = subprocess.run(["man", "-w", "certbot-batch"], capture_output=True, text=True,
                           env=env, check=False)
    assert where.stdout.strip() == "/usr/share/man/man1/certbot-batch.1.gz", output(where)
    page = subprocess.run(["man", "-P", "cat", "certbot-batch"], capture_output=True,
                          text=True, env=env, check=False)
    assert page.returncode == 0, output(page)
    for needle in ("certbot-batch - renewal status", "BATCH OPTIONS OF CERTBOT RENEW",
                   "--batch-engine", "--config-dir DIR"):
        assert needle in page.stdout, needle
    version = subprocess.run(["certbot-batch", "--version"], capture_output=True, text=True,
                             env=env, check=True)
    assert version.stdout == f"certbot-batch {installed_version()}\n"


# -- renewals with /usr/bin/certbot -----------------------------------------------------------

class Site:
    """A registered account at the bed's pebble, lineages whose SSL vhosts the private
    Apache serves, and a cli.ini in $XDG_CONFIG_HOME with everything certbot needs."""

    def __init__(self, tmp: Path, apache: Apache, pebble: Pebble) -> None:
        self.tmp, self.apache, self.pebble = tmp, apache, pebble
        self.bot = AptCertbot(apt_flavour(), tmp, pebble, env_extra=apache.env())
        self.bot.register()
        self.ca = FarmCA.create("deb test CA")
        settings = [f"server = {pebble.directory_url}", "non-interactive = true",
                    "no-random-sleep-on-renew = true"]
        args = apache.certbot_args()
        settings += [f"{k[2:]} = {v}" for k, v in zip(args[::2], args[1::2])]
        self.env = docblocks.cli_ini_env(tmp, "\n".join(settings) + "\n")
        self.env.update(apache.env(), REQUESTS_CA_BUNDLE=str(pebble.ca_bundle), PATH=PATH)

    def lineages(self, count: int, prefix: str, **kwargs: object) -> list[str]:
        names = make_farm(str(self.bot.config_dir), count, ca=self.ca,
                          server=self.pebble.directory_url, webroot=str(self.apache.webroot),
                          name_fmt=prefix + "{i}.example.test", version=self.bot.version,
                          **kwargs)  # type: ignore[arg-type]
        for name in names:
            live = self.bot.live(name)
            self.apache.add_ssl_vhost(name, cert_path=live / "fullchain.pem",
                                      key_path=live / "privkey.pem")
        self.apache.reload()
        self.apache.reset_counts()
        return names

    def versions(self, name: str) -> int:
        return len(list((self.bot.config_dir / "archive" / name).glob("cert*.pem")))

    def run(self, command: list[str] | str) -> subprocess.CompletedProcess[str]:
        if isinstance(command, str):
            return docblocks.run_block(command, self.env, self.tmp)
        return subprocess.run(command, capture_output=True, text=True, env=self.env,
                              cwd=self.tmp, check=False, timeout=600)


@pytest.fixture()
def site(tmp_path: Path, apache: Apache, pebble: Pebble) -> Iterator[Site]:
    yield Site(tmp_path, apache, pebble)


def test_batched_renewal_with_usr_bin_certbot(site: Site) -> None:
    names = site.lineages(3, "batch")
    proc = site.bot.run("renew", "--force-renewal", "-a", "batch-webroot", "-i",
                        "batch-apache", *site.apache.certbot_args())
    assert proc.returncode == 0, output(proc) + site.bot.log_text()[-6000:]
    assert "Traceback" not in output(proc)
    counts = site.apache.counts()
    assert (counts.configtest, counts.graceful) == (1, 1), site.apache.ctl_calls()
    for name in names:
        assert site.versions(name) == 2, name
        live = certs.load_pem_chain(site.bot.live(name) / "cert.pem")[0]
        assert site.apache.wait_for_cert(name, live).serial_number == live.serial_number


def test_documented_use(site: Site) -> None:
    names = site.lineages(2, "use")
    proc = site.run(docblocks.block(ROOT / "docs" / "debian.md", "deb-use"))
    assert proc.returncode == 0, output(proc) + site.bot.log_text()[-6000:]
    assert all(site.versions(n) == 2 for n in names), output(proc)
    for name in names:  # the renewal confs remember the batch plugins
        conf = site.bot.renewal_conf(name).read_text()
        assert "authenticator = batch-webroot" in conf and "installer = batch-apache" in conf
    # certbot-batch status read the directories from the same cli.ini: a table of both.
    table = proc.stdout[proc.stdout.rindex("lineage "):]
    assert all(name in table for name in names), table
    assert "2 lineage(s), 0 due, 0 needing attention" in table
    # Before removing the package: back to the stock plugins, settings kept.
    proc = site.run(docblocks.block(ROOT / "docs" / "debian.md", "deb-revert"))
    assert proc.returncode == 0, output(proc) + site.bot.log_text()[-6000:]
    for name in names:
        assert site.versions(name) == 3, output(proc)
        conf = site.bot.renewal_conf(name).read_text()
        assert "authenticator = webroot" in conf and "installer = apache" in conf, conf
        assert f"apache_server_root = {site.apache.root}" in conf
        live = certs.load_pem_chain(site.bot.live(name) / "cert.pem")[0]
        assert site.apache.wait_for_cert(name, live).serial_number == live.serial_number


def _verify(*units: Path) -> str:
    return docblocks.verify_command(*units)


def test_timer_dropins_and_the_hourly_command(site: Site) -> None:
    """The documented command enables the shipped drop-ins; their ExecStart, run as written,
    renews what is due, is quiet when nothing is, and exits 0 when another certbot holds
    the lock."""
    etc = Path("/etc/systemd/system")
    if not os.environ.get("CERTBOT_BATCH_DEB_PRIVATE_ETC") == "1":
        pytest.skip("/etc is the host's here (test-deb.sh gives the test a private /etc)")
    units = [Path("/lib/systemd/system", n) for n in ("certbot.timer", "certbot.service")]
    proc = site.run(docblocks.substitute(
        docblocks.block(ROOT / "docs" / "debian.md", "deb-timer"),
        [("systemctl daemon-reload", _verify(*units))]))
    assert proc.returncode == 0 and output(proc) == "", output(proc)
    for rel in ("certbot.timer.d/certbot-batch.conf", "certbot.service.d/certbot-batch.conf"):
        assert (etc / rel).read_text() == (EXAMPLES / "systemd" / rel).read_text()
    command = docblocks.exec_start((etc / "certbot.service.d/certbot-batch.conf").read_text())
    known = skip_if_locked_known()
    if not known:  # not in options.py yet: the rest of the command must work
        command[-1] = command[-1].replace(f" {SKIP_IF_LOCKED}", "")

    fresh = site.lineages(1, "fresh")
    due = site.lineages(2, "due", age=85, authenticator="webroot")  # 5 days left: due
    proc = site.run(command)
    assert proc.returncode == 0, output(proc) + site.bot.log_text()[-6000:]
    assert output(proc) == "", output(proc)  # -q
    assert [site.versions(n) for n in due + fresh] == [2, 2, 1]
    assert (site.bot.work_dir / "certbot-batch" / "state.sqlite").exists()
    # The next hour: nothing due, nothing to say, nothing renewed.
    proc = site.run(command)
    assert proc.returncode == 0 and output(proc) == "", output(proc)
    assert [site.versions(n) for n in due + fresh] == [2, 2, 1]
    if not known:
        pytest.skip(f"{SKIP_IF_LOCKED} is not in this certbot-batch yet (options.py)")
    # Another certbot holds the lock (certbot locks each of its directories).
    lock = site.bot.config_dir / ".certbot.lock"
    with open(lock, "a") as fh:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = site.run(command)
    assert proc.returncode == 0, output(proc)
    assert len(output(proc).strip().splitlines()) == 1, output(proc)


def test_cron_file(site: Site) -> None:
    if not os.environ.get("CERTBOT_BATCH_DEB_PRIVATE_ETC") == "1":
        pytest.skip("/etc is the host's here (test-deb.sh gives the test a private /etc)")
    stock = Path("/etc/cron.d/certbot")
    if not stock.exists():
        pytest.skip("no /etc/cron.d/certbot (Debian's certbot package)")
    proc = site.run(docblocks.block(ROOT / "docs" / "scheduling.md", "cron"))
    assert proc.returncode == 0 and output(proc) == "", output(proc)
    installed = Path("/etc/cron.d/certbot-batch")
    assert installed.read_text() == (EXAMPLES / "cron" / "certbot-batch").read_text()
    jobs = [line for line in stock.read_text().splitlines() if "certbot -q renew" in line]
    assert jobs and all(line.startswith("#") for line in jobs), jobs
    # The job's command, as cron runs it (sh -c), without its random sleep of up to 9 min.
    line = next(line for line in installed.read_text().splitlines()
                if line and not line.startswith("#") and "renew" in line)
    command = line.split(None, 6)[6]
    sleep = "perl -e 'sleep int(rand(540))'"
    assert sleep in command
    if not skip_if_locked_known():
        command = command.replace(f" {SKIP_IF_LOCKED}", "")
    if Path("/run/systemd/system").exists():
        pytest.skip("systemd runs here: the cron job steps aside for the timer")
    due = site.lineages(1, "crondue", age=85, authenticator="webroot")
    proc = site.run(["sh", "-c", command.replace(sleep, "true")])
    assert proc.returncode == 0 and output(proc) == "", output(proc)
    assert site.versions(due[0]) == 2

