#!/usr/bin/env bash
# Two-host benchmark: real QEMU 10.0 live migrations of a 4 GiB guest that keeps dirtying memory,
# between two network namespaces (a source host and a destination host) joined by one veth pair:
# 1, 2.5 and 10 Gbit/s with a 0.2 ms round trip, and unshaped. With sch_netem (rate + 0.1 ms each
# way) when the kernel has it; without it tbf shapes the rate of the data direction and the
# reverse direction (the destination's ACKs) takes a delay line instead: two TUN devices and
# bench/src/bin/delay_line.rs between them, 0.2 ms later (policy routing sends only the
# destination's packets to the source host through it). Paths:
# direct, migproxy on the destination host, migproxy source-side transparent (the guide's
# nftables redirect, `--upstream original-dst`), HAProxy on the destination host.
#
#   scripts/bench-two-host.sh [RESULTS_DIR]          full matrix (~18 min on an idle 2-core machine)
#   BENCH_QUICK=1 scripts/bench-two-host.sh          1 GiB guest, 1 repetition, smaller matrix (~5 min)
#
# The same migration runs through every path in one invocation, one warm-up per configuration (not
# counted), the order rotated between repetitions.
#
# Needs root (network namespaces, tc, nftables). Writes one JSON per run, link.json per link and
# meta.json into RESULTS_DIR (default: $MIGPROXY_CACHE/twohost/results/DATE); bench/tools/report_two_host.py
# turns them into the report. Nothing here runs in the test command.
#
# Knobs (environment): BENCH_QUICK=1, TWOHOST_RAM_MIB (4096), TWOHOST_REPS (4 on the links
# the targets are judged on, 1 and 2.5 Gbit/s; 2 on the others), TWOHOST_WINDOW_PAGES
# (8192: the guest's dirtied working set, 32 MiB), TWOHOST_ICOUNT (shift=10,align=on), TWOHOST_LINKS
# (unshaped,1g,2.5g,10g), TWOHOST_PATHS / TWOHOST_MULTIFD (override the per-link matrix, e.g.
# direct,haproxy / off), TWOHOST_DELAY_US (180: the delay line's delay; with the veth's own ~20 us the
# round trip is 0.2 ms),
# TWOHOST_RAM_DIR (/dev/shm: a tmpfs for the guest RAM file), TWOHOST_DST_PREALLOC (1; 0: the
# destination faults its RAM in during the migration), MIGPROXY_BIN / DELAY_LINE_BIN (use
# these instead of building them), QEMU10.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { printf 'bench-two-host: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "needs root: it creates network namespaces, shapes their link with tc and loads nftables rules"
    exit 1
fi
started_epoch=$(date +%s)

if [ "${BENCH_QUICK:-}" = 1 ]; then
    : "${TWOHOST_RAM_MIB:=1024}" "${TWOHOST_REPS:=1}"
fi
ram_mib="${TWOHOST_RAM_MIB:-4096}"
# The guest's pause varies by a few ms from run to run (how much it dirtied in the last round, and
# with multifd which channel finishes last): the links the targets are judged on get more runs.
reps_judged="${TWOHOST_REPS:-4}"
reps_other="${TWOHOST_REPS:-2}"
window_pages="${TWOHOST_WINDOW_PAGES:-8192}"
icount="${TWOHOST_ICOUNT:-shift=10,align=on}"
links="${TWOHOST_LINKS:-unshaped,1g,2.5g,10g}"
delay_us="${TWOHOST_DELAY_US:-180}"
# The destination preallocates its RAM before the migration: faulting it in during the migration
# cost the destination QEMU 5-7 s of system time per 4 GiB (zeroing, reclaim) on the loading thread
# and held a 2.5 Gbit/s direct migration to 1.85-1.97 Gbit/s with 80-130 retransmits; preallocated,
# the same migration reached 2.33-2.35 Gbit/s (93-94 % of the link) with none.
dst_prealloc="${TWOHOST_DST_PREALLOC:-1}"
[ "$dst_prealloc" = 0 ] && dst_prealloc=
qemu="${QEMU10:-/usr/bin/qemu-system-aarch64}"
cache="${MIGPROXY_CACHE:-$HOME/.cache/migproxy}/twohost"
results="${1:-$cache/results/$(date -u +%Y%m%dT%H%M%SZ)}"
python=/usr/bin/python3
tools="$root/bench/tools"
mkdir -p "$cache" "$results"

# --- tools ----------------------------------------------------------------------------------------
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v aarch64-linux-gnu-as >/dev/null || missing+=(binutils-aarch64-linux-gnu)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >&2 ||
        { apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 &&
            apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >&2; }
fi
if [ ! -x "$qemu" ]; then
    eval "$(scripts/provision-qemu.sh | grep -E '^QEMU10=')"
    qemu="$QEMU10"
fi
if [ -n "${MIGPROXY_BIN:-}" ]; then
    migproxy_built="$MIGPROXY_BIN"
else
    cargo build --release -p migproxy >&2
    migproxy_built="$root/target/release/migproxy"
fi
if [ -n "${DELAY_LINE_BIN:-}" ]; then
    delay_line_built="$DELAY_LINE_BIN"
else
    cargo build --release -p migproxy-bench --bin delay-line >&2
    delay_line_built="$root/target/release/delay-line"
fi

# --- scratch: namespaces, veth, a world-readable dir for the uid the source-side migproxy runs as ------
id="mpb$$"
src_ns="$id-src"
dst_ns="$id-dst"
src_dev="${id}s"
dst_dev="${id}d"
src_addr=10.231.0.1
dst_addr=10.231.0.2
# The delay line's TUN devices: the destination host routes the source host's address into dst_tun,
# the packets come out of src_tun on the source host.
src_tun="${id}rs"
dst_tun="${id}rd"
delay_line_pid=
# Under target/: the uid the source-side migproxy runs as must reach it, and it must allow exec.
mkdir -p "$root/target"
work="$(mktemp -d "$root/target/bench-two-host.XXXXXX")"
ram_dir="$(mktemp -d "${TWOHOST_RAM_DIR:-/dev/shm}/migproxy-two-host.XXXXXX")"
cleanup() {
    set +e
    # The delay line runs in this namespace (it opened its TUN devices here before they moved).
    if [ -n "$delay_line_pid" ]; then kill "$delay_line_pid" 2>/dev/null; wait "$delay_line_pid" 2>/dev/null; fi
    # QEMUs and relays run inside the namespaces: end them (by pid) before the namespaces go.
    for ns in "$src_ns" "$dst_ns"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
    done
    sleep 1
    for ns in "$src_ns" "$dst_ns"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf "$work" "$ram_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

chmod 755 "$work"
ip netns add "$src_ns"
ip netns add "$dst_ns"
ip link add "$src_dev" type veth peer name "$dst_dev"
ip link set "$src_dev" netns "$src_ns"
ip link set "$dst_dev" netns "$dst_ns"
ip -n "$src_ns" addr add "$src_addr/30" dev "$src_dev"
ip -n "$dst_ns" addr add "$dst_addr/30" dev "$dst_dev"
for ns in "$src_ns" "$dst_ns"; do ip -n "$ns" link set lo up; done
ip -n "$src_ns" link set "$src_dev" up
ip -n "$dst_ns" link set "$dst_dev" up

# With sch_netem: rate and half the round trip per direction on both ends, and a queue big enough
# that TCP's window, not the qdisc, fills. A kernel without netem (no CONFIG_NET_SCH_NETEM, nor fq or
# etf to pace by departure time) cannot delay a packet in a qdisc: then tbf shapes the data direction
# and the reverse direction goes through the delay line (link-LINK.json "shaping": tbf+delay-line).
shaping="netem"
tc -n "$src_ns" qdisc add dev "$src_dev" root netem delay 100us 2>/dev/null || shaping="tbf+delay-line"
tc -n "$src_ns" qdisc del dev "$src_dev" root 2>/dev/null || true
log "link shaping with $shaping"
if [ "$shaping" != netem ]; then
    cp "$delay_line_built" "$work/delay-line"
    "$python" "$tools/two_host.py" delay-line --binary "$work/delay-line" --in-dev "$dst_tun" \
        --out-dev "$src_tun" --delay-us "$delay_us" --spin-us "${TWOHOST_DELAY_SPIN_US:-10}" \
        --stats "$work/delay-line.json" 2>"$work/delay-line.log" &
    delay_line_pid=$!
    for _ in $(seq 100); do
        ip link show "$src_tun" >/dev/null 2>&1 && ip link show "$dst_tun" >/dev/null 2>&1 && break
        kill -0 "$delay_line_pid" 2>/dev/null || { log "delay line exited: $(cat "$work/delay-line.log")"; exit 1; }
        sleep 0.1
    done
    ip link set "$dst_tun" netns "$dst_ns"
    ip link set "$src_tun" netns "$src_ns"
    # IPv4 only: IPv6 would send router solicitations through the line before both ends are up.
    ip netns exec "$dst_ns" sysctl -qw "net.ipv6.conf.$dst_tun.disable_ipv6=1" 2>/dev/null || true
    ip netns exec "$src_ns" sysctl -qw "net.ipv6.conf.$src_tun.disable_ipv6=1" 2>/dev/null || true
    ip -n "$dst_ns" link set "$dst_tun" up
    ip -n "$src_ns" link set "$src_tun" up
    # The source host receives the destination's packets on src_tun while its route to the
    # destination is the veth: reverse-path filtering would drop them.
    ip netns exec "$src_ns" sysctl -qw net.ipv4.conf.all.rp_filter=0 "net.ipv4.conf.$src_tun.rp_filter=0"
fi
shape() { # LINK
    local rate burst
    case "$1" in
        unshaped)
            tc -n "$src_ns" qdisc del dev "$src_dev" root 2>/dev/null || true
            tc -n "$dst_ns" qdisc del dev "$dst_dev" root 2>/dev/null || true
            ip -n "$dst_ns" route del "$src_addr/32" 2>/dev/null || true
            return ;;
        1g) rate=1gbit burst=500kb ;;
        2.5g) rate=2500mbit burst=1250kb ;;
        10g) rate=10gbit burst=5mb ;;
        *) log "unknown link $1 (unshaped, 1g, 2.5g, 10g)"; exit 1 ;;
    esac
    if [ "$shaping" != netem ]; then
        # Data (source -> destination) on the tbf-shaped veth, everything back through the delay
        # line. burst: 4 ms of the rate (a smaller bucket loses tokens to late qdisc timers on a
        # busy machine and the link falls short of its rate); limit: 16 MiB of queue, beyond any
        # TCP window TSQ lets a few flows park in the qdisc.
        tc -n "$src_ns" qdisc replace dev "$src_dev" root tbf rate "$rate" burst "$burst" limit 16mb
        ip -n "$dst_ns" route replace "$src_addr/32" dev "$dst_tun"
        return
    fi
    for end in "$src_ns:$src_dev" "$dst_ns:$dst_dev"; do
        tc -n "${end%%:*}" qdisc replace dev "${end#*:}" root netem delay 100us rate "$rate" limit 100000
    done
}

cp "$migproxy_built" "$work/migproxy"
migproxy="$work/migproxy"
log "migproxy: $("$migproxy" --version)"

# The guest: dirty.S with the working set, loaded by -device loader.
aarch64-linux-gnu-as --defsym COUNTER_ADDR=0x40280000 --defsym WINDOW_ADDR=0x40300000 \
    --defsym WINDOW_PAGES="$window_pages" -o "$work/dirty.o" integration-tests/guest/dirty.S
aarch64-linux-gnu-objcopy -O binary "$work/dirty.o" "$work/dirty.bin"

# Guest RAM: a file pre-filled with non-zero data (cached; the guest maps it share=off), copied to
# tmpfs for the run: read from the disk, the source's RAM scan waited on I/O (a 2.5 Gbit/s direct
# migration spent 25-39 s of its 60 core-seconds in iowait and reached 1.2-1.4 Gbit/s), so the disk
# and not the link set the pace.
"$python" "$tools/qemu_bench.py" fill "$cache/ram-$ram_mib.fill" "$ram_mib"
ram_file="$ram_dir/ram-$ram_mib.fill"
cp "$cache/ram-$ram_mib.fill" "$ram_file"

# The rewriting relay's inputs: a stream of a fresh VM with the same configuration (its source
# reference) and the register profile captured from it (its destination profile: nothing changes).
"$python" "$tools/two_host.py" reference --qemu "$qemu" --icount "$icount" --out "$work/reference.bin"
"$migproxy" profile capture --from-stream "$work/reference.bin" -o "$work/dest-profile.json" >&2
chmod 644 "$work/reference.bin" "$work/dest-profile.json"
chmod 755 "$migproxy"

common=(--src-ns "$src_ns" --dst-ns "$dst_ns" --src-dev "$src_dev" --dst-dev "$dst_dev" --dst-addr "$dst_addr")
failed=0
IFS=, read -r -a link_list <<<"$links"
for link in "${link_list[@]}"; do
    shape "$link"
    log "link $link: measuring"
    "$python" "$tools/two_host.py" measure-link "${common[@]}" --link "$link" --shaping "$shaping" \
        ${delay_line_pid:+--delay-line-pid "$delay_line_pid"} --delay-us "$delay_us" >"$results/link-$link.json"
    log "link $link: $("$python" -c 'import json,sys; r=json.load(sys.stdin); print("%.2f Gbit/s, rtt %.3f ms, drops %s" % (r["gbit_s"], r["rtt_ms_median"], r["drops"]))' <"$results/link-$link.json")"
    # The matrix per link, sized for the time budget (<= 25 min full, ~5 min quick on an idle
    # machine): every path without multifd on 2.5 Gbit/s, multifd (4 channels) on 2.5 and 10 Gbit/s;
    # on 1 Gbit/s (a 4 GiB migration takes 35 s there) direct and migproxy on the destination host,
    # the configuration the targets are judged on, without multifd.
    case "$link" in
        unshaped) paths=direct,migproxy-dst,haproxy multifd=off ;;
        1g) paths=direct,migproxy-dst multifd=off ;;
        2.5g) paths=direct,migproxy-dst,migproxy-src,haproxy multifd=off,on ;;
        *) paths=direct,migproxy-dst,haproxy multifd=off,on ;;
    esac
    if [ "${BENCH_QUICK:-}" = 1 ]; then
        case "$link" in
            unshaped|1g) paths=direct,migproxy-dst ;;
            2.5g) ;;
            *) paths=direct,migproxy-dst,haproxy multifd=off ;;
        esac
    fi
    paths="${TWOHOST_PATHS:-$paths}"
    case "$link" in
        1g|2.5g) reps=$reps_judged ;;
        *) reps=$reps_other ;;
    esac
    multifd="${TWOHOST_MULTIFD:-$multifd}"
    "$python" "$tools/two_host.py" matrix "${common[@]}" --link "$link" --results "$results" \
        --work "$work/runs" --paths "$paths" --multifd "$multifd" --reps "$reps" --qemu "$qemu" \
        --mem-mib "$ram_mib" --fill "$ram_file" --guest "$work/dirty.bin" \
        --window-pages "$window_pages" --icount "$icount" --migproxy "$migproxy" \
        --dest-profile "$work/dest-profile.json" --source-reference "$work/reference.bin" \
        --nft-template "$root/deploy/nftables/redirect.nft" ${delay_line_pid:+--delay-line-pid "$delay_line_pid"} \
        ${dst_prealloc:+--dst-prealloc} || failed=1
    # The delay line's counters so far (cumulative; written by it once a second).
    if [ -n "$delay_line_pid" ]; then sleep 1.2; cp "$work/delay-line.json" "$results/delay-line-after-$link.json"; fi
done

ended_epoch=$(date +%s)
cat >"$results/meta.json" <<EOF
{"qemu": "$("$qemu" --version | head -n1)", "migproxy": "$("$migproxy" --version)",
 "haproxy": "$(haproxy -v 2>/dev/null | head -n1 | cut -d' ' -f3)", "wall_seconds": $((ended_epoch - started_epoch)),
 "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "cpus": $(nproc), "kernel": "$(uname -r)",
 "loadavg_at_end": "$(cut -d' ' -f1-3 /proc/loadavg)", "ram_mib": $ram_mib, "reps": $reps_judged, "reps_other_links": $reps_other,
 "window_pages": $window_pages, "icount": "$icount", "links": "$links", "quick": "${BENCH_QUICK:-0}",
 "shaping": "$shaping", "delay_us": $delay_us, "dst_prealloc": $([ -n "$dst_prealloc" ] && echo true || echo false),
 "commit": "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)"}
EOF
"$python" "$tools/report_two_host.py" "$results" >"$results/report.md" || failed=1
log "results in $results; wall time $((ended_epoch - started_epoch)) s"
exit "$failed"
