"""``certbot-batch status``: table, --json, --prometheus and the exit code, over a state
database written by a real scan (farm + our ARI responder)."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from certbot_batch import cli
from certbot_batch.scan.engine import Scanner, ScanSettings
from certbot_batch.scan.state import StateDB
from tests.bed import farm
from tests.bed.farm import FarmCA
from tests.bed.responder import Responder

DAY = datetime.timedelta(days=1)
JSON_FIELDS = {"lineage", "names", "not_after", "ari_window", "chosen_time", "due",
               "next_check", "last_error"}
PROM_LINE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)?\})?'
    r' (?P<value>[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|NaN|[+-]?Inf))$')


@pytest.fixture(scope="module")
def ca() -> FarmCA:
    return FarmCA.create("Status CLI Test")


class Site:
    def __init__(self, tmp: Path, ca: FarmCA, responder: Responder) -> None:
        self.config_dir = tmp / "config"
        self.work_dir = tmp / "work"
        self.ca = ca
        self.r = responder

    def add(self, count: int, prefix: str, **kwargs: Any) -> list[str]:
        return farm.make_farm(str(self.config_dir), count, ca=self.ca,
                              server=self.r.directory_url, name_fmt=prefix + "{i}.test",
                              names_per_lineage=2, **kwargs)

    def scan(self) -> None:
        db = StateDB(str(self.work_dir / "certbot-batch" / "state.sqlite"))
        try:
            rdir = self.config_dir / "renewal"
            Scanner(ScanSettings(workers=4, timeout=2.0), db).scan(
                sorted(str(rdir / f) for f in os.listdir(rdir)))
        finally:
            db.close()

    def args(self, *extra: str) -> list[str]:
        return ["status", "--config-dir", str(self.config_dir), "--work-dir",
                str(self.work_dir), *extra]

    def status(self, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
        code = cli.main(self.args(*extra))
        captured = capsys.readouterr()
        return code, captured.out, captured.err


@pytest.fixture()
def site(tmp_path: Path, ca: FarmCA) -> Iterator[Site]:
    with Responder(ca) as r:
        yield Site(tmp_path, ca, r)


@pytest.fixture()
def mixed(site: Site) -> dict[str, str]:
    """fine (window in the future), due (window in the past), failing (ARI answers 500)."""
    [fine] = site.add(1, "fine")
    [due] = site.add(1, "due")
    [failing] = site.add(1, "failing")
    site.r.set_window(farm.load_lineage_cert(str(site.config_dir), due), -2 * DAY, -DAY)
    site.r.set_fault("http500", key=farm.load_lineage_cert(str(site.config_dir), failing))
    site.scan()
    return {"fine": fine, "due": due, "failing": failing}


def test_table_lists_every_lineage(site: Site, mixed: dict[str, str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = site.status(capsys)
    assert code == 1  # one overdue, one failing
    lines = out.splitlines()
    for header in ("lineage", "names", "notAfter", "ARI window", "chosen time", "due?",
                   "next check", "last error"):
        assert header in lines[0]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    for name in mixed.values():
        assert name in rows, out
        assert f"alt1.{name}" in rows[name]  # names column
    assert " DUE " in rows[mixed["due"]]
    assert " no " in rows[mixed["fine"]]
    assert "HTTP 500" in rows[mixed["failing"]]
    assert "3 lineage(s), 1 due, 2 needing attention" in out


def test_json(site: Site, mixed: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = site.status(capsys, "--json")
    assert code == 1
    doc = json.loads(out)
    rows = {r["lineage"]: r for r in doc["lineages"]}
    assert set(rows) == set(mixed.values())
    for row in rows.values():
        assert JSON_FIELDS <= set(row), row
        assert row["names"] == [row["lineage"], f"alt1.{row['lineage']}"]
        assert row["not_after"] and row["next_check"]
    fine, due, failing = rows[mixed["fine"]], rows[mixed["due"]], rows[mixed["failing"]]
    assert fine["due"] is False and due["due"] is True and failing["due"] is False
    for row in (fine, due):
        assert isinstance(row["ari_window"], list) and len(row["ari_window"]) == 2
        assert row["ari_window"][0] <= row["chosen_time"] <= row["ari_window"][1]
        assert row["last_error"] is None
    assert failing["ari_window"] is None and failing["chosen_time"] is None
    assert "HTTP 500" in failing["last_error"]
    # --cert-name narrows it down, and a fine lineage alone exits 0.
    code, out, _ = site.status(capsys, "--json", "--cert-name", mixed["fine"])
    assert code == 0
    assert [r["lineage"] for r in json.loads(out)["lineages"]] == [mixed["fine"]]


def parse_prometheus(text: str) -> dict[tuple[str, str], float]:
    samples: dict[tuple[str, str], float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split()
            assert parts[1] in ("HELP", "TYPE"), line
            if parts[1] == "TYPE":
                assert parts[3] in ("gauge", "counter", "untyped"), line
                typed.add(parts[2])
            continue
        m = PROM_LINE.match(line)
        assert m, f"not node_exporter textfile format: {line!r}"
        assert m.group("name") in typed, f"sample before its TYPE line: {line!r}"
        samples[(m.group("name"), m.group("labels") or "")] = float(m.group("value"))
    return samples


def test_prometheus_textfile(site: Site, mixed: dict[str, str], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    prom_dir = tmp_path / "textfile"
    prom_dir.mkdir()
    target = prom_dir / "certbot_batch.prom"
    code, _, _ = site.status(capsys, "-q", "--prometheus", str(target))
    assert code == 1
    assert os.listdir(prom_dir) == ["certbot_batch.prom"]  # no temporary file left behind
    text = target.read_text()
    assert text.endswith("\n")
    samples = parse_prometheus(text)
    for key, name in mixed.items():
        label = f'lineage="{name}"'
        assert samples[("certbot_batch_lineage_due", label)] == (1.0 if key == "due" else 0.0)
        assert samples[("certbot_batch_lineage_check_failures", label)] == \
            (1.0 if key == "failing" else 0.0)
        not_after = farm.cert_not_after(farm.load_lineage_cert(str(site.config_dir), name))
        assert samples[("certbot_batch_cert_not_after_seconds", label)] == \
            pytest.approx(not_after.timestamp(), abs=1)
    assert ("certbot_batch_ari_renewal_time_seconds", f'lineage="{mixed["fine"]}"') in samples
    assert ("certbot_batch_ari_renewal_time_seconds",
            f'lineage="{mixed["failing"]}"') not in samples
    assert samples[("certbot_batch_lineages_needing_attention", "")] == 2.0
    assert samples[("certbot_batch_status_generated_seconds", "")] == \
        pytest.approx(time.time(), abs=60)


def test_exit_codes(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    fine = site.add(2, "fine")
    # No state database yet: nothing was scanned, that needs attention.
    code, _, err = site.status(capsys)
    assert code == 1 and "no state database yet" in err
    site.scan()
    code, out, _ = site.status(capsys)
    assert code == 0, out
    assert "2 lineage(s), 0 due, 0 needing attention" in out
    # A lineage added since the last scan.
    [new] = site.add(1, "new")
    code, out, _ = site.status(capsys, "--json")
    rows = {r["lineage"]: r for r in json.loads(out)["lineages"]}
    assert code == 1 and rows[new]["attention"] == "not scanned yet"
    assert all(rows[n]["attention"] is None for n in fine)
    # Scanned again, fine again; then a lineage starts failing.
    site.scan()
    assert site.status(capsys, "-q") == (0, "", "")
    site.r.set_fault("http503", retry_after=60)
    site.add(1, "late")  # a new lineage is asked at once and meets the 503
    site.scan()
    code, out, _ = site.status(capsys, "--json")
    rows = {r["lineage"]: r for r in json.loads(out)["lineages"]}
    assert code == 1
    assert rows["late0.test"]["attention"] == "failing"
    assert "503" in rows["late0.test"]["last_error"]


def test_unreadable_database_is_a_clear_error(site: Site,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    site.add(1, "x")
    db = site.work_dir / "certbot-batch" / "state.sqlite"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"garbage, not SQLite" * 100)
    code, out, err = site.status(capsys)
    assert code == 2
    assert "cannot read the state database" in err and str(db) in err
    assert "Traceback" not in out + err
    assert db.read_bytes().startswith(b"garbage")  # status is read-only: it never rebuilds


def test_console_script(site: Site, mixed: dict[str, str]) -> None:
    script = Path(sys.executable).parent / "certbot-batch"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "certbot_batch.cli"]
    proc = subprocess.run(cmd + site.args("--json"), capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert {r["lineage"] for r in json.loads(proc.stdout)["lineages"]} == set(mixed.values())


# -- certbot's cli.ini, --version, --help -------------------------------------------------------

@pytest.fixture()
def ini_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Stand-ins for /etc/letsencrypt/cli.ini and ~/.config/letsencrypt/cli.ini (through
    $XDG_CONFIG_HOME, as certbot reads it)."""
    system = tmp_path / "etc-letsencrypt" / "cli.ini"
    system.parent.mkdir()
    monkeypatch.setattr(cli, "SYSTEM_CLI_INI", str(system))
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    user = xdg / "letsencrypt" / "cli.ini"
    user.parent.mkdir(parents=True)
    return system, user


def test_default_config_files_are_certbots(monkeypatch: pytest.MonkeyPatch) -> None:
    from certbot._internal import constants

    # certbot computes its list at import, with the environment of this process.
    assert cli.default_config_files() == constants.CLI_DEFAULTS["config_files"]
    assert cli.SYSTEM_CLI_INI == "/etc/letsencrypt/cli.ini"


def test_status_reads_certbots_cli_ini(site: Site, mixed: dict[str, str],
                                       ini_paths: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    system, user = ini_paths
    # certbot's syntax: "key = value", "key: value", comments, a [section] line, and keys
    # status does not care about.
    system.write_text(f"# written by the admin\nconfig-dir = {site.config_dir}\n"
                      "rsa-key-size = 4096\nbatch-engine = true\n")
    user.write_text(f"[whatever]\nwork-dir: {site.work_dir}  # the scan's state\n")
    code = cli.main(["status", "--json"])
    out = capsys.readouterr().out
    assert code == 1
    assert {r["lineage"] for r in json.loads(out)["lineages"]} == set(mixed.values())
    # The command line wins over the files, the user's file over the system's, and -c FILE
    # over both (certbot's order).
    empty = tmp_path / "empty-config"
    empty.mkdir()
    assert cli.main(["status", "--json", "--config-dir", str(empty)]) == 0
    assert json.loads(capsys.readouterr().out)["lineages"] == []
    user.write_text(f"config-dir = {empty}\nwork-dir = {site.work_dir}\n")
    assert cli.main(["status", "--json"]) == 0
    capsys.readouterr()
    extra = tmp_path / "extra.ini"
    extra.write_text(f"config-dir = {site.config_dir}\n")
    assert cli.main(["status", "--json", "-c", str(extra)]) == 1
    assert len(json.loads(capsys.readouterr().out)["lineages"]) == 3


def test_status_without_cli_ini_uses_certbots_defaults(ini_paths: tuple[Path, Path]) -> None:
    dirs = cli.resolve_dirs(None, None)
    assert (dirs.config_dir, dirs.work_dir) == ("/etc/letsencrypt", "/var/lib/letsencrypt")
    system, _user = ini_paths
    system.write_text("config-dir = ~/le\n")
    assert cli.resolve_dirs(None, None).config_dir == os.path.expanduser("~/le")


def test_broken_cli_ini_is_a_clear_error(ini_paths: tuple[Path, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    system, _user = ini_paths
    system.write_bytes(b"config-dir = \xff\xfe\n")
    code = cli.main(["status"])
    err = capsys.readouterr().err
    assert code == 2 and str(system) in err and "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    import certbot_batch

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"certbot-batch {certbot_batch.__version__}\n"
    assert certbot_batch.__version__ == version("certbot-batch")


def test_help_is_plain_text_and_complete() -> None:
    parser = cli.build_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, __import__("argparse")._SubParsersAction):
            parsers += list(action.choices.values())
    assert len(parsers) == 2
    for p in parsers:
        text = p.format_help()
        # No reStructuredText/Sphinx markup: ``literal``, :role:`x`, `x`_.
        assert not re.search(r"``|:[a-z]+:`|`_", text), text
        for action in p._actions:
            assert action.help and action.help.strip(), action.option_strings or action.dest
    status_help = parsers[1].format_help()
    for option in ("--config-dir", "--work-dir", "-c FILE"):
        assert option in status_help
    assert "/etc/letsencrypt" in status_help and "/var/lib/letsencrypt" in status_help


def test_console_script_reads_xdg_cli_ini(site: Site, mixed: dict[str, str],
                                          tmp_path: Path) -> None:
    """The installed script, configured only through certbot's user cli.ini."""
    xdg = tmp_path / "xdg"
    (xdg / "letsencrypt").mkdir(parents=True)
    (xdg / "letsencrypt" / "cli.ini").write_text(
        f"config-dir = {site.config_dir}\nwork-dir = {site.work_dir}\n")
    script = Path(sys.executable).parent / "certbot-batch"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "certbot_batch.cli"]
    proc = subprocess.run(cmd + ["status", "--json"], capture_output=True, text=True,
                          check=False, timeout=60,
                          env=dict(os.environ, XDG_CONFIG_HOME=str(xdg)))
    assert proc.returncode == 1, proc.stderr
    assert {r["lineage"] for r in json.loads(proc.stdout)["lineages"]} == set(mixed.values())
    version = subprocess.run(cmd + ["--version"], capture_output=True, text=True, check=True,
                             timeout=60)
    assert version.stdout.startswith("certbot-batch ")


def test_dns_records_left_by_an_interrupted_run(site: Site, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """TXT records an interrupted run left and no certbot run could remove yet (the DNS
    journal, challenges/grouped.py): listed in the table and --json, counted in
    --prometheus, and status exits 1 until they are gone (monitoring)."""
    from certbot_batch.challenges import grouped
    from certbot_batch.challenges.journal import Journal

    [fine] = site.add(1, "fine")
    site.scan()
    assert site.status(capsys, "-q")[0] == 0
    journal = Journal(str(site.work_dir / "certbot-batch" / grouped.JOURNAL_NAME))
    journal.record_dns([
        {"id": "r1", "lineage": fine, "conf": "", "plugin": "dns-rfc2136", "domain": fine,
         "validation_name": f"_acme-challenge.{fine}", "validation": "v1", "settings": {}},
        {"id": "r2", "lineage": "other.test", "conf": "", "plugin": "manual",
         "domain": "other.test", "validation_name": "_acme-challenge.other.test",
         "validation": "v2", "settings": {}}])
    code, out, _ = site.status(capsys)
    assert code == 1, out
    assert "DNS RECORDS LEFT: 2 TXT record(s) left by an interrupted run" in out, out
    listed = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [row[:3] for row in listed] == [
        ["dns-rfc2136", fine, f"_acme-challenge.{fine}"],
        ["manual", "other.test", "_acme-challenge.other.test"]], out
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d", row[3]) for row in listed), out
    code, out, _ = site.status(capsys, "--json")
    assert code == 1
    records = json.loads(out)["dns_records"]
    assert [(r["plugin"], r["lineage"], r["validation_name"], r["validation"])
            for r in records] == [("dns-rfc2136", fine, f"_acme-challenge.{fine}", "v1"),
                                  ("manual", "other.test", "_acme-challenge.other.test", "v2")]
    assert all(r["since"] for r in records), records
    target = tmp_path / "dns.prom"
    assert site.status(capsys, "-q", "--prometheus", str(target))[0] == 1
    assert parse_prometheus(target.read_text())[("certbot_batch_dns_records_left", "")] == 2.0
    # Removed (by a later certbot run): nothing left, status is fine again.
    journal.dns_removed(["r1", "r2"])
    code, out, _ = site.status(capsys, "--json")
    assert code == 0 and json.loads(out)["dns_records"] == []
    assert site.status(capsys, "-q", "--prometheus", str(target))[0] == 0
    assert parse_prometheus(target.read_text())[("certbot_batch_dns_records_left", "")] == 0.0


def test_when_and_why_each_lineage_is_renewed(site: Site, mixed: dict[str, str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """"renew at" and "because" (scan/schedule.py), and the last run with the cadence."""
    code, out, _ = site.status(capsys)
    lines = out.splitlines()
    assert "renew at" in lines[0] and "because" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert " now " in rows[mixed["due"]]
    assert "ARI window" in rows[mixed["fine"]]
    assert "1/3 of the lifetime left" in rows[mixed["failing"]]  # no ARI answer: the rule
    assert re.search(r"^Last run: \S+ \S+ \(timer\), 1 due, \? renewed\.", out, re.MULTILINE)
    code, out, _ = site.status(capsys, "--json")
    doc = json.loads(out)
    by = {r["lineage"]: r for r in doc["lineages"]}
    fine = by[mixed["fine"]]
    assert fine["because"] == "ARI window"
    # Not before the window opens, not after the time chosen in it.
    assert fine["ari_window"][0] <= fine["renew_at"] <= fine["chosen_time"]
    assert by[mixed["due"]]["renew_at"] is not None
    assert [r["trigger"] for r in doc["runs"]["recent"]] == ["timer"]
    assert doc["runs"]["cadence_seconds"] is None  # one run: no cadence yet
