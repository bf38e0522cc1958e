#!/bin/sh
# The test command's fuzz step: build every fuzz target (cargo +nightly fuzz build, with
# AddressSanitizer as cargo-fuzz builds by default) and replay each target's corpus
# (fuzz/corpus/TARGET: every input once, no new inputs), so that every input a campaign kept,
# and every crash input kept as a regression, runs again on every change. A failing input is
# named and saved under fuzz/artifacts/TARGET/.
#
#   scripts/fuzz-replay.sh [TARGET...]      # default: every target of fuzz/Cargo.toml
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo/fuzz"
targets=${*:-$(cargo +nightly fuzz list)}
cargo +nightly fuzz build
failed=""
for target in $targets; do
    mkdir -p "artifacts/$target"
    start=$(date +%s)
    log=$(mktemp)
    # -runs=0: the corpus only; the inputs' size is not capped (the corpus decides).
    if "target/x86_64-unknown-linux-gnu/release/$target" "corpus/$target" -runs=0 -max_len=1048576 \
        -timeout=30 -rss_limit_mb=2048 -artifact_prefix="artifacts/$target/" >"$log" 2>&1; then
        echo "fuzz replay $target: $(ls "corpus/$target" | wc -l) inputs ok in $(($(date +%s) - start)) s"
    else
        echo "fuzz replay $target: FAILED (artifacts/$target/):"
        grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -5
        failed="$failed $target"
    fi
    rm -f "$log"
done
[ -z "$failed" ] || { echo "fuzz replay failed:$failed"; exit 1; }
