"""The first law, command by command: with certbot-batch installed but not in use, every
certbot command a user runs (not only ``renew``) behaves exactly as the same certbot without
certbot-batch: same exit code, same output (every line), same files and modes left behind.

Twins: two certbot dirs of the same flavour at the same pebble, one with certbot-batch
visible, one with it made invisible (tests/bed/hiding.py); each step runs on both at once
and their normalized results must be equal. The stock Apache installer steps run against
two private Apaches (one per twin, built from the same baseline), the HTTP-01 challenges of
both twins are served by the first one (the one pebble validates against).
"""
from __future__ import annotations

import concurrent.futures
import difflib
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.bed import hiding
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.pebble import Pebble

Step = tuple[str, ...]


class Twin:
    def __init__(self, label: str, bot: Certbot, apache: Apache, webroot: Path,
                 prelude: str = "") -> None:
        self.label = label
        self.bot = bot
        self.apache = apache
        self.webroot = webroot
        self.prelude = prelude
        self.account = ""

    def expand(self, step: Step) -> list[str]:
        out: list[str] = []
        for arg in step:
            if arg == "{APACHE}":
                out += self.apache.certbot_args()
            else:
                out.append(arg.replace("{WEBROOT}", str(self.webroot)))
        return out

    def run(self, step: Step) -> tuple[int, str, str]:
        cmd = self.bot.command(*self.expand(step))
        cmd[2] = self.prelude + cmd[2]
        env = self.bot.env(self.apache.env())
        env.pop("CERTBOT_PLUGIN_PATH", None)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=self.bot.base_dir, timeout=240, check=False)
        if not self.account:
            ids = [p.parent.name for p in (self.bot.config_dir / "accounts").rglob("regr.json")]
            self.account = ids[0] if ids else ""
        return proc.returncode, self.norm(proc.stdout), self.norm(proc.stderr)

    def norm(self, text: str) -> str:
        text = text.replace(str(self.bot.base_dir), "<BASE>")
        text = text.replace(str(self.apache.dir), "<APACHE>")
        for port, label in ((self.apache.http_port, "<HTTP>"), (self.apache.https_port, "<HTTPS>")):
            text = re.sub(rf"\b{port}\b", label, text)
        if self.account:
            text = text.replace(self.account, "<ACCOUNT>")
        text = re.sub(r"/my-account/\w+", "/my-account/<ID>", text)
        text = re.sub(r"\b[0-9a-fA-F]{16,}\b", "<HEX>", text)  # serials, account URLs
        text = re.sub(r"\d\d:\d\d:\d\d(\.\d+)?", "<TIME>", text)
        text = re.sub(r"(Serial Number|Account Thumbprint): \S+", r"\1: <ID>", text)
        text = re.sub(r"certbot-log-\w+", "certbot-log-<TMP>", text)  # mkdtemp's name
        # seconds of a run's duration, in "(... took N.NN s)"-style debug lines, if any
        return re.sub(r"\d+\.\d+ ?s\b", "<SECS>", text)

    def tree(self) -> list[str]:
        """Every file and dir certbot left in its dirs: relative path, type and mode (the
        installer's backup dirs are named by the time)."""
        out: list[str] = []
        for top in (self.bot.config_dir, self.bot.work_dir):
            for root, dirs, files in os.walk(top):
                for name in dirs + files:
                    path = Path(root, name)
                    rel = str(path.relative_to(self.bot.base_dir))
                    if self.account:
                        rel = rel.replace(self.account, "<ACCOUNT>")
                    rel = re.sub(r"/backups/[0-9.]+", "/backups/<TIME>", rel)
                    st = path.lstat()
                    kind = ("link" if stat.S_ISLNK(st.st_mode) else
                            "dir" if stat.S_ISDIR(st.st_mode) else "file")
                    out.append(f"{rel} {kind} {stat.S_IMODE(st.st_mode):o}")
        return sorted(out)


def _steps(version: tuple[int, ...]) -> list[tuple[Step, Optional[int]]]:
    """The commands, each with the exit code stock certbot has (None: whatever it is)."""
    steps: list[tuple[Step, Optional[int]]] = [
        (("--version",), 0),
        (("register",), 0),
        (("certonly", "-a", "webroot", "-w", "{WEBROOT}", "-d", "a.test", "-d", "www.a.test"),
         0),
        (("certonly", "--webroot", "-w", "{WEBROOT}", "-d", "b.test", "--key-type", "ecdsa",
          "--deploy-hook", "true"), 0),
        (("certificates",), 0),
        (("certificates", "--cert-name", "nothere.test"), 0),
        (("renew", "--dry-run"), 0),
        (("renew",), 0),  # nothing due
        (("renew", "--cert-name", "a.test", "--force-renewal"), 0),
        (("renew", "--cert-name", "nothere.test"), 1),
        (("certonly", "-a", "webroot", "-w", "/nonexistent/dir", "-d", "c.test"), 1),
        (("certonly", "-a", "webroot", "-w", "{WEBROOT}", "-d", "not_a valid!name"), 1),
        (("certonly", "--no-such-option"), 2),
        (("update_symlinks",), None),  # gone in certbot 5
        (("run", "-a", "webroot", "-w", "{WEBROOT}", "-i", "apache", "{APACHE}",
          "-d", "ap.test", "--redirect"), 0),
        (("enhance", "--cert-name", "ap.test", "-i", "apache", "{APACHE}", "--hsts"), 0),
        (("install", "--cert-name", "b.test", "-i", "apache", "{APACHE}", "-d", "ap.test"),
         None),
        (("revoke", "--cert-name", "b.test", "--no-delete-after-revoke"), 0),
        (("delete", "--cert-name", "a.test"), 0),
        (("show_account",), 0),
        (("unregister",), 0),
    ]
    if version >= (2, 3):  # certbot 2.3 brought `reconfigure`
        steps.insert(9, (("reconfigure", "--cert-name", "b.test", "-a", "webroot",
                          "-w", "{WEBROOT}"), 0))
    return steps


def _diff(step: Step, ours: tuple[int, str, str], stock: tuple[int, str, str]) -> str:
    lines = [f"certbot {' '.join(step)}: exit {ours[0]} with certbot-batch, {stock[0]} without"]
    for what, a, b in (("stdout", ours[1], stock[1]), ("stderr", ours[2], stock[2])):
        lines += difflib.unified_diff(b.splitlines(), a.splitlines(), f"{what} stock",
                                      f"{what} with certbot-batch", lineterm="")
    return "\n".join(lines)


@pytest.mark.versions
def test_every_command_is_stock(certbot_flavour: str, tmp_path: Path, apache: Apache,
                                pebble: Pebble) -> None:
    ours_bot = Certbot(certbot_flavour, tmp_path / "ours", pebble)
    stock_bot = Certbot(certbot_flavour, tmp_path / "stock", pebble)
    hidden = hiding.without_certbot_batch(stock_bot.python, tmp_path / "mirror")
    probe = subprocess.run([str(stock_bot.python), "-c",
                            hiding.prelude(hidden) + hiding.VISIBLE_PROBE],
                           capture_output=True, text=True, check=True, env=stock_bot.env())
    assert probe.stdout.split() == ["False", "False"], probe
    # Each twin installs into its own Apache; pebble validates against the first one, so
    # both twins answer HTTP-01 in its DocumentRoot (made beforehand: no twin removes it).
    (apache.webroot / ".well-known" / "acme-challenge").mkdir(parents=True, exist_ok=True)
    apache.add_http_vhost("ap.test", docroot=apache.webroot)
    apache.reload()
    with Apache() as second:
        second.add_http_vhost("ap.test", docroot=second.webroot)
        second.reload()
        twins = (Twin("ours", ours_bot, apache, apache.webroot),
                 Twin("stock", stock_bot, second, apache.webroot, hiding.prelude(hidden)))
        pool = concurrent.futures.ThreadPoolExecutor(2)
        with pool:
            for step, expected in _steps(ours_bot.version_info):
                run: Callable[[Twin], tuple[int, str, str]] = lambda t: t.run(step)  # noqa: B023,E731
                ours, stock = pool.map(run, twins)
                assert ours == stock, _diff(step, ours, stock)
                code, stdout, stderr = ours
                assert "Traceback" not in stdout + stderr, (step, stdout, stderr)
                assert "certbot-batch" not in stdout + stderr, (step, stdout, stderr)
                if expected is not None:
                    assert code == expected, (step, code, stdout, stderr)
        assert twins[0].tree() == twins[1].tree()
        # the stock Apache installer's work: same vhosts, same enabled set
        for sub in ("sites-available", "sites-enabled"):
            ours_sites = {p.name: twins[0].norm(p.read_text())
                          for p in sorted((apache.root / sub).iterdir())}
            stock_sites = {p.name: twins[1].norm(p.read_text())
                           for p in sorted((second.root / sub).iterdir())}
            assert ours_sites == stock_sites, sub
        assert "ap.test-le-ssl.conf" in ours_sites
        # a2enmod (run by the installer for --redirect/--hsts) kept to the private Apaches
        for server in (apache, second):
            assert sorted(p.name for p in server.state_dir.rglob("*") if p.is_file()) \
                == ["headers", "rewrite"]
    # never engaged: nothing of ours was left behind
    assert not (ours_bot.work_dir / "certbot-batch").exists()
    assert "certbot-batch renewal session" not in ours_bot.log_text()
