"""Benchmark of issue 19: a mass renewal in one run.

N lineages (default 10,000) whose ARI windows are all in the past at once (the CA's "renew
now" for every certificate: LE's drill of 2026-03-19, DigiCert's 24-hour revocation of 2024),
batch-webroot, a real pebble without validation delay, HTTP-01 served by a private Apache
from the farm's webroot. Our ARI responder (tests/bed/responder.py) sits in front of pebble's
directory and answers a window that ended yesterday for every certID (pebble 2.4 has no ARI).

* ours:  ``certbot renew`` (the renewal confs name batch-webroot): every lineage must be
  renewed in this one run, exit 0, one provisioning action per wave;
* stock: certbot with certbot-batch made invisible (tests/bed/hiding.py), ``certbot renew``
  on a sample of the same farm (default 100 lineages), projected linearly to N (its loop is
  serial).

Reported: wall time, certificates per second, peak RSS, waves, provisioning actions, orders
at pebble. Exits 1 when a check fails.

Usage::

    .venv-pypi/bin/python benchmarks/bench_mass.py [--lineages 10000] [--stock-sample 100]
        [--flavour pypi|deb] [--batch-size 100] [--tuned "OPTIONS"] [--json FILE]

``--tuned`` adds a third run, ours with those options on a farm of its own (the default
``--batch-acme-rate`` of 100 requests/s bounds a wave to about 12 lineages/s: a lineage
costs about 8 ACME requests).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from tests.bed import farm, hiding  # noqa: E402
from tests.bed.apache import Apache  # noqa: E402
from tests.bed.certbots import Certbot  # noqa: E402
from tests.bed.pebble import Pebble  # noqa: E402
from tests.bed.responder import Responder, window_policy  # noqa: E402

WAVE = re.compile(r"certbot-batch: (\d+) lineage\(s\) validated and issued, (\d+) failed, in "
                  r"([\d.]+) s \((\d+) provisioning action\(s\)")
PAST = (datetime.timedelta(days=-2), datetime.timedelta(days=-1))


class Via:
    """What certbot talks to: the responder's directory (pebble's endpoints + renewalInfo)."""

    def __init__(self, directory_url: str, ca_bundle: Path) -> None:
        self.directory_url = directory_url
        self.ca_bundle = ca_bundle


def _account(config_dir: Path) -> str:
    ids = [p.name for p in (config_dir / "accounts").rglob("*")
           if p.is_dir() and (p / "private_key.json").exists()]
    if not ids:
        raise SystemExit(f"no account under {config_dir}")
    return ids[0]


def _renewed(config_dir: Path, names: list[str]) -> int:
    return sum(1 for n in names if (config_dir / "archive" / n / "cert2.pem").exists())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lineages", type=int, default=10000)
    ap.add_argument("--stock-sample", type=int, default=100)
    ap.add_argument("--flavour", choices=["pypi", "deb"], default="pypi")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--tuned", default="", metavar="OPTIONS",
                    help="also run ours with these options on a farm of its own, e.g. "
                         "\"--batch-size 300 --batch-acme-rate 250\"")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-mass-", dir="/dev/shm"
                                 if Path("/dev/shm").is_dir() else None))
    base.chmod(0o755)
    try:
        return run(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(args: argparse.Namespace, base: Path) -> int:
    checks: list[str] = []
    report: dict[str, Any] = {"facts": common.machine_facts(args.flavour),
                              "lineages": args.lineages, "stock_sample": args.stock_sample}
    with Apache(base / "apache") as apache, \
            Pebble(apache.http_port, va_sleeptime=0, authz_reuse=0,
                   base_dir=base / "pebble") as pebble:
        directory = json.loads(pebble.get(pebble.directory_url))
        ca = farm.FarmCA.create("Mass Renewal Benchmark")
        # Every certificate: its window ended yesterday (a mass "renew now").
        responder = Responder(ca, acme_directory=directory,
                              policy=window_policy(*PAST)).start()
        try:
            via = Via(responder.directory_url, pebble.ca_bundle)
            env = {"REQUESTS_CA_BUNDLE": str(pebble.ca_bundle)}
            results = {}
            runs = [("ours", args.lineages, ["--batch-size", str(args.batch_size)])]
            if args.tuned:
                runs.append(("tuned", args.lineages, args.tuned.split()))
            runs.append(("stock", args.stock_sample, []))
            for label, count, extra in runs:
                bot = Certbot(args.flavour, base / label, via)
                bot.register()
                names = farm.make_farm(
                    str(bot.config_dir), count, ca=ca, server=responder.directory_url,
                    account=_account(bot.config_dir), authenticator="batch-webroot"
                    if label != "stock" else "webroot", webroot=str(apache.webroot),
                    name_fmt=f"{label}{{i:05d}}.test", lifetime=90, age=20, workers=2,
                    version=bot.version)
                orders_before = _orders(pebble)
                wrapper: Optional[list[str]] = None
                if label == "stock":
                    hidden = hiding.without_certbot_batch(bot.python, base / "mirror")
                    wrapper = [str(bot.python), "-c",
                               hiding.prelude(hidden) + bot.command("renew")[2]]
                if label == "stock" and bot.version_info < (4, 1):
                    extra = ["--force-renewal"]  # no ARI in this certbot: it would not see it
                result = common.run_certbot(args.flavour, base / label, "renew", *extra,
                                            label=label, env_extra=env, timeout=4 * 3600,
                                            python_wrapper=wrapper)
                renewed = _renewed(bot.config_dir, names)
                waves = WAVE.findall(result.output)
                results[label] = {
                    **result.summary(), "lineages": count, "renewed": renewed,
                    "per_second": round(renewed / result.wall, 2) if result.wall else None,
                    "orders": _orders(pebble) - orders_before,
                    "waves": len(waves),
                    # the waves' issuance (orders, validation, finalization, in parallel)
                    # and the rest: scan, certbot's own per-lineage loop (save, hooks), deploy
                    "waves_s": round(sum(float(w[2]) for w in waves), 1),
                    "provisioning_actions": sum(int(w[3]) for w in waves)}
                if waves:
                    print(f"{label}: {len(waves)} wave(s), issuance {results[label]['waves_s']}"
                          f" s, the rest {result.wall - results[label]['waves_s']:.1f} s",
                          flush=True)
                print(f"{label}: {renewed}/{count} renewed in {result.wall:.1f} s "
                      f"({results[label]['per_second']}/s), peak RSS "
                      f"{result.max_rss_mb:.0f} MB, rc {result.returncode}", flush=True)
                if renewed != count or result.returncode != 0:
                    checks.append(f"{label}: {renewed}/{count} renewed, rc "
                                  f"{result.returncode}: {result.output[-3000:]}")
            stock = results["stock"]
            projected = stock["wall_s"] / max(1, stock["lineages"]) * args.lineages
            report.update(results=results, stock_projected_s=round(projected, 1),
                          tuned_options=args.tuned or None)
            for label in results:
                if label == "stock":
                    continue
                ours = results[label]
                if ours["provisioning_actions"] != ours["waves"]:
                    checks.append(f"{label}: {ours['provisioning_actions']} provisioning "
                                  f"actions for {ours['waves']} waves")
                report[f"speedup_{label}"] = round(projected / ours["wall_s"], 1)
                print(f"stock projected to {args.lineages}: {projected:.0f} s; {label} "
                      f"{ours['wall_s']:.0f} s ({report[f'speedup_{label}']}x)")
        finally:
            responder.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    for problem in checks:
        print(f"CHECK FAILED: {problem}")
    return 1 if checks else 0


def _orders(pebble: Pebble) -> int:
    return pebble.pebble_log.read_text(errors="replace").count("Added order")


if __name__ == "__main__":
    sys.exit(main())
