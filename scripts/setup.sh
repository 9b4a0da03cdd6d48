#!/usr/bin/env bash
# Installs everything certbot-batch's tests, benchmarks and demo need on Debian 12:
# apt packages (pebble, Apache, nginx, BIND, Debian's certbot 2.1.0 + Apache, nginx and RFC 2136
# plugins)
# and one venv per certbot the project supports (see README "Supported certbot versions"):
#   .venv-pypi  latest certbot 5.x from PyPI (+ Apache, nginx, dns-rfc2136), certbot-batch editable
#   .venv-deb   Debian's python3 with --system-site-packages (apt certbot 2.1.0),
#               certbot-batch installed with --no-deps, the way a distro user would
#   .venv-c290  certbot 2.9.0 (Ubuntu 24.04), .venv-c330 3.3.0 (last 3.x),
#   .venv-c400  4.0.0 (Debian 13),
#   .venv-c540  5.4.0 (last release with a separate certbot-apache): PyPI, pinned
#   .venv-c121  certbot 1.21.0 (Ubuntu 22.04, unsupported): certbot-batch --no-deps
# Idempotent: re-running only fills in what is missing. SETUP_MATRIX=0 skips the extra
# certbot versions (quick local setups).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

APT_PACKAGES=(pebble apache2 nginx libaugeas-dev certbot python3-certbot-apache
              python3-certbot-nginx python3-certbot-dns-rfc2136 bind9 bind9-utils
              bind9-dnsutils python3-venv python3-setuptools python3-pip python3-pytest ca-certificates)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  # Installing apache2, nginx or bind9 must not start (or restart) the host's services: we
  # only ever run private servers on loopback ports.
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
# The DNS and nginx plugins of the same release as the certbot that pip chose (the nginx
# plugin lives inside certbot from 5.5: the certbot[nginx] extra).
latest=$(.venv-pypi/bin/python -c 'import certbot; print(certbot.__version__)')
nginx_req="certbot[nginx]==$latest"
if ! .venv-pypi/bin/python -c 'import sys, certbot; v = tuple(int(x) for x in certbot.__version__.split(".")[:2]); sys.exit(v < (5, 5))'; then
  nginx_req="certbot-nginx==$latest"
fi
.venv-pypi/bin/pip install -q "certbot-dns-rfc2136==$latest" "$nginx_req"

if [ ! -x .venv-deb/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv-deb
fi
# Dependencies come from apt (certbot, acme, josepy, cryptography, requests).
.venv-deb/bin/pip install -q --no-deps --no-build-isolation -e .

# venv name, then the pip requirements that make that certbot release work (FACTS.md).
MATRIX=(
  "c290|certbot==2.9.0 certbot-apache==2.9.0 certbot-nginx==2.9.0 acme==2.9.0 certbot-dns-rfc2136==2.9.0 josepy<2 pyOpenSSL<24.3"
  "c330|certbot==3.3.0 certbot-apache==3.3.0 certbot-nginx==3.3.0 acme==3.3.0 certbot-dns-rfc2136==3.3.0 pyOpenSSL==25.0.0"
  "c400|certbot==4.0.0 certbot-apache==4.0.0 certbot-nginx==4.0.0 acme==4.0.0 certbot-dns-rfc2136==4.0.0"
  "c540|certbot==5.4.0 certbot-apache==5.4.0 certbot-nginx==5.4.0 acme==5.4.0 certbot-dns-rfc2136==5.4.0"
  "c121|certbot==1.21.0 acme==1.21.0 certbot-apache==1.21.0 certbot-nginx==1.21.0 josepy<2 pyOpenSSL<24.3 setuptools>=75,<81"
)
if [ "${SETUP_MATRIX:-1}" != 0 ]; then
  for entry in "${MATRIX[@]}"; do
    name=${entry%%|*}; reqs=${entry#*|}
    venv=".venv-$name"
    stamp="$venv/.certbot-batch-reqs"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$reqs" ]; then
      rm -rf "$venv"
      "$PY" -m venv "$venv"
      # shellcheck disable=SC2086  (the requirements are words)
      "$venv/bin/pip" install -q $reqs
      echo "$reqs" > "$stamp"
    fi
    # --no-deps: the pinned certbot stack above must stay as it is.
    "$venv/bin/pip" install -q --no-deps -e .
  done
fi

echo "setup done:"
echo "  PyPI certbot $(.venv-pypi/bin/certbot --version 2>&1 | awk '{print $2}') in $ROOT/.venv-pypi"
echo "  Debian certbot $(.venv-deb/bin/python -c 'import certbot; print(certbot.__version__)') in $ROOT/.venv-deb"
if [ "${SETUP_MATRIX:-1}" != 0 ]; then
  for entry in "${MATRIX[@]}"; do
    name=${entry%%|*}
    echo "  certbot $(".venv-$name/bin/python" -c 'import certbot; print(certbot.__version__)') in $ROOT/.venv-$name"
  done
fi
