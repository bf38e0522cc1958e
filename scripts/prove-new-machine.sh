#!/usr/bin/env bash
# Prove that the test command passes on a brand-new machine: run scripts/test-all.sh from a fresh clone of
# HEAD, starting from nothing the project made. Not part of .ci/run (it purges packages, and building
# everything from nothing takes the better part of an hour on 2 cores); run it before every submission
# (README, Tests).
#
#   scripts/prove-new-machine.sh --base-packages FILE [--keep PACKAGE]... [--keep-work] [--dry-run]
#
# FILE lists the packages a new machine of this kind has (one name per line, or the tab-separated
# `apt<TAB>name<TAB>version` form of a machine image's package list; `name:arch` is read as `name`).
#
# What "nothing the project made" means here, on this machine, as root:
#   - Debian packages: every installed package that FILE does not list is purged (dependencies
#     included: they are not in FILE either; a base package is never removed), the project's apt
#     source for backports is removed and apt's download cache emptied. --keep PACKAGE spares one (for a package another user of a shared machine needs now; a
#     kept package weakens the proof for whatever needs it, so the run prints the kept ones).
#   - Cargo: an empty CARGO_HOME (no registry cache, no cargo-fuzz), whose bin/ holds only rustup's
#     proxies; PATH no longer has the machine's ~/.cargo/bin.
#   - Rust toolchains: a copy of RUSTUP_HOME with the toolchains a rustup install gives (linked
#     toolchains dropped) and only the host target (the aarch64 target is the project's).
#   - Caches: an empty MIGPROXY_CACHE (QEMU unpacks, container base tarballs, vendored crates), a podman
#     storage of its own (no base image, no layer, no built image is reused) and an empty TMPDIR (buildah
#     keeps the image build's cargo cache mount there).
#   - The source: `git clone` of HEAD into a temporary directory (uncommitted changes are not proved).
# --dry-run prints what would be purged and stops there.
# Upgrades of base packages that a project package pulled in cannot be undone; the run lists none of them.
#
# Prints the test command's output, then the total run time and the verdict; exits with the test
# command's status. The full log is kept next to the work directory (its path is printed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APT=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
PROJECT_APT_SOURCE=/etc/apt/sources.list.d/migproxy-bookworm-backports.sources
# The commands rustup installs into CARGO_HOME/bin, all links to the rustup binary.
RUSTUP_PROXIES=(cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt rust-gdb rust-lldb)

log() { printf '[prove-new-machine %5ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
    log "FAIL: $*"
    exit 1
}
usage() {
    sed -n '6p' "${BASH_SOURCE[0]}" | sed 's/^# *//' >&2
    exit 2
}

base_packages=""
keep=()
keep_work=0
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --base-packages) base_packages="${2:-}" && shift 2 || usage ;;
        --keep) keep+=("${2:-}") && shift 2 || usage ;;
        --keep-work) keep_work=1 && shift ;;
        --dry-run) dry_run=1 && shift ;;
        *) usage ;;
    esac
done
[ -n "$base_packages" ] || usage
[ -r "$base_packages" ] || die "cannot read $base_packages"
[ "$(id -u)" = 0 ] || die "must run as root (it purges packages and runs the test command as CI does)"
command -v rustup >/dev/null || die "rustup not found: the machine's Rust toolchain is part of a new machine"

# Short: TMPDIR lives inside, and the scenarios put Unix sockets in directories under TMPDIR (at most
# 107 bytes per path); a long prefix fails them with "path must be shorter than SUN_LEN".
work="$(mktemp -d /tmp/mpv.XXXXXX)"
# mktemp makes it 0700; a new machine's TMPDIR (/tmp) is open to every user, and the libvirt
# source-redirect scenarios run migproxy as the unprivileged uid the deploy recipes use, which
# must read its profiles under TMPDIR.
chmod 0755 "$work"
run_log="$work.log"
cleanup() {
    if [ -d "$work/containers" ]; then
        CONTAINERS_STORAGE_CONF="$work/storage.conf" podman system reset -f >/dev/null 2>&1 || true
    fi
    if [ "$keep_work" = 0 ]; then
        rm -rf "$work"
    else
        log "work directory kept: $work"
    fi
}
trap cleanup EXIT

# --- the source ---------------------------------------------------------------------------------------

head_rev="$(git -C "$ROOT" rev-parse HEAD)"
if [ -n "$(git -C "$ROOT" status --porcelain)" ]; then
    log "note: the working tree has uncommitted changes; they are not part of the proof"
fi
git clone --quiet --no-local "$ROOT" "$work/src"
git -C "$work/src" checkout --quiet --detach "$head_rev"
log "source: fresh clone of $head_rev in $work/src"

# --- Debian packages ----------------------------------------------------------------------------------

# Package names of FILE: the second field of `apt<TAB>name<TAB>...` lines, else the first word of
# lines that are not comments; architecture suffixes dropped.
base_names() {
    awk -F'\t' '/^#/ || NF == 0 { next }
        $1 == "apt" { print $2; next }
        NF == 1 { split($1, w, " "); print w[1] }' "$base_packages" | sed 's/:.*//' | sort -u
}

purge_project_packages() {
    local base installed kept_closure="" extra=() name
    base="$(base_names)"
    [ "$(wc -l <<<"$base")" -ge 50 ] || die "$base_packages lists fewer than 50 packages: not a machine's package list"
    installed="$(dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' | awk '$1 ~ /^[ih]i/ { print $2 }' | sort -u)"
    if [ "${#keep[@]}" -gt 0 ]; then
        # A kept package keeps what it depends on (purging a dependency would remove it too).
        kept_closure="$(apt-cache depends --recurse --installed --no-recommends --no-suggests --no-conflicts \
            --no-breaks --no-replaces --no-enhances "${keep[@]}" | awk '!/^ / && !/</ { print $1 }' | sort -u)"
    fi
    while read -r name; do
        grep -qx -- "$name" <<<"$kept_closure" || extra+=("$name")
    done < <(comm -13 <(printf '%s\n' "$base") <(printf '%s\n' "$installed"))
    if [ "${#keep[@]}" -gt 0 ]; then
        log "kept although not on a new machine (--keep, with their dependencies):" \
            "$(comm -13 <(printf '%s\n' "$base") <(printf '%s\n' "$kept_closure") | tr '\n' ' ')"
    fi
    if [ "${#extra[@]}" -gt 0 ]; then
        # apt also removes what depends on a purged package: make sure that is no base package.
        local removed unexpected
        removed="$(DEBIAN_FRONTEND=noninteractive "${APT[@]}" -s purge "${extra[@]}" | awk '/^Purg / { print $2 }' | sort -u)"
        unexpected="$(comm -12 <(printf '%s\n' "$base") <(printf '%s\n' "$removed") | tr '\n' ' ')"
        [ -z "$unexpected" ] || die "purging ${extra[*]} would also remove base packages: $unexpected"
        unexpected="$(comm -12 <(printf '%s\n' "$kept_closure") <(printf '%s\n' "$removed") | tr '\n' ' ')"
        [ -z "$unexpected" ] || die "purging ${extra[*]} would also remove kept packages: $unexpected"
        log "purging ${#extra[@]} packages a new machine does not have: ${extra[*]}"
        [ "$dry_run" = 0 ] || return 0
        DEBIAN_FRONTEND=noninteractive "${APT[@]}" purge -y -qq "${extra[@]}" >&2 || die "apt-get purge failed"
    else
        log "no package beyond the base list is installed"
    fi
    [ "$dry_run" = 0 ] || return 0
    if [ -e "$PROJECT_APT_SOURCE" ]; then
        log "removing the project's apt source $PROJECT_APT_SOURCE"
        rm -f "$PROJECT_APT_SOURCE"
        "${APT[@]}" update -qq >&2 || die "apt-get update failed"
    fi
    # Only hygiene (a new machine has no downloaded .deb files): another apt run may hold the lock.
    "${APT[@]}" clean || log "note: apt-get clean failed (apt busy); the download cache was not emptied"
}

# --- Rust: empty CARGO_HOME, RUSTUP_HOME as a rustup install leaves it ---------------------------------

fresh_rust_homes() {
    local rustup_bin rustup_home toolchain host target
    rustup_bin="$(readlink -f "$(command -v rustup)")"
    rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
    mkdir -p "$work/cargo-home/bin"
    cp "$rustup_bin" "$work/cargo-home/bin/rustup"
    # The machine's cargo configuration (registry settings) is part of a new machine; its caches are not.
    for config in config config.toml; do
        [ -f "$HOME/.cargo/$config" ] && cp "$HOME/.cargo/$config" "$work/cargo-home/"
    done
    for proxy in "${RUSTUP_PROXIES[@]}"; do ln -s rustup "$work/cargo-home/bin/$proxy"; done

    log "copying $rustup_home (toolchains installed by rustup only)"
    mkdir -p "$work/rustup-home/toolchains"
    (cd "$rustup_home" && find . -mindepth 1 -maxdepth 1 ! -name toolchains ! -name tmp ! -name downloads \
        -exec cp -a {} "$work/rustup-home/" \;)
    for toolchain in "$rustup_home"/toolchains/*; do
        [ -L "$toolchain" ] && continue # `rustup toolchain link` or an alias: not what an install gives
        cp -a "$toolchain" "$work/rustup-home/toolchains/"
    done
    export CARGO_HOME="$work/cargo-home" RUSTUP_HOME="$work/rustup-home"
    host="$(rustc -vV | awk '/^host:/ { print $2 }')"
    for toolchain in "$RUSTUP_HOME"/toolchains/*; do
        toolchain="$(basename "$toolchain")"
        for target in $(rustup target list --installed --toolchain "$toolchain"); do
            [ "$target" = "$host" ] && continue
            log "removing target $target from the copy of $toolchain"
            rustup target remove --toolchain "$toolchain" "$target" >&2
        done
    done
}

# PATH without the machine's cargo bin directory, with the fresh one first.
fresh_path() {
    local machine_cargo_bin entry out="$CARGO_HOME/bin"
    machine_cargo_bin="$(readlink -f "$HOME/.cargo/bin" 2>/dev/null || echo "$HOME/.cargo/bin")"
    IFS=: read -r -a entries <<<"$PATH"
    for entry in "${entries[@]}"; do
        [ -z "$entry" ] && continue
        [ "$(readlink -f "$entry" 2>/dev/null || echo "$entry")" = "$machine_cargo_bin" ] && continue
        out="$out:$entry"
    done
    printf '%s\n' "$out"
}

fresh_caches() {
    mkdir -p "$work/cache" "$work/t" "$work/containers"
    cat >"$work/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$work/containers/storage"
runroot = "$work/containers/run"
CONF
    export MIGPROXY_CACHE="$work/cache" TMPDIR="$work/t" CONTAINERS_STORAGE_CONF="$work/storage.conf"
}

# --- the run ------------------------------------------------------------------------------------------

start=$SECONDS
purge_project_packages
[ "$dry_run" = 0 ] || exit 0
fresh_rust_homes
PATH="$(fresh_path)"
export PATH
fresh_caches
# Nothing of a previous run steers this one (QEMU paths, the image, the binary).
while read -r name; do unset "$name"; done < <(env | awk -F= '/^MIGPROXY_/ && $1 != "MIGPROXY_CACHE" { print $1 }')
command -v cargo-fuzz >/dev/null && die "cargo-fuzz is still on PATH ($(command -v cargo-fuzz))"
log "CARGO_HOME=$CARGO_HOME RUSTUP_HOME=$RUSTUP_HOME MIGPROXY_CACHE=$MIGPROXY_CACHE TMPDIR=$TMPDIR"
log "podman storage: $work/containers; PATH=$PATH"
log "running bash scripts/test-all.sh (log: $run_log)"

set +e
(cd "$work/src" && bash scripts/test-all.sh </dev/null) 2>&1 | tee "$run_log"
status=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - start))
printf '\nprove-new-machine: %s: scripts/test-all.sh from nothing the project made, on %s, exit %d, total %d s (%d min %d s); log %s\n' \
    "$([ "$status" = 0 ] && echo PASS || echo FAIL)" "$head_rev" "$status" "$elapsed" \
    $((elapsed / 60)) $((elapsed % 60)) "$run_log"
exit "$status"
