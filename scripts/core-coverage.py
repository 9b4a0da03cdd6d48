#!/usr/bin/env python3
"""Coverage of the concurrency core by the in-process tests (issue 17): prints the lines
covered per module and fails when one of them is under the floor.

Run by scripts/test.sh after ``pytest -m "not bed" --cov=certbot_batch --cov-report=json``
wrote coverage.json (the in-process tests only: the end-to-end tests run certbot in
subprocesses, which coverage does not follow)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

FLOOR = 75.0
#: the session, the challenge batch, the grouped rounds, the journal, the deployment flush
#: (the safe reload and finishing what is pending), the pending record, and http-01 through
#: a web server (any kind, behind the servers/ interface)
CORE = ("session.py", "challenges/batch.py", "challenges/grouped.py", "challenges/journal.py",
        "deploy/reload.py", "deploy/finish.py", "deploy/pending.py", "challenges/http01.py")


def main(path: str = "coverage.json") -> int:
    data = json.loads(Path(path).read_text())
    files = data["files"]
    status = 0
    print(f"in-process coverage of the core (floor {FLOOR:.0f} %):")
    for module in CORE:
        key = next((k for k in files if k.replace("\\", "/").endswith(
            "certbot_batch/" + module)), None)
        if key is None:
            print(f"  {module:28} not measured")
            status = 1
            continue
        summary = files[key]["summary"]
        percent = float(summary["percent_covered"])
        print(f"  {module:28} {summary['covered_lines']:4}/{summary['num_statements']:4} lines "
              f"{percent:5.1f} %")
        if percent < FLOOR:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
