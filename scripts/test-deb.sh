#!/usr/bin/env bash
# The Debian package check, on Debian 12 as root (scripts/test.sh runs it last;
# CERTBOT_BATCH_DEB=0 there skips it):
#   1. copy the checkout to a temporary directory and build python3-certbot-batch there with
#      the commands of docs/debian.md (apt-get build-dep, dpkg-buildpackage -us -uc -b; the
#      in-process tests run at build time, under pybuild's proxy settings);
#   2. lintian, as documented, then strict (warnings and pedantic tags fail);
#   3. in a private mount namespace whose /usr, /etc and /var are copy-on-write overlays:
#      install the .deb as documented, run the autopkgtest (tests/test_deb.py: apt's
#      /usr/bin/certbot lists the plugins, man certbot-batch, batched renewals against pebble
#      and a private Apache, the documented timer and cron setups), purge the package and
#      check that nothing is left and that certbot still works.
# The host never sees the package: .venv-deb has certbot-batch installed (editable) on top of
# apt's certbot, and with a second copy in dist-packages its certbot would fail ("Duplicate
# plugin name"), for whoever runs tests at that moment. Without unshare or overlayfs (a
# container without CAP_SYS_ADMIN), step 3 runs on the host and the package is purged again
# on exit. Nothing is written into the checkout. KEEP=1 keeps the temporary directory.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# apt's interpreter and tools, never a python3 from pyenv or a venv earlier on PATH.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
unset PYTHONPATH CERTBOT_BATCH_FLAVOURS CERTBOT_BATCH_FULL CERTBOT_BATCH_VENV_PYPI \
      CERTBOT_BATCH_VENV_DEB CERTBOT_PLUGIN_PATH REQUESTS_CA_BUNDLE VIRTUAL_ENV || true
APT_OPTS="-y -q -o DPkg::Lock::Timeout=600"
PKG=python3-certbot-batch

step() { printf '== deb: %s (%ss)\n' "$*" "$SECONDS"; }

# run_doc_block FILE NAME [OLD=NEW ...]: a shell block of the docs (tests/docblocks.py), with
# the substitutions, in the current directory.
run_doc_block() {
  local file=$1 name=$2
  shift 2
  python3 "$TREE/tests/docblocks.py" "$TREE/$file" "$name" "$@" > "$WORK/block-$name.sh"
  bash -e -o pipefail "$WORK/block-$name.sh"
}

# An environment whose certbot keeps its directories in $WORK/cb ($XDG_CONFIG_HOME's cli.ini,
# certbot's user config file): documented certbot commands never touch /etc/letsencrypt.
certbot_env() {
  mkdir -p "$WORK/xdg/letsencrypt" "$WORK/cb"
  printf 'config-dir = %s\nwork-dir = %s\nlogs-dir = %s\n' \
    "$WORK/cb/config" "$WORK/cb/work" "$WORK/cb/logs" > "$WORK/xdg/letsencrypt/cli.ini"
  export XDG_CONFIG_HOME="$WORK/xdg"
}

# -- step 3, inside the namespace (or on the host) -------------------------------------------
inside() {
  WORK=$1 TREE=$1/src
  if [ "${2:-}" = overlay ]; then
    for d in usr var etc; do mkdir -p "$WORK/ovl/$d/up" "$WORK/ovl/$d/work"; done
    for d in usr var; do
      mount -t overlay overlay -o "lowerdir=/$d,upperdir=$WORK/ovl/$d/up,workdir=$WORK/ovl/$d/work" "/$d"
    done
    # /etc: keep the files the container runtime bind-mounts (resolv.conf, hosts, ...).
    mkdir -p "$WORK/ovl/etc/mnt"
    mount -t overlay overlay -o "lowerdir=/etc,upperdir=$WORK/ovl/etc/up,workdir=$WORK/ovl/etc/work" "$WORK/ovl/etc/mnt"
    findmnt -rn -o TARGET | { grep '^/etc/' || true; } | while read -r m; do
      [ -e "$WORK/ovl/etc/mnt${m#/etc}" ] && mount --bind "$m" "$WORK/ovl/etc/mnt${m#/etc}"
    done
    mount --move "$WORK/ovl/etc/mnt" /etc
    export CERTBOT_BATCH_DEB_PRIVATE_ETC=1
  fi
  certbot_env
  cd "$TREE"
  step "install (docs/debian.md)"
  run_doc_block docs/debian.md deb-install "apt-get install=apt-get install $APT_OPTS" \
    > "$WORK/install.log" 2>&1 || { tail -40 "$WORK/install.log"; return 1; }
  grep -q '^\* batch-webroot' "$WORK/install.log" && grep -q '^\* batch-apache' "$WORK/install.log" \
    || { echo "certbot plugins does not list batch-webroot and batch-apache"; cat "$WORK/install.log"; return 1; }
  grep -q 'BATCH OPTIONS OF CERTBOT RENEW' "$WORK/install.log" \
    || { echo "man certbot-batch did not show the page"; return 1; }
  step "autopkgtest debian/tests/renew-with-pebble"
  mkdir -p "$WORK/adt"
  AUTOPKGTEST_TMP="$WORK/adt" debian/tests/renew-with-pebble
  step "purge (docs/debian.md)"
  local dropin=/etc/systemd/system/certbot.service.d/certbot-batch.conf
  [ ! -f "$dropin" ] || cp "$dropin" "$WORK/dropin.conf"
  local reload=true units="/lib/systemd/system/certbot.timer /lib/systemd/system/certbot.service"
  if command -v systemd-analyze >/dev/null && [ -f /lib/systemd/system/certbot.timer ]; then
    reload="systemd-analyze verify $units"  # no systemd to reload in a test container
  fi
  run_doc_block docs/debian.md deb-remove "systemctl daemon-reload=$reload" \
    "apt-get purge=apt-get purge $APT_OPTS" > "$WORK/purge.log" 2>&1 \
    || { cat "$WORK/purge.log"; return 1; }
  if dpkg-query -W -f='${Status}\n' "$PKG" 2>/dev/null | grep -q 'installed'; then
    echo "$PKG is still installed"; return 1
  fi
  for p in /usr/lib/python3/dist-packages/certbot_batch \
           /usr/lib/python3/dist-packages/certbot_batch-*.dist-info /usr/bin/certbot-batch \
           /usr/share/doc/$PKG /usr/share/man/man1/certbot-batch.1.gz; do
    [ ! -e "$p" ] || { echo "purge left $p behind"; return 1; }
  done
  /usr/bin/certbot plugins --text > "$WORK/plugins-after.log" 2>&1 \
    || { cat "$WORK/plugins-after.log"; echo "certbot plugins fails after the purge"; return 1; }
  if grep -qE '^\* batch-' "$WORK/plugins-after.log"; then
    cat "$WORK/plugins-after.log"; echo "certbot still lists a batch plugin after the purge"
    return 1
  fi
  for p in /etc/systemd/system/certbot.timer.d/certbot-batch.conf "$dropin"; do
    [ ! -e "$p" ] || { echo "the documented removal left $p behind"; return 1; }
  done
  # A drop-in left behind after the purge: its command falls back to certbot's own
  # (docs/debian.md, docs/scheduling.md).
  if [ -f "$WORK/dropin.conf" ]; then
    python3 -c 'import shlex, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("ExecStart=")]
print(shlex.join(shlex.split(lines[-1].split("=", 1)[1])))' "$WORK/dropin.conf" > "$WORK/execstart"
    bash -c "$(cat "$WORK/execstart")" > "$WORK/fallback.log" 2>&1 \
      || { cat "$WORK/fallback.log"; echo "the drop-in's command fails without the package"; return 1; }
  fi
  step "package installed, tested and purged"
}

if [ "${1:-}" = --inside ]; then
  SECONDS=${3:-0}
  inside "$2" "${4:-}"
  exit $?
fi

# -- steps 1 and 2, on the host -------------------------------------------------------------
if [ "$(id -u)" != 0 ]; then
  exec sudo -E "$0" "$@"
fi
. /etc/os-release
if [ "${ID:-}" != debian ] || [ "${VERSION_ID:-}" != 12 ]; then
  echo "scripts/test-deb.sh builds the Debian 12 package: this is ${PRETTY_NAME:-unknown}" \
       "(CERTBOT_BATCH_DEB=0 ./scripts/test.sh skips it)" >&2
  exit 1
fi

WORK=$(mktemp -d /tmp/certbot-batch-deb.XXXXXX)
chmod 755 "$WORK"  # the private Apache's www-data must reach the webroot under it
# Every temporary file of the run under $WORK, removed with it (lintian leaves files behind
# in $TMPDIR).
mkdir -m 755 "$WORK/tmp"
export TMPDIR="$WORK/tmp"
TREE=$WORK/src
cleanup() {
  local rc=$?
  if [ "${HOST_INSTALL:-0}" = 1 ] && dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q 'installed'; then
    apt-get purge $APT_OPTS "$PKG" >/dev/null 2>&1 || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT

step "copy the checkout to $TREE"
mkdir -p "$TREE"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # What a clone would hold once the work in progress is committed: tracked and new files.
  (cd "$ROOT" && git ls-files -z -c -o --exclude-standard \
     | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf -) | tar -xf - -C "$TREE"
else
  (cd "$ROOT" && tar --exclude='./.venv*' --exclude=./.git --exclude=./build \
     --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ --exclude=./debian \
     --exclude=./.pybuild -cf - .) | tar -xf - -C "$TREE"
fi

step "build (docs/debian.md: apt-get build-dep, dpkg-buildpackage -us -uc -b)"
cd "$TREE"
if ! run_doc_block docs/debian.md deb-build \
      "apt-get install=apt-get install $APT_OPTS" \
      "apt-get build-dep=apt-get build-dep $APT_OPTS" > "$WORK/build.log" 2>&1; then
  tail -80 "$WORK/build.log"
  echo "the package build failed (log: $WORK/build.log, KEEP=1 keeps it)"
  exit 1
fi
grep -E '^(=+ .* in [0-9.]+s =+|[0-9]+ passed.*)$' "$WORK/build.log" | tail -1 || true
DEB=$(ls "$WORK"/${PKG}_*_all.deb)
echo "built $DEB"

step "lintian (docs/debian.md)"
run_doc_block docs/debian.md deb-lint "apt-get install=apt-get install $APT_OPTS" \
  > "$WORK/lintian.log" 2>&1 || { cat "$WORK/lintian.log"; exit 1; }
# Strict: any tag shown at error, warning, info or pedantic level fails (overridden "O:"
# and screened "M:" ones, which lintian also prints, do not).
lintian_strict() {
  local log=$1; shift
  lintian --pedantic --display-info "$@" > "$log" 2>&1 || true
  grep -v '^running with root privileges' "$log" || true
  if grep -qE '^[EWIP]: ' "$log"; then echo "lintian found something ($*)"; return 1; fi
}
lintian_strict "$WORK/lintian-strict.log" "$WORK"/*.changes

step "source package: the sdist as orig tarball + packaging/debian, lintian"
# What a distribution uploads: the release tarball (python -m build --sdist) and debian/.
# python3-build comes with pybuild-plugin-pyproject; no isolation: apt's setuptools. From
# $WORK: a build/ directory in the current one would shadow the module.
mkdir -p "$WORK/source/dist"
(cd "$WORK" && python3 -m build --sdist --no-isolation --outdir "$WORK/source/dist" "$TREE") \
  > "$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
VERSION=$(dpkg-parsechangelog -l "$TREE/packaging/debian/changelog" -S Version)
UPSTREAM=${VERSION%-*}
mv "$WORK"/source/dist/certbot[-_]batch-"$UPSTREAM".tar.gz "$WORK/source/certbot-batch_$UPSTREAM.orig.tar.gz"
mkdir "$WORK/source/unpacked"
tar -xzf "$WORK/source/certbot-batch_$UPSTREAM.orig.tar.gz" -C "$WORK/source/unpacked" --strip-components=1
cp -r "$WORK/source/unpacked/packaging/debian" "$WORK/source/unpacked/debian"
(cd "$WORK/source/unpacked" && dpkg-source -b .) > "$WORK/source/dpkg-source.log" 2>&1 \
  || { cat "$WORK/source/dpkg-source.log"; exit 1; }
lintian_strict "$WORK/lintian-source.log" "$WORK/source/certbot-batch_$VERSION.dsc"

if unshare --mount --propagation private sh -c \
     "mkdir -p $WORK/probe/u $WORK/probe/w $WORK/probe/m && mount -t overlay overlay -o lowerdir=/usr,upperdir=$WORK/probe/u,workdir=$WORK/probe/w $WORK/probe/m" \
     2>/dev/null; then
  unshare --mount --propagation private "$0" --inside "$WORK" "$SECONDS" overlay
else
  echo "no private mount namespace with overlayfs here: installing on the host (purged on exit)"
  HOST_INSTALL=1
  inside "$WORK"
fi
