#!/bin/sh
# Seed the fuzz corpora (they live in the repository, fuzz/corpus/TARGET, minimised after each
# campaign by scripts/fuzz-campaign.sh); this adds the seeds a fresh corpus starts from:
# - decode: the captured vectors of codec/tests/vectors cut to their first KiB and to their
#   device-phase or postcopy-package tails (codec/examples/capture_seeds.rs), and small synthetic
#   streams (codec/examples/synthetic_seeds.rs), each behind the target's control byte;
# - decode_structured: a few random inputs (the target builds the stream from any bytes);
# - description: one description; profile: the README's example; config_toml: the packaged one.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
corpus="$here/corpus"
mkdir -p "$corpus/decode" "$corpus/decode_structured" "$corpus/description" "$corpus/profile" "$corpus/config_toml"
(cd "$here/.." && cargo run -q -p migproxy-codec --example capture_seeds -- "$corpus/decode" codec/tests/vectors/*.bin >/dev/null)
(cd "$here/.." && cargo run -q -p migproxy-codec --features testing --example synthetic_seeds -- "$corpus/decode")
for i in 1 2 3 4; do
    head -c $((i * 64)) /dev/urandom > "$corpus/decode_structured/seed-$i"
done
# The description target: the number of device bytes, the device bytes (after the FULL byte),
# then the description. First no device bytes; then a section that walks: id 0, "timer",
# instance 0, version 1, 4 bytes of fields, [a subsection "timer/sub" version 1 of 2 bytes], footer.
printf '\000{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "version": 1, "fields": [{"name": "data", "size": 4}]}]}' \
    > "$corpus/description/seed-timer"
printf '\033\000\000\000\000\005timer\000\000\000\000\000\000\000\001\001\002\003\004\176\000\000\000\000{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 1, "fields": [{"name": "data", "type": "buffer", "size": 4}]}]}' \
    > "$corpus/description/seed-timer-walks"
printf '\054\000\000\000\000\005timer\000\000\000\000\000\000\000\001\001\002\003\004\005\011timer/sub\000\000\000\001\007\010\176\000\000\000\000{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 1, "fields": [{"name": "data", "type": "buffer", "size": 4}], "subsections": [{"vmsd_name": "timer/sub", "version": 1, "fields": [{"name": "data", "type": "buffer", "size": 2}]}]}]}' \
    > "$corpus/description/seed-timer-subsection"
sed -n '/^```json$/,/^```$/p' "$here/../README.md" | sed '1d;$d' > "$corpus/profile/seed-readme"
cp "$here/../deploy/systemd/config.toml" "$corpus/config_toml/seed-deploy"
for target in decode decode_structured description profile config_toml; do
    echo "$target: $(ls "$corpus/$target" | wc -l) inputs"
done
