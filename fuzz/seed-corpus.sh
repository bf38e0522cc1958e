#!/bin/sh
# Seed the fuzz corpus (fuzz/corpus/decode, gitignored) with the captured vectors, each prefixed by
# one byte: the fuzz target uses the first byte to choose its chunk size.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
corpus="$here/corpus/decode"
mkdir -p "$corpus"
for vector in "$here"/../codec/tests/vectors/*.bin; do
    name=$(basename "$vector" .bin)
    for split in 0 6 63; do
        { printf "\\$(printf '%03o' "$split")"; cat "$vector"; } > "$corpus/$name-$split"
    done
done
# Small synthetic streams reach the device phase after a few hundred bytes.
(cd "$here/.." && cargo run -q -p migproxy-codec --features testing --example synthetic_seeds -- "$corpus")
echo "seeded $(ls "$corpus" | wc -l) inputs into $corpus"
