#!/usr/bin/env bash
# Provision the three QEMU builds the end-to-end tests migrate between, plus the
# aarch64 assembler the test guest is built with.
#
#   QEMU 10.0: qemu-system-arm from bookworm-backports, installed system-wide.
#   QEMU 7.2:  qemu-system-arm from bookworm main, unpacked (dpkg -x) into a
#              private folder. It cannot be installed system-wide: the image
#              already carries qemu-utils 10.0 from backports, and the 7.2
#              system package conflicts with it through qemu-system-common.
#   QEMU 11.1: the trixie-backports build and its trixie library closure,
#              unpacked into a private folder and started through a wrapper
#              (scripts/provision-qemu-11.1.sh).
#
# Idempotent and cached: a second run only checks. Prints the three binary paths
# as shell assignments (QEMU10=..., QEMU72=..., QEMU111=...) on its last lines.
#
# Overrides for other distributions: set MIGPROXY_QEMU10, MIGPROXY_QEMU72 and
# MIGPROXY_QEMU111 to existing binaries and this script only checks them.
set -euo pipefail

cache="${MIGPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/migproxy}"
mkdir -p "$cache"

log() { printf 'provision-qemu: %s\n' "$*" >&2; }

# Other apt users (a parallel provisioning, unattended upgrades) hold the dpkg lock for a while: wait
# for it instead of failing at once.
apt-get() { command apt-get -o DPkg::Lock::Timeout=600 "$@"; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root to install packages (or set MIGPROXY_QEMU10/MIGPROXY_QEMU72)"
        exit 1
    fi
}

apt_updated=""
apt_update_once() {
    if [ -z "$apt_updated" ]; then
        apt-get update -qq >&2
        apt_updated=1
    fi
}

ensure_backports_source() {
    local src=/etc/apt/sources.list.d/migproxy-bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports apt source"
        cat >"$src" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        apt_updated=""
    fi
}

qemu10="${MIGPROXY_QEMU10:-}"
qemu72="${MIGPROXY_QEMU72:-}"

if [ -z "$qemu10" ]; then
    qemu10=/usr/bin/qemu-system-aarch64
    if ! "$qemu10" --version 2>/dev/null | grep -q 'version 10\.0'; then
        need_root
        ensure_backports_source
        apt_update_once
        log "installing qemu-system-arm from bookworm-backports"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
            --no-install-recommends qemu-system-arm >&2
    fi
fi

if ! command -v aarch64-linux-gnu-as >/dev/null || ! command -v aarch64-linux-gnu-objcopy >/dev/null; then
    need_root
    apt_update_once
    log "installing binutils-aarch64-linux-gnu"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        binutils-aarch64-linux-gnu >&2
fi

if [ -z "$qemu72" ]; then
    root72="$cache/qemu-7.2"
    qemu72="$root72/usr/bin/qemu-system-aarch64"
    if ! "$qemu72" --version 2>/dev/null | grep -q 'version 7\.2'; then
        need_root
        apt_update_once
        # The newest 7.2 build bookworm main (or its security suite) offers.
        ver=$(apt-cache madison qemu-system-arm | awk -F'|' '$2 ~ /7\.2/ {gsub(/ /,"",$2); print $2}' | sort -V | tail -n1)
        if [ -z "$ver" ]; then
            log "no QEMU 7.2 qemu-system-arm in the apt sources"
            exit 1
        fi
        log "unpacking qemu-system-arm $ver into $root72"
        dl="$cache/debs-7.2"
        rm -rf "$dl" "$root72"
        mkdir -p "$dl" "$root72"
        (cd "$dl" && apt-get download -qq "qemu-system-arm=$ver" "qemu-system-common=$ver" >&2)
        for deb in "$dl"/*.deb; do dpkg -x "$deb" "$root72"; done
        # Shared libraries 7.2 links against that the 10.0 install may not
        # have pulled in: install whatever ldd says is missing.
        missing=$(ldd "$qemu72" | awk '/not found/ {print $1}')
        if [ -n "$missing" ]; then
            pkgs=""
            for lib in $missing; do
                pkg=$(apt-file search -l "$lib" 2>/dev/null | head -n1 || true)
                [ -n "$pkg" ] && pkgs="$pkgs $pkg"
            done
            log "7.2 needs libraries: $missing ${pkgs:+(packages:$pkgs)}"
            [ -n "$pkgs" ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >&2
        fi
        "$qemu72" --version >&2
    fi
fi

# QEMU 11.1: a private unpack of the trixie-backports build (its own script says how).
qemu111=$(bash "$(dirname "$0")/provision-qemu-11.1.sh" | sed -n 's/^QEMU111=//p')

"$qemu10" --version | head -n1 >&2
"$qemu72" --version | head -n1 >&2
"$qemu111" --version | head -n1 >&2
echo "QEMU10=$qemu10"
echo "QEMU72=$qemu72"
echo "QEMU111=$qemu111"
