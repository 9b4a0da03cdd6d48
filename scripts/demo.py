"""The main job, as a demo: renew a farm of lineages with the batch plugins against a local
pebble CA and a private Apache, and show what happened.

    ./scripts/demo.sh [--lineages 300] [--due 40] [--flavour pypi|deb] [--keep DIR]

Everything runs on loopback ports in a temporary directory; the host's Apache and
/etc/letsencrypt are never touched.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.bed import farm  # noqa: E402
from tests.bed.apache import Apache  # noqa: E402
from tests.bed.certbots import Certbot  # noqa: E402
from tests.bed.pebble import Pebble  # noqa: E402
from tests.bed.responder import Responder  # noqa: E402


class AcmeVia:
    """The ACME server certbot talks to: our responder's directory (pebble's endpoints plus
    renewalInfo, since pebble 2.4 has no ARI), trusted through pebble's CA bundle."""

    def __init__(self, directory_url: str, ca_bundle: Path) -> None:
        self.directory_url = directory_url
        self.ca_bundle = ca_bundle


def account_id(config_dir: Path) -> str:
    found = [p.name for p in (config_dir / "accounts").glob("*/*/*") if p.is_dir()]
    found += [p.name for p in (config_dir / "accounts").glob("*/*/*/*")
              if p.is_dir() and (p / "private_key.json").exists()]
    ids = [i for i in found if re.fullmatch(r"[0-9a-f]{32}", i)]
    if not ids:
        raise SystemExit(f"no ACME account found under {config_dir}/accounts")
    return ids[0]


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lineages", type=int, default=300)
    ap.add_argument("--due", type=int, default=40)
    ap.add_argument("--flavour", choices=["pypi", "deb"], default="pypi")
    ap.add_argument("--va-sleep", type=int, default=2,
                    help="pebble's maximum random validation delay, seconds")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it afterwards")
    args = ap.parse_args()
    base = Path(args.keep or tempfile.mkdtemp(prefix="certbot-batch-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)  # mkdtemp makes it 0700: Apache's www-data must reach the webroot
    try:
        return run(args, base)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def run(args: argparse.Namespace, base: Path) -> int:
    not_due = args.lineages - args.due
    with Apache(base / "apache") as apache, \
            Pebble(apache.http_port, va_sleeptime=args.va_sleep) as pebble:
        ca = farm.FarmCA.create()
        directory = json.loads(pebble.get(pebble.directory_url))
        responder = Responder(ca, acme_directory=directory).start()
        try:
            return renew_farm(args, base, apache, pebble, responder, ca, not_due)
        finally:
            responder.stop()


def renew_farm(args: argparse.Namespace, base: Path, apache: Apache, pebble: Pebble,
               responder: Responder, ca: farm.FarmCA, not_due: int) -> int:
    cb = Certbot(args.flavour, base / "certbot",
                 AcmeVia(responder.directory_url, pebble.ca_bundle))
    banner(f"certbot {cb.version} ({args.flavour}); pebble (ACME) at "
           f"{pebble.directory_url}; ARI at {responder.directory_url}; Apache on "
           f"127.0.0.1:{apache.http_port} (HTTP) / :{apache.https_port} (HTTPS)")
    cb.register()
    acct = account_id(cb.config_dir)
    apache_params = {
        "apache_server_root": str(apache.root), "apache_vhost_root": str(apache.vhost_root),
        "apache_logs_root": str(apache.log_dir), "apache_ctl": str(apache.ctl),
        "apache_challenge_location": str(apache.challenge_location),
    }
    t0 = time.monotonic()
    names = farm.make_farm(
        cb.config_dir, args.lineages, ca=ca, server=responder.directory_url, account=acct,
        authenticator="batch-webroot", installer="batch-apache",
        webroot=str(apache.webroot), extra_renewalparams=apache_params, lifetime=90,
        age=20)
    # The CA (our ARI responder) asks for early renewal of some: a window in the past.
    # The others get a window 30-32 days ahead.
    due_names = names[-args.due:] if args.due else []
    for name in due_names:
        responder.set_window(farm.load_lineage_cert(cb.config_dir, name),
                             datetime.timedelta(days=-2), datetime.timedelta(days=-1))
    for name in names:
        live = cb.config_dir / "live" / name
        apache.add_ssl_vhost(name, live / "fullchain.pem", live / "privkey.pem")
    apache.start()
    before = apache.counts()
    print(f"{len(names)} lineages (90-day certs, 20 days old; the CA's ARI window says "
          f"'renew now' for {args.due}, 'in a month' for {not_due}), {len(names)} SSL "
          f"vhosts, made in {time.monotonic() - t0:.1f} s")

    banner("certbot renew   (the renewal confs name batch-webroot / batch-apache)")
    t0 = time.monotonic()
    proc = cb.run("renew", timeout=1800)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    shown = [line for line in out.splitlines()
             if line.startswith("certbot-batch") or "succeeded" in line
             or "failed" in line.lower() or "not due" in line]
    print("\n".join(shown))
    after = apache.counts()
    renewed = [n for n in names if (cb.config_dir / "archive" / n / "cert2.pem").exists()]
    wrong = sorted(set(renewed) ^ set(due_names))
    served_ok = sum(
        1 for n in renewed[:10]
        if apache.served_cert(n).serial_number == farm.load_lineage_cert(
            cb.config_dir, n).serial_number)
    print(f"\nexit code {proc.returncode}; {len(renewed)} lineages renewed in {elapsed:.1f} s; "
          f"Apache: {after.graceful - before.graceful} graceful reload(s), "
          f"{after.configtest - before.configtest} configtest(s); new cert served for "
          f"{served_ok}/{min(10, len(renewed))} sampled names; challenge files left: "
          f"{sum(1 for _ in apache.webroot.rglob('*'))}")

    banner("certbot renew   (again: nothing due, state kept between runs)")
    t0 = time.monotonic()
    proc2 = cb.run("renew", timeout=600)
    print("\n".join(line for line in (proc2.stdout + proc2.stderr).splitlines()
                    if line.startswith("certbot-batch") or "No renewals" in line))
    print(f"exit code {proc2.returncode} in {time.monotonic() - t0:.1f} s")

    banner("certbot-batch status (first lines)")
    status_cmd = [str(cb.venv / "bin" / "certbot-batch"), "status",
                  "--config-dir", str(cb.config_dir), "--work-dir", str(cb.work_dir)]
    if not os.path.exists(status_cmd[0]):
        status_cmd = [str(cb.python), "-m", "certbot_batch.cli", *status_cmd[1:]]
    st = subprocess.run(status_cmd, capture_output=True, text=True, check=False)
    lines = st.stdout.splitlines()
    print("\n".join(lines[:6] + ["..."] + lines[-1:]))
    if wrong:
        print(f"renewed set differs from the due set: {wrong[:5]}")
    ok = proc.returncode == 0 and not wrong and proc2.returncode == 0
    banner("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
