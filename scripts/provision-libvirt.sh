#!/usr/bin/env bash
# Provision the libvirt builds of the libvirt lab (integration-tests/src/libvirt.rs).
#
#   libvirt 9.0:  Debian 12's libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients, installed
#                 system-wide by scripts/provision.sh from scripts/debian-packages.txt (this script only
#                 checks it). Installing them starts nothing: there is no systemd unit in those packages.
#   libvirt 11.3: bookworm-backports, unpacked (dpkg -x) into a private folder and run from there by
#                 the lab, inside the host's own mount namespace. Installing it system-wide would pull
#                 a newer systemd.
#
# Idempotent and cached: a second run only checks. Prints LIBVIRT113=PATH (the unpacked root) on its
# last line. MIGPROXY_LIBVIRT113 set to an existing root makes this script only check it.
set -euo pipefail

cache="${MIGPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/migproxy}"
version=11.3.0-2~bpo12+1
packages=(libvirt0 libvirt-common libvirt-daemon libvirt-daemon-common libvirt-daemon-driver-qemu)

log() { printf 'provision-libvirt: %s\n' "$*" >&2; }

# The unpacked libvirtd, run as the lab runs it; prints its version line.
unpacked_version() {
    LD_LIBRARY_PATH="$1/usr/lib/x86_64-linux-gnu" "$1/usr/sbin/libvirtd" --version 2>/dev/null
}

# (Outputs are captured first: with pipefail, `cmd | grep -q` fails when grep exits early.)
system_version=$(libvirtd --version 2>/dev/null || true)
if ! grep -q ' 9\.0\.' <<<"$system_version"; then
    log "libvirt 9.0 (libvirtd) is not installed: run scripts/provision.sh (scripts/debian-packages.txt)"
    exit 1
fi

root="${MIGPROXY_LIBVIRT113:-$cache/libvirt-11.3}"
found=$(unpacked_version "$root" || true)
if ! grep -q ' 11\.3\.' <<<"$found"; then
    if [ -n "${MIGPROXY_LIBVIRT113:-}" ]; then
        log "MIGPROXY_LIBVIRT113=$root holds no libvirt 11.3"
        exit 1
    fi
    policy=$(apt-cache policy libvirt0)
    if ! grep -qF "$version" <<<"$policy"; then
        log "libvirt0 $version is not in the apt sources (bookworm-backports; scripts/provision-qemu.sh adds it)"
        exit 1
    fi
    log "unpacking libvirt $version into $root"
    mkdir -p "$cache"
    # Unpacked beside the final place and renamed into it: a concurrent or interrupted run never
    # sees half a tree.
    staging=$(mktemp -d "$cache/.libvirt-11.3.XXXXXX")
    trap 'rm -rf "$staging"' EXIT
    mkdir "$staging/debs" "$staging/root"
    specs=()
    for package in "${packages[@]}"; do specs+=("$package=$version"); done
    # _apt cannot write into root's cache; download as root, quietly.
    (cd "$staging/debs" && apt-get download -qq -o APT::Sandbox::User=root "${specs[@]}" >&2)
    for deb in "$staging"/debs/*.deb; do dpkg -x "$deb" "$staging/root"; done
    found=$(unpacked_version "$staging/root" || true)
    if ! grep -q ' 11\.3\.' <<<"$found"; then
        log "the unpacked libvirtd does not run: $found"
        exit 1
    fi
    rm -rf "$root.old"
    if [ -e "$root" ]; then mv "$root" "$root.old"; fi
    mv "$staging/root" "$root"
    rm -rf "$root.old"
fi

unpacked_version "$root" >&2
echo "LIBVIRT113=$root"
