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
