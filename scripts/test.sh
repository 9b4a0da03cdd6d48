#!/usr/bin/env bash
# The test command: sets up what is missing, then ruff, mypy, the whole test suite (real
# pebble, real Apache, both certbots) and the Debian package (scripts/test-deb.sh). Extra
# arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null || { echo "setup failed"; exit 1; }
export CERTBOT_BATCH_VENV_PYPI="$PWD/.venv-pypi" CERTBOT_BATCH_VENV_DEB="$PWD/.venv-deb"
status=0
lint_dirs=(); for d in src tests benchmarks scripts; do [ -d "$d" ] && lint_dirs+=("$d"); done
echo "== ruff";  .venv-pypi/bin/ruff check "${lint_dirs[@]}" || status=1
echo "== mypy";  .venv-pypi/bin/mypy || status=1
echo "== pytest"
# The end-to-end tests mostly wait on pebble, Apache and BIND: 4 workers on 2 cores run the
# suite ~3x faster (each worker takes its loopback ports from its own block: tests/bed/ports.py).
# CERTBOT_BATCH_JOBS=0 runs it in this process, one test after another.
jobs=${CERTBOT_BATCH_JOBS:-4}
xdist=(); [ "$jobs" != 0 ] && xdist=(-n "$jobs")
.venv-pypi/bin/python -m pytest -q -ra --durations=30 "${xdist[@]}" "$@"
rc=$?
# pytest exit 5 = no tests collected: that is a failure here, not a pass.
[ $rc -eq 0 ] || status=1
# The Debian package (about 1.5 minutes): built from a copy of the tree with the build-time
# tests, lintian, installed in a private mount namespace, a renewal with /usr/bin/certbot
# against pebble, purged. CERTBOT_BATCH_DEB=0 skips it.
if [ "${CERTBOT_BATCH_DEB:-1}" != 0 ]; then
  echo "== deb"
  ./scripts/test-deb.sh || status=1
fi
exit $status
