#!/bin/sh
# Seed the fuzz corpora. fuzz/corpus/decode (gitignored: the captured vectors, each prefixed by
# one byte that chooses the chunk size and mode) is rebuilt from codec/tests/vectors; the other
# targets' corpora live in the repository (fuzz/corpus/TARGET, minimised after each campaign by
# scripts/fuzz-campaign.sh) and only get their hand-written seeds added here.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
corpus="$here/corpus"
mkdir -p "$corpus/decode" "$corpus/decode_structured" "$corpus/description" "$corpus/profile" "$corpus/config_toml"
for vector in "$here"/../codec/tests/vectors/*.bin; do
    name=$(basename "$vector" .bin)
    for split in 0 6 63 134; do
        { printf "\\$(printf '%03o' "$split")"; cat "$vector"; } > "$corpus/decode/$name-$split"
    done
done
# Small synthetic streams reach the device phase after a few hundred bytes.
(cd "$here/.." && cargo run -q -p migproxy-codec --features testing --example synthetic_seeds -- "$corpus/decode")
# The structure-aware target needs no seeds beyond some bytes to steer it.
for i in 1 2 3 4; do
    head -c $((i * 64)) /dev/urandom > "$corpus/decode_structured/seed-$i"
done
# The description target: split byte 0 (no device bytes), then a description.
printf '\000{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "version": 1, "fields": [{"name": "data", "size": 4}]}]}' \
    > "$corpus/description/seed-timer"
# The profile format: the README's example; the configuration: the packaged example.
sed -n '/^```json$/,/^```$/p' "$here/../README.md" | sed '1d;$d' > "$corpus/profile/seed-readme"
cp "$here/../deploy/systemd/config.toml" "$corpus/config_toml/seed-deploy"
for target in decode decode_structured description profile config_toml; do
    echo "$target: $(ls "$corpus/$target" | wc -l) inputs"
done
