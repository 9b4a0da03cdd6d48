"""Packaging: what a release and a distribution package are made of.

- exactly one module touches certbot._internal;
- on a certbot it does not know, certbot-batch switches its engine off with a warning and
  certbot runs as stock (no crash);
- the release metadata (requires-python, URLs, no lower bounds, the entry points), the
  version, LICENSE and the Debian changelog agree;
- the committed man page and README options table are what scripts/make-man.py generates;
- the sdist holds the tests, their bed, the docs, the man page, the examples and the
  packaging, and the in-process tests run from it in a fresh venv;
- the systemd drop-ins and the cron file are valid and use options that exist.

These tests run from a checkout and from a distribution's build directory (the installed
package next to a copy of tests/, debian/pybuild.testfiles): source-tree files are looked up
next to tests/, the package wherever it is installed.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

import certbot_batch
from tests.bed import certbots
from tests.sourcetree import copy_source_tree, system_python_with

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(certbot_batch.__file__).resolve().parent
DIST = "certbot-batch"
DEPENDENCIES = {"certbot", "acme", "cryptography", "requests", "urllib3", "configobj"}
ENTRY_POINTS = {
    ("certbot.plugins", "batch-webroot"): "certbot_batch.plugins.webroot:BatchWebrootAuthenticator",
    ("certbot.plugins", "batch-apache"): "certbot_batch.plugins.apache:BatchApacheConfigurator",
    ("certbot.plugins", "batch-standalone"):
        "certbot_batch.plugins.standalone:BatchStandaloneAuthenticator",
    ("certbot.plugins", "batch-nginx"): "certbot_batch.plugins.nginx:BatchNginxConfigurator",
    ("console_scripts", "certbot-batch"): "certbot_batch.cli:main",
}
SKIP_IF_LOCKED = "--batch-skip-if-locked"


def source_file(relative: str) -> Path:
    """A file of the source tree (checkout, sdist, or the copies pybuild makes next to the
    tests); skip when this tree has not got it."""
    path = ROOT / relative
    if not path.exists():
        pytest.skip(f"{relative} is not next to tests/ here ({ROOT})")
    return path


def make_man() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_man",
                                                  source_file("scripts/make-man.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the certbot boundary ---------------------------------------------------------------------

def test_only_one_module_touches_certbot_internal() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if re.search(r"certbot\._internal|certbot_apache\._internal", text):
            offenders.append(path.relative_to(PACKAGE).as_posix())
    assert offenders == ["_certbot.py"]


_BOOT_UNKNOWN = """
import sys, certbot
certbot.__version__ = "99.0.0"
from certbot.main import main
sys.exit(main())
"""

_BOOT_MOVED = """
import sys
from certbot._internal import renewal
del renewal.should_renew
from certbot.main import main
sys.exit(main())
"""


@pytest.mark.parametrize("boot,reason", [(_BOOT_UNKNOWN, "99.0.0"),
                                         (_BOOT_MOVED, "should_renew")])
def test_unknown_certbot_disables_engine_with_warning(tmp_path: Path, certbot_flavour: str,
                                                      boot: str, reason: str) -> None:
    python = certbots.python_for(certbot_flavour)
    assert python is not None
    dirs = ["--config-dir", str(tmp_path / "c"), "--work-dir", str(tmp_path / "w"),
            "--logs-dir", str(tmp_path / "l")]
    env = certbots.clean_env()
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        [str(python), "-c", boot, *dirs, "renew", "--non-interactive",
         "--no-random-sleep-on-renew", "--batch-engine"],
        capture_output=True, text=True, check=False, timeout=120, env=env)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "renewal engine disabled" in out and reason in out
    assert proc.returncode == 0, out
    assert "No renewals were attempted" in out or "No simulated renewals" in out
    # certbot ran as stock: no certbot-batch scan, no state database.
    assert "certbot-batch: checked" not in out
    assert not (tmp_path / "w" / "certbot-batch" / "state.sqlite").exists()


# -- release metadata -------------------------------------------------------------------------

def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]


def test_metadata() -> None:
    meta = importlib.metadata.metadata(DIST)
    assert meta["Version"] == certbot_batch.__version__
    assert meta["Requires-Python"] == ">=3.10"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    assert meta["Author"] == "The certbot-batch developers"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert urls["Homepage"] == "https://github.com/certbot-batch/certbot-batch"
    assert urls["Source"] == urls["Homepage"]
    assert urls["Issues"] == urls["Homepage"] + "/issues"
    classifiers = meta.get_all("Classifier") or []
    assert "License :: OSI Approved :: Apache Software License" in classifiers
    versions = [c.rsplit(" :: ", 1)[1] for c in classifiers
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions and min(versions, key=lambda v: int(v.split(".")[1])) == "3.10"
    # No lower bounds (certbot 1.x checks them before it imports a plugin: a bound it does
    # not meet breaks every certbot command); nothing beyond the decided set.
    required = [r for r in importlib.metadata.requires(DIST) or [] if "extra ==" not in r]
    assert {_requirement_name(r) for r in required} == DEPENDENCIES
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", r.strip()) for r in required), required


def test_entry_points_are_exactly_our_plugins_and_the_script() -> None:
    eps = importlib.metadata.distribution(DIST).entry_points
    assert {(ep.group, ep.name): ep.value for ep in eps} == ENTRY_POINTS


def test_interpreter_meets_requires_python() -> None:
    assert sys.version_info >= (3, 10)
    # The call that made 3.9 impossible (plugins/server.py looks certbot's Apache and nginx
    # plugins up this way; 3.9's entry_points() takes no arguments).
    names = {ep.name for ep in importlib.metadata.entry_points(group="certbot.plugins")}
    assert {"batch-webroot", "batch-apache", "batch-nginx"} <= names


def test_ruff_target_matches_requires_python() -> None:
    text = source_file("pyproject.toml").read_text()
    assert re.search(r'^requires-python = ">=3\.10"', text, re.M)
    assert re.search(r'^target-version = "py310"', text, re.M)


def test_license_is_the_full_apache_text_with_a_copyright_line() -> None:
    path = ROOT / "LICENSE"
    if path.exists():
        text = path.read_text()
    else:  # an installed package: the wheel's copy in the dist-info
        files = importlib.metadata.distribution(DIST).files or []
        copies = [f for f in files if f.name == "LICENSE"]
        if not copies:
            pytest.skip("no LICENSE here (a distribution keeps it in its copyright file)")
        text = copies[0].read_text()
    assert text.startswith("Copyright 2026 The certbot-batch developers\n")
    for needle in ("Apache License", "Version 2.0, January 2004",
                   "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
                   "9. Accepting Warranty or Additional Liability.",
                   "END OF TERMS AND CONDITIONS"):
        assert needle in text
    assert len(text.splitlines()) > 200


def test_debian_changelog_version_is_the_upstream_version() -> None:
    first = source_file("packaging/debian/changelog").read_text().splitlines()[0]
    match = re.fullmatch(r"certbot-batch \(([^)]+)\) \S+; urgency=\w+", first)
    assert match, first
    assert match.group(1).rsplit("-", 1)[0] == certbot_batch.__version__


def test_debian_depends_on_the_supported_certbot_range() -> None:
    control = source_file("packaging/debian/control").read_text()
    binary = control.split("\nPackage: python3-certbot-batch\n", 1)[1]
    depends = re.search(r"^Depends:\n((?: .*\n)+)", binary, re.M)
    assert depends, binary
    items = {line.strip().rstrip(",") for line in depends.group(1).splitlines()}
    # certbot-batch supports certbot 2.1 to 5.x (README, docs/architecture.md).
    assert {"python3-certbot (>= 2.1)", "python3-certbot (<< 6)", "certbot"} <= items
    assert re.search(r"^Enhances:\n certbot,$", binary, re.M)
    assert re.search(r"^Recommends:\n python3-certbot-apache,$", binary, re.M)


# -- man page ---------------------------------------------------------------------------------

def test_man_page_and_readme_table_are_up_to_date() -> None:
    mm = make_man()
    for path, text in mm.outputs().items():
        committed = path.read_text(encoding="utf-8") if path.exists() else ""
        assert committed == text, (f"{path.name} is out of date: run scripts/make-man.py "
                                   "(and commit the result)")


def test_man_page_documents_every_option() -> None:
    mm = make_man()
    page = source_file("man/certbot-batch.1").read_text()
    from certbot_batch import cli

    parser = cli.build_parser()
    sub, _helps = mm._subparsers(parser)
    options = [s for a in parser._actions for s in a.option_strings]
    for subparser in sub.choices.values():
        options += [s for a in subparser._actions for s in a.option_strings]
    options += [s for a in mm.run_options() for s in a.option_strings]
    assert "--batch-engine" in options and "--config-dir" in options
    for option in options:
        assert f"\\fB{option.replace('-', chr(92) + '-')}\\fR" in page, option
    assert '.SH "BATCH OPTIONS OF CERTBOT RENEW"' in page
    # Deterministic: no date from the clock (the .TH date field is empty).
    assert re.search(r'^\.TH CERTBOT\\-BATCH 1 "" "certbot\\-batch [0-9.]+" ', page, re.M)


def test_run_options_come_from_options_py_through_a_throwaway_parser() -> None:
    mm = make_man()

    def add(parser: object) -> None:
        parser.add_argument("--batch-zzz-new", type=int, default=7,  # type: ignore[attr-defined]
                            help="A new option. (default: 7)")

    [action] = mm.run_options(add)
    assert mm._metavar(action) == "BATCH_ZZZ_NEW" and mm._default(action) == "7"
    assert mm._plain_help(action) == "A new option."


def test_man_page_renders_without_warnings(tmp_path: Path) -> None:
    page = source_file("man/certbot-batch.1")
    if shutil.which("man") is None:
        pytest.skip("man (man-db) is not installed")
    # lintian's check (manpage-has-errors-from-man), with its environment.
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80", HOME=str(tmp_path))
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                           str(page)], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = subprocess.run(["man", "-l", "-P", "cat", str(page)], capture_output=True,
                          text=True, env=env, check=True).stdout
    assert "certbot-batch - renewal status of Certbot lineages" in text
    lexgrog = shutil.which("lexgrog")
    if lexgrog:  # lintian's whatis check
        proc = subprocess.run([lexgrog, str(page)], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0 and "certbot-batch - " in proc.stdout, proc.stdout


# -- sdist ------------------------------------------------------------------------------------

_SDIST_MUST_HAVE = (
    "LICENSE", "README.md", "pyproject.toml", "MANIFEST.in", "PKG-INFO",
    "src/certbot_batch/__init__.py", "src/certbot_batch/py.typed",
    "tests/__init__.py", "tests/conftest.py", "tests/test_packaging.py",
    "tests/bed/__init__.py", "tests/bed/certbots.py", "tests/bed/pebble.py",
    "tests/bed/apache.py", "tests/bed/farm.py", "tests/bed/responder.py",
    "docs/debian.md", "docs/scheduling.md", "man/certbot-batch.1", "scripts/make-man.py",
    "scripts/test-deb.sh", "benchmarks/README.md",
    "contrib/systemd/certbot.timer.d/certbot-batch.conf",
    "contrib/systemd/certbot.service.d/certbot-batch.conf", "contrib/cron/certbot-batch",
    "packaging/debian/control", "packaging/debian/rules", "packaging/debian/tests/control",
)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("sdist")
    tree = copy_source_tree(base / "tree")
    out = base / "dist"
    # The PEP 517 hook of the interpreter running the tests: no isolated build env to fetch.
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
         "print(b.build_sdist(sys.argv[1]))", str(out)],
        cwd=tree, capture_output=True, text=True, check=False, timeout=300,
        env=certbots.clean_env())
    assert proc.returncode == 0, proc.stderr
    yield out / proc.stdout.strip().splitlines()[-1]


def test_sdist_contents(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    # certbot-batch-X/ (setuptools < 69.3) or certbot_batch-X/ (normalized, newer ones)
    prefix = names[0].split("/", 1)[0] + "/"
    assert re.fullmatch(rf"certbot[-_]batch-{re.escape(certbot_batch.__version__)}/", prefix)
    assert all(n.startswith(prefix) for n in names)
    inside = {n[len(prefix):] for n in names}
    missing = [f for f in _SDIST_MUST_HAVE if f not in inside]
    assert not missing, missing
    assert {f"tests/bed/{p.name}" for p in (ROOT / "tests" / "bed").glob("*.py")} <= inside
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= inside
    junk = [n for n in inside if re.search(r"(^|/)(__pycache__|\.venv|\.git|\.pybuild)"
                                           r"(/|$)|\.py[co]$|^build/", n)]
    assert not junk, junk


def test_tests_run_from_the_unpacked_sdist_in_a_fresh_venv(sdist: Path,
                                                           tmp_path: Path) -> None:
    """The way a distribution runs them: the package installed (no src/ on the path), the
    system's libraries (Debian's certbot 2.1, cryptography 38), pybuild's dead proxy."""
    python = system_python_with("certbot", "pytest", "venv", "ensurepip", "setuptools")
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.11.4+: refuse odd members
            tar.extractall(tmp_path, filter="data")
        else:
            tar.extractall(tmp_path)
    tree = tmp_path / sdist.name[:-len(".tar.gz")]
    venv = tmp_path / "venv"
    env = certbots.clean_env()
    subprocess.run([str(python), "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, env=env, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--no-deps", "--no-build-isolation", "--no-index", str(tree)],
                         capture_output=True, text=True, check=False, env=env, timeout=300)
    assert pip.returncode == 0, pip.stderr
    env.update(http_proxy="http://127.0.0.1:9/", https_proxy="https://127.0.0.1:9/",
               no_proxy="localhost", TMPDIR=str(tmp_path))
    env.pop("NO_PROXY", None)
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-m", "not bed", "-k", "not sdist", "tests"],
        cwd=tree, capture_output=True, text=True, check=False, env=env, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert re.search(r"\b\d{2,} passed\b", proc.stdout), tail
    # It tested the installed copy, not the tree's src/.
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import certbot_batch; print(certbot_batch.__file__)"],
                           cwd=tree, capture_output=True, text=True, check=True, env=env)
    assert where.stdout.startswith(str(venv)), where.stdout


# -- scheduling examples ----------------------------------------------------------------------

def _unit_settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, in order, continuation lines joined."""
    out, section, pending = [], "", ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _batch_options(text: str) -> set[str]:
    return set(re.findall(r"--batch-[a-z-]+", text))


def _check_options_exist(used: set[str]) -> None:
    known = {s for a in make_man().run_options() for s in a.option_strings}
    assert used - {SKIP_IF_LOCKED} <= known, used - known
    if SKIP_IF_LOCKED not in known:
        pytest.skip(f"{SKIP_IF_LOCKED} is not in src/certbot_batch/options.py yet (the examples "
                    "use it)")


def test_systemd_dropins() -> None:
    timer = source_file("contrib/systemd/certbot.timer.d/certbot-batch.conf").read_text()
    service = source_file("contrib/systemd/certbot.service.d/certbot-batch.conf").read_text()
    t = _unit_settings(timer)
    # A drop-in appends to OnCalendar=: the reset must come first, then every 10 minutes
    # only (docs/scheduling.md: the cadence for short-lived certificates).
    assert [(k, v) for s, k, v in t if k == "OnCalendar"] == [("OnCalendar", ""),
                                                              ("OnCalendar", "*:0/10")]
    assert ("Timer", "RandomizedDelaySec", "10min") in t
    assert ("Timer", "FixedRandomDelay", "true") in t
    s = _unit_settings(service)
    starts = [v for sec, k, v in s if k == "ExecStart"]
    assert starts[0] == "" and len(starts) == 2, starts
    command = starts[1]
    assert "/usr/bin/certbot -q renew --no-random-sleep-on-renew --batch-engine " \
           f"{SKIP_IF_LOCKED}" in command
    # Without certbot-batch installed, certbot's own command (the options would fail).
    assert "else exec /usr/bin/certbot -q renew --no-random-sleep-on-renew; fi" in command
    _check_options_exist(_batch_options(service))


def test_systemd_dropins_verify_against_certbots_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = Path("/lib/systemd/system")
    for name in ("certbot.timer", "certbot.service"):
        if not (units / name).exists():
            pytest.skip(f"no {units / name} (Debian's certbot package)")
        shutil.copy(units / name, tmp_path / name)
    shutil.copytree(source_file("contrib/systemd"), tmp_path, dirs_exist_ok=True)
    proc = subprocess.run([analyze, "verify", str(tmp_path / "certbot.timer"),
                           str(tmp_path / "certbot.service")], capture_output=True,
                          text=True, check=False, cwd=tmp_path)
    # Unknown keys, bad values and missing executables only warn: any output is a finding.
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stderr
    cal = subprocess.run([analyze, "calendar", "*:0/10"], capture_output=True, text=True,
                         check=False)
    assert "Normalized form: *-*-* *:00/10:00" in cal.stdout, cal.stdout


def test_cron_file(tmp_path: Path) -> None:
    text = source_file("contrib/cron/certbot-batch").read_text()
    jobs = [line for line in text.splitlines()
            if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    assert len(jobs) == 1, jobs
    minute, hour, dom, month, dow, user, command = jobs[0].split(None, 6)
    assert (minute, hour, dom, month, dow, user) == ("*/10", "*", "*", "*", "*", "root")
    # The random delay stays within the 10 minutes.
    assert "sleep int(rand(540))" in command
    assert "%" not in command  # cron would turn it into a newline
    assert "--no-random-sleep-on-renew --batch-engine " + SKIP_IF_LOCKED in command
    assert "-d /run/systemd/system" in command  # with systemd, the timer does it
    syntax = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True,
                            check=False)
    assert syntax.returncode == 0, syntax.stderr
    _check_options_exist(_batch_options(text))
