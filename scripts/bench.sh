#!/usr/bin/env bash
# Benchmark migproxy against the relays people would use instead, and regenerate
# docs/benchmarks.md and docs/benchmarks.png from the results of this run.
#
#   scripts/bench.sh            full run (~10-15 min on 2 cores; the first run also captures
#                               the streams, ~1 min, and builds the release binaries)
#   BENCH_QUICK=1 scripts/bench.sh   smaller and fewer runs (~3 min), same report
#
# What it does, all on loopback:
#   1. installs socat, haproxy and python3-matplotlib (apt) and QEMU 10.0 (scripts/provision-qemu.sh)
#      when they are missing;
#   2. builds `migproxy`, `migbench` and `tokio-relay` (release);
#   3. captures real QEMU 10.0 streams once into $BENCH_CACHE (outside the repo): a 4-vCPU a64fx
#      guest whose RAM is a file-backed memory backend pre-filled with non-zero data, paused,
#      `migrate "exec:cat > FILE"`;
#   4. replays them with bench/ `migbench` through: direct, socat -b 1048576, HAProxy (TCP mode,
#      splice), the tokio 1 MiB relay, `migproxy run` (checking relay) and `migproxy run
#      --dest-profile` (rewrite path, profile of the same stream: nothing changes) and with a QEMU 7.2
#      destination profile (registers dropped and filled, `cpu` sections re-encoded), alternating;
#   5. added switchover latency (device-state tail, 4 vCPUs), scaling (1/8/64 concurrent migrations);
#   6. real QEMU 10.0 -> 10.0 live migrations, direct and through migproxy, alternating;
#   7. writes docs/benchmarks.md and docs/benchmarks.png.
#
# Knobs (environment): BENCH_CACHE, BENCH_RAM_MIB (4096), BENCH_REPS (4), BENCH_SWITCHOVER_ITER (300),
# BENCH_SCALE_MIB (128), BENCH_SCALE_CONC (1,8,64), BENCH_SCALE_REPS (2), BENCH_QEMU_RAM_MIB (4096),
# BENCH_QEMU_REPS (3), BENCH_SKIP_QEMU=1, BENCH_SKIP_TWO_HOST=1, BENCH_NO_DOCS=1 (keep results only), MIGPROXY_BIN (skip
# building migproxy, use this binary), QEMU10/QEMU72.
set -euo pipefail

started_epoch=$(date +%s)
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf 'bench: %s\n' "$*" >&2; }

if [ "${BENCH_QUICK:-}" = 1 ]; then
    : "${BENCH_RAM_MIB:=1024}" "${BENCH_REPS:=3}" "${BENCH_SWITCHOVER_ITER:=100}"
    : "${BENCH_SCALE_MIB:=64}" "${BENCH_SCALE_REPS:=1}" "${BENCH_QEMU_RAM_MIB:=1024}" "${BENCH_QEMU_REPS:=1}"
fi
ram_mib="${BENCH_RAM_MIB:-4096}"
reps="${BENCH_REPS:-4}"
switchover_iter="${BENCH_SWITCHOVER_ITER:-300}"
scale_mib="${BENCH_SCALE_MIB:-128}"
scale_conc="${BENCH_SCALE_CONC:-1,8,64}"
scale_reps="${BENCH_SCALE_REPS:-2}"
qemu_ram_mib="${BENCH_QEMU_RAM_MIB:-4096}"
qemu_reps="${BENCH_QEMU_REPS:-3}"
cache="${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/migproxy/bench}"
results="$cache/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$cache" "$results/logs"
python=/usr/bin/python3
tools="$root/bench/tools"
commands="$results/commands.txt"
: >"$commands"

# Record a command (with $cache and $root spelled symbolically, so the report carries no
# path of this machine) and run it.
show() {
    local arg shown=""
    for arg in "$@"; do
        # Quote what the shell would split, so the recorded line can be pasted as it is.
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+{}-]+$ ]]; then shown+=" $arg"; else shown+=" \"$arg\""; fi
    done
    shown="${shown# }"
    shown="${shown//$results/\$RESULTS}"
    shown="${shown//$cache/\$BENCH_CACHE}"
    shown="${shown//$root/.}"
    shown="${shown//$HOME/\~}"
    printf '%s\n' "$shown"
}
run() {
    local shown
    shown="$(show "$@")"
    printf '%s\n' "$shown" >>"$commands"
    log "+ $shown"
    "$@"
}

# --- 1. tools -------------------------------------------------------------------------------
missing=()
command -v socat >/dev/null || missing+=(socat)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v valgrind >/dev/null || missing+=(valgrind)
"$python" -c 'import matplotlib' 2>/dev/null || missing+=(python3-matplotlib)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; }
fi
if [ -z "${QEMU10:-}" ] || [ -z "${QEMU72:-}" ]; then
    # Idempotent; prints QEMU10=... and QEMU72=... last.
    eval "$(scripts/provision-qemu.sh | grep -E '^QEMU(10|72)=')"
fi
qemu_version="$("$QEMU10" --version | head -n1)"
log "QEMU: $qemu_version"

# --- 2. build -------------------------------------------------------------------------------
# MIGPROXY_BIN: benchmark an already built migproxy (then only the bench crate is built).
if [ -n "${MIGPROXY_BIN:-}" ]; then
    run cargo build --release -p migproxy-bench
    migproxy="$(cd "$(dirname "$MIGPROXY_BIN")" && pwd)/$(basename "$MIGPROXY_BIN")"
else
    run cargo build --release -p migproxy -p migproxy-bench
    migproxy="$root/target/release/migproxy"
fi
log "migproxy: $("$migproxy" --version)"
migbench="$root/target/release/migbench"
tokio_relay="$root/target/release/tokio-relay"

# --- 3. streams (cached) --------------------------------------------------------------------
# A capture is reused only if migbench can find its device-state phase (a complete file).
capture() { # NAME MIB FILL(yes|no) [QEMU MACHINE]
    local out="$cache/$1.bin" fill_args=() qemu="${4:-$QEMU10}" machine="${5:-virt-10.0}"
    if [ "$3" = yes ]; then
        run "$python" "$tools/qemu_bench.py" fill "$cache/ram-$2.fill" "$2"
        fill_args=(--fill "$cache/ram-$2.fill")
    fi
    local capture_cmd=("$python" "$tools/qemu_bench.py" capture --qemu "$qemu" --machine "$machine" --smp 4
        --mem-mib "$2" "${fill_args[@]}" --out "$out")
    if [ -s "$out" ] && "$migbench" layout "$out" >/dev/null 2>&1; then
        log "reusing $out"
        printf '# cached from an earlier run: %s\n' "$(show "${capture_cmd[@]}")" >>"$commands"
    else
        run "${capture_cmd[@]}" >"$results/capture-$1.json"
    fi
    "$migbench" layout "$out" >"$results/layout-$1.json"
}
capture "big-$ram_mib" "$ram_mib" yes
capture "scale-$scale_mib" "$scale_mib" yes
capture small-4vcpu 256 no
capture small-4vcpu-q72 256 no "$QEMU72" virt-7.2
big="$cache/big-$ram_mib.bin"
scale_stream="$cache/scale-$scale_mib.bin"
small="$cache/small-4vcpu.bin"

# The rewrite path: a destination profile captured from the same stream, so every `cpu`
# section goes through rewrite + re-encode while the result stays loadable.
# Every capture is a `-smp 4` virt-10.0 VM of the same devices (only RAM differs), so the small one's
# description is the source reference of all of them: a rewriting migproxy needs one.
run "$migproxy" profile capture --from-stream "$small" -o "$results/dest-profile.json" \
    --save-reference "$results/source-reference.json"
# A rewrite that changes bytes: the register profile of a QEMU 7.2 a64fx destination (the acceptance
# scenario's), with the source's own profile telling which nonzero values are reset defaults.
run "$migproxy" profile capture --from-stream "$cache/small-4vcpu-q72.bin" -o "$results/dest-profile-q72.json"

# --- 4. relays ------------------------------------------------------------------------------
cat >"$results/haproxy.cfg" <<'EOF'
global
    maxconn 4096
    # 1 MiB pipes for splice(2), like the 1 MiB buffers of the other relays
    tune.pipesize 1048576
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    option splice-request
    option splice-response
frontend migration
    bind 127.0.0.1:"${MIGBENCH_LISTEN_PORT}"
    default_backend destination
backend destination
    server dest 127.0.0.1:"${MIGBENCH_UPSTREAM_PORT}"
EOF
relay_direct="direct"
relay_socat="socat=socat -b 1048576 TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.1:{upstream}"
relay_haproxy="haproxy=haproxy -db -f $results/haproxy.cfg"
relay_tokio="tokio-relay=$tokio_relay --listen 127.0.0.1:{listen} --upstream 127.0.0.1:{upstream}"
relay_migproxy="migproxy=$migproxy run --admin none --listen tcp:127.0.0.1:{listen} --upstream tcp:127.0.0.1:{upstream}"
relay_rewrite="migproxy-rewrite=$migproxy run --admin none --listen tcp:127.0.0.1:{listen} --upstream tcp:127.0.0.1:{upstream} --dest-profile $results/dest-profile.json --source-reference $results/source-reference.json"
relay_rewrite72="migproxy-to-7.2=$migproxy run --admin none --listen tcp:127.0.0.1:{listen} --upstream tcp:127.0.0.1:{upstream} --dest-profile $results/dest-profile-q72.json --source-profile $results/dest-profile.json --source-reference $results/source-reference.json"

run "$migbench" throughput --stream "$big" --reps "$reps" --log-dir "$results/logs" --out "$results/throughput.json" \
    --relay "$relay_direct" --relay "$relay_socat" --relay "$relay_haproxy" --relay "$relay_tokio" \
    --relay "$relay_migproxy" --relay "$relay_rewrite" --relay "$relay_rewrite72"

# Multifd: a main channel plus 4 multifd channels through `migproxy run --raw-relay copy|splice`.
raw="$migproxy run --admin none --listen tcp:127.0.0.1:{listen} --upstream tcp:127.0.0.1:{upstream} --raw-relay"
run "$migbench" multifd-relay --stream "$small" --payload "$big" --channels 4 --channel-mib "${BENCH_MULTIFD_MIB:-1024}" \
    --reps "$reps" --log-dir "$results/logs" --out "$results/multifd-relay.json" --relay "copy=$raw copy" --relay "splice=$raw splice"
run "$python" "$tools/report_multifd.py" "$results"

# --- 5. switchover and scaling --------------------------------------------------------------
run "$migbench" switchover --stream "$small" --iterations "$switchover_iter" --log-dir "$results/logs" \
    --out "$results/switchover.json" \
    --relay "$relay_direct" --relay "$relay_socat" --relay "$relay_haproxy" --relay "$relay_tokio" \
    --relay "$relay_migproxy" --relay "$relay_rewrite" --relay "$relay_rewrite72"

# Instructions per switchover (migproxy under callgrind; report part: bench/tools/report_switchover.py).
run "$python" "$tools/switchover_instructions.py" --migbench "$migbench" --migproxy "$migproxy" --stream "$small" \
    --dest-profile "$results/dest-profile.json" --dest-profile-q72 "$results/dest-profile-q72.json" \
    --work-dir "$results/instructions" --out "$results/switchover-instructions.json"

run "$migbench" scale --stream "$scale_stream" --concurrency "$scale_conc" --reps "$scale_reps" \
    --log-dir "$results/logs" --out "$results/scale.json" \
    --relay "$relay_tokio" --relay "$relay_migproxy" --relay "$relay_rewrite72"

# --- 6. real QEMU live migration ------------------------------------------------------------
if [ "${BENCH_SKIP_QEMU:-}" != 1 ]; then
    run "$python" "$tools/qemu_bench.py" fill "$cache/ram-$qemu_ram_mib.fill" "$qemu_ram_mib"
    : >"$results/qemu.jsonl"
    migproxy_cmd="$migproxy run --admin none --listen tcp:127.0.0.1:{listen} --upstream tcp:127.0.0.1:{upstream}"
    for rep in $(seq 1 "$qemu_reps"); do
        # Alternate which one goes first.
        if [ $((rep % 2)) = 1 ]; then order="direct migproxy"; else order="migproxy direct"; fi
        for via in $order; do
            relay_args=()
            [ "$via" = migproxy ] && relay_args=(--relay "$migproxy_cmd" --relay-log "$results/logs/qemu-migproxy.log")
            if out=$(run "$python" "$tools/qemu_bench.py" migrate --qemu "$QEMU10" --smp 4 --mem-mib "$qemu_ram_mib" \
                --fill "$cache/ram-$qemu_ram_mib.fill" "${relay_args[@]}"); then
                printf '{"via": "%s", "rep": %d, "result": %s}\n' "$via" "$rep" "$out" >>"$results/qemu.jsonl"
            else
                log "real migration via $via failed (rep $rep)"
                printf '{"via": "%s", "rep": %d, "error": "migration failed, see bench log"}\n' "$via" "$rep" >>"$results/qemu.jsonl"
            fi
        done
    done
fi

# --- 6b. two hosts: network namespaces, shaped links (bench-two-host.sh; report_two_host.py) ----
if [ "${BENCH_SKIP_TWO_HOST:-}" != 1 ]; then
    run env MIGPROXY_BIN="$migproxy" QEMU10="$QEMU10" scripts/bench-two-host.sh "$results/two-host" ||
        log "two-host benchmark failed (see $results/two-host)"
fi

# --- 7. report ------------------------------------------------------------------------------
ended_epoch=$(date +%s)
cat >"$results/meta.json" <<EOF
{"qemu": "$qemu_version", "wall_seconds": $((ended_epoch - started_epoch)), "date": "$(date -u +%Y-%m-%dT%H:%MZ)",
 "cpus": $(nproc), "cpu_model": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//; s/"/\\"/g')",
 "kernel": "$(uname -r)", "mem_gib": $(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo),
 "loadavg_at_end": "$(cut -d' ' -f1-3 /proc/loadavg)",
 "socat": "$(socat -V 2>/dev/null | grep -m1 'socat version' | cut -d' ' -f3)",
 "haproxy": "$(haproxy -v 2>/dev/null | head -n1 | cut -d' ' -f3)",
 "ram_mib": $ram_mib, "reps": $reps, "switchover_iter": $switchover_iter, "scale_mib": $scale_mib,
 "scale_reps": $scale_reps, "qemu_ram_mib": $qemu_ram_mib, "qemu_reps": $qemu_reps, "quick": "${BENCH_QUICK:-0}"}
EOF
if [ "${BENCH_NO_DOCS:-}" != 1 ]; then
    "$python" "$tools/report.py" --results "$results" --md docs/benchmarks.md --png docs/benchmarks.png
fi
log "results in $results; wall time $((ended_epoch - started_epoch)) s"
