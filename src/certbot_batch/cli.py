"""certbot-batch: the renewal status of every certbot lineage, as certbot-batch's renewal
engine last saw it (ARI window, chosen renewal time, due or not, last error)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

from certbot_batch import __version__, paths
from certbot_batch.ca import ledger
from certbot_batch.deploy import pending
from certbot_batch.scan import schedule
from certbot_batch.scan.engine import ScanSettings, fmt_time, plan
from certbot_batch.scan.state import LineageState, RunRecord, StateDB
from certbot_batch.servers import server_for

EXIT_OK, EXIT_ATTENTION, EXIT_ERROR = 0, 1, 2


DESCRIPTION = ("Show the renewal status of every certbot lineage as certbot-batch's renewal "
               "engine last saw it: the ARI window, the chosen renewal time, whether it is "
               "due, when it is checked next and the last error. Read-only: it sends no "
               "request and never writes to certbot's directories.")

#: certbot's defaults (certbot/_internal/constants.py, Linux).
DEFAULT_CONFIG_DIR = "/etc/letsencrypt"
DEFAULT_WORK_DIR = "/var/lib/letsencrypt"
#: certbot's first default config file: always this path, whatever --config-dir says.
SYSTEM_CLI_INI = os.path.join(DEFAULT_CONFIG_DIR, "cli.ini")
#: The settings of cli.ini that status reads (the rest is certbot's business).
_DIR_KEYS = ("config-dir", "work-dir")


class ConfigFileError(Exception):
    pass


class _Dirs:
    def __init__(self, config_dir: str, work_dir: str) -> None:
        self.config_dir = config_dir
        self.work_dir = work_dir


def default_config_files() -> list[str]:
    """certbot's default config files, in the order it reads them (a later one wins):
    ``CLI_DEFAULTS["config_files"]`` in certbot/_internal/constants.py, which has been the
    same from certbot 1.x to 5.x."""
    return [SYSTEM_CLI_INI,
            os.path.join(os.environ.get("XDG_CONFIG_HOME", "~/.config"), "letsencrypt",
                         "cli.ini")]


def _read_cli_ini(path: str) -> dict[str, str]:
    # certbot parses its config files with ConfigArgParse's default parser (certbot depends
    # on ConfigArgParse in every release): the same parser reads the same values.
    import configargparse

    try:
        with open(path, encoding="utf-8") as fh:
            items = configargparse.DefaultConfigFileParser().parse(fh)
    except configargparse.ConfigFileParserException as exc:
        raise ConfigFileError(f"{path}: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read {path} ({exc})") from exc
    return {k: str(v) for k, v in items.items() if k in _DIR_KEYS}


def resolve_dirs(config_dir: Optional[str], work_dir: Optional[str],
                 config_file: Optional[str] = None) -> _Dirs:
    """certbot's directories the way certbot finds them: the command line, else the config
    files (the default ones, then ``-c FILE``; a later file wins), else certbot's defaults."""
    settings: dict[str, str] = {}
    for pattern in default_config_files():
        path = os.path.expanduser(pattern)
        if os.path.isfile(path):
            settings.update(_read_cli_ini(path))
    if config_file is not None:
        settings.update(_read_cli_ini(config_file))
    config_dir = config_dir or settings.get("config-dir") or DEFAULT_CONFIG_DIR
    work_dir = work_dir or settings.get("work-dir") or DEFAULT_WORK_DIR
    # certbot makes them absolute (configuration.NamespaceConfig) after expanding "~".
    return _Dirs(os.path.abspath(os.path.expanduser(config_dir)),
                 os.path.abspath(os.path.expanduser(work_dir)))


def _lineage_names(config_dir: str) -> list[str]:
    renewal = os.path.join(config_dir, "renewal")
    try:
        return sorted(e[:-5] for e in os.listdir(renewal) if e.endswith(".conf"))
    except FileNotFoundError:
        return []


def _attention(state: Optional[LineageState], now: float) -> Optional[str]:
    if state is None:
        return "not scanned yet"
    if state.not_after is not None and state.not_after <= now:
        return "expired"
    if state.renew_failures or state.renew_next_attempt:
        return "renewal failing"
    if state.due:
        return "overdue"
    if state.last_error:
        return "failing"
    return None


def _row(name: str, state: Optional[LineageState], now: float,
         interval: Optional[float] = None) -> dict[str, Any]:
    if state is None:
        return {"lineage": name, "names": [], "not_after": None, "ari_window": None,
                "chosen_time": None, "due": None, "reason": "not scanned yet",
                "renew_at": None, "because": "not scanned yet",
                "next_check": None, "failures": 0, "last_error": None,
                "renew_attempts": 0, "renew_failing_since": None, "renew_last_error": None,
                "renew_next_attempt": None, "issued_by": None,
                "attention": "not scanned yet"}
    # As the next run decides it, on what the last scan stored, with the cadence it used.
    decision = plan(state, now, ScanSettings(), interval, quiet=True)
    return {
        "lineage": name,
        "names": state.names.split(),
        "serial": state.serial,
        "not_after": fmt_time(state.not_after) if state.not_after else None,
        "ari_window": ([fmt_time(state.window_start), fmt_time(state.window_end)]
                       if state.window_start is not None else None),
        "chosen_time": fmt_time(state.chosen_time) if state.chosen_time else None,
        "due": state.due,
        "reason": state.reason,
        # When a run renews it and why (scan/schedule.py): the rule, in a few words.
        "renew_at": fmt_time(decision.renew_at) if decision.renew_at is not None else None,
        "because": _because(state, decision),
        "next_check": fmt_time(state.next_check) if state.next_check else None,
        "ocsp_status": state.ocsp_status,
        "failures": state.failures,
        "last_error": state.last_error,
        "last_scan": fmt_time(state.last_scan) if state.last_scan else None,
        "renew_attempts": state.renew_failures,
        "renew_failing_since": (fmt_time(state.renew_failing_since)
                                if state.renew_failing_since else None),
        "renew_last_error": state.renew_last_error,
        "renew_next_attempt": (fmt_time(state.renew_next_attempt)
                               if state.renew_next_attempt else None),
        "issued_by": state.issued_by or state.server,
        "attention": _attention(state, now),
    }


def _because(state: LineageState, decision: schedule.Decision) -> str:
    why = decision.because or state.reason or "-"
    if state.renew_next_attempt and state.due:
        # Due, but waiting out the backoff of its failed renewals.
        return f"{why}; backing off until {fmt_time(state.renew_next_attempt)}"
    return why


def _runs_json(runs: list[RunRecord], cadence: Optional[float]) -> dict[str, Any]:
    return {"cadence_seconds": cadence,
            "recent": [{"started": fmt_time(r.started), "trigger": r.trigger,
                        "lineages": r.lineages, "due": r.due, "renewed": r.renewed,
                        "next_run_expected_in": r.interval} for r in runs]}


def _runs_line(runs: list[RunRecord], cadence: Optional[float]) -> str:
    started, trigger, _, due, renewed, _ = runs[0]
    line = (f"Last run: {fmt_time(started)} ({trigger}), {due} due, "
            f"{'?' if renewed is None else renewed} renewed. ")
    if cadence:
        return line + (f"Timer runs come every ~{schedule.fmt_span(cadence)} (learned from "
                       "the recent runs, or --batch-run-interval): a lineage whose renewal "
                       "time falls before the next run is renewed by the run before it.")
    return line + "The timer's cadence is not known yet (fewer than 3 timer runs)."


def _short_error(text: str) -> str:
    """The table's column: URLs cut to their host and certIDs dropped, so that what the CA
    answered fits (the full message is in --json)."""
    text = re.sub(r" for certificate [A-Za-z0-9_.-]+:", ":", text)
    return re.sub(r"(https?://[^/\s]+)/\S*", r"\1", text)


def _table(rows: list[dict[str, Any]]) -> str:
    headers = ["lineage", "names", "notAfter", "ARI window", "chosen time", "due?",
               "renew at", "because", "next check", "attempts", "next attempt", "issued by",
               "last error"]
    body = []
    for r in rows:
        window = " .. ".join(r["ari_window"]) if r.get("ari_window") else "-"
        due = "?" if r["due"] is None else ("DUE" if r["due"] else "no")
        names = " ".join(r["names"]) or "-"
        if len(names) > 40:
            names = names[:37] + "..."
        issuer = re.sub(r"^https?://([^/]+).*$", r"\1", r.get("issued_by") or "-")
        error = r.get("renew_last_error") or r["last_error"] or r.get("attention") or "-"
        renew_at = ("now" if r["due"] else r.get("renew_at")) or "-"
        body.append([r["lineage"], names, r["not_after"] or "-", window,
                     r["chosen_time"] or "-", due, renew_at, r.get("because") or "-",
                     r["next_check"] or "-",
                     str(r.get("renew_attempts") or 0), r.get("renew_next_attempt") or "-",
                     issuer, _short_error(error)[:120]])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body)] if body else \
        [len(h) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def _prometheus(rows: list[dict[str, Any]], states: dict[str, LineageState],
                now: float, pending_count: int = 0) -> str:
    out = [
        "# HELP certbot_batch_cert_not_after_seconds Expiry of the lineage's certificate.",
        "# TYPE certbot_batch_cert_not_after_seconds gauge",
    ]
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    gauges: dict[str, list[str]] = {"not_after": [], "due": [], "failures": [], "chosen": []}
    for r in rows:
        st = states.get(r["lineage"])
        label = f'lineage="{esc(r["lineage"])}"'
        if st is not None and st.not_after is not None:
            gauges["not_after"].append(
                f"certbot_batch_cert_not_after_seconds{{{label}}} {st.not_after:.0f}")
        gauges["due"].append(f"certbot_batch_lineage_due{{{label}}} {1 if r['due'] else 0}")
        gauges["failures"].append(
            f"certbot_batch_lineage_check_failures{{{label}}} {r['failures']}")
        gauges.setdefault("renew", []).append(
            f"certbot_batch_lineage_renew_failures{{{label}}} {r.get('renew_attempts') or 0}")
        if st is not None and st.chosen_time is not None:
            gauges["chosen"].append(
                f"certbot_batch_ari_renewal_time_seconds{{{label}}} {st.chosen_time:.0f}")
    out += gauges["not_after"]
    out += ["# HELP certbot_batch_lineage_due 1 when the lineage is due (or overdue).",
            "# TYPE certbot_batch_lineage_due gauge"] + gauges["due"]
    out += ["# HELP certbot_batch_lineage_check_failures Consecutive ARI/OCSP failures.",
            "# TYPE certbot_batch_lineage_check_failures gauge"] + gauges["failures"]
    out += ["# HELP certbot_batch_ari_renewal_time_seconds Renewal time chosen in the ARI "
            "window.", "# TYPE certbot_batch_ari_renewal_time_seconds gauge"] + gauges["chosen"]
    out += ["# HELP certbot_batch_lineage_renew_failures Consecutive failed renewal "
            "attempts (the lineage backs off).",
            "# TYPE certbot_batch_lineage_renew_failures gauge"] + gauges.get("renew", [])
    out += ["# HELP certbot_batch_deployment_pending Renewed lineages not deployed yet.",
            "# TYPE certbot_batch_deployment_pending gauge",
            f"certbot_batch_deployment_pending {pending_count}"]
    attention = sum(1 for r in rows if r["attention"])
    out += ["# HELP certbot_batch_lineages_needing_attention Overdue, expired, failing or "
            "unscanned lineages.", "# TYPE certbot_batch_lineages_needing_attention gauge",
            f"certbot_batch_lineages_needing_attention {attention}",
            "# HELP certbot_batch_status_generated_seconds When this file was written.",
            "# TYPE certbot_batch_status_generated_seconds gauge",
            f"certbot_batch_status_generated_seconds {now:.0f}"]
    return "\n".join(out) + "\n"


def _dns_records(dirs: _Dirs) -> list[dict[str, Any]]:
    """TXT records (DNS plugins, manual hooks) that interrupted runs left and no certbot run
    could remove yet. Raises OSError when their journal cannot be read."""
    from certbot_batch.challenges import grouped  # imports certbot: only when asked

    return grouped.outstanding(dirs)


def _print_dns_records(records: list[dict[str, Any]]) -> None:
    print(f"DNS RECORDS LEFT: {len(records)} TXT record(s) left by an interrupted run are not "
          "removed yet; the next certbot run tries again (plugin, lineage, name, since):")
    for r in records[:20]:
        print(f"  {r['plugin']}  {r['lineage']}  {r['validation_name'] or r['domain']}  "
              f"{fmt_time(r['since']) if r['since'] else '?'}")
    if len(records) > 20:
        print(f"  ... and {len(records) - 20} more (--json lists them all)")


def _write_atomic(path: str, text: str) -> None:
    # node_exporter may read the file at any moment: never let it see half a file.
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".certbot-batch-", suffix=".prom")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _pending_json(what: str, entry: dict[str, Any],
                  server: Optional[dict[str, str]] = None) -> dict[str, Any]:
    out = {"what": what, "lineages": list(entry.get("lineages") or []),
           "state": "running" if pending.running(entry) else
           ("interrupted" if pending.interrupted(entry) else "failed"),
           "since": fmt_time(entry.get("since")) if entry.get("since") else None,
           "error": entry.get("error"), "attempts": int(entry.get("attempts") or 0)}
    if server is not None:
        out["server"] = server
    return out


def _pending_line(where: str, entry: dict[str, Any]) -> str:
    names = [str(n) for n in entry.get("lineages") or []]
    since = fmt_time(entry.get("since")) if entry.get("since") else "?"
    if pending.running(entry):
        return (f"Deployment in progress {where} (certbot pid {entry.get('pid')}): "
                f"{len(names)} lineage(s)")
    state = "interrupted run" if pending.interrupted(entry) else \
        f"failed {int(entry.get('attempts') or 0)} time(s)"
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    return (f"DEPLOYMENT PENDING {where} since {since}: {len(names)} renewed lineage(s) not "
            f"deployed yet ({shown}); {state}; last error: {entry.get('error') or '-'}. "
            "The next `certbot renew` retries.")


def status(args: argparse.Namespace) -> int:
    try:
        dirs = resolve_dirs(args.config_dir, args.work_dir, args.config)
    except ConfigFileError as exc:
        print(f"certbot-batch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    db_path = paths.state_db_path(dirs)
    names = _lineage_names(dirs.config_dir)
    if args.cert_name:
        names = [n for n in names if n in args.cert_name]
    states: dict[str, LineageState] = {}
    runs: list[RunRecord] = []
    cadence: Optional[float] = None
    if os.path.exists(db_path):
        try:
            db = StateDB(db_path, readonly=True)
            states = db.load_all()
            runs = db.recent_runs()
            cadence = schedule.learned_interval(db.run_starts("timer"))
            db.close()
        except sqlite3.Error as exc:
            print(f"certbot-batch: cannot read the state database {db_path} ({exc}); the "
                  "next `certbot renew` run rebuilds it.", file=sys.stderr)
            return EXIT_ERROR
    elif not args.quiet:
        print(f"certbot-batch: no state database yet at {db_path}; run `certbot renew` with "
              "a batch plugin (or --batch-engine) once.", file=sys.stderr)
    # The backoff as the next run sees it (the ledger survives a lost database).
    ledger.Ledger(dirs).apply(states.values())
    try:
        dns_records = _dns_records(dirs)
    except OSError as exc:
        print(f"certbot-batch: cannot read the journal of DNS records ({exc})", file=sys.stderr)
        return EXIT_ERROR
    now = time.time()
    # The cadence the last run used (--batch-run-interval or learned), else the learned one.
    interval = next((r.interval for r in runs if r.interval), None) or cadence
    rows = [_row(n, states.get(n), now, interval) for n in names]
    record = pending.PendingDeployments(dirs)
    servers = record.servers() if record.exists() else []
    hooks = record.hooks() if record.exists() else []
    pending_names = record.lineages() if (servers or hooks) else []
    # In progress in a live certbot right now is no alarm; anything else is.
    stuck = [e for _, e in servers + hooks if not pending.running(e)]
    if args.json:
        doc: dict[str, Any] = {"generated": fmt_time(now), "lineages": rows,
                               "pending_deployment": None, "runs": _runs_json(runs, cadence)}
        if servers or hooks:
            doc["pending_deployment"] = {
                "lineages": pending_names,
                "since": fmt_time(min(float(e.get("since") or now) for _, e in
                                      servers + hooks)),
                "error": next((e.get("error") for _, e in servers + hooks
                               if e.get("error")), None),
                "servers": [_pending_json(server_for(ref).label(), e, ref.to_dict())
                            for ref, e in servers],
                "hooks": [_pending_json(cmd, e) for cmd, e in hooks]}
        doc["dns_records"] = [dict(r, since=fmt_time(r["since"]) if r["since"] else None)
                              for r in dns_records]
        print(json.dumps(doc, indent=2))
    elif not args.quiet:
        print(_table(rows))
        attention = [r for r in rows if r["attention"]]
        due = sum(1 for r in rows if r["due"])
        print(f"\n{len(rows)} lineage(s), {due} due, {len(attention)} needing attention")
        if runs:
            print(_runs_line(runs, cadence))
        for ref, entry in servers:
            print(_pending_line(f"on {server_for(ref).label()}", entry))
        for cmd, entry in hooks:
            print(_pending_line(f"(batch deploy hook '{cmd}')", entry))
        if dns_records:
            _print_dns_records(dns_records)
    if args.prometheus:
        _write_atomic(args.prometheus, _prometheus(rows, states, now, len(pending_names)) + (
            "# HELP certbot_batch_dns_records_left TXT records left by interrupted runs, not "
            "removed yet.\n# TYPE certbot_batch_dns_records_left gauge\n"
            f"certbot_batch_dns_records_left {len(dns_records)}\n"))
    if stuck or dns_records:
        return EXIT_ATTENTION
    return EXIT_ATTENTION if any(r["attention"] for r in rows) else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    # The man page (man/certbot-batch.1, scripts/make-man.py) is generated from this parser:
    # plain-text help strings, no markup.
    parser = argparse.ArgumentParser(
        prog="certbot-batch", description=DESCRIPTION,
        epilog="The batch options of certbot renew (--batch-engine, --batch-workers and "
               "the others) are options of certbot itself once certbot-batch is installed: "
               "certbot --help batch-webroot lists them, and so does certbot-batch(1).")
    parser.add_argument("--version", action="version", version=f"certbot-batch {__version__}",
                        help="print the version of certbot-batch and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="the command to run")
    st = sub.add_parser(
        "status", help="show the renewal status of every lineage",
        description="Show what the last scan of certbot-batch saw, one line per lineage. "
                    "Exit status: 0 when every lineage is fine, 1 when one is overdue, "
                    "expired, failing or not scanned yet, 2 on errors.")
    st.add_argument("-c", "--config", metavar="FILE", default=None,
                    help="a certbot config file to read --config-dir and --work-dir from, "
                         "after the default ones (as certbot -c FILE does)")
    st.add_argument("--config-dir", metavar="DIR", default=None,
                    help="certbot's configuration directory, with renewal/ and live/ "
                         "(default: config-dir from certbot's cli.ini files, else "
                         f"{DEFAULT_CONFIG_DIR})")
    st.add_argument("--work-dir", metavar="DIR", default=None,
                    help="certbot's working directory; the state database is "
                         f"DIR/{paths.SUBDIR}/state.sqlite (default: work-dir from "
                         f"certbot's cli.ini files, else {DEFAULT_WORK_DIR})")
    st.add_argument("--cert-name", metavar="NAME", action="append", default=None,
                    help="only this lineage (repeatable)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--prometheus", metavar="FILE",
                    help="also write node_exporter textfile metrics to FILE")
    st.add_argument("-q", "--quiet", action="store_true", help="no table; exit code only")
    st.set_defaults(func=status)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
