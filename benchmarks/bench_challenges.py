"""Benchmark of issue 4: batched challenges, stock ``-a webroot`` vs ``-a batch-webroot``.

K lineages (default 50) of one registered account at a real pebble (validations delayed by
``PEBBLE_VA_SLEEPTIME``, default 5: pebble sleeps a random 0..4 s before each validation;
authorization reuse 0), webroot = the DocumentRoot of a private Apache (tests/bed/apache.py)
that pebble's validator connects to. The farm (tests/bed/farm.py, current certs from a local
CA, renewal confs pointing at pebble and the account) is copied twice; on one copy

* stock:  ``certbot renew --force-renewal -a webroot``
* ours:   ``certbot renew --force-renewal -a batch-webroot``

and the two runs are compared side by side. Both must renew all K lineages (exit 0, every
lineage gets ``cert2.pem`` from pebble, K new orders at pebble): the script exits 1 otherwise.
Orders and challenge answers are counted in pebble's log (``Added order "ID" to the db``,
``POST /chalZ/``); provisioning actions and cleanups come from certbot-batch's summary line.
For our run the wall time is split into: status scan, prevalidation (orders, one
provisioning, validation, finalization, all concurrent), and the rest (process start-up,
plugin discovery, certbot's per-lineage loop saving the lineages).

Usage::

    .venv-pypi/bin/python benchmarks/bench_challenges.py [--flavour pypi|deb] [-k 50]
        [--sleeptime 5] [--json FILE] [--profile] [--keep]

``--profile`` runs ours once more under cProfile (on a third copy) and prints the top
functions by cumulative time.
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from tests.bed import farm  # noqa: E402
from tests.bed.apache import Apache  # noqa: E402
from tests.bed.certbots import Certbot  # noqa: E402
from tests.bed.pebble import INTERMEDIATE_CN_PREFIX, Pebble  # noqa: E402

SUMMARY = re.compile(
    r"certbot-batch: (\d+) lineage\(s\) validated and issued, (\d+) failed, in ([\d.]+) s "
    r"\((\d+) provisioning action\(s\), (\d+) cleanup\(s\), (\d+) challenge file\(s\)\)")
SCAN = re.compile(r"certbot-batch: checked \d+ lineage\(s\) in ([\d.]+) s")

MODES = {
    "stock": ("renew", "--force-renewal", "-a", "webroot"),
    "ours": ("renew", "--force-renewal", "-a", "batch-webroot"),
}


def copy_config(src: Path, dst_base: Path) -> Path:
    """``src`` (a certbot base dir) -> ``dst_base`` with config/ (confs repointed), empty
    work/ logs/ tmp/."""
    if dst_base.exists():
        shutil.rmtree(dst_base)
    dst_base.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(src / "config"), str(dst_base / "config")], check=True)
    old, new = str(src / "config") + "/", str(dst_base / "config") + "/"
    for conf in (dst_base / "config" / "renewal").glob("*.conf"):
        conf.write_text(conf.read_text().replace(old, new))
    for sub in ("work", "logs", "tmp"):
        (dst_base / sub).mkdir()
    return dst_base


class PebbleLog:
    def __init__(self, pebble: Pebble) -> None:
        self.path = pebble.pebble_log
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def since(self) -> str:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace")


def check_renewed(base: Path, names: list[str]) -> list[str]:
    """Problems with the renewal of ``names`` in the certbot base dir (empty when all good)."""
    problems = []
    config = base / "config"
    for name in names:
        if not (config / "archive" / name / "cert2.pem").exists():
            problems.append(f"{name}: no cert2.pem")
            continue
        target = os.readlink(config / "live" / name / "cert.pem")
        if not target.endswith("cert2.pem"):
            problems.append(f"{name}: live/ points at {target}")
            continue
        cert = farm.load_lineage_cert(str(config), name)
        if INTERMEDIATE_CN_PREFIX not in cert.issuer.rfc4514_string():
            problems.append(f"{name}: not issued by pebble ({cert.issuer.rfc4514_string()})")
    return problems


def timed_run(mode: str, args: tuple[str, ...], flavour: str, base: Path, plog: PebbleLog,
              env: dict[str, str], python_wrapper: Optional[list[str]] = None
              ) -> tuple[Any, dict[str, Any]]:
    """One timed certbot run of a benchmark mode: its result and what every benchmark
    records of it (command, exit code, time, memory, orders and answers seen at pebble)."""
    plog.mark()
    res = common.run_certbot(flavour, base, *args, label=mode, env_extra=env,
                             python_wrapper=python_wrapper)
    seen = plog.since()
    return res, {
        "mode": mode, "command": "certbot " + " ".join(args), "rc": res.returncode,
        "wall_s": round(res.wall, 2), "cpu_s": round(res.cpu, 2),
        "max_rss_mb": round(res.max_rss_mb, 1),
        "orders": len(re.findall(r'Added order "[^"]+" to the db', seen)),
        "challenge_answers": seen.count("POST /chalZ/"),
    }


def renewal_problems(out: dict[str, Any], res: Any, base: Path, names: list[str]
                     ) -> list[str]:
    """The checks every benchmark run gets: scan time, every lineage renewed by pebble,
    exit code 0, one order per lineage (fills in scan_s and renewed)."""
    text = res.output
    s = SCAN.search(text)
    if s:
        out["scan_s"] = float(s.group(1))
    problems = check_renewed(base, names)
    out["renewed"] = len(names) - len(problems)
    if res.returncode != 0:
        problems.insert(0, f"exit code {res.returncode}: {text[-3000:]}")
    if out["orders"] != len(names):
        problems.append(f"{out['orders']} orders at pebble, expected {len(names)}")
    return problems


def run_mode(mode: str, flavour: str, base: Path, names: list[str], plog: PebbleLog,
             env: dict[str, str], python_wrapper: Optional[list[str]] = None
             ) -> dict[str, Any]:
    res, out = timed_run(mode, MODES[mode], flavour, base, plog, env, python_wrapper)
    out.update(provisioning_actions=None, cleanups=None, challenge_files=None)
    text = res.output
    m = SUMMARY.search(text)
    if m:
        out.update(batch_ok=int(m.group(1)), batch_failed=int(m.group(2)),
                   prevalidation_s=float(m.group(3)),
                   provisioning_actions=int(m.group(4)), cleanups=int(m.group(5)),
                   challenge_files=int(m.group(6)))
    problems = renewal_problems(out, res, base, names)
    if mode == "ours" and (out["provisioning_actions"], out["cleanups"]) != (1, 1):
        problems.append(f"provisioning/cleanup {out['provisioning_actions']}/"
                        f"{out['cleanups']}, expected 1/1")
    if mode == "stock" and m:
        problems.append("certbot-batch engaged in the stock run")
    out["problems"] = problems[:10]
    return out


def profile_ours(flavour: str, pristine: Path, work: Path, names: list[str], plog: PebbleLog,
                 env: dict[str, str]) -> dict[str, Any]:
    base = copy_config(pristine, work / "profile")
    prof = work / "ours.prof"
    boot = work / "boot.py"
    boot.write_text("import sys\nfrom certbot.main import main\nsys.exit(main())\n")
    python = common.which_python(flavour)
    res = run_mode("ours", flavour, base, names, plog, env,
                   python_wrapper=[python, "-m", "cProfile", "-o", str(prof), str(boot)])
    stats = pstats.Stats(str(prof), stream=sys.stderr)
    print("\n[profile] ours, top 30 by cumulative time (main thread only: cProfile does not "
          "follow the worker threads)", file=sys.stderr)
    stats.sort_stats("cumulative").print_stats(30)
    res["profile"] = str(prof)
    return res


def fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavour", default="pypi", choices=["pypi", "deb"])
    p.add_argument("-k", type=int, default=50, help="lineages (default 50)")
    p.add_argument("--sleeptime", type=int, default=5, help="PEBBLE_VA_SLEEPTIME (default 5)")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--profile", action="store_true", help="also profile our run (cProfile)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-challenges-"))
    work.chmod(0o755)
    results: dict[str, Any] = {"machine": common.machine_facts(args.flavour), "k": args.k,
                               "flavour": args.flavour, "va_sleeptime": args.sleeptime,
                               "authz_reuse": 0}
    try:
        with Apache(work / "apache") as apache, \
                Pebble(apache.http_port, va_sleeptime=args.sleeptime, authz_reuse=0,
                       base_dir=work / "pebble") as pebble:
            env = dict(apache.env(), REQUESTS_CA_BUNDLE=str(pebble.ca_bundle))
            pristine = work / "pristine"
            bot = Certbot(args.flavour, pristine, pebble, env_extra=apache.env())
            bot.register()
            account = next((bot.config_dir / "accounts").rglob("regr.json")).parent.name
            ca = farm.FarmCA.create("bench_challenges")
            names = farm.make_farm(str(bot.config_dir), args.k, ca=ca,
                                   server=pebble.directory_url, webroot=str(apache.webroot),
                                   account=account, name_fmt="ch{i:03d}.test")
            plog = PebbleLog(pebble)
            for mode in ("stock", "ours"):
                base = copy_config(pristine, work / mode)
                print(f"[bench] {mode}: certbot {' '.join(MODES[mode])} over {args.k} "
                      "lineages ...", file=sys.stderr)
                results[mode] = run_mode(mode, args.flavour, base, names, plog, env)
                print(f"[bench] {mode}: {results[mode]['wall_s']} s", file=sys.stderr)
            leftovers = sorted(str(p) for p in apache.webroot.rglob("*"))
            results["webroot_leftovers"] = leftovers
            if args.profile:
                results["ours_profiled"] = profile_ours(args.flavour, pristine, work, names,
                                                        plog, env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[bench] kept {work}", file=sys.stderr)

    stock, ours = results["stock"], results["ours"]
    speedup = stock["wall_s"] / ours["wall_s"] if ours["wall_s"] else None
    results["speedup"] = round(speedup, 1) if speedup else None
    rest = None
    if ours.get("scan_s") is not None and ours.get("prevalidation_s") is not None:
        rest = round(ours["wall_s"] - ours["scan_s"] - ours["prevalidation_s"], 1)
    ours["rest_s"] = rest

    print(f"\ncertbot {results['machine']['certbot']} ({args.flavour}), K={args.k}, "
          f"PEBBLE_VA_SLEEPTIME={args.sleeptime}, authz reuse 0, "
          f"{results['machine']['nproc']} cores\n")
    print("| run | wall (s) | CPU (s) | orders | challenge answers | provisioning actions "
          "| cleanups | renewed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (stock, ours):
        renewed = f"{r['renewed']}/{args.k}" + (" (problems)" if r["problems"] else "")
        per_lineage = "one per lineage"
        provisions = fmt(r["provisioning_actions"]) if r is ours else per_lineage
        cleanups = fmt(r["cleanups"]) if r is ours else per_lineage
        print(f"| {r['command']} | {r['wall_s']} | {r['cpu_s']} | {r['orders']} | "
              f"{r['challenge_answers']} | {provisions} | {cleanups} | {renewed} |")
    print(f"\nspeedup: {fmt(results['speedup'])}x (target >= 10x)")
    print(f"ours split: scan {fmt(ours.get('scan_s'))} s, prevalidation "
          f"{fmt(ours.get('prevalidation_s'))} s, rest (start-up + certbot's loop) "
          f"{fmt(rest)} s")
    failed = False
    for r in (stock, ours):
        for problem in r["problems"]:
            print(f"PROBLEM [{r['mode']}]: {problem}", file=sys.stderr)
            failed = True
    if results["webroot_leftovers"]:
        print(f"PROBLEM: left in the webroot: {results['webroot_leftovers']}", file=sys.stderr)
        failed = True
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
