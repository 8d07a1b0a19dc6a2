#!/usr/bin/env bash
# Prove that `make test`'s install steps work on a bare Debian 12: debootstrap a throwaway
# chroot with only Python 3.11 and make (README's premise), copy the committed tree into it,
# run `make install redis-server postgresql` there (apt installs both servers) and then the
# given pytest arguments through the harness. Everything is removed at the end.
#
#   sudo scripts/fresh_debian.sh                      # the packaging and harness tests
#   sudo scripts/fresh_debian.sh tests/workers -x     # any pytest arguments
#   sudo scripts/fresh_debian.sh --make-test          # CI's command itself: `make test`, which
#                                                     # installs every tool it needs too
#
# Needs root and debootstrap (installed with apt when missing); downloads about 300 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "fresh_debian: run as root (debootstrap and chroot need it)" >&2; exit 2; }
make_test=false
if [ "${1:-}" = --make-test ]; then
  make_test=true
  shift
elif [ $# -eq 0 ]; then
  set -- tests/test_services.py tests/test_migrations.py tests/test_dependencies.py \
    tests/test_package.py tests/test_deploy_files.py
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }

root=$(mktemp -d /tmp/backstop-fresh-debian.XXXXXX)
chmod 755 "$root"  # apt downloads as the _apt user
mounted=()
cleanup() {
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" || true; done
  # Only once nothing is mounted inside, so rm can never reach the host's /dev or /proc.
  if ! grep -q " $root/" /proc/mounts; then rm -rf "$root"; fi
}
trap cleanup EXIT
mount_in() { mount "$@"; mounted+=("${*: -1}"); }

echo "fresh_debian: debootstrap bookworm into $root"
debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 \
  || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# As in Debian's container images: packages never start services in here.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The host's CA bundle, so a TLS proxy the host trusts is trusted inside too.
cp /etc/ssl/certs/ca-certificates.crt "$root/ca-certificates.crt"
mount_in -t proc proc "$root/proc"
mount_in --bind /dev "$root/dev"
mount_in --bind /dev/pts "$root/dev/pts"
mount_in -t tmpfs shm "$root/dev/shm"

chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install \
  -y -qq --no-install-recommends python3 python3-venv make ca-certificates >/dev/null'
mkdir "$root/src"
git archive HEAD | tar -x -C "$root/src"

if $make_test; then
  # What CI runs, in a fresh clone, on a machine that has none of the tools.
  chroot "$root" env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 CI=true PIP_CERT=/ca-certificates.crt NODE_EXTRA_CA_CERTS=/ca-certificates.crt \
    bash -euo pipefail -c 'cd /src && python3 -m tests.services --find-postgres || true; make test'
  exit
fi
chroot "$root" env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
  PIP_CERT=/ca-certificates.crt bash -euo pipefail -c '
    cd /src
    python3 -m tests.services --find-postgres || true  # none yet: make installs it
    command -v redis-server || echo "no redis-server yet"
    make install redis-server postgresql
    .venv/bin/python -m tests.services -- .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
  ' fresh_debian "$@"
