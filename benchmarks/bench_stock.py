"""Benchmark of issue 18, item 3: lineages saved with certbot's own plugins, renewed by stock
certbot and by ``certbot renew --batch-engine`` on the same confs (nothing rewritten).

Three farms of K lineages (default 20), each on a real pebble (validation delays on:
``--sleeptime``, default 5, as in bench_challenges.py) and a private Apache whose SSL vhosts
serve the lineages' live/ files:

* ``webroot+apache``: ``authenticator = webroot``, ``installer = apache``;
* ``apache+apache``:  ``authenticator = apache``,  ``installer = apache``;
* ``standalone``:     ``authenticator = standalone`` on the saved ``http01_port``.

For each, two copies of the farm: stock (certbot-batch invisible: tests/bed/hiding.py)
``certbot renew --force-renewal`` and ours ``certbot renew --force-renewal --batch-engine``.
Reported: wall time, speed-up, Apache reloads, provisioning actions; checked: every lineage
renewed, the renewal confs still name certbot's plugins. Exits 1 when a check fails.

Usage::

    .venv-pypi/bin/python benchmarks/bench_stock.py [-k 20] [--sleeptime 5]
        [--flavour pypi|deb] [--json FILE] [--only webroot+apache,standalone]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from tests.bed import farm, hiding, ports  # noqa: E402
from tests.bed.apache import Apache  # noqa: E402
from tests.bed.certbots import Certbot  # noqa: E402
from tests.bed.pebble import Pebble  # noqa: E402

WAVE = re.compile(r"\((\d+) provisioning action\(s\), (\d+) cleanup\(s\)")
SETUPS = {
    "webroot+apache": ("webroot", "apache"),
    "apache+apache": ("apache", "apache"),
    "standalone": ("standalone", None),
}


def _plugins(conf: Path) -> tuple[Optional[str], Optional[str]]:
    text = conf.read_text()
    auth = re.search(r"^authenticator = (\S+)", text, re.MULTILINE)
    inst = re.search(r"^installer = (\S+)", text, re.MULTILINE)
    return (auth.group(1) if auth else None, inst.group(1) if inst else None)


def _one(setup: str, mode: str, args: argparse.Namespace, base: Path,
         checks: list[str]) -> dict[str, Any]:
    authenticator, installer = SETUPS[setup]
    # No "+" in paths: a2enmod (run by certbot's Apache authenticator) matches its module
    # directory as a regular expression and then finds no module.
    tag = setup.replace("+", "-")
    standalone_port = ports.free_port() if authenticator == "standalone" else None
    with Apache(base / f"{tag}-{mode}-apache") as apache, \
            Pebble(standalone_port or apache.http_port, va_sleeptime=args.sleeptime,
                   authz_reuse=0, base_dir=base / f"{tag}-{mode}-pebble") as pebble:
        bot = Certbot(args.flavour, base / f"{tag}-{mode}", pebble, env_extra=apache.env())
        bot.register()
        extra: dict[str, str] = {}
        if "apache" in (authenticator, installer):
            extra.update({"apache_server_root": str(apache.root),
                          "apache_vhost_root": str(apache.vhost_root),
                          "apache_logs_root": str(apache.log_dir),
                          "apache_challenge_location": str(apache.challenge_location),
                          "apache_ctl": str(apache.ctl)})
        if authenticator == "apache":
            # certbot's Apache authenticator looks for the vhosts on http01_port (80 by
            # default); the private Apache listens elsewhere.
            extra["http01_port"] = str(apache.http_port)
        if standalone_port:
            extra.update({"http01_port": str(standalone_port),
                          "http01_address": "127.0.0.1"})
        names = farm.make_farm(str(bot.config_dir), args.k, ca=farm.FarmCA.create(setup),
                               server=pebble.directory_url, webroot=str(apache.webroot),
                               authenticator=authenticator, installer=installer,
                               extra_renewalparams=extra or None,
                               name_fmt=f"{mode}{{i}}.test", version=bot.version)
        for name in names:
            live = bot.live(name)
            apache.add_ssl_vhost(name, cert_path=live / "fullchain.pem",
                                 key_path=live / "privkey.pem")
        apache.reload()
        apache.reset_counts()
        cmd = bot.command("renew", "--force-renewal",
                          *(["--batch-engine"] if mode == "ours" else []))
        if mode == "stock":
            hidden = hiding.without_certbot_batch(bot.python, base / f"{tag}-mirror")
            cmd[2] = hiding.prelude(hidden) + cmd[2]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=bot.env(),
                              cwd=bot.base_dir, timeout=3600, check=False)
        wall = time.monotonic() - t0
        text = proc.stdout + proc.stderr
        renewed = sum(1 for n in names if (bot.config_dir / "archive" / n / "cert2.pem")
                      .exists())
        unchanged = all(_plugins(bot.renewal_conf(n)) == (authenticator, installer)
                        for n in names)
        waves = WAVE.findall(text)
        row = {"setup": setup, "mode": mode, "wall_s": round(wall, 1), "rc": proc.returncode,
               "renewed": renewed, "reloads": apache.counts().graceful,
               "provisioning_actions": sum(int(w[0]) for w in waves) if waves else None,
               "confs_unchanged": unchanged}
        if renewed != args.k or proc.returncode != 0 or not unchanged:
            checks.append(f"{setup}/{mode}: {row}: {text[-2000:]}")
        print(json.dumps(row), flush=True)
        return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--sleeptime", type=int, default=5)
    ap.add_argument("--flavour", choices=["pypi", "deb"], default="pypi")
    ap.add_argument("--only", default=",".join(SETUPS))
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-stock-"))
    base.chmod(0o755)
    checks: list[str] = []
    rows = []
    try:
        for setup in args.only.split(","):
            stock = _one(setup, "stock", args, base, checks)
            ours = _one(setup, "ours", args, base, checks)
            ours["speedup"] = round(stock["wall_s"] / ours["wall_s"], 1)
            rows += [stock, ours]
            print(f"{setup}: stock {stock['wall_s']} s, {stock['reloads']} reloads; "
                  f"--batch-engine {ours['wall_s']} s, {ours['reloads']} reloads, "
                  f"{ours['provisioning_actions']} provisioning action(s): "
                  f"{ours['speedup']}x", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": common.machine_facts(args.flavour),
                                               "rows": rows}, indent=2))
    for problem in checks:
        print(f"CHECK FAILED: {problem}")
    return 1 if checks else 0


if __name__ == "__main__":
    sys.exit(main())
