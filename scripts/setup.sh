#!/usr/bin/env bash
# Installs everything certbot-batch's tests, benchmarks and demo need on Debian 12:
# apt packages (pebble, Apache, Debian's certbot 2.1.0 + Apache plugin) and two venvs:
#   .venv-pypi  latest certbot from PyPI (+ its Apache plugin), certbot-batch editable
#   .venv-deb   Debian's python3 with --system-site-packages (apt certbot 2.1.0),
#               certbot-batch installed with --no-deps, the way a distro user would.
# Idempotent: re-running only fills in what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

APT_PACKAGES=(pebble apache2 libaugeas-dev certbot python3-certbot-apache python3-venv
              python3-setuptools python3-pip ca-certificates)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  # Installing apache2 must not start (or restart) the host's Apache: we only ever run
  # private Apache roots on loopback ports.
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d; policy_created=1
  fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
  [ $policy_created = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d
fi

PY=${PYTHON:-python3}
if [ ! -x .venv-pypi/bin/certbot ] || [ ! -x .venv-pypi/bin/pytest ]; then
  "$PY" -m venv .venv-pypi
  .venv-pypi/bin/pip install -q --upgrade pip
fi
.venv-pypi/bin/pip install -q -e ".[apache,test]"

if [ ! -x .venv-deb/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv-deb
fi
# Dependencies come from apt (certbot, acme, josepy, cryptography, requests).
.venv-deb/bin/pip install -q --no-deps --no-build-isolation -e .

echo "setup done:"
echo "  PyPI certbot $(.venv-pypi/bin/certbot --version 2>&1 | awk '{print $2}') in $ROOT/.venv-pypi"
echo "  Debian certbot $(.venv-deb/bin/python -c 'import certbot; print(certbot.__version__)') in $ROOT/.venv-deb"
