#!/usr/bin/env bash
# The project's test command (README, .ci/run): every check CI makes, runnable from a clean clone
# on Debian 12 as root (or with MIGPROXY_QEMU10/MIGPROXY_QEMU72/MIGPROXY_QEMU111 pointing at existing QEMU builds).
#
#   1. provision everything the tests use and check it (scripts/provision.sh: Debian packages of
#      scripts/debian-packages.txt, QEMU 10.0, 7.2 and 11.1, libvirt 11.3, the KVM lab, Rust
#      components and targets, nightly + cargo-fuzz, every crate of the lock files); a missing tool
#      stops the run here, by name
#   2. cargo fmt --check, cargo clippy -D warnings, of the workspace and of the fuzz crate (fuzz/
#      is its own workspace: named by --manifest-path; its clippy runs on stable)
#   3. unit, property and vector tests of every crate but the end-to-end suite, and the benchmark
#      report's judgements (bench/tools/test_*.py)
#   4. fuzz build and corpus replay (scripts/fuzz-replay.sh) when fuzz/ exists; aarch64 check of --from-kvm
#   5. build migproxy, then the real-QEMU end-to-end scenarios, one line per scenario
#
# Steps after provisioning all run even when one fails, and every test binary runs (--no-fail-fast):
# a failure never hides another. The end lists the failed steps and tests by name and exits non-zero
# if there is any.
#
# Every step is bounded: the end-to-end scenarios carry their own deadlines, and the whole run
# takes well under CI's 90 minutes on 2 cores (timings are printed per step).
#
# Environment: MIGPROXY_TEST_THREADS (default 1: TCG guests need the cores), MIGPROXY_SKIP_FUZZ=1
# to skip step 4's fuzz build locally (CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

run_start=$(date +%s)
# Every cargo test output also goes here, to name the failures and total the results at the end.
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

# Run a check; on failure remember its name and go on.
failed_steps=()
check() {
    local name="$1"
    shift
    if ! "$@"; then
        failed_steps+=("$name")
        printf '!!! FAILED: %s\n' "$name"
    fi
}

# cargo test with its output also in the test log, every test binary run even when one fails.
cargo_test() {
    cargo test --no-fail-fast "$@" 2>&1 | tee -a "$test_log"
}

step "provision and check every tool the tests use (scripts/provision.sh)"
# Provisioning stops the run: nothing after it can mean anything without its tools.
if ! provision_env=$(bash scripts/provision.sh); then
    echo "scripts/test-all.sh: FAIL: provisioning failed (see the provision: lines above)"
    exit 1
fi
eval "$provision_env"
printf '%s\n' "$provision_env" | sed 's/^export /    /'
cargo --version

step "cargo fmt --check (workspace and fuzz crate)"
check "cargo fmt --check" cargo fmt --all -- --check
check "cargo fmt --check (fuzz)" cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check

step "cargo clippy --all-targets -D warnings (workspace and fuzz crate)"
check "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
# Stable is enough for a check: libfuzzer-sys builds there (only the fuzz build needs nightly).
check "cargo clippy (fuzz)" cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings

step "unit, property and vector tests"
check "unit, property and vector tests" cargo_test --workspace --exclude migproxy-integration-tests
# How the benchmark report judges its targets (met, missed, or not decidable from the runs).
check "benchmark report judgements" python3 -B -m unittest discover -s bench/tools -p 'test_*.py'

if [ -d fuzz ] && [ "${MIGPROXY_SKIP_FUZZ:-0}" != 1 ]; then
    step "fuzz build and corpus replay"
    check "fuzz build and corpus replay" scripts/fuzz-replay.sh
fi

step "aarch64 compile check of the KVM capture path (profile capture --from-kvm)"
# The --from-kvm path only exists on aarch64 and these machines are x86_64: check that it
# compiles and is clippy-clean for aarch64 (provisioning added the target).
check "aarch64 clippy" \
    cargo clippy -p migproxy-config --target aarch64-unknown-linux-gnu --all-targets -- -D warnings

step "build migproxy"
check "build migproxy" cargo build -p migproxy
export MIGPROXY_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/migproxy"

step "end-to-end scenarios (real QEMU 10.0 and 7.2 through migproxy)"
# --tests: the harness library has no doc tests worth a "0 passed" line.
check "end-to-end scenarios" cargo_test -p migproxy-integration-tests --tests -- \
    --test-threads="${MIGPROXY_TEST_THREADS:-1}" --nocapture

step "done"
# Failed tests by name, each with its test binary: cargo prints "Running <binary> (...)" before a
# binary's output and, at its end, the names of its failed tests under the last "failures:" line.
failed_tests=$(awk '/^ *Running / { binary = $0; sub(/^ *Running /, "", binary) }
    /^failures:$/ { names = ""; listing = 1; next }
    listing && /^    [A-Za-z_][A-Za-z0-9_:]*$/ { names = names "    " binary ": " substr($0, 5) "\n"; next }
    /^test result:/ { printf "%s", names; names = ""; listing = 0 }' "$test_log")
status=0
if [ "${#failed_steps[@]}" -gt 0 ]; then
    status=1
    echo "failed steps:"
    printf '    %s\n' "${failed_steps[@]}"
    if [ -n "$failed_tests" ]; then
        echo "failed tests:"
        printf '%s\n' "$failed_tests"
    fi
    echo "scripts/test-all.sh: FAILED after $(($(date +%s) - run_start)) s"
else
    echo "scripts/test-all.sh: all steps passed in $(($(date +%s) - run_start)) s"
fi
# One closing line for the whole run (cargo prints one per test binary, the last often "0 passed").
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$test_log"
exit "$status"
