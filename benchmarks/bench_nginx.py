"""Benchmark of issue 18: `certbot renew` of K due lineages on an nginx with N SSL server blocks.

A private nginx (tests/bed/nginx.py, counting ctl wrapper) with N SSL server blocks on one
HTTPS port (one file per block in sites-available/, linked from sites-enabled/, as Debian
lays them out), each serving live/NAME/{fullchain,privkey}.pem of a farm lineage
(tests/bed/farm.py), and one default plain-HTTP server (pebble's HTTP-01 port). K of the N
lineages are due (5 days left), the others not (80 days left). The renewal confs are the
stock plugin's (``authenticator = nginx``, ``installer = nginx``, ``nginx_server_root``,
``nginx_ctl``, ``http01_port``), with ``nginx_sleep_seconds = 4``: with certbot's default of
1 s the stock plugin fails every challenge at 1,000 blocks (a reload needs ~2.5 s before
new workers answer, certbot issue 7422). Every run starts from the same pristine certbot
config dir and nginx configuration (restored by copy, nginx reloaded onto it, counts reset).
Runs, side by side, on the same confs:

* stock          ``-a nginx -i nginx``              (certbot's nginx plugin, as saved)
* batch          ``-a batch-nginx -i batch-nginx``
* engine         ``-a nginx -i nginx --batch-engine`` (the stock confs, batched in a session)
* webroot-stock  ``-a webroot -i nginx``
* webroot-engine ``-a webroot -i nginx --batch-engine``
* webroot-batch  ``-a webroot -i batch-nginx``

Per run: wall time, ``nginx -s reload``s, ``nginx -t``s, ``nginx -V``s (certbot's plugin asks
twice per prepare(), which is its full pyparsing parse: parses = -V / 2), the due
certificates renewed and served afterwards (TLS probe), and whether every file of the
nginx configuration is byte-identical afterwards. The script exits 1 when a check fails
(batch runs: all renewed and served, <= 2 reloads, 0 parses, configuration identical).

Usage::

    .venv-pypi/bin/python benchmarks/bench_nginx.py [--flavour pypi|deb] [--blocks 1000] \
        [--due 20] [--modes stock,batch,engine,webroot-stock,webroot-engine,webroot-batch] \
        [--json FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.bed import certs  # noqa: E402
from tests.bed.certbots import Certbot  # noqa: E402
from tests.bed.farm import FarmCA, make_farm  # noqa: E402
from tests.bed.nginx import Nginx  # noqa: E402
from tests.bed.pebble import Pebble  # noqa: E402

MODES = {
    "stock": ("-a", "nginx", "-i", "nginx"),
    "batch": ("-a", "batch-nginx", "-i", "batch-nginx"),
    # the stock confs, nothing renamed: inside a session certbot's nginx plugin entries
    # are batch-nginx (issue 18 item 3)
    "engine": ("-a", "nginx", "-i", "nginx", "--batch-engine"),
    "webroot-stock": ("-a", "webroot", "-i", "nginx"),
    "webroot-engine": ("-a", "webroot", "-i", "nginx", "--batch-engine"),
    "webroot-batch": ("-a", "webroot", "-i", "batch-nginx"),
}
BATCH_MODES = ("batch", "engine", "webroot-engine", "webroot-batch")


@dataclasses.dataclass
class Result:
    mode: str
    blocks: int
    due: int
    rc: int
    wall: float
    reloads: int
    configtests: int
    version_calls: int
    renewed_served: int
    config_identical: bool
    note: str = ""

    @property
    def parses(self) -> int:
        return self.version_calls // 2


def serial(certbot: Certbot, name: str) -> int:
    return certs.load_pem_chain(certbot.live(name) / "cert.pem")[0].serial_number


class Bed:
    def __init__(self, root: Path, flavour: str, blocks: int, due: int,
                 sleep_seconds: int) -> None:
        self.root = root
        self.blocks = blocks
        self.due = due
        self.sleep_seconds = sleep_seconds
        self.nginx = Nginx(root / "nginx", startup_timeout=300.0)
        self.pebble = Pebble(http_port=self.nginx.http_port)
        self.certbot: Optional[Certbot] = None
        self.flavour = flavour
        self.names: list[str] = []

    def __enter__(self) -> Bed:
        self.pebble.start()
        self.certbot = Certbot(self.flavour, self.root / "certbot", self.pebble)
        self.certbot.register()
        extra = {"installer": "nginx", "nginx_server_root": str(self.nginx.root),
                 "nginx_ctl": str(self.nginx.ctl), "http01_port": str(self.nginx.http_port),
                 "nginx_sleep_seconds": str(self.sleep_seconds)}
        common: dict[str, Any] = dict(
            ca=FarmCA.create(), server=self.pebble.directory_url, authenticator="nginx",
            webroot=str(self.nginx.webroot), extra_renewalparams=extra,
            version="2.1.0" if self.flavour == "deb" else None,
            workers=os.cpu_count() or 1)
        cfg = str(self.certbot.config_dir)
        self.names = make_farm(cfg, self.due, age=85, **common)  # 5 days left: due
        self.names += make_farm(cfg, self.blocks - self.due, age=10, start_index=self.due,
                                **common)
        for name in self.names:
            live = self.certbot.live(name)
            self.nginx.add_ssl_server(name, cert_path=live / "fullchain.pem",
                                      key_path=live / "privkey.pem")
        shutil.copytree(self.certbot.config_dir, self.root / "pristine", symlinks=True)
        shutil.copytree(self.nginx.root, self.root / "pristine-nginx", symlinks=True)
        t0 = time.monotonic()
        self.nginx.start()
        print(f"  nginx with {self.blocks} SSL server blocks started in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.pebble.cleanup()
        self.nginx.cleanup()

    def restore(self) -> dict[str, str]:
        assert self.certbot is not None
        shutil.rmtree(self.certbot.config_dir)
        shutil.copytree(self.root / "pristine", self.certbot.config_dir, symlinks=True)
        shutil.rmtree(self.certbot.work_dir, ignore_errors=True)
        self.certbot.work_dir.mkdir()
        shutil.rmtree(self.nginx.root)
        shutil.copytree(self.root / "pristine-nginx", self.nginx.root, symlinks=True)
        self.nginx.reload()
        self.nginx.reset_counts()
        return self.nginx.digest()

    def run(self, mode: str) -> Result:
        assert self.certbot is not None
        before_digest = self.restore()
        due = self.names[:self.due]
        before = {n: serial(self.certbot, n) for n in due}
        t0 = time.monotonic()
        # the stock confs name no webroot: the webroot modes give the default server's root
        webroot = ("-w", str(self.nginx.webroot)) if "webroot" in MODES[mode] else ()
        proc = self.certbot.run("renew", *MODES[mode], *webroot, timeout=6 * 3600)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], self.certbot.log_text()[-3000:])
        counts = self.nginx.counts()
        served = 0
        for name in due:
            now = serial(self.certbot, name)
            if now == before[name]:
                continue
            expected = certs.load_pem_chain(self.certbot.live(name) / "cert.pem")[0]
            if self.nginx.wait_for_cert(name, expected, timeout=30).serial_number == now:
                served += 1
        return Result(mode, self.blocks, self.due, proc.returncode, wall, counts.reload,
                      counts.configtest, counts.version, served,
                      self.nginx.digest() == before_digest)


def table(results: list[Result]) -> str:
    lines = ["| mode | SSL server blocks | due | exit | wall (s) | reloads | configtests | "
             "-V calls (parses) | due certs served after the run | config identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.mode} | {r.blocks} | {r.due} | {r.rc} | {r.wall:.1f} | "
                     f"{r.reloads} | {r.configtests} | {r.version_calls} ({r.parses}) | "
                     f"{r.renewed_served}/{r.due} | {'yes' if r.config_identical else 'NO'}"
                     f"{' ' + r.note if r.note else ''} |")
    return "\n".join(lines)


def check(results: list[Result]) -> list[str]:
    """What issue 18 promises: every due cert renewed and served; the batch runs with at
    most 2 reloads, no parse, the configuration identical; >= 20x faster than stock."""
    problems = []
    stock = next((r for r in results if r.mode == "stock"), None)
    for r in results:
        where = f"{r.mode} @ {r.blocks} blocks"
        if r.rc != 0:
            problems.append(f"{where}: exit {r.rc}")
        if r.renewed_served != r.due:
            problems.append(f"{where}: {r.renewed_served}/{r.due} renewed certs served")
        if r.mode in BATCH_MODES:
            if r.reloads > 2 or r.parses:
                problems.append(f"{where}: {r.reloads} reloads, {r.parses} parses "
                                "(want <= 2, 0)")
            if not r.config_identical:
                problems.append(f"{where}: the nginx configuration changed")
        if r.mode in ("batch", "engine") and stock is not None and stock.rc == 0 and \
                r.wall * 20 > stock.wall:
            problems.append(f"{where}: {stock.wall / r.wall:.1f}x faster than stock "
                            "(want >= 20x)")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavour", default="pypi")
    ap.add_argument("--blocks", type=int, default=1000)
    ap.add_argument("--due", type=int, default=20)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--sleep-seconds", type=int, default=4,
                    help="nginx_sleep_seconds saved in the confs (the stock plugin's wait "
                         "after each reload)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s): {', '.join(unknown)}")
    results: list[Result] = []
    base = Path(tempfile.mkdtemp(prefix="bench-nginx-", dir="/dev/shm"
                                 if os.path.isdir("/dev/shm") else None))
    os.chmod(base, 0o755)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load = os.getloadavg()
    try:
        print(f"== {args.blocks} SSL server blocks, {args.due} due ({args.flavour})",
              flush=True)
        with Bed(base, args.flavour, args.blocks, args.due, args.sleep_seconds) as bed:
            for mode in modes:
                res = bed.run(mode)
                print("  ", res, flush=True)
                results.append(res)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"certbot flavour {args.flavour}, {os.cpu_count()} CPUs, started {started}, load "
          f"average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at the end "
          f"{os.getloadavg()[0]:.2f}")
    print(table(results))
    stock = next((r for r in results if r.mode == "stock"), None)
    if stock is not None:
        for r in results:
            if r is not stock and r.wall > 0:
                print(f"  {r.mode}: {stock.wall / r.wall:.1f}x faster than stock")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"results": [dataclasses.asdict(r) for r in results]}, indent=2))
    problems = check(results)
    for problem in problems:
        print("CHECK FAILED:", problem)
    print(f"{len(problems)} check(s) failed" if problems else "all checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
