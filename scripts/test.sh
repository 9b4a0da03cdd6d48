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
# The end-to-end tests mostly wait on pebble, Apache, nginx and BIND: 6 workers on 2 cores
# run the suite in 12 minutes where 4 take 16 (each worker takes its loopback ports from its
# own block: tests/bed/ports.py). CERTBOT_BATCH_JOBS=0 runs it in this process, one test
# after another.
jobs=${CERTBOT_BATCH_JOBS:-6}
xdist=(); [ "$jobs" != 0 ] && xdist=(-n "$jobs")
echo "== in-process core (coverage)"
# The fast tests alone (no pebble, Apache, BIND, no certbot subprocess), measured: the
# session, the challenge batch, the grouped rounds, the journal, the deployment flush, the
# pending record and http-01 through a server must each be at least 75 % covered by them
# (issue 17).
cov_dir=$(mktemp -d)
.venv-pypi/bin/python -m pytest -q -m "not bed" -p no:cacheprovider "${xdist[@]}" \
  --cov=certbot_batch --cov-report=json:"$cov_dir/coverage.json" --cov-report= \
  tests/ >"$cov_dir/out" 2>&1 || { cat "$cov_dir/out"; status=1; }
tail -1 "$cov_dir/out"
.venv-pypi/bin/python scripts/core-coverage.py "$cov_dir/coverage.json" || status=1
rm -rf "$cov_dir"
echo "== pytest"
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
