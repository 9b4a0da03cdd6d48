"""Issue 8: every certbot our users have, with certbot-batch installed next to it.

* supported releases (Debian 12's 2.1.0, 2.9.0, 4.0.0, 5.4.0, latest 5.x): ``certbot renew``
  on an empty config dir exits 0; a batched renewal renews everything, exits 0, and certbot's
  post-hooks see the right RENEWED_DOMAINS (certbot >= 2.7 exports it);
* certbot 1.21.0 (Ubuntu 22.04, unsupported): ``--version``, ``plugins`` and ``renew`` exit 0
  as stock, with one warning line and no traceback;
* every entry of the boundary table (_certbot.BOUNDARY) deleted in turn: certbot still
  works as stock (one warning, no traceback, certbot's own exit code);
* certbot's own unit tests fail on exactly the same tests with and without certbot-batch.
"""
from __future__ import annotations

import concurrent.futures
import re
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from certbot_batch import _certbot
from tests import sourcetree
from tests.bed import certbots, hiding
from tests.bed.apache import Apache
from tests.bed.certbots import Certbot
from tests.bed.farm import FarmCA, make_farm
from tests.bed.pebble import Pebble

ROOT = Path(__file__).resolve().parent.parent
BOOT = "import sys; from certbot.main import main; sys.exit(main())"
WARNING = "certbot-batch: renewal engine disabled"
STILL_THERE = "[inherited, still there]\n"


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def dirs(base: Path) -> list[str]:
    return ["--config-dir", str(base / "c"), "--work-dir", str(base / "w"),
            "--logs-dir", str(base / "l")]


def run_py(python: Path, code: str, args: list[str], tmp: Path,
           env_extra: Optional[dict[str, str]] = None,
           timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = certbots.clean_env()
    env["TMPDIR"] = str(tmp)
    env.update(env_extra or {})
    return subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True,
                          env=env, check=False, timeout=timeout, cwd=tmp)


# -- supported releases ------------------------------------------------------------------

@pytest.mark.versions
@pytest.mark.parametrize("batch", [False, True], ids=["plain", "batch-engine"])
def test_renew_on_empty_config_dir_exits_0(certbot_flavour: str, tmp_path: Path,
                                           batch: bool) -> None:
    python = certbots.python_for(certbot_flavour)
    assert python is not None
    args = ["renew", "--non-interactive", "--no-random-sleep-on-renew", *dirs(tmp_path)]
    if batch:
        args.append("--batch-engine")
    proc = run_py(python, BOOT, args, tmp_path)
    assert proc.returncode == 0, out(proc)
    assert "Traceback" not in out(proc)
    assert WARNING not in out(proc)
    assert "No renewals were attempted" in out(proc)
    plugins = run_py(python, BOOT, ["plugins", "--non-interactive", *dirs(tmp_path)], tmp_path)
    assert plugins.returncode == 0, out(plugins)
    assert "* batch-webroot" in plugins.stdout and "* batch-apache" in plugins.stdout


@pytest.mark.versions
def test_batched_renewal_exits_0_and_post_hook_sees_domains(certbot: Certbot, apache: Apache,
                                                            pebble: Pebble,
                                                            tmp_path: Path) -> None:
    certbot.register()
    names = make_farm(str(certbot.config_dir), 4, ca=FarmCA.create(),
                      server=pebble.directory_url, webroot=str(apache.webroot),
                      name_fmt="compat{i}.test", version=certbot.version)
    seen = tmp_path / "post-hook.env"
    hook = f"printf '%s|%s' \"$RENEWED_DOMAINS\" \"$FAILED_DOMAINS\" >> {seen}"
    proc = certbot.run("renew", "--force-renewal", "-a", "batch-webroot", "--post-hook", hook)
    text = out(proc)
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    for name in names:
        archive = certbot.config_dir / "archive" / name
        assert len(list(archive.glob("cert*.pem"))) == 2, (name, text)
    assert "Congratulations, all renewals succeeded" in text, text
    recorded = seen.read_text()
    assert recorded.count("|") == 1, recorded  # the post-hook ran exactly once
    renewed, failed = recorded.split("|")
    if certbot.version_info >= (2, 7):  # certbot exports them from 2.7 on
        assert sorted(renewed.split()) == sorted(names), recorded
        assert failed == ""


# -- certbot 1.21 (unsupported) ------------------------------------------------------------

def _c121() -> Path:
    python = ROOT / ".venv-c121" / "bin" / "python"
    if not python.exists():
        pytest.skip("no certbot 1.21 venv (.venv-c121, made by scripts/setup.sh)")
    return python


@pytest.mark.parametrize("route", ["installed", "plugin-path"])
def test_certbot_1_21_runs_as_stock(tmp_path: Path, route: str) -> None:
    python = _c121()
    env: dict[str, str] = {}
    if route == "plugin-path":
        # docs/debian.md's route: pip --no-deps --target DIR + CERTBOT_PLUGIN_PATH, into an
        # interpreter where certbot-batch is otherwise invisible.
        target = tmp_path / "plugins"
        # From a copy: building writes build/ and *.egg-info into the tree it builds.
        source = sourcetree.copy_source_tree(tmp_path / "src")
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                              "--target", str(target), str(source)],
                             capture_output=True, text=True, check=False, timeout=300,
                             env=certbots.clean_env())
        assert pip.returncode == 0, pip.stderr
        env["CERTBOT_PLUGIN_PATH"] = str(target)
        code = hiding.prelude(hiding.without_certbot_batch(python, tmp_path / "m")) + BOOT
    else:
        code = BOOT
    probe = run_py(python, "import certbot; print(certbot.__version__)", [], tmp_path)
    assert probe.stdout.strip() == "1.21.0"
    for args in (["--version"], ["plugins", "--non-interactive"],
                 ["renew", "--non-interactive", "--no-random-sleep-on-renew"]):
        full = args if args == ["--version"] else [*args, *dirs(tmp_path)]
        proc = run_py(python, code, full, tmp_path, env)
        text = out(proc)
        assert proc.returncode == 0, (args, text)
        assert "Traceback" not in text and "unexpected error" not in text, text
        warnings = [line for line in text.splitlines() if line.startswith("certbot-batch")]
        assert len(warnings) == 1 and WARNING in warnings[0], text
        if args[0] == "plugins":
            assert "* webroot" in text, text
        if args[0] == "renew":
            assert "No renewals were attempted" in text, text


# -- the boundary table ------------------------------------------------------------------------

def _delete_entry_prelude(entry: _certbot.Internal) -> str:
    """Python that deletes every spelling of the entry's attribute before certbot starts."""
    lines = ["import importlib, sys"]
    for name in entry.attr.split("|"):
        *parents, attr = name.split(".")
        lines.append("try:")
        lines.append(f"    o = importlib.import_module({entry.module!r})")
        for p in parents:
            lines.append(f"    o = getattr(o, {p!r})")
        lines.append(f"    if {attr!r} in getattr(o, '__dict__', {{}}): delattr(o, {attr!r})")
        lines.append(f"    else: delattr(o, {attr!r})")
        lines.append("except (AttributeError, ImportError):")
        lines.append("    pass")
        # A method a class only inherits from a base class is still there.
        lines.append("try:")
        lines.append(f"    if hasattr(o, {attr!r}): sys.stderr.write({STILL_THERE!r})")
        lines.append("except NameError:")
        lines.append("    pass")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("flavour", [f for f in ("pypi", "deb") if f in certbots.flavours()])
def test_each_boundary_entry_deleted_certbot_still_works(flavour: str, tmp_path: Path) -> None:
    python = certbots.python_for(flavour)
    assert python is not None
    hidden = hiding.prelude(hiding.without_certbot_batch(python, tmp_path / "mirror"))
    commands = {"plugins": ["plugins", "--non-interactive"],
                "renew": ["renew", "--non-interactive", "--no-random-sleep-on-renew",
                          "--batch-engine"]}

    def check(index: int) -> list[str]:
        entry = _certbot.BOUNDARY[index]
        problems = []
        base = tmp_path / f"e{index}"
        base.mkdir()
        prelude = _delete_entry_prelude(entry)
        for label, args in commands.items():
            proc = run_py(python, prelude + BOOT, [*args, *dirs(base)], base)
            text = out(proc)
            # certbot may fail before it loads any plugin (then nobody can warn): see below.
            if entry.required and proc.returncode == 0 and WARNING not in text \
                    and STILL_THERE not in text:
                problems.append(f"{entry.attr} {label}: no warning\n{text}")
            if "Traceback" in text:
                problems.append(f"{entry.attr} {label}: traceback\n{text}")
            if proc.returncode != 0:
                # Only acceptable when stock certbot without us fails the same way.
                stock_args = [a for a in args if a != "--batch-engine"]
                stock = run_py(python, hidden + prelude + BOOT, [*stock_args, *dirs(base)],
                               base)
                if stock.returncode != proc.returncode:
                    problems.append(f"{entry.attr} {label}: exit {proc.returncode}, stock "
                                    f"{stock.returncode}\n{text}")
                log = (base / "l" / "letsencrypt.log")
                if log.exists() and "certbot_batch" in "".join(
                        re.findall(r"File \"[^\"]+\"", log.read_text(errors="replace"))):
                    problems.append(f"{entry.attr} {label}: certbot-batch in the traceback")
        return problems

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(check, range(len(_certbot.BOUNDARY))))
    problems = [p for r in results for p in r]
    assert not problems, "\n\n".join(problems)


# -- certbot's own unit tests ----------------------------------------------------------------

def _certbot_unit_failures(python: Path, prelude: str, tmp: Path) -> set[str]:
    code = (prelude + "import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider',"
            " '-rf', '--pyargs', 'certbot._internal.tests']))")
    tmp.mkdir()
    proc = run_py(python, code, [], tmp, timeout=900)
    text = out(proc)
    assert re.search(r"\d+ passed", text), text[-3000:]
    return set(re.findall(r"^FAILED (\S+)", text, re.MULTILINE))


@pytest.mark.slow
def test_certbots_own_unit_tests_unchanged(tmp_path: Path) -> None:
    python = certbots.python_for("pypi")
    if python is None:
        pytest.skip("no latest-certbot venv")
    probe = run_py(python, "import pytest, certbot._internal.tests", [], tmp_path)
    if probe.returncode != 0:
        pytest.skip(f"certbot's tests cannot run here: {probe.stderr.strip()[-200:]}")
    hidden = hiding.prelude(hiding.without_certbot_batch(python, tmp_path / "mirror"))
    # Both runs at once (2 cores): about a minute instead of two.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        with_us_f = pool.submit(_certbot_unit_failures, python, "", tmp_path / "with")
        without_f = pool.submit(_certbot_unit_failures, python, hidden, tmp_path / "without")
        with_us, without = with_us_f.result(), without_f.result()
    assert with_us == without, {"only with certbot-batch": sorted(with_us - without),
                                "only without": sorted(without - with_us)}

