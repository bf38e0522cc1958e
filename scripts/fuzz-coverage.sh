#!/bin/sh
# Line coverage of the codec and config sources reached by each fuzz target's corpus:
# `cargo fuzz coverage` (an instrumented build replaying fuzz/corpus/TARGET), then `llvm-cov report`
# restricted to codec/src and config/src. Prints, per target, the TOTAL line and the lines of the
# files docs/fuzzing.md follows; the full reports go to fuzz/coverage/TARGET/report.txt.
#
#   scripts/fuzz-coverage.sh [TARGET...]    # default: decode_structured description decode
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
targets=${*:-"decode_structured description decode"}
rustup component add llvm-tools-preview --toolchain nightly >/dev/null 2>&1 \
    || { echo "fuzz-coverage: rustup could not add llvm-tools-preview to nightly" >&2; exit 1; }
sysroot=$(rustc +nightly --print sysroot)
llvm_bin=$(ls -d "$sysroot"/lib/rustlib/*/bin | head -1)
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
cd "$repo/fuzz"
for target in $targets; do
    nice -n 19 cargo +nightly fuzz coverage "$target" "corpus/$target" >/dev/null 2>&1 \
        || { echo "fuzz-coverage: cargo fuzz coverage $target failed" >&2; exit 1; }
    bin="target/$triple/coverage/$triple/release/$target"
    report="coverage/$target/report.txt"
    "$llvm_bin/llvm-cov" report "$bin" -instr-profile="coverage/$target/coverage.profdata" \
        "$repo/codec/src" "$repo/config/src" >"$report"
    echo "== $target ($(ls "corpus/$target" | wc -l) inputs): file, regions, missed, cover, functions, missed, executed, lines, missed, cover"
    grep -E 'device_phase\.rs|decoder\.rs|package\.rs|json\.rs|reference\.rs|rewrite\.rs|candidates\.rs|^TOTAL' "$report" \
        | sed "s|$repo/||" | awk '{printf "%-36s %s %s %s  %s %s %s  %s %s %s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10}'
done
