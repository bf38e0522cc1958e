#!/usr/bin/env bash
# Benchmark migproxy against the relays people would use instead, and regenerate
# docs/benchmarks.md and docs/benchmarks.png from the results of this run, in one command.
#
#   scripts/bench.sh                  full run (<= 30 min on an idle 2-core machine, including the
#                                     two-host part when present; the first run also captures the
#                                     streams and builds the release binaries)
#   BENCH_QUICK=1 scripts/bench.sh    smaller streams, fewer repetitions (<= 8 min), same report
#
# Method (the same for every measured comparison): one uncounted warm-up per configuration, then
# repetitions in a rotated order (ABC, BCA, CAB, ...), medians with min/max; every stream and RAM file
# is read once before measuring (page cache warm, recorded in warm.json and in the report); the report
# flags a result that cannot be physically right as `implausible` (a relay faster than direct by more
# than 3 %, repetitions spreading more than 10 %, ...) and never counts it as met.
#
# What it does, all on loopback:
#   1. installs socat, haproxy, python3-matplotlib and valgrind (apt) and QEMU 10.0/7.2
#      (scripts/provision-qemu.sh) when they are missing; probes `perf stat -e instructions:u`;
#   2. builds `migproxy`, `migbench` and `tokio-relay` (release);
#   3. captures real QEMU 10.0 streams once into $BENCH_CACHE (outside the repo): a 4-vCPU a64fx
#      guest whose RAM is a file-backed memory backend pre-filled with non-zero data, paused,
#      `migrate "exec:cat > FILE"`; then reads every stream and RAM file once (page cache);
#   4. replays them with bench/ `migbench` through: direct, socat -b 1048576, HAProxy (TCP mode,
#      splice), the tokio 1 MiB relay, `migproxy run` (checking relay) and `migproxy run
#      --dest-profile` (rewrite path, profile of the same stream: nothing changes) and with a QEMU 7.2
#      destination profile (registers dropped and filled, `cpu` sections re-encoded);
#   5. added switchover latency (device-state tail, 4 vCPUs), scaling (1/8/64 concurrent migrations);
#   6. user-space instructions per GiB relayed (perf where the CPU counter works, else valgrind's
#      cachegrind) of the tokio relay, the checking relay and the rewrite paths;
#   7. real QEMU 10.0 -> 10.0 live migrations, direct and through migproxy;
#   8. the parts other scripts measure, each only when present in this checkout (two-host, multifd raw
#      relay, switchover instruction counts); the report says "not run in this run" for a missing one;
#   9. writes docs/benchmarks.md and docs/benchmarks.png.
#
# Knobs (environment): BENCH_CACHE, BENCH_RAM_MIB (4096), BENCH_REPS (5), BENCH_WARMUP (1),
# BENCH_SWITCHOVER_ITER (1500), BENCH_SWITCHOVER_WARMUP (20), BENCH_SCALE_MIB (128), BENCH_SCALE_CONC
# (1,8,64), BENCH_SCALE_REPS (3), BENCH_ICOUNT_MIB (256), BENCH_ICOUNT_REPS (1), BENCH_QEMU_RAM_MIB (4096),
# BENCH_QEMU_REPS (4), BENCH_MULTIFD_MIB (1024 per channel), BENCH_SKIP_QEMU=1, BENCH_SKIP_ICOUNT=1, BENCH_SKIP_TWO_HOST=1,
# BENCH_TWO_HOST_RESULTS=DIR (take an earlier scripts/bench-two-host.sh results dir instead of running
# the ~20 min part again; the report shows that run's own date and commit), BENCH_NO_DOCS=1 (keep results only), MIGPROXY_BIN (skip building migproxy, use this binary), QEMU10/QEMU72.
set -euo pipefail

started_epoch=$(date +%s)
loadavg_at_start="$(cut -d' ' -f1-3 /proc/loadavg)"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf 'bench: %s\n' "$*" >&2; }

# Quick mode keeps three repetitions wherever a spread is judged: fewer could not show one.
if [ "${BENCH_QUICK:-}" = 1 ]; then
    : "${BENCH_RAM_MIB:=1024}" "${BENCH_REPS:=3}" "${BENCH_SWITCHOVER_ITER:=500}" "${BENCH_SWITCHOVER_WARMUP:=10}"
    : "${BENCH_SCALE_MIB:=32}" "${BENCH_SCALE_REPS:=3}" "${BENCH_QEMU_RAM_MIB:=1024}" "${BENCH_QEMU_REPS:=3}"
    : "${BENCH_ICOUNT_MIB:=128}" "${BENCH_MULTIFD_MIB:=256}"
fi
ram_mib="${BENCH_RAM_MIB:-4096}"
reps="${BENCH_REPS:-5}"
warmup="${BENCH_WARMUP:-1}"
# The switchover verdict compares 5 blocks of rounds; one round's added latency spreads ~100 us
# (p10-p90), so a block median is within the 10 %/20 us rule only from a few hundred rounds on (60
# per block gave ~20-30 us from sampling noise alone). A round of 7 relays takes ~35 ms.
switchover_iter="${BENCH_SWITCHOVER_ITER:-1500}"
switchover_warmup="${BENCH_SWITCHOVER_WARMUP:-20}"
scale_mib="${BENCH_SCALE_MIB:-128}"
scale_conc="${BENCH_SCALE_CONC:-1,8,64}"
scale_reps="${BENCH_SCALE_REPS:-3}"
icount_mib="${BENCH_ICOUNT_MIB:-256}"
icount_reps="${BENCH_ICOUNT_REPS:-1}"
qemu_ram_mib="${BENCH_QEMU_RAM_MIB:-4096}"
qemu_reps="${BENCH_QEMU_REPS:-4}"
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
command -v fincore >/dev/null || missing+=(util-linux)
"$python" -c 'import matplotlib' 2>/dev/null || missing+=(python3-matplotlib)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_get=(apt-get -o DPkg::Lock::Timeout=600)
    "${apt_get[@]}" install -y -qq "${missing[@]}" >&2 ||
        { "${apt_get[@]}" update -qq >&2 && "${apt_get[@]}" install -y -qq "${missing[@]}" >&2; }
fi
# Hardware instruction counters: used where they work (many VMs do not expose them), otherwise the
# instruction counts come from cachegrind. The probe's answer goes into the report.
perf stat -x, -e instructions:u -- true 2>&1 >/dev/null | grep -m1 instructions >"$results/perf-probe.txt" ||
    echo "perf not installed or not permitted" >"$results/perf-probe.txt"
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
capture "scale-$icount_mib" "$icount_mib" yes
capture small-4vcpu 256 no
capture small-4vcpu-q72 256 no "$QEMU72" virt-7.2
big="$cache/big-$ram_mib.bin"
scale_stream="$cache/scale-$scale_mib.bin"
icount_stream="$cache/scale-$icount_mib.bin"
small="$cache/small-4vcpu.bin"
warm_files=("$big" "$scale_stream" "$icount_stream" "$small")
if [ "${BENCH_SKIP_QEMU:-}" != 1 ]; then
    run "$python" "$tools/qemu_bench.py" fill "$cache/ram-$qemu_ram_mib.fill" "$qemu_ram_mib"
    warm_files+=("$cache/ram-$qemu_ram_mib.fill")
fi
# Every input read once before anything is measured: a first run that reads its input from disk
# measures the disk. migbench reads its stream again itself; the report shows what was resident.
run "$python" "$tools/qemu_bench.py" warm "${warm_files[@]}" >"$results/warm.json"

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

run "$migbench" throughput --stream "$big" --reps "$reps" --warmup "$warmup" --log-dir "$results/logs" --out "$results/throughput.json" \
    --relay "$relay_direct" --relay "$relay_socat" --relay "$relay_haproxy" --relay "$relay_tokio" \
    --relay "$relay_migproxy" --relay "$relay_rewrite" --relay "$relay_rewrite72"

# --- 5. switchover and scaling --------------------------------------------------------------
run "$migbench" switchover --stream "$small" --iterations "$switchover_iter" --warmup "$switchover_warmup" --log-dir "$results/logs" \
    --out "$results/switchover.json" \
    --relay "$relay_direct" --relay "$relay_socat" --relay "$relay_haproxy" --relay "$relay_tokio" \
    --relay "$relay_migproxy" --relay "$relay_rewrite" --relay "$relay_rewrite72"

# Concurrent migrations come from distinct loopback source addresses (migproxy admits one migration
# per source host and destination); the budget of migrations in progress (16 by default) is raised
# to the largest concurrency measured.
max_conc=$(tr ',' '\n' <<<"$scale_conc" | sort -n | tail -n1)
relay_migproxy_scale="${relay_migproxy} --max-migrations $max_conc"
relay_rewrite72_scale="${relay_rewrite72} --max-migrations $max_conc"
run "$migbench" scale --stream "$scale_stream" --concurrency "$scale_conc" --reps "$scale_reps" --warmup "$warmup" \
    --log-dir "$results/logs" --out "$results/scale.json" \
    --relay "$relay_tokio" --relay "$relay_migproxy_scale" --relay "$relay_rewrite72_scale"

# --- 6. instructions per GiB ---------------------------------------------------------------
# Seconds move with whatever else runs on the machine; user-space instruction counts barely do.
if [ "${BENCH_SKIP_ICOUNT:-}" != 1 ]; then
    run "$migbench" instructions --stream "$icount_stream" --reps "$icount_reps" --log-dir "$results/logs" \
        --out "$results/instructions.json" \
        --relay "$relay_tokio" --relay "$relay_migproxy" --relay "$relay_rewrite" --relay "$relay_rewrite72"
fi

# --- 7. real QEMU live migration ------------------------------------------------------------
# One uncounted warm-up migration per path, then repetitions alternating which path goes first.
qemu_migration() { # VIA REP (REP 0 = warm-up)
    local via="$1" rep="$2" relay_args=() out
    [ "$via" = migproxy ] && relay_args=(--relay "$migproxy_cmd" --relay-log "$results/logs/qemu-migproxy.log")
    if out=$(run "$python" "$tools/qemu_bench.py" migrate --qemu "$QEMU10" --smp 4 --mem-mib "$qemu_ram_mib" \
        --fill "$cache/ram-$qemu_ram_mib.fill" "${relay_args[@]}"); then
        printf '{"via": "%s", "rep": %d, "warmup": %s, "result": %s}\n' "$via" "$rep" \
            "$([ "$rep" = 0 ] && echo true || echo false)" "$out" >>"$results/qemu.jsonl"
    else
        log "real migration via $via failed (rep $rep)"
        printf '{"via": "%s", "rep": %d, "warmup": %s, "error": "migration failed, see bench log"}\n' "$via" "$rep" \
            "$([ "$rep" = 0 ] && echo true || echo false)" >>"$results/qemu.jsonl"
    fi
}
if [ "${BENCH_SKIP_QEMU:-}" != 1 ]; then
    : >"$results/qemu.jsonl"
    migproxy_cmd="$migproxy run --admin none --listen tcp:127.0.0.1:{listen} --upstream tcp:127.0.0.1:{upstream}"
    for via in direct migproxy; do qemu_migration "$via" 0; done
    for rep in $(seq 1 "$qemu_reps"); do
        if [ $((rep % 2)) = 1 ]; then order="direct migproxy"; else order="migproxy direct"; fi
        for via in $order; do qemu_migration "$via" "$rep"; done
    done
fi

# --- 8. parts measured by their own scripts ---------------------------------------------------
# Each runs only when its script or subcommand is in this checkout and writes into its own
# $results/<part>/ directory, where its report module (bench/tools/report_*.py) reads it. A part
# that is missing or fails is reported as "not run in this run", never with an older number.
if [ -n "${BENCH_TWO_HOST_RESULTS:-}" ]; then
    # An earlier two-host run, reported as it was (its meta.json carries its date and commit).
    [ -f "$BENCH_TWO_HOST_RESULTS/meta.json" ] ||
        { log "BENCH_TWO_HOST_RESULTS=$BENCH_TWO_HOST_RESULTS has no meta.json (not a finished two-host run)"; exit 1; }
    log "two-host part: taking $BENCH_TWO_HOST_RESULTS (not re-run)"
    cp -a "$BENCH_TWO_HOST_RESULTS" "$results/two-host"
elif [ -x scripts/bench-two-host.sh ] && [ "${BENCH_SKIP_TWO_HOST:-}" != 1 ]; then
    mkdir -p "$results/two-host"
    # A part that fails keeps its partial results under <part>.failed: the report says it failed
    # instead of presenting half a matrix.
    run env MIGPROXY_BIN="$migproxy" DELAY_LINE_BIN="$root/target/release/delay-line" QEMU10="$QEMU10" \
        scripts/bench-two-host.sh "$results/two-host" ||
        { log "two-host part failed (see above)"; mv "$results/two-host" "$results/two-host.failed"; }
fi
if "$migbench" multifd-relay --help >/dev/null 2>&1; then
    # Multifd: a main channel plus 4 multifd channels through `migproxy run --raw-relay copy|splice`
    # (report_multifd.py reads multifd-relay.json there).
    mkdir -p "$results/multifd"
    raw="$migproxy run --admin none --listen tcp:127.0.0.1:{listen} --upstream tcp:127.0.0.1:{upstream} --raw-relay"
    run "$migbench" multifd-relay --stream "$small" --payload "$big" --channels 4 \
        --channel-mib "${BENCH_MULTIFD_MIB:-1024}" --reps "$reps" --warmup "$warmup" --log-dir "$results/logs" \
        --out "$results/multifd/multifd-relay.json" --relay "copy=$raw copy" --relay "splice=$raw splice" ||
        { log "multifd part failed (see above)"; mv "$results/multifd" "$results/multifd.failed"; }
fi
if [ -f "$tools/switchover_instructions.py" ]; then
    # Instructions per switchover (migproxy under callgrind; report part: bench/tools/report_switchover.py,
    # which reads switchover-instructions.json next to switchover.json).
    run "$python" "$tools/switchover_instructions.py" --migbench "$migbench" --migproxy "$migproxy" --stream "$small" \
        --dest-profile "$results/dest-profile.json" --dest-profile-q72 "$results/dest-profile-q72.json" \
        --source-reference "$results/source-reference.json" --work-dir "$results/instructions" --out "$results/switchover-instructions.json" ||
        { log "switchover instructions part failed (see above)"; mkdir -p "$results/switchover-instructions.failed"
          mv -f "$results/switchover-instructions.json" "$results/switchover-instructions.failed/" 2>/dev/null || true; }
fi

# --- 9. report ------------------------------------------------------------------------------
ended_epoch=$(date +%s)
cat >"$results/meta.json" <<EOF
{"qemu": "$qemu_version", "wall_seconds": $((ended_epoch - started_epoch)), "date": "$(date -u +%Y-%m-%dT%H:%MZ)",
 "cpus": $(nproc), "cpu_model": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//; s/"/\\"/g')",
 "kernel": "$(uname -r)", "mem_gib": $(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo),
 "loadavg_at_start": "$loadavg_at_start", "loadavg_at_end": "$(cut -d' ' -f1-3 /proc/loadavg)",
 "commit": "$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- . ':!docs/benchmarks.md' ':!docs/benchmarks*.png' 2>/dev/null || echo '+uncommitted changes')",
 "warmup": $warmup, "switchover_warmup": $switchover_warmup,
 "icount_mib": $icount_mib,
 "socat": "$(socat -V 2>/dev/null | grep -m1 'socat version' | cut -d' ' -f3)",
 "haproxy": "$(haproxy -v 2>/dev/null | head -n1 | cut -d' ' -f3)",
 "ram_mib": $ram_mib, "reps": $reps, "switchover_iter": $switchover_iter, "scale_mib": $scale_mib,
 "scale_reps": $scale_reps, "qemu_ram_mib": $qemu_ram_mib, "qemu_reps": $qemu_reps, "quick": "${BENCH_QUICK:-0}"}
EOF
if [ "${BENCH_NO_DOCS:-}" != 1 ]; then
    run "$python" "$tools/report.py" --results "$results" --md docs/benchmarks.md --png docs/benchmarks.png
fi
log "results in $results; wall time $((ended_epoch - started_epoch)) s"
