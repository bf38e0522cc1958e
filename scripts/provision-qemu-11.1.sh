#!/usr/bin/env bash
# Provision QEMU 11.1 on Debian 12 without touching the machine's packages.
#
# 11.1 is built for Debian 13 (trixie-backports) and needs trixie's glibc, so it
# cannot be installed on bookworm. Instead, with a private apt configuration (own
# sources list, state and cache; the machine's dpkg state is never read or
# written), this script downloads qemu-system-arm, qemu-system-common and
# qemu-system-data of the newest 11.1 build from trixie-backports plus their
# whole dependency closure from trixie, unpacks every package with `dpkg -x`
# into one folder, and writes a wrapper that starts the binary through that
# folder's own dynamic loader:
#
#   <root>/qemu-system-aarch64 ARGS...
#     = <root>/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
#         --library-path <root>/usr/lib/x86_64-linux-gnu:...
#         <root>/usr/bin/qemu-system-aarch64 -L <root>/usr/share/qemu ARGS...
#   with QEMU_MODULE_DIR inside <root> (the system QEMU's modules are never loaded).
#
# Cached and idempotent: a second run only checks the wrapper's version. The
# unpack happens in a temporary folder that is renamed into place when complete,
# so an interrupted or concurrent run never leaves a half tree behind.
# Prints QEMU111=<wrapper> on its last line. MIGPROXY_QEMU111 set to an existing
# binary skips all of this (only checked).
set -euo pipefail

series="11.1"
cache="${MIGPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/migproxy}"
root="$cache/qemu-$series"
wrapper="$root/qemu-system-aarch64"

log() { printf 'provision-qemu-%s: %s\n' "$series" "$*" >&2; }

if [ -n "${MIGPROXY_QEMU111:-}" ]; then
    "$MIGPROXY_QEMU111" --version | head -n1 >&2
    echo "QEMU111=$MIGPROXY_QEMU111"
    exit 0
fi

if "$wrapper" --version 2>/dev/null | grep -q "version ${series//./\\.}"; then
    "$wrapper" --version | head -n1 >&2
    echo "QEMU111=$wrapper"
    exit 0
fi

# Signed by the trixie archive keys, which bookworm's debian-archive-keyring carries since
# 2023.3+deb12u1 (scripts/debian-packages.txt).
if [ ! -e /usr/share/keyrings/debian-archive-trixie-stable.gpg ]; then
    log "no trixie archive key in /usr/share/keyrings: install debian-archive-keyring >= 2023.3+deb12u1"
    exit 1
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.qemu-$series.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Private apt: its own sources, lists, status (empty: resolve the full closure)
# and archive cache. Nothing under /etc/apt or /var/lib/dpkg is used.
apt_dir="$work/apt"
mkdir -p "$apt_dir/etc/sources.list.d" "$apt_dir/etc/preferences.d" "$apt_dir/etc/apt.conf.d" \
    "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial"
: >"$apt_dir/state/status"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$apt_dir/etc/sources.list" <<SRC
deb [signed-by=$keyring] http://deb.debian.org/debian trixie main
deb [signed-by=$keyring] http://deb.debian.org/debian trixie-backports main
SRC
cat >"$apt_dir/apt.conf" <<CONF
Dir::Etc "$apt_dir/etc";
Dir::Etc::sourcelist "$apt_dir/etc/sources.list";
Dir::Etc::sourceparts "$apt_dir/etc/sources.list.d";
Dir::Etc::preferencesparts "$apt_dir/etc/preferences.d";
Dir::Etc::parts "$apt_dir/etc/apt.conf.d";
Dir::State "$apt_dir/state";
Dir::State::status "$apt_dir/state/status";
Dir::Cache "$apt_dir/cache";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
APT::Install-Recommends "false";
// The private folders belong to root; the _apt sandbox user could not write them.
APT::Sandbox::User "root";
CONF
export APT_CONFIG="$apt_dir/apt.conf"

log "reading trixie and trixie-backports package lists"
apt-get -o DPkg::Lock::Timeout=600 update -qq >&2

# The newest build of the pinned series; fail by name when the archive no longer has it.
ver=$(apt-cache madison qemu-system-arm \
    | awk -F'|' -v s=":$series." '{gsub(/ /,"",$2); if (index($2, s)) print $2}' | sort -V | tail -n1)
if [ -z "$ver" ]; then
    log "no qemu-system-arm of the $series series in trixie-backports any more (apt-cache madison qemu-system-arm shows none)"
    exit 1
fi
log "newest $series build: qemu-system-arm $ver"

# The dependency closure from an empty system, as apt resolves it.
wanted=("qemu-system-arm=$ver" "qemu-system-common=$ver" "qemu-system-data=$ver")
closure=$(apt-get -s -qq -t trixie-backports install "${wanted[@]}" \
    | awk '$1 == "Inst" { v = $3; gsub(/[()]/, "", v); print $2 "=" v }')
if [ -z "$closure" ]; then
    log "apt could not resolve the dependencies of qemu-system-arm $ver"
    exit 1
fi
log "downloading $(printf '%s\n' "$closure" | wc -l) packages"
mkdir -p "$work/debs"
# shellcheck disable=SC2086 # one package=version per word
(cd "$work/debs" && apt-get download -qq $closure >&2)

tree="$work/tree"
mkdir -p "$tree"
for deb in "$work/debs"/*.deb; do dpkg -x "$deb" "$tree"; done

libdir="$tree/usr/lib/x86_64-linux-gnu"
loader="$libdir/ld-linux-x86-64.so.2"
if [ ! -e "$loader" ]; then
    log "the unpacked libc6 has no $loader"
    exit 1
fi
# The wrapper resolves its own folder at run time, so the tree can be renamed into place.
cat >"$tree/qemu-system-aarch64" <<'WRAP'
#!/bin/sh
# Generated by scripts/provision-qemu-11.1.sh: start this folder's QEMU through this folder's loader.
here=$(cd "$(dirname "$0")" && pwd)
lib="$here/usr/lib/x86_64-linux-gnu"
QEMU_MODULE_DIR="$lib/qemu"
export QEMU_MODULE_DIR
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib:$here/lib/x86_64-linux-gnu:$lib/pulseaudio" \
    "$here/usr/bin/qemu-system-aarch64" -L "$here/usr/share/qemu" "$@"
WRAP
chmod +x "$tree/qemu-system-aarch64"

missing=$("$loader" --library-path "$libdir" --list "$tree/usr/bin/qemu-system-aarch64" | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
    log "libraries missing from the unpacked closure: $missing"
    exit 1
fi
if ! "$tree/qemu-system-aarch64" --version | grep -q "version ${series//./\\.}"; then
    log "the unpacked binary does not report version $series"
    exit 1
fi
printf '%s\n' "$ver" >"$tree/DEBIAN-VERSION"

# A concurrent run may have finished first: keep its tree (QEMUs may be running from it).
if ! "$wrapper" --version 2>/dev/null | grep -q "version ${series//./\\.}"; then
    rm -rf "$root.old"
    if [ -e "$root" ]; then mv "$root" "$root.old"; fi
    mv "$tree" "$root"
    rm -rf "$root.old"
fi
"$wrapper" --version | head -n1 >&2
echo "QEMU111=$wrapper"
