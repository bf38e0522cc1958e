#!/usr/bin/env bash
# Install everything the tests use, then check it: the one provisioning entry of the test command
# (scripts/test-all.sh calls it first). On Debian 12 as root; idempotent, and a second run only checks.
#
#   1. Debian packages      scripts/debian-packages.txt (apt; the backports source when a line asks for it)
#   2. Rust toolchain       rustfmt, clippy, the aarch64-unknown-linux-gnu target, nightly + cargo-fuzz
#   3. crates               cargo fetch --locked for every Cargo.lock: all crates for every platform, so
#                           `cargo vendor` (the container image build) and the fuzz build work offline
#   4. private downloads    one scripts/provision-*.sh each (PROVISIONERS below)
#   5. tool check           every command the tests run (REQUIRED_TOOLS below); a missing one stops the
#                           run here, by name, instead of in the middle of a scenario
#
# Output: progress on stderr; on stdout only `export MIGPROXY_NAME=value` lines for the caller to eval,
# one for every NAME=value line a provisioner prints (provision-qemu.sh's QEMU10=... becomes
# MIGPROXY_QEMU10, the variable the tests read).
#
# Environment: CARGO_HOME, RUSTUP_HOME and MIGPROXY_CACHE are honoured (scripts/prove-new-machine.sh
# points them at empty directories).
set -euo pipefail
cd "$(dirname "$0")/.."

# Private downloads and builds, run in this order after the packages and the toolchain. Each prints
# NAME=value lines on stdout. Adding one is one line here.
PROVISIONERS=(
    scripts/provision-qemu.sh     # QEMU 10.0 (backports), 7.2 and 11.1 (private unpacks): QEMU10=, QEMU72=, QEMU111=
    scripts/provision-libvirt.sh  # libvirt 11.3 (private unpack) for the libvirt lab: LIBVIRT113=
    scripts/provision-kvm-lab.sh  # arm64 kernels, initramfs, aarch64 migproxy (needs the aarch64 target): KVMLAB=
)

# Every command a test or a test script runs, with what needs it. Checked after provisioning.
REQUIRED_TOOLS=(
    "cc                         cargo's linker, ring's C code"
    "git                        container-smoke.sh build context"
    "python3                    container-smoke.sh"
    "flock                      container-smoke.sh"
    "getconf                    integration-tests (page size)"
    "xz                         proxy/tests/kvm_plan.rs, kvm_daemon.rs"
    "aarch64-linux-gnu-as       the end-to-end test guest"
    "aarch64-linux-gnu-objcopy  the end-to-end test guest"
    "qemu-img                   postcopy_bitmaps.rs (qcow2 disks)"
    "podman                     container scenarios"
    "buildah                    container-smoke.sh builder image"
    "runc                       podman --runtime runc"
    "mmdebstrap                 container-smoke.sh base images"
    "nft                        container_a64fx_10_to_72_nftables_redirect"
    "valgrind                   bench/tests/harness.rs (instruction counts)"
)

RUST_COMPONENTS=(rustfmt clippy)
RUST_TARGETS=(aarch64-unknown-linux-gnu) # the aarch64 check of profile capture --from-kvm
CARGO_FUZZ_VERSION=0.13.2
# Every lock file whose crates must be in the local cargo cache.
CARGO_MANIFESTS=(Cargo.toml fuzz/Cargo.toml)

APT=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
BACKPORTS_SOURCE=/etc/apt/sources.list.d/migproxy-bookworm-backports.sources

log() { printf 'provision: %s\n' "$*" >&2; }
die() {
    log "FAIL: $*"
    exit 1
}

# --- 1. Debian packages ------------------------------------------------------------------------------

# The package names of the list (first word of each line, comments and blank lines skipped).
listed_packages() {
    sed -e 's/#.*//' scripts/debian-packages.txt | awk 'NF { print $1 }'
}

is_installed() {
    [ "$(dpkg-query -W -f '${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

ensure_backports_source() {
    grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ && return
    log "adding the bookworm-backports apt source"
    cat >"$BACKPORTS_SOURCE" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

install_packages() {
    local entry name missing=()
    while read -r entry; do
        name="${entry%%/*}"
        is_installed "$name" || missing+=("$entry")
    done < <(listed_packages)
    if [ "${#missing[@]}" -eq 0 ]; then
        log "Debian packages: all $(listed_packages | wc -l) of scripts/debian-packages.txt installed"
        return
    fi
    [ "$(id -u)" = 0 ] || die "installing ${missing[*]} needs root"
    case " ${missing[*]}" in *"/bookworm-backports"*) ensure_backports_source ;; esac
    log "installing ${missing[*]}"
    "${APT[@]}" update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# --- 2. Rust toolchain -------------------------------------------------------------------------------

install_toolchain() {
    command -v rustup >/dev/null || die "rustup not found: the machine's Rust toolchain is installed with rustup"
    local installed item
    installed="$(rustup component list --installed)"
    for item in "${RUST_COMPONENTS[@]}"; do
        grep -q "^$item" <<<"$installed" || rustup component add "$item" >&2 || die "rustup component add $item failed"
    done
    installed="$(rustup target list --installed)"
    for item in "${RUST_TARGETS[@]}"; do
        grep -qx "$item" <<<"$installed" || rustup target add "$item" >&2 || die "rustup target add $item failed"
    done
    if ! rustup toolchain list | grep -q '^nightly'; then
        rustup toolchain install nightly --profile minimal >&2 || die "rustup toolchain install nightly failed"
    fi
    if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
        log "cargo install cargo-fuzz $CARGO_FUZZ_VERSION"
        cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" >&2 || die "cargo install cargo-fuzz failed"
    fi
    log "Rust: $(rustc -V), $(cargo +nightly -V 2>/dev/null || echo 'no nightly cargo'), $(cargo fuzz --version)"
}

# --- 3. crates ---------------------------------------------------------------------------------------

fetch_crates() {
    local manifest
    for manifest in "${CARGO_MANIFESTS[@]}"; do
        # Without --target: every platform's crates (windows-sys ...), which `cargo vendor` needs.
        cargo fetch --locked --manifest-path "$manifest" >&2 \
            || die "cargo fetch --locked ($manifest) failed; if its lock file is out of date, update it (cargo metadata) and commit it"
    done
}

# --- 4. private downloads ----------------------------------------------------------------------------

run_provisioners() {
    local script out line
    for script in "${PROVISIONERS[@]}"; do
        log "running $script"
        out="$(bash "$script")" || die "$script failed"
        while IFS= read -r line; do
            [[ "$line" =~ ^([A-Z][A-Z0-9_]*)=(.*)$ ]] || continue
            printf 'export MIGPROXY_%s=%q\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
        done <<<"$out"
    done
}

# --- 5. tool check -----------------------------------------------------------------------------------

check_tools() {
    local entry tool needed_by missing=()
    for entry in "${REQUIRED_TOOLS[@]}"; do
        read -r tool needed_by <<<"$entry"
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool (for $needed_by)")
    done
    cargo fmt --version >/dev/null 2>&1 || missing+=("cargo fmt (rustfmt component)")
    cargo clippy --version >/dev/null 2>&1 || missing+=("cargo clippy (clippy component)")
    cargo +nightly fuzz --version >/dev/null 2>&1 || missing+=("cargo +nightly fuzz (cargo-fuzz)")
    for entry in "${RUST_TARGETS[@]}"; do
        rustup target list --installed | grep -qx "$entry" || missing+=("Rust target $entry")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        local item
        for item in "${missing[@]}"; do log "missing after provisioning: $item"; done
        die "${#missing[@]} tool(s) missing (see above); scripts/debian-packages.txt and scripts/provision.sh install them"
    fi
    log "tool check: all ${#REQUIRED_TOOLS[@]} tools and the Rust pieces present"
}

install_packages
install_toolchain
fetch_crates
run_provisioners
check_tools
