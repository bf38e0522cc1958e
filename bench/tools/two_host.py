#!/usr/bin/env python3
"""Two-host part of the migproxy benchmark: real QEMU live migrations between two network namespaces.

scripts/bench-two-host.sh creates the namespaces (a source host and a destination host joined by one
shaped veth pair) and calls this driver; only the Python standard library is used, QMP through the
Qmp class of qemu_bench.py.

  two_host.py probe-sink --port P --seconds S      (in the destination namespace) count what arrives
  two_host.py probe-source --addr A --port P ...   (in the source namespace) send for S seconds, then a
                                                   TCP ping-pong for the round trip; JSON on stdout
  two_host.py measure-link ...                     both of the above across the namespaces, JSON out
  two_host.py delay-line --in-dev A --out-dev B ... open two TUN devices and exec the delay line
                                                   (bench/src/bin/delay_line.rs) on them: packets
                                                   routed into A come out of B a fixed delay later
  two_host.py matrix ...                           one link: every configuration (multifd off/on x
                                                   path), a warm-up each, repetitions with the path
                                                   order rotated; one JSON file per run

Paths (the migration's route from the source QEMU to the destination QEMU):
  direct         the source connects to the destination QEMU's port
  migproxy-dst   `migproxy run` on the destination host in front of the destination QEMU
  migproxy-src   `migproxy run --upstream original-dst` on the source host; the guide's nftables
                 redirect (deploy/nftables/redirect.nft) sends the source's connection to it
  haproxy        HAProxy in TCP mode (splice) on the destination host
"""
import argparse
import fcntl
import json
import os
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_account  # noqa: E402
import socket_queues  # noqa: E402
from qemu_bench import UNLIMITED_BANDWIDTH, Qmp, is_listening, proc_cpu_ticks, stop  # noqa: E402

# The counting guest's memory map (integration-tests/src/guest.rs).
GUEST_LOAD_ADDR = 0x4020_0000
GUEST_COUNTER_ADDR = 0x4028_0000
GUEST_WINDOW_ADDR = 0x4030_0000

# Ports on the destination host: the destination QEMU listens on one of QEMU_PORTS (rotated, so a
# previous run's TIME_WAIT never matters), a relay on RELAY_PORT.
QEMU_PORT_BASE = 49152
QEMU_PORT_COUNT = 64
RELAY_PORT = 4444
# The user migproxy runs as on the source host: the guide's ruleset exempts its own connections by uid.
MIGPROXY_UID = 65532

PATHS = ("direct", "migproxy-dst", "migproxy-src", "haproxy")


def log(msg):
    print(f"two_host: {msg}", file=sys.stderr, flush=True)


class EventQmp(Qmp):
    """QMP that keeps the events it reads on the way (with QEMU's own microsecond timestamps)."""

    def __init__(self, path, deadline_s=30.0):
        self.events = []
        super().__init__(path, deadline_s)

    def _read(self):
        msg = super()._read()
        if "event" in msg:
            self.events.append(msg)
        return msg

    def event_time(self, name, after=0.0):
        """Timestamp (s, QEMU's wall clock) of the first event `name` stamped after `after`."""
        for ev in self.events:
            ts = ev.get("timestamp", {})
            t = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
            if ev["event"] == name and t > after:
                return t
        return None

    def counter(self):
        out = self.cmd("human-monitor-command", **{"command-line": f"xp /1xg {GUEST_COUNTER_ADDR:#x}"})
        # "0000000040280000: 0x000000000123abcd"
        return int(out.split(": ", 1)[1].strip(), 16)


# --- link probe -------------------------------------------------------------------------------

def cmd_probe_sink(args):
    """Accept one connection, read until EOF, then echo 8-byte pings until EOF."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    srv.listen(1)
    srv.settimeout(args.seconds + 30)
    print("listening", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(args.seconds + 30)
    total = 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        total += len(data)
    conn.close()
    ping, _ = srv.accept()
    ping.settimeout(30)
    ping.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = ping.recv(8)
        if not data:
            break
        ping.sendall(data)
    print(json.dumps({"received_bytes": total}), flush=True)


def cmd_probe_source(args):
    buf = os.urandom(1 << 20)
    s = socket.create_connection((args.addr, args.port), timeout=30)
    start = time.monotonic()
    end = start + args.seconds
    sent = 0
    while time.monotonic() < end:
        s.sendall(buf)
        sent += len(buf)
    loaded = tcp_info(s)
    s.shutdown(socket.SHUT_WR)
    # The sink reads to EOF: wait for its close so the bytes in flight are counted as delivered.
    s.settimeout(60)
    while s.recv(1 << 16):
        pass
    elapsed = time.monotonic() - start
    s.close()
    p = socket.create_connection((args.addr, args.port), timeout=30)
    p.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for i in range(args.pings):
        t0 = time.monotonic()
        p.sendall(struct.pack("<Q", i))
        got = b""
        while len(got) < 8:
            chunk = p.recv(8 - len(got))
            if not chunk:
                raise RuntimeError("probe sink closed during ping-pong")
            got += chunk
        rtts.append((time.monotonic() - t0) * 1000)
        time.sleep(0.002)
    idle = tcp_info(p)
    p.close()
    print(json.dumps({"bulk_tcp": loaded, "ping_tcp": idle, "sent_bytes": sent, "seconds": elapsed, "gbit_s": sent * 8 / elapsed / 1e9,
                      "rtt_ms_median": statistics.median(rtts), "rtt_ms_min": min(rtts),
                      "rtt_ms_max": max(rtts), "pings": len(rtts)}))


def tcp_info(sock):
    """The kernel's view of a connection (struct tcp_info, linux/tcp.h): min_rtt is the smallest round
    trip it measured (the path without queueing), rtt the smoothed one (with whatever queue built up)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    rtt_us, = struct.unpack_from("<I", raw, 68)
    total_retrans, = struct.unpack_from("<I", raw, 100)
    min_rtt_us, = struct.unpack_from("<I", raw, 148)
    return {"rtt_ms": rtt_us / 1000, "min_rtt_ms": min_rtt_us / 1000, "total_retrans": total_retrans}


def netns(ns, argv):
    return ["ip", "netns", "exec", ns] + argv


def cmd_measure_link(args):
    me = os.path.abspath(__file__)
    accounted = {"delay_line": args.delay_line_pid} if args.delay_line_pid else {}
    cpu_before = cpu_account.snapshot(accounted)
    started = time.monotonic()
    sink = subprocess.Popen(netns(args.dst_ns, [sys.executable, me, "probe-sink", "--port", str(args.port),
                                                "--seconds", str(args.seconds)]),
                            stdout=subprocess.PIPE, text=True)
    try:
        if sink.stdout.readline().strip() != "listening":
            raise RuntimeError("probe sink did not start")
        out = subprocess.run(netns(args.src_ns, [sys.executable, me, "probe-source", "--addr", args.dst_addr,
                                                 "--port", str(args.port), "--seconds", str(args.seconds),
                                                 "--pings", str(args.pings)]),
                             check=True, capture_output=True, text=True, timeout=args.seconds + 120).stdout
        result = json.loads(out)
        sink_out = sink.communicate(timeout=60)[0]
        result["received_bytes"] = json.loads(sink_out.strip().splitlines()[-1])["received_bytes"]
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    # The probe's own CPU is in "others": the point is the delay line's share and the cores' load.
    result["cpu"] = cpu_account.account(cpu_before, cpu_account.snapshot(accounted), time.monotonic() - started)
    result["delay_us"] = args.delay_us if args.shaping != "netem" and args.link != "unshaped" else None
    result["qdisc"] = {}
    for ns, dev in ((args.src_ns, args.src_dev), (args.dst_ns, args.dst_dev)):
        stats = subprocess.run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev],
                               capture_output=True, text=True).stdout
        result["qdisc"][dev] = [{k: q.get(k) for k in ("kind", "options", "bytes", "packets", "drops",
                                                       "overlimits", "requeues")}
                                for q in json.loads(stats or "[]")]
    result["link"] = args.link
    result["shaping"] = "none" if args.link == "unshaped" else args.shaping
    result["drops"] = sum(q.get("drops") or 0 for qs in result["qdisc"].values() for q in qs)
    print(json.dumps(result))


# --- delay line -------------------------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name):
    """A new TUN device `name` in this network namespace (raw IP packets, no header); its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def cmd_delay_line(args):
    """Open both TUN devices (the caller moves them into their namespaces afterwards: a TUN device
    keeps its file when it changes namespace) and become the delay line, reading the first on its
    standard input and writing the second on its standard output. Safe Rust cannot issue TUNSETIFF,
    so the opening is done here."""
    into, out_of = open_tun(args.in_dev), open_tun(args.out_dev)
    os.dup2(into, 0)
    os.dup2(out_of, 1)
    os.close(into)
    os.close(out_of)
    # Real-time priority: on a machine whose two cores run both QEMUs, a normal thread wakes up
    # hundreds of microseconds late; a SCHED_FIFO one preempts them (it spins at most --spin-us per packet).
    argv = ["chrt", "--fifo", str(args.rt_priority), args.binary, "--delay-us", str(args.delay_us),
            "--spin-us", str(args.spin_us), "--stats", args.stats]
    os.execvp("chrt", argv)


# --- one migration ----------------------------------------------------------------------------

def link_tx_bytes(ns, dev):
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["stats64"]["tx"]["bytes"]


def qemu_argv(args, qmp_path, source, prealloc=False):
    argv = [args.qemu, "-M", args.machine, "-cpu", args.cpu, "-smp", str(args.smp), "-m", f"{args.mem_mib}M",
            "-nodefaults", "-nographic", "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off",
            # Single-threaded TCG whose virtual clock the host clock paces (align=on sleeps when the guest
            # runs ahead): the dirtying loop gets a small, steady share of a CPU, so the link and not this
            # machine's two cores bounds the migration.
            "-icount", args.icount,
            # Named threads (CPU n/TCG, live_migration, multifdsend_n, ...): the CPU accounting per thread.
            "-name", f"{'source' if source else 'destination'},debug-threads=on"]
    if source:
        # share=off: the guest's writes stay private, every run starts from the same file content.
        argv += ["-object", f"memory-backend-file,id=mem0,size={args.mem_mib}M,mem-path={args.fill},share=off",
                 "-machine", "memory-backend=mem0",
                 "-device", f"loader,file={args.guest},addr={GUEST_LOAD_ADDR:#x},cpu-num=0"]
    else:
        # prealloc: the destination faults its RAM in before the migration instead of during it
        # (page faults and zeroing on the loading thread, which competes with everything else for
        # two cores); what a production destination with preallocated (huge) pages does.
        argv += ["-object", f"memory-backend-ram,id=mem0,size={args.mem_mib}M{',prealloc=on' if prealloc else ''}",
                 "-machine",
                 "memory-backend=mem0",
                 "-incoming", "defer"]
    return argv


def start_in(ns, argv, log_path):
    log(f"[{ns}] " + " ".join(shlex.quote(a) for a in argv))
    with open(log_path, "ab") as logf:
        return subprocess.Popen(netns(ns, argv), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)


def wait_listening_in(ns, port, proc, what, deadline_s=20.0):
    end = time.monotonic() + deadline_s
    probe = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from qemu_bench import "
             "is_listening; sys.exit(0 if is_listening(int(sys.argv[2])) else 1)",
             os.path.dirname(os.path.abspath(__file__)), str(port)]
    while True:
        if subprocess.run(netns(ns, probe)).returncode == 0:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before listening on {port}")
        if time.monotonic() > end:
            raise RuntimeError(f"{what} not listening on {port} after {deadline_s}s")
        time.sleep(0.05)


def haproxy_config(path, qemu_port):
    with open(path, "w") as f:
        f.write(f"""global
    maxconn 256
    tune.pipesize 1048576
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    option splice-request
    option splice-response
frontend migration
    bind 0.0.0.0:{RELAY_PORT}
    default_backend destination
backend destination
    server dest 127.0.0.1:{qemu_port}
""")


def redirect_ruleset(template, table, dst_addr, qemu_port):
    """deploy/nftables/redirect.nft as it is, with this run's values for its defines and a table of its own."""
    values = {"MIGPROXY_UID": str(MIGPROXY_UID), "MIGPROXY_PORT": str(RELAY_PORT),
              "MIGRATION_PORTS": str(qemu_port), "UPGRADED_HOSTS": "{ " + dst_addr + " }"}
    out, seen = [], set()
    with open(template) as f:
        for line in f:
            if line.startswith("define "):
                name = line[len("define "):].split("=", 1)[0].strip()
                if name not in values:
                    raise RuntimeError(f"{template}: unexpected define {name}")
                seen.add(name)
                line = f"define {name} = {values[name]}\n"
            elif line.startswith("table inet migproxy "):
                seen.add("table")
                line = f"table inet {table} {{\n"
            out.append(line)
    if seen != set(values) | {"table"}:
        raise RuntimeError(f"{template}: expected defines {sorted(values)} and the table, found {sorted(seen)}")
    return "".join(out)


def start_relay(args, path, qemu_port, run_dir):
    """The relay of `path` (None for direct), listening; returns (proc, port the source dials, cleanup)."""
    relay_log = os.path.join(run_dir, f"{path}.log")
    if path == "direct":
        return None, qemu_port, lambda: None
    if path == "haproxy":
        cfg = os.path.join(run_dir, "haproxy.cfg")
        haproxy_config(cfg, qemu_port)
        proc = start_in(args.dst_ns, [args.haproxy, "-db", "-f", cfg], relay_log)
        wait_listening_in(args.dst_ns, RELAY_PORT, proc, "haproxy")
        return proc, RELAY_PORT, lambda: None
    rewrite = ["--dest-profile", args.dest_profile, "--source-reference", args.source_reference]
    if path == "migproxy-dst":
        argv = [args.migproxy, "run", "--admin", "none", "--listen", f"tcp:0.0.0.0:{RELAY_PORT}",
                "--upstream", f"tcp:127.0.0.1:{qemu_port}"] + rewrite
        proc = start_in(args.dst_ns, argv, relay_log)
        wait_listening_in(args.dst_ns, RELAY_PORT, proc, "migproxy")
        return proc, RELAY_PORT, lambda: None
    if path == "migproxy-src":
        table = f"migproxy_bench_{os.getpid()}"
        ruleset = redirect_ruleset(args.nft_template, table, args.dst_addr, qemu_port)
        nft_file = os.path.join(run_dir, "redirect.nft")
        with open(nft_file, "w") as f:
            f.write(ruleset)
        argv = ["setpriv", f"--reuid={MIGPROXY_UID}", f"--regid={MIGPROXY_UID}", "--clear-groups",
                args.migproxy, "run", "--admin", "none", "--listen", f"tcp:0.0.0.0:{RELAY_PORT}",
                "--upstream", "original-dst"] + rewrite
        proc = start_in(args.src_ns, argv, relay_log)
        wait_listening_in(args.src_ns, RELAY_PORT, proc, "migproxy")
        subprocess.run(["ip", "netns", "exec", args.src_ns, "nft", "-f", nft_file], check=True)

        def cleanup():
            subprocess.run(["ip", "netns", "exec", args.src_ns, "nft", "delete", "table", "inet", table])
        # The source dials the destination QEMU itself; nftables hands the connection to migproxy.
        return proc, qemu_port, cleanup
    raise RuntimeError(f"unknown path {path}")


def set_multifd(qmp, channels):
    qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    qmp.cmd("migrate-set-parameters", **{"multifd-channels": channels})


def _busy_ticks(cpu_line):
    """Non-idle ticks of all CPUs from /proc/stat's first line (user nice system idle iowait irq softirq)."""
    fields = [int(v) for v in cpu_line.split()[1:8]]
    return sum(fields) - fields[3] - fields[4]


def one_migration(args, path, multifd, run_dir, qemu_port):
    os.makedirs(run_dir, exist_ok=True)
    src_qmp_path = os.path.join(run_dir, "src.qmp")
    dst_qmp_path = os.path.join(run_dir, "dst.qmp")
    dst = start_in(args.dst_ns, qemu_argv(args, dst_qmp_path, source=False, prealloc=args.dst_prealloc),
                   os.path.join(run_dir, "dst.log"))
    src = start_in(args.src_ns, qemu_argv(args, src_qmp_path, source=True), os.path.join(run_dir, "src.log"))
    src_qmp = dst_qmp = relay = queues = None
    cleanup = lambda: None  # noqa: E731
    result = {"path": path, "multifd": multifd, "converged": False}
    try:
        dst_qmp = EventQmp(dst_qmp_path)
        src_qmp = EventQmp(src_qmp_path)
        if multifd:
            set_multifd(dst_qmp, args.multifd_channels)
            set_multifd(src_qmp, args.multifd_channels)
        dst_qmp.cmd("migrate-incoming", uri=f"tcp:0.0.0.0:{qemu_port}")
        wait_listening_in(args.dst_ns, qemu_port, dst, "destination QEMU")
        relay, dial_port, cleanup = start_relay(args, path, qemu_port, run_dir)
        # The guest runs and dirties: its counter moves before the migration starts.
        first = src_qmp.counter()
        end = time.monotonic() + 30
        while (before := src_qmp.counter()) <= first:
            if time.monotonic() > end:
                raise RuntimeError(f"guest counter stuck at {first} before the migration")
            time.sleep(0.05)
        result["counter_before"] = before
        src_qmp.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BANDWIDTH})
        hz = os.sysconf("SC_CLK_TCK")
        relay_ticks = proc_cpu_ticks(relay.pid) if relay else None
        # Where the CPU goes (a 2-core machine runs both QEMUs, the relay and the link's softirqs).
        qemu_ticks = (proc_cpu_ticks(src.pid), proc_cpu_ticks(dst.pid))
        with open("/proc/stat") as f:
            machine_busy = _busy_ticks(f.readline())
        accounted = {"source_qemu": src.pid, "destination_qemu": dst.pid, "relay": relay.pid if relay else None}
        if args.delay_line_pid:
            accounted["delay_line"] = args.delay_line_pid
        cpu_before = cpu_account.snapshot(accounted)
        tcp_before = {ns: cpu_account.tcp_counters(ns) for ns in (args.src_ns, args.dst_ns)}
        tx_before = link_tx_bytes(args.src_ns, args.src_dev)
        queues_file = os.path.join(run_dir, "source-host-queues.jsonl")
        queues = start_in(args.src_ns, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                      "socket_queues.py"),
                                        "sample", "--dst-addr", args.dst_addr, "--relay-port", str(RELAY_PORT),
                                        "--out", queues_file], os.path.join(run_dir, "queues.log"))
        started = time.time()
        src_qmp.cmd("migrate", uri=f"tcp:{args.dst_addr}:{dial_port}")
        end = time.monotonic() + args.timeout
        while True:
            info = src_qmp.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                terminate(queues)
                result["source_host_queues"] = socket_queues.summarize(queues_file)
                break
            if time.monotonic() > end:
                # Did not converge in time: give up on this run, record it as such.
                src_qmp.cmd("migrate_cancel")
                result["error"] = f"still {info.get('status')} after {args.timeout}s (not converged)"
                result["source"] = info
                return result
            time.sleep(0.05)
        result["source"] = info
        if info.get("status") != "completed":
            result["error"] = f"migration {info.get('status')}: {info.get('error-desc')}"
            return result
        # The destination resumes the guest itself (no -S): wait for its RESUME event.
        end = time.monotonic() + 30
        while dst_qmp.event_time("RESUME", started) is None:
            if time.monotonic() > end:
                raise RuntimeError("destination did not resume within 30 s")
            dst_qmp.cmd("query-status")
            time.sleep(0.01)
        if relay:
            result["migproxy_cpu_s" if path.startswith("migproxy") else "relay_cpu_s"] = \
                (proc_cpu_ticks(relay.pid) - relay_ticks) / hz
        result["link_tx_bytes"] = link_tx_bytes(args.src_ns, args.src_dev) - tx_before
        result["cpu"] = cpu_account.account(cpu_before, cpu_account.snapshot(accounted), time.time() - started)
        result["tcp"] = {side: {k: v - tcp_before[ns][k] for k, v in cpu_account.tcp_counters(ns).items()}
                         for side, ns in (("source_host", args.src_ns), ("destination_host", args.dst_ns))}
        result["source_qemu_cpu_s"] = (proc_cpu_ticks(src.pid) - qemu_ticks[0]) / hz
        result["destination_qemu_cpu_s"] = (proc_cpu_ticks(dst.pid) - qemu_ticks[1]) / hz
        with open("/proc/stat") as f:
            result["machine_busy_cpu_s"] = (_busy_ticks(f.readline()) - machine_busy) / hz
        stop_t = src_qmp.event_time("STOP", started)
        resume_t = dst_qmp.event_time("RESUME", started)
        result["destination"] = dst_qmp.cmd("query-migrate")
        result["total_time_ms"] = info.get("total-time")
        result["downtime_ms"] = info.get("downtime")
        result["stop_to_resume_ms"] = (resume_t - stop_t) * 1000 if stop_t and resume_t else None
        ram = info.get("ram", {})
        result["ram_transferred"] = ram.get("transferred")
        result["dirty_sync_count"] = ram.get("dirty-sync-count")
        # The guest keeps counting on the destination from where the source stopped it.
        last = dst_qmp.counter()
        end = time.monotonic() + 10
        while (after := dst_qmp.counter()) <= last and time.monotonic() < end:
            time.sleep(0.05)
        result["counter_after"] = after
        result["guest_dirtying"] = after > last > before
        result["converged"] = True
        return result
    finally:
        if queues:
            terminate(queues)
        stop(src, src_qmp)
        stop(dst, dst_qmp)
        cleanup()
        if relay:
            terminate(relay)


def terminate(proc, timeout_s=10):
    """SIGTERM, then SIGKILL if `proc` has not exited within `timeout_s`; a no-op once it has."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cmd_reference(args):
    """A saved stream of a fresh, paused VM with the benchmark's configuration (zero RAM, -icount too):
    the destination profile and the source reference migproxy's rewriting relay is given."""
    qmp_path = args.out + ".qmp"
    argv = [a for a in qemu_argv(args, qmp_path, source=False) if a not in ("-incoming", "defer")] + ["-S"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    qmp = None
    try:
        qmp = Qmp(qmp_path)
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BANDWIDTH})
        partial = args.out + ".partial"
        qmp.cmd("migrate", uri=f"exec:cat > {shlex.quote(partial)}")
        end = time.monotonic() + args.timeout
        while (info := qmp.cmd("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() > end:
                raise RuntimeError(f"reference capture still {info.get('status')} after {args.timeout}s")
            time.sleep(0.05)
        if info.get("status") != "completed":
            raise RuntimeError(f"reference capture failed: {info}")
        os.replace(partial, args.out)
    finally:
        stop(proc, qmp)
        if os.path.exists(qmp_path):
            os.unlink(qmp_path)


def cmd_matrix(args):
    """Every configuration of one link: a warm-up each, then `reps` repetitions, path order rotated."""
    os.makedirs(args.results, exist_ok=True)
    configs = []
    for multifd in args.multifd:
        for path in args.paths:
            configs.append((path, multifd == "on"))
    runs = [("warmup", 0)] + [("rep", r) for r in range(1, args.reps + 1)]
    index = 0
    failures = 0
    for kind, rep in runs:
        # Rotate the order every round so no path always runs first (or right after a warm-up).
        shift = rep % len(configs)
        for path, multifd in configs[shift:] + configs[:shift]:
            name = f"{args.link}-{'multifd' if multifd else 'single'}-{path}-{kind}{rep}"
            run_dir = os.path.join(args.work, name)
            qemu_port = QEMU_PORT_BASE + index % QEMU_PORT_COUNT
            index += 1
            log(f"run {name}")
            try:
                result = one_migration(args, path, multifd, run_dir, qemu_port)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                result = {"path": path, "multifd": multifd, "converged": False, "error": str(e)}
            result.update({"link": args.link, "rep": rep, "dst_prealloc": args.dst_prealloc, "warmup": kind == "warmup", "mem_mib": args.mem_mib,
                           "icount": args.icount, "window_pages": args.window_pages,
                           "loadavg": open("/proc/loadavg").read().split()[:3], "name": name})
            if "error" in result:
                failures += 1
                log(f"run {name}: {result['error']}")
                for f in ("src.log", "dst.log", f"{path}.log"):
                    p = os.path.join(run_dir, f)
                    if os.path.exists(p):
                        text = open(p, errors="replace").read().strip()
                        if text:
                            log(f"  {f}: {text[-2000:]}")
            else:
                log(f"run {name}: total {result['total_time_ms']} ms, downtime {result['downtime_ms']} ms, "
                    f"stop->resume {result['stop_to_resume_ms']:.2f} ms")
            with open(os.path.join(args.results, f"run-{name}.json"), "w") as f:
                json.dump(result, f, indent=1)
            # Keep the QEMU and relay logs with the results (the scratch dir goes with the namespaces).
            logs = os.path.join(args.results, "logs")
            os.makedirs(logs, exist_ok=True)
            for f in ("src.log", "dst.log", f"{path}.log"):
                p = os.path.join(run_dir, f)
                if os.path.exists(p) and os.path.getsize(p):
                    shutil.copyfile(p, os.path.join(logs, f"{name}-{f}"))
    return failures


def add_qemu_args(s):
    s.add_argument("--qemu", default="/usr/bin/qemu-system-aarch64")
    s.add_argument("--machine", default="virt-10.0")
    s.add_argument("--cpu", default="a64fx")
    s.add_argument("--smp", type=int, default=4)
    s.add_argument("--icount", default="shift=10,align=on")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("probe-sink")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seconds", type=float, default=3)
    s = sub.add_parser("probe-source")
    s.add_argument("--addr", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seconds", type=float, default=3)
    s.add_argument("--pings", type=int, default=200)
    s = sub.add_parser("delay-line")
    s.add_argument("--binary", required=True, help="the delay-line program")
    s.add_argument("--in-dev", required=True)
    s.add_argument("--out-dev", required=True)
    s.add_argument("--delay-us", type=int, required=True)
    s.add_argument("--stats", required=True)
    s.add_argument("--rt-priority", type=int, default=10, help="SCHED_FIFO priority")
    s.add_argument("--spin-us", type=int, default=10, help="spin this long before each deadline")
    s = sub.add_parser("reference")
    s.add_argument("--out", required=True)
    add_qemu_args(s)
    s.add_argument("--mem-mib", type=int, default=256)
    s.add_argument("--timeout", type=float, default=120)
    for name in ("measure-link", "matrix"):
        s = sub.add_parser(name)
        s.add_argument("--src-ns", required=True)
        s.add_argument("--dst-ns", required=True)
        s.add_argument("--src-dev", required=True)
        s.add_argument("--dst-dev", required=True)
        s.add_argument("--dst-addr", required=True)
        if name == "measure-link":
            s.add_argument("--link", required=True)
            s.add_argument("--shaping", required=True,
                           help="netem (rate + delay) or tbf+delay-line (rate; the way back through the delay line)")
            s.add_argument("--port", type=int, default=5201)
            s.add_argument("--seconds", type=float, default=3)
            s.add_argument("--pings", type=int, default=200)
            s.add_argument("--delay-line-pid", type=int, help="the delay line's process (its CPU is accounted)")
            s.add_argument("--delay-us", type=int, required=True, help="the delay line's delay (recorded)")
        else:
            s.add_argument("--link", required=True, help="name of the link shape (results are keyed by it)")
            s.add_argument("--results", required=True)
            s.add_argument("--work", required=True, help="scratch dir for QMP sockets and logs")
            s.add_argument("--paths", type=lambda v: v.split(","), default=list(PATHS))
            s.add_argument("--multifd", type=lambda v: v.split(","), default=["off"], help="off,on")
            s.add_argument("--multifd-channels", type=int, default=4)
            s.add_argument("--reps", type=int, default=3)
            add_qemu_args(s)
            s.add_argument("--mem-mib", type=int, default=4096)
            s.add_argument("--fill", required=True)
            s.add_argument("--guest", required=True, help="assembled dirty.S (flat binary)")
            s.add_argument("--window-pages", type=int, required=True, help="recorded with each run")
            s.add_argument("--timeout", type=float, default=180)
            s.add_argument("--migproxy", required=True)
            s.add_argument("--haproxy", default="haproxy")
            s.add_argument("--dest-profile", required=True)
            s.add_argument("--source-reference", required=True)
            s.add_argument("--nft-template", required=True)
            s.add_argument("--delay-line-pid", type=int, help="the delay line's process (its CPU is accounted)")
            s.add_argument("--dst-prealloc", action="store_true", help="destination RAM preallocated (prealloc=on)")
    args = p.parse_args()
    if args.command == "probe-sink":
        cmd_probe_sink(args)
    elif args.command == "probe-source":
        cmd_probe_source(args)
    elif args.command == "delay-line":
        cmd_delay_line(args)
    elif args.command == "reference":
        cmd_reference(args)
    elif args.command == "measure-link":
        cmd_measure_link(args)
    else:
        bad = [x for x in args.paths if x not in PATHS]
        if bad:
            p.error(f"unknown path(s) {bad}; known: {', '.join(PATHS)}")
        failures = cmd_matrix(args)
        if failures:
            log(f"{failures} run(s) failed on link {args.link}")
            sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"two_host: {e}", file=sys.stderr)
        sys.exit(1)
