#!/usr/bin/env bash
# The project's test command (README, .ci/run): every check CI makes, runnable from a clean clone
# on Debian 12 as root (or with MIGPROXY_QEMU10/MIGPROXY_QEMU72/MIGPROXY_QEMU111 pointing at existing QEMU builds).
#
#   1. provision QEMU 10.0, 7.2 and 11.1 and the aarch64 assembler (scripts/provision-qemu.sh)
#   1b. provision the KVM lab (scripts/provision-kvm-lab.sh: arm64 kernels, initramfs, aarch64 migproxy)
#   2. rustfmt/clippy components, cargo fmt --check, cargo clippy -D warnings
#   3. unit, property and vector tests of every crate but the end-to-end suite
#   4. fuzz build (cargo +nightly fuzz build) when fuzz/ exists; aarch64 check of --from-kvm
#   5. build migproxy, then the real-QEMU end-to-end scenarios, one line per scenario
#
# Every step is bounded: the end-to-end scenarios carry their own deadlines, and the whole run
# takes well under CI's 90 minutes on 2 cores (timings are printed per step).
#
# Environment: MIGPROXY_TEST_THREADS (default 1: TCG guests need the cores), MIGPROXY_SKIP_FUZZ=1
# to skip step 4 locally (CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

run_start=$(date +%s)
# Every cargo test output also goes here, to total the results at the end.
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
step_start=""
step() {
    local now
    now=$(date +%s)
    if [ -n "$step_start" ]; then
        printf '    (%d s)\n' "$((now - step_start))"
    fi
    step_start=$now
    printf '\n==> %s\n' "$*"
}

step "provision QEMU 10.0, 7.2 and 11.1"
provision_out=$(bash scripts/provision-qemu.sh)
eval "$(printf '%s\n' "$provision_out" | grep -E '^QEMU(10|72|111)=')"
export MIGPROXY_QEMU10="$QEMU10" MIGPROXY_QEMU72="$QEMU72" MIGPROXY_QEMU111="$QEMU111"
echo "QEMU 10.0: $MIGPROXY_QEMU10"
echo "QEMU 7.2:  $MIGPROXY_QEMU72"
echo "QEMU 11.1: $MIGPROXY_QEMU111"
# libvirt 11.3 for the libvirt lab, unpacked privately (9.0 is in scripts/debian-packages.txt);
# without them the libvirt scenarios fail by name, the rest still runs.
libvirt_out=$(bash scripts/provision-libvirt.sh) || echo "WARNING: libvirt lab not provisioned"
eval "$(printf '%s\n' "$libvirt_out" | grep -E '^LIBVIRT113=' || true)" && export MIGPROXY_LIBVIRT113="${LIBVIRT113:-}"

step "provision the KVM lab (kernels 6.1/6.12/7.3, arm64 initramfs, aarch64 migproxy)"
kvmlab_out=$(bash scripts/provision-kvm-lab.sh)
export MIGPROXY_KVMLAB="${kvmlab_out##*KVMLAB=}"

step "rust toolchain components"
installed=$(rustup component list --installed 2>/dev/null || true)
for component in rustfmt clippy; do
    if ! printf '%s\n' "$installed" | grep -q "^$component"; then
        rustup component add "$component"
    fi
done
cargo --version

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "unit, property and vector tests"
cargo test --workspace --exclude migproxy-integration-tests 2>&1 | tee -a "$test_log"

if [ -d fuzz ] && [ "${MIGPROXY_SKIP_FUZZ:-0}" != 1 ]; then
    step "fuzz build"
    if ! rustup toolchain list | grep -q '^nightly'; then
        rustup toolchain install nightly --profile minimal
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        cargo install cargo-fuzz --locked
    fi
    cargo +nightly fuzz build
fi

step "aarch64 compile check of the KVM capture path (profile capture --from-kvm)"
# The --from-kvm path only exists on aarch64 and these machines are x86_64: check that it
# compiles and is clippy-clean for aarch64. rustup fetches the target's std from its own
# server; where that is unreachable the step says so loudly instead of passing silently.
if rustup target list --installed | grep -q '^aarch64-unknown-linux-gnu$' \
    || rustup target add aarch64-unknown-linux-gnu; then
    cargo clippy -p migproxy-config --target aarch64-unknown-linux-gnu --all-targets -- -D warnings
else
    echo "WARNING: rustup target add aarch64-unknown-linux-gnu failed: aarch64 check NOT run"
fi

step "build migproxy"
cargo build -p migproxy
export MIGPROXY_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/migproxy"
test -x "$MIGPROXY_BIN"

step "end-to-end scenarios (real QEMU 10.0 and 7.2 through migproxy)"
# --tests: the harness library has no doc tests worth a "0 passed" line.
cargo test -p migproxy-integration-tests --tests -- \
    --test-threads="${MIGPROXY_TEST_THREADS:-1}" --nocapture 2>&1 | tee -a "$test_log"

step "done"
echo "scripts/test-all.sh: all steps passed in $(( $(date +%s) - run_start )) s"
# One closing line for the whole run (cargo prints one per test binary, the last often "0 passed").
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$test_log"
