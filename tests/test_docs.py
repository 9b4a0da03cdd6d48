"""Every shell block of docs/debian.md and docs/scheduling.md is run by a test.

Blocks carry a marker (``<!-- test: NAME -->``, tests/docblocks.py); RUNNERS says which file
runs each one, and that file must name it. The Debian package blocks run in
scripts/test-deb.sh (build, lintian, install) and tests/test_deb.py (use, timer, cron), with
the package installed; the venv and CERTBOT_PLUGIN_PATH routes run here, against a copy of
the checkout and Debian's certbot.

The commands run as written, with the substitutions listed next to each run: paths under
/opt, /usr/local and /etc go to a temporary directory, "install certbot-batch from PyPI"
installs the copy of the checkout, apt-get only checks what it would install, and
`systemctl daemon-reload` (no systemd in a test container) becomes `systemd-analyze verify`.
certbot's own directories come from a cli.ini in $XDG_CONFIG_HOME, the way certbot reads
it, so certbot never touches /etc/letsencrypt.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import docblocks
from tests.docblocks import output
from tests.sourcetree import copy_source_tree, deb_installed, system_python_with

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_MD = ROOT / "docs" / "debian.md"
SCHEDULING_MD = ROOT / "docs" / "scheduling.md"
DOCS = (DEBIAN_MD, SCHEDULING_MD)
SKIP_IF_LOCKED = "--batch-skip-if-locked"

#: block name -> the file that runs it.
RUNNERS = {
    "deb-build": "scripts/test-deb.sh",
    "deb-lint": "scripts/test-deb.sh",
    "deb-install": "scripts/test-deb.sh",
    "deb-use": "tests/test_deb.py",
    "deb-timer": "tests/test_deb.py",
    "deb-revert": "tests/test_deb.py",
    "deb-remove": "scripts/test-deb.sh",
    "cron": "tests/test_deb.py",
    "venv": "tests/test_docs.py",
    "venv-timer": "tests/test_docs.py",
    "venv-update": "tests/test_docs.py",
    "plugin-path": "tests/test_docs.py",
}


def _docs() -> tuple[Path, ...]:
    for doc in DOCS:
        if not doc.exists():
            pytest.skip(f"no {doc.relative_to(ROOT)} here")
    return DOCS


def test_every_shell_block_is_run_by_a_test() -> None:
    seen: dict[str, str] = {}
    for doc in _docs():
        for block in docblocks.shell_blocks(doc):
            where = f"{doc.name}:{block.line}"
            assert block.name, f"{where}: a shell block without a <!-- test: NAME --> marker"
            assert block.name in RUNNERS, f"{where}: no runner for {block.name!r}"
            # The same name twice (debian.md and scheduling.md): the same commands.
            assert seen.setdefault(block.name, block.text) == block.text, where
    assert set(seen) == set(RUNNERS)
    for name, runner in RUNNERS.items():
        path = ROOT / runner
        if not path.exists():
            pytest.skip(f"no {runner} here")
        # Python runners call docblocks.block(DOC, "name"), test-deb.sh run_doc_block DOC name.
        pattern = (rf'"{re.escape(name)}"\)' if runner.endswith(".py")
                   else rf"run_doc_block \S+ {re.escape(name)}(?![\w-])")
        assert re.search(pattern, path.read_text()), f"{runner} does not run {name!r}"


def test_documented_versions_match_the_package() -> None:
    import certbot_batch

    text = DEBIAN_MD.read_text() if DEBIAN_MD.exists() else pytest.skip("no docs")
    assert f"python3-certbot-batch_{certbot_batch.__version__}-1_all.deb" in text
    assert "python3-certbot (>= 2.1), python3-certbot (<< 6)" in text


# -- running blocks ----------------------------------------------------------------------------

def known_run_options() -> set[str]:
    import argparse

    from certbot_batch import options

    parser = argparse.ArgumentParser(add_help=False)
    options.add_run_options(parser)
    return {s for a in parser._actions for s in a.option_strings}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return copy_source_tree(tmp_path / "tree")


@pytest.mark.bed
def test_venv_route(tmp_path: Path, tree: Path) -> None:
    system_python_with("certbot", "venv", "ensurepip", "setuptools")
    if deb_installed():
        pytest.skip("certbot-batch is in Debian's dist-packages (the package is installed)")
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    venv = tmp_path / "opt" / "certbot-batch"
    env = docblocks.cli_ini_env(tmp_path)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"  # the wrapper first, as /usr/local/bin is
    text = docblocks.substitute(docblocks.block(DEBIAN_MD, "venv"), [
        ("apt-get install certbot python3-certbot-apache python3-venv",
         "dpkg-query -W certbot python3-certbot-apache python3-venv"),
        ("pip install --no-deps certbot-batch",
         f"pip install -q --no-deps --no-build-isolation --no-index {tree}"),
        ("/opt/certbot-batch", str(venv)),
        ("/usr/local/bin/certbot", str(bin_dir / "certbot")),
    ])
    proc = docblocks.run_block(text, env, tmp_path)
    assert proc.returncode == 0, output(proc)
    import certbot_batch

    assert "* batch-webroot" in proc.stdout and "* batch-apache" in proc.stdout, output(proc)
    assert f"certbot-batch {certbot_batch.__version__}\n" in proc.stdout
    assert "Traceback" not in output(proc)
    # Updating: pip replaces the venv's copy (here: with the same tree).
    text = docblocks.substitute(docblocks.block(DEBIAN_MD, "venv-update"), [
        ("pip install --no-deps --upgrade certbot-batch",
         f"pip install -q --no-deps --upgrade --no-build-isolation --no-index {tree}"),
        ("/opt/certbot-batch", str(venv)),
    ])
    proc = docblocks.run_block(text, env, tmp_path)
    assert proc.returncode == 0, output(proc)
    installed = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import certbot_batch; print(certbot_batch.__file__)"],
                               capture_output=True, text=True, env=env, check=True)
    assert installed.stdout.startswith(str(venv)), installed.stdout
    # Only through the wrapper: apt's /usr/bin/certbot does not see the venv.
    if Path("/usr/bin/certbot").exists():
        stock = subprocess.run(["/usr/bin/certbot", "plugins", "--text"], capture_output=True,
                               text=True, env=env, check=False, timeout=120)
        assert stock.returncode == 0 and "batch-webroot" not in stock.stdout, output(stock)

    # The unit drop-in for this route, then its command (an empty config dir: nothing to do).
    etc = tmp_path / "etc" / "systemd" / "system"
    units = tmp_path / "units"
    units.mkdir()
    for name in ("certbot.timer", "certbot.service"):
        if Path("/lib/systemd/system", name).exists():
            shutil.copy(Path("/lib/systemd/system", name), units / name)
    text = docblocks.substitute(docblocks.block(DEBIAN_MD, "venv-timer"), [
        ("/etc/systemd/system", str(etc)),
        ("/usr/local/bin/certbot", str(bin_dir / "certbot")),
        ("systemctl daemon-reload", f"cp -r {etc}/. {units}/ && "
         + docblocks.verify_command(units / "certbot.timer", units / "certbot.service")),
    ])
    proc = docblocks.run_block(text, env, tmp_path)
    assert proc.returncode == 0 and output(proc) == "", output(proc)
    dropin = etc / "certbot.service.d" / "certbot-batch.conf"
    command = docblocks.exec_start(dropin.read_text())
    assert command[0] == str(bin_dir / "certbot")
    missing = SKIP_IF_LOCKED not in known_run_options()
    if missing:  # not in options.py yet: the rest of the command must work
        command.remove(SKIP_IF_LOCKED)
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, output(run)
    assert output(run) == "", output(run)  # -q: nothing to say when nothing is due
    assert (tmp_path / "work" / "certbot-batch" / "state.sqlite").exists()  # the engine ran
    if missing:
        pytest.skip(f"{SKIP_IF_LOCKED} is not in src/certbot_batch/options.py yet")


@pytest.mark.bed
def test_plugin_path_route_and_its_limits(tmp_path: Path, tree: Path) -> None:
    python = system_python_with("certbot", "pip")
    if not Path("/usr/bin/certbot").exists():
        pytest.skip("Debian's certbot is not installed")
    if deb_installed():
        pytest.skip("certbot-batch is in Debian's dist-packages (the package is installed): "
                    "a second copy through CERTBOT_PLUGIN_PATH would be a duplicate plugin")
    target = tmp_path / "plugins"
    env = docblocks.cli_ini_env(tmp_path)
    text = docblocks.substitute(docblocks.block(DEBIAN_MD, "plugin-path"), [
        ("pip3 install", f"{python} -m pip install -q --no-build-isolation --no-index"),
        ("/opt/certbot-batch-plugins", str(target)),
        (" certbot-batch\n", f" {tree}\n"),
    ])
    proc = docblocks.run_block(text, env, tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "* batch-webroot" in proc.stdout and "* batch-apache" in proc.stdout, output(proc)
    # What the page says about its limits. Without the variable certbot knows nothing of
    # us (nothing went into dist-packages) ...
    stock = subprocess.run(["/usr/bin/certbot", "plugins", "--text"], capture_output=True,
                           text=True, env=env, check=False, timeout=120)
    assert stock.returncode == 0 and "batch-webroot" not in stock.stdout, output(stock)
    # ... a batch option in cli.ini then breaks every command ...
    broken_env = docblocks.cli_ini_env(tmp_path, "batch-engine = true\n")
    for args in (["plugins"], ["renew", "--no-random-sleep-on-renew"], ["certificates"]):
        proc = subprocess.run(["/usr/bin/certbot", *args], capture_output=True, text=True,
                              env=broken_env, check=False, timeout=120)
        text = output(proc)
        assert proc.returncode != 0 and "unrecognized arguments" in text, text
    # ... unless certbot-batch is loaded.
    loaded = dict(broken_env, CERTBOT_PLUGIN_PATH=str(target))
    proc = subprocess.run(["/usr/bin/certbot", "renew", "--no-random-sleep-on-renew"],
                          capture_output=True, text=True, env=loaded, check=False,
                          timeout=120)
    assert proc.returncode == 0, output(proc)
    # ... and the scripts pip wrote into the target do not run.
    script = target / "bin" / "certbot-batch"
    assert script.exists()
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          env=env, check=False, timeout=60)
    assert proc.returncode != 0 and "No module named 'certbot_batch'" in proc.stderr, \
        output(proc)
