#!/usr/bin/env bash
# The main job as a demo: sets everything up (apt packages, venvs), then renews a farm of
# a few hundred lineages with batch-webroot + batch-apache against a local pebble CA and a
# private Apache on loopback ports, and prints what happened. Options: see scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CERTBOT_BATCH_VENV_PYPI="$PWD/.venv-pypi" CERTBOT_BATCH_VENV_DEB="$PWD/.venv-deb"
exec .venv-pypi/bin/python scripts/demo.py "$@"
