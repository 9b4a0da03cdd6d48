"""Benchmark of issue 11: batched dns-01, stock ``certbot renew`` vs ``--batch-engine``.

K lineages (default 50) of apex + wildcard (``dnsNNN.test`` and ``*.dnsNNN.test``) of one
registered account at a real pebble that validates dns-01 against a private BIND
(tests/bed/bind.py, pebble's ``-dnsserver``), authenticator dns-rfc2136 (one credentials
file, TSIG key allowed to update the zone), ``dns_rfc2136_propagation_seconds`` = P
(default 10) saved in every renewal conf. The farm (tests/bed/farm.py) is copied twice; on
one copy

* stock:  ``certbot renew --force-renewal``
* ours:   ``certbot renew --force-renewal --batch-engine``

and the two runs are compared side by side. Both must renew all K lineages (exit 0, every
lineage gets ``cert2.pem`` from pebble, K new orders at pebble) and leave no TXT record in
the zone (AXFR): the script exits 1 otherwise. Propagation waits are counted from the
plugin's own notice (``Waiting P seconds for DNS changes to propagate``, once per
``perform()`` call) in each run's output; our grouped ``perform()`` calls from
certbot-batch's line ``certbot-batch: dns-rfc2136: one perform() for N challenge(s) of K
lineage(s)``. For our run the wall time is split into: status scan, prevalidation (orders,
the grouped perform with its one wait, validation, finalization, all concurrent), and the
rest (process start-up, plugin discovery, certbot's loop saving the lineages).

Usage::

    .venv-pypi/bin/python benchmarks/bench_dns.py [--flavour pypi|deb] [-k 50]
        [--propagation 10] [--sleeptime N] [--no-stock] [--json FILE] [--keep]

``--sleeptime`` sets PEBBLE_VA_SLEEPTIME (default: none, validations at once: the
propagation wait is what is measured).
"""
from __future__ import annotations

import argparse
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
from benchmarks.bench_challenges import (  # noqa: E402
    PebbleLog,
    copy_config,
    renewal_problems,
    timed_run,
)
from tests.bed import farm, ports  # noqa: E402
from tests.bed.bind import Bind  # noqa: E402
from tests.bed.certbots import Certbot  # noqa: E402
from tests.bed.pebble import Pebble  # noqa: E402

SUMMARY = re.compile(
    r"certbot-batch: (\d+) lineage\(s\) validated and issued, (\d+) failed, in ([\d.]+) s")
WAIT = re.compile(r"Waiting (\d+) seconds? for DNS changes to propagate")
PERFORM = re.compile(r"certbot-batch: ([\w-]+): one perform\(\) for (\d+) challenge\(s\) of "
                     r"(\d+) lineage\(s\)")

MODES = {
    "stock": ("renew", "--force-renewal"),
    "ours": ("renew", "--force-renewal", "--batch-engine"),
}


def run_mode(mode: str, flavour: str, base: Path, names: list[str], plog: PebbleLog,
             bind: Bind, env: dict[str, str]) -> dict[str, Any]:
    res, out = timed_run(mode, MODES[mode], flavour, base, plog, env)
    text = res.output
    waits = [int(n) for n in WAIT.findall(text)]
    performs = [(p, int(c), int(k)) for p, c, k in PERFORM.findall(text)]
    out.update(propagation_waits=len(waits), waited_s=sum(waits),
               grouped_performs=len(performs), performs=performs)
    m = SUMMARY.search(text)
    if m:
        out.update(batch_ok=int(m.group(1)), batch_failed=int(m.group(2)),
                   prevalidation_s=float(m.group(3)))
    problems = renewal_problems(out, res, base, names)
    leftovers = bind.txt_records()
    out["txt_left"] = len(leftovers)
    if leftovers:
        problems.append(f"{len(leftovers)} TXT record(s) left in the zone: {leftovers[:4]}")
    if mode == "ours" and (out["propagation_waits"], out["grouped_performs"]) != (1, 1):
        problems.append(f"{out['propagation_waits']} propagation wait(s), "
                        f"{out['grouped_performs']} grouped perform(s), expected 1/1")
    if mode == "stock":
        if m or performs:
            problems.append("certbot-batch engaged in the stock run")
        if out["propagation_waits"] != len(names):
            problems.append(f"stock waited {out['propagation_waits']} times, expected "
                            f"{len(names)}")
    out["problems"] = problems[:10]
    return out


def fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--flavour", default="pypi", choices=["pypi", "deb"])
    p.add_argument("-k", type=int, default=50, help="lineages (default 50)")
    p.add_argument("--propagation", type=int, default=10,
                   help="dns_rfc2136_propagation_seconds (default 10)")
    p.add_argument("--sleeptime", type=int, default=None,
                   help="PEBBLE_VA_SLEEPTIME (default: no validation delay)")
    p.add_argument("--no-stock", action="store_true",
                   help="only our run (no comparison, no speedup)")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-dns-"))
    work.chmod(0o755)
    results: dict[str, Any] = {"machine": common.machine_facts(args.flavour), "k": args.k,
                               "flavour": args.flavour, "propagation_s": args.propagation,
                               "va_sleeptime": args.sleeptime, "authz_reuse": 0}
    failed = False
    try:
        with Bind(base_dir=work / "bind") as bind, \
                Pebble(ports.free_port(), dns_server=bind.address, va_sleeptime=args.sleeptime,
                       authz_reuse=0, base_dir=work / "pebble") as pebble:
            env = {"REQUESTS_CA_BUNDLE": str(pebble.ca_bundle)}
            pristine = work / "pristine"
            bot = Certbot(args.flavour, pristine, pebble)
            bot.register()
            account = next((bot.config_dir / "accounts").rglob("regr.json")).parent.name
            ini = bind.rfc2136_ini(work / "rfc2136.ini")
            ca = farm.FarmCA.create("bench_dns")
            names = farm.make_farm(
                str(bot.config_dir), args.k, ca=ca, server=pebble.directory_url,
                account=account, authenticator="dns-rfc2136",
                extra_renewalparams={"dns_rfc2136_credentials": str(ini),
                                     "dns_rfc2136_propagation_seconds": str(args.propagation)},
                names_for=lambda i: [f"dns{i:03d}.test", f"*.dns{i:03d}.test"])
            plog = PebbleLog(pebble)
            for mode in ("ours",) if args.no_stock else ("stock", "ours"):
                base = copy_config(pristine, work / mode)
                print(f"[bench] {mode}: certbot {' '.join(MODES[mode])} over {args.k} "
                      f"lineages (apex + wildcard, propagation {args.propagation} s) ...",
                      file=sys.stderr)
                results[mode] = run_mode(mode, args.flavour, base, names, plog, bind, env)
                print(f"[bench] {mode}: {results[mode]['wall_s']} s", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[bench] kept {work}", file=sys.stderr)

    ours = results["ours"]
    stock = results.get("stock")
    speedup: Optional[float] = None
    if stock is not None and ours["wall_s"]:
        speedup = stock["wall_s"] / ours["wall_s"]
    results["speedup"] = round(speedup, 1) if speedup else None
    rest = None
    if ours.get("scan_s") is not None and ours.get("prevalidation_s") is not None:
        rest = round(ours["wall_s"] - ours["scan_s"] - ours["prevalidation_s"], 1)
    ours["rest_s"] = rest

    print(f"\ncertbot {results['machine']['certbot']} ({args.flavour}), K={args.k} "
          f"(apex + wildcard), dns-rfc2136, propagation {args.propagation} s, "
          f"PEBBLE_VA_SLEEPTIME={fmt(args.sleeptime)}, authz reuse 0, "
          f"{results['machine']['nproc']} cores\n")
    print("| run | wall (s) | CPU (s) | orders | challenge answers | propagation waits "
          "| perform() calls | renewed | TXT left |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [r for r in (stock, ours) if r is not None]
    for r in runs:
        renewed = f"{r['renewed']}/{args.k}" + (" (problems)" if r["problems"] else "")
        performs = str(r["grouped_performs"]) if r is ours else f"{args.k} (one per lineage)"
        print(f"| {r['command']} | {r['wall_s']} | {r['cpu_s']} | {r['orders']} | "
              f"{r['challenge_answers']} | {r['propagation_waits']} ({r['waited_s']} s) | "
              f"{performs} | {renewed} | {r['txt_left']} |")
    target = "✔" if speedup and speedup >= 20 else "✘"
    print(f"\nspeedup: {fmt(results['speedup'])}x (target >= 20x {target})")
    print(f"ours split: scan {fmt(ours.get('scan_s'))} s, prevalidation "
          f"{fmt(ours.get('prevalidation_s'))} s, rest (start-up + certbot's loop) "
          f"{fmt(rest)} s")
    for r in runs:
        for problem in r["problems"]:
            print(f"PROBLEM [{r['mode']}]: {problem}", file=sys.stderr)
            failed = True
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
