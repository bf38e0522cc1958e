#!/bin/sh
# Run a fuzz campaign: every target (or the ones named) for SECONDS each, at the lowest CPU
# priority, on the corpora kept in the repository (fuzz/corpus/TARGET), then minimise each corpus
# and append one line per target to fuzz/campaigns.log: date, target, seconds, executions, user
# CPU seconds, coverage (libFuzzer "cov"), features ("ft"), corpus size, result. docs/fuzzing.md sums it up.
#
#   scripts/fuzz-campaign.sh SECONDS [TARGET...]
#   FUZZ_JOBS=2 scripts/fuzz-campaign.sh 3600 decode_structured   # parallel workers
#
# The code under test forbids unsafe code, so AddressSanitizer finds little that Rust's own checks
# do not; campaigns run without it by default (several times more executions per second).
# FUZZ_SANITIZER=address brings it back; the test command's `cargo +nightly fuzz build` uses it.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:?usage: fuzz-campaign.sh SECONDS [TARGET...]}
shift
targets=${*:-"decode_structured description profile config_toml decode"}
jobs=${FUZZ_JOBS:-1}
sanitizer=${FUZZ_SANITIZER:-none}
build_opts="--sanitizer $sanitizer --target-dir target/sanitizer-$sanitizer"
cd "$repo/fuzz"
[ -d corpus/decode ] || sh ./seed-corpus.sh
# shellcheck disable=SC2086 # two options
cargo +nightly fuzz build $build_opts
logdir=$(mktemp -d)
# User CPU seconds of this script's finished children: on a shared machine the executions per
# CPU second say more about a target than those per wall-clock second.
# `times` must run in this shell (not in a command substitution's subshell): it writes a file.
children_cpu() {
    tail -1 "$logdir/times" | awk '{ split($1, t, "m"); sub("s", "", t[2]); print t[1] * 60 + t[2] }'
}
for target in $targets; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log="$logdir/$target.log"
    result=ok
    # -max_len bounds inputs of the small-input targets; decode's seeds are captures cut to
    # their device-phase tails (about 50 KiB).
    max_len=4096
    [ "$target" = decode ] && max_len=65536
    parallel=""
    [ "$jobs" -gt 1 ] && parallel="-jobs=$jobs -workers=$jobs"
    rm -f fuzz-*.log
    # shellcheck disable=SC2086 # $parallel is empty or two options
    # shellcheck disable=SC2086 # $build_opts holds options
    times >"$logdir/times"
    cpu_before=$(children_cpu)
    if ! nice -n 19 cargo +nightly fuzz run $build_opts "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len="$max_len" -print_final_stats=1 $parallel \
        -timeout=10 -rss_limit_mb=2048 -artifact_prefix="artifacts/$target/" >"$log" 2>&1; then
        result="FAILED (see artifacts/$target, log $log)"
    fi
    times >"$logdir/times"
    cpu=$(awk -v a="$cpu_before" -v b="$(children_cpu)" 'BEGIN { printf "%d", b - a }')
    # Executions: the sum over workers of their final stats.
    execs=$(cat "$log" fuzz-*.log 2>/dev/null | sed -n 's/^stat::number_of_executed_units: *//p' | awk '{s+=$1} END {print s+0}')
    last=$(cat "$log" fuzz-*.log 2>/dev/null | grep -E '#[0-9]+.*cov: ' | tail -1)
    cov=$(printf '%s' "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    ft=$(printf '%s' "$last" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
    rm -f fuzz-*.log
    # Minimising renames or drops inputs by coverage: the regression inputs (regression-*, kept
    # by name so that the replay runs them) are set aside and put back.
    kept="$logdir/kept-$target"
    mkdir -p "$kept"
    find "corpus/$target" -maxdepth 1 -name 'regression-*' -exec cp {} "$kept/" \;
    # shellcheck disable=SC2086
    nice -n 19 cargo +nightly fuzz cmin $build_opts "$target" "corpus/$target" -- -max_len="$max_len" >/dev/null 2>&1 || true
    find "$kept" -type f -exec cp {} "corpus/$target/" \;
    size=$(ls "corpus/$target" | wc -l)
    line="$(date -u +%Y-%m-%dT%H:%MZ) target=$target seconds=$seconds jobs=$jobs sanitizer=$sanitizer execs=$execs cpu_seconds=$cpu cov=${cov:-?} ft=${ft:-?} corpus=$size result=$result"
    echo "$line" | tee -a campaigns.log
done
