"""Benchmark of issue 5: Apache reloads and wall time of `certbot renew` with K due lineages.

A private Apache (tests/bed/apache.py, counting apachectl wrapper) with N name-based SSL
vhosts on one HTTPS port, each serving live/NAME/{fullchain,privkey}.pem of a farm lineage
(tests/bed/farm.py) renewed against a real pebble; K of the N lineages are due (the others
have 80 of 90 days left). Every run starts from the same pristine config dir (restored by
copy) and Apache reloaded onto it, then the counts are reset. Runs, side by side:

* stock   ``-a webroot -i apache``           (certbot's Apache plugin: a parse per lineage)
* batch   ``-a batch-webroot -i batch-apache``
* batch-auth ``-a batch-apache -i batch-apache`` (challenges served by Apache)

The stock run parses the configuration once per lineage (FACTS.md measured 265 s per parse
at 1,000 SSL vhosts on another layout; a few seconds on this one), so ``--stock-sizes``
picks where the full stock run is measured (default 100 vhosts) and ``--stock-sample-sizes``
renews just one due lineage the stock way (the per-lineage cost, from which the K-lineage
stock run is projected). Every row is checked (exit status, renewed certs served, reload /
configtest / parse counts); the script exits 1 when a check fails.

Usage::

    .venv-pypi/bin/python benchmarks/bench_apache.py [--flavour pypi|deb] \
        [--sizes 100,1000] [--stock-sizes 100] [--due 20] [--stock-sample-sizes 1000]
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
from tests.bed.apache import Apache  # noqa: E402
from tests.bed.certbots import Certbot  # noqa: E402
from tests.bed.farm import FarmCA, make_farm  # noqa: E402
from tests.bed.pebble import Pebble  # noqa: E402

MODES = {
    "stock": ("-a", "webroot", "-i", "apache"),
    "batch": ("-a", "batch-webroot", "-i", "batch-apache"),
    "batch-auth": ("-a", "batch-apache", "-i", "batch-apache"),
}


@dataclasses.dataclass
class Result:
    mode: str
    vhosts: int
    due: int
    rc: int
    wall: float
    graceful: int
    configtest: int
    parses: int
    renewed_served: int
    note: str = ""


def serial(certbot: Certbot, name: str) -> int:
    return certs.load_pem_chain(certbot.live(name) / "cert.pem")[0].serial_number


class Bed:
    def __init__(self, root: Path, flavour: str, vhosts: int, due: int) -> None:
        self.root = root
        self.vhosts = vhosts
        self.due = due
        self.apache = Apache(root / "apache")
        self.apache.startup_timeout = 120.0
        self.pebble = Pebble(http_port=self.apache.http_port)
        self.certbot: Optional[Certbot] = None
        self.flavour = flavour
        self.names: list[str] = []

    def __enter__(self) -> Bed:
        self.pebble.start()
        self.certbot = Certbot(self.flavour, self.root / "certbot", self.pebble,
                               env_extra=self.apache.env())
        self.certbot.register()
        ca = FarmCA.create()
        common: dict[str, Any] = dict(
            ca=ca, server=self.pebble.directory_url, webroot=str(self.apache.webroot),
            version="2.1.0" if self.flavour == "deb" else None)
        cfg = str(self.certbot.config_dir)
        self.names = make_farm(cfg, self.due, age=85, **common)  # 5 days left: due
        self.names += make_farm(cfg, self.vhosts - self.due, age=10, start_index=self.due,
                                **common)
        for name in self.names:
            live = self.certbot.live(name)
            self.apache.add_ssl_vhost(name, cert_path=live / "fullchain.pem",
                                      key_path=live / "privkey.pem")
        shutil.copytree(self.certbot.config_dir, self.root / "pristine", symlinks=True)
        t0 = time.monotonic()
        self.apache.start()
        print(f"  Apache with {self.vhosts} SSL vhosts started in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.pebble.cleanup()
        self.apache.cleanup()

    def restore(self) -> None:
        assert self.certbot is not None
        shutil.rmtree(self.certbot.config_dir)
        shutil.copytree(self.root / "pristine", self.certbot.config_dir, symlinks=True)
        shutil.rmtree(self.certbot.work_dir, ignore_errors=True)
        self.certbot.work_dir.mkdir()
        self.apache.reload()
        self.apache.reset_counts()

    def run(self, mode: str, extra: tuple[str, ...] = ()) -> Result:
        assert self.certbot is not None
        self.restore()
        due = self.names[:self.due]
        before = {n: serial(self.certbot, n) for n in due}
        t0 = time.monotonic()
        proc = self.certbot.run("renew", *MODES[mode], *self.apache.certbot_args(), *extra,
                                timeout=6 * 3600)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], self.certbot.log_text()[-3000:])
        counts = self.apache.counts()
        # certbot's configurator asks for modules when it parses (DUMP_RUN_CFG alone is
        # certbot-batch asking for the pid file that confirms its reload).
        parses = sum("DUMP_MODULES" in c for c in self.apache.ctl_calls())
        served = 0
        for name in due:
            now = serial(self.certbot, name)
            if now == before[name]:
                continue
            expected = certs.load_pem_chain(self.certbot.live(name) / "cert.pem")[0]
            if self.apache.wait_for_cert(name, expected, timeout=30).serial_number == now:
                served += 1
        return Result(mode, self.vhosts, self.due, proc.returncode, wall, counts.graceful,
                      counts.configtest, parses, served)

    def probe_stock_one(self) -> Result:
        """The stock run on a sample: `renew --cert-name` of ONE due lineage with
        `-a webroot -i apache` (one parse, one reload): the per-lineage cost at this size."""
        res = self.run("stock", ("--cert-name", self.names[0]))
        res.note = "(sample: 1 of the due lineages, --cert-name)"
        res.due = 1
        res.renewed_served = min(res.renewed_served, 1)
        return res


def table(results: list[Result]) -> str:
    lines = ["| mode | SSL vhosts | due | exit | wall (s) | graceful reloads | configtests | "
             "config parses | due certs served after the run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.mode} | {r.vhosts} | {r.due} | {r.rc} | {r.wall:.1f} | "
                     f"{r.graceful} | {r.configtest} | {r.parses} | {r.renewed_served}/{r.due}"
                     f"{' ' + r.note if r.note else ''} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavour", default="pypi")
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--stock-sizes", default="100")
    ap.add_argument("--due", type=int, default=20)
    ap.add_argument("--stock-sample-sizes", default="",
                    help="sizes at which the stock run renews ONE due lineage only "
                         "(--cert-name), to measure its per-lineage cost")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    stock_sizes = {int(s) for s in args.stock_sizes.split(",") if s}
    sample_sizes = {int(s) for s in args.stock_sample_sizes.split(",") if s}
    results: list[Result] = []
    base = Path(tempfile.mkdtemp(prefix="bench-apache-", dir="/dev/shm"
                                 if os.path.isdir("/dev/shm") else None))
    os.chmod(base, 0o755)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        for size in sizes:
            print(f"== {size} SSL vhosts, {args.due} due ({args.flavour})", flush=True)
            with Bed(base / str(size), args.flavour, size, args.due) as bed:
                modes = (["stock"] if size in stock_sizes else []) + ["batch", "batch-auth"]
                for mode in modes:
                    res = bed.run(mode)
                    print("  ", res, flush=True)
                    results.append(res)
                if size in sample_sizes:
                    res = bed.probe_stock_one()
                    print("  ", res, flush=True)
                    results.append(res)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"certbot flavour {args.flavour}, {os.cpu_count()} CPUs, started {started}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"results": [dataclasses.asdict(r) for r in results]}, indent=2))
    problems = check(results)
    for problem in problems:
        print("CHECK FAILED:", problem)
    print(f"{len(problems)} check(s) failed" if problems else "all checks passed")
    return 1 if problems else 0


def check(results: list[Result]) -> list[str]:
    """What issue 5 promises, per row: every due cert renewed and served; batch = one
    configtest + one graceful and no parse; batch-auth = at most 2 reloads, no parse."""
    problems = []
    for r in results:
        where = f"{r.mode} @ {r.vhosts} vhosts"
        if r.rc != 0:
            problems.append(f"{where}: exit {r.rc}")
        if r.renewed_served != r.due:
            problems.append(f"{where}: {r.renewed_served}/{r.due} renewed certs served")
        if r.mode == "batch" and (r.graceful, r.configtest, r.parses) != (1, 1, 0):
            problems.append(f"{where}: {r.graceful} reloads, {r.configtest} configtests, "
                            f"{r.parses} parses (want 1, 1, 0)")
        if r.mode == "batch-auth" and (r.graceful > 2 or r.parses):
            problems.append(f"{where}: {r.graceful} reloads, {r.parses} parses (want <= 2, 0)")
    return problems


if __name__ == "__main__":
    sys.exit(main())
