#!/usr/bin/env bash
# Regenerate the codec's test vectors (codec/tests/vectors/*.bin and README.md) from real
# QEMU 7.2, 10.0 and 11.1 migrations. Provisions QEMU the way the end-to-end suite does
# (scripts/provision-qemu.sh, or MIGPROXY_QEMU10/MIGPROXY_QEMU72/MIGPROXY_QEMU111), then runs the capture tool.
#
#   scripts/capture-vectors.sh                 # all vectors
#   scripts/capture-vectors.sh --only q72-a64fx,q10-xbzrle
#   scripts/capture-vectors.sh --list
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash scripts/provision-qemu.sh | grep -E '^QEMU(10|72|111)=')"
export MIGPROXY_QEMU10="$QEMU10" MIGPROXY_QEMU72="$QEMU72" MIGPROXY_QEMU111="$QEMU111"

cargo build -q -p migproxy-integration-tests --bin capture-vectors
exec "${CARGO_TARGET_DIR:-target}/debug/capture-vectors" "$@"
