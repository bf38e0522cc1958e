#!/usr/bin/env python3
"""QEMU side of the migproxy benchmark: capture a migration stream and run real live migrations.

Only the Python standard library is used. QMP is spoken directly over the unix socket.

  qemu_bench.py fill FILE SIZE_MIB          pre-fill a guest RAM file with non-zero data
  qemu_bench.py warm FILE...                read files once so measurements find them in the page cache;
                                            JSON on stdout: bytes, seconds, resident fraction after
  qemu_bench.py capture --out FILE ...      `migrate "exec:cat > FILE"` from a paused guest
  qemu_bench.py migrate [--relay CMD] ...   one QEMU -> QEMU live migration over TCP (through the relay
                                            command, `{listen}`/`{upstream}` = ports), JSON result on stdout
"""
import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time

# QEMU throttles every outgoing migration to max-bandwidth (128 MiB/s by default since 8.x): lift it so the
# transport, not the throttle, bounds the transfer.
UNLIMITED_BANDWIDTH = 1 << 40


class Qmp:
    def __init__(self, path, deadline_s=30.0):
        end = time.monotonic() + deadline_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > end:
                    raise RuntimeError(f"qmp socket {path} did not come up")
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("qmp connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"qmp {name}: {reply['error']}")
            return reply.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def qemu_cmdline(args, qmp_path, fill, extra):
    cmd = [args.qemu, "-M", args.machine, "-cpu", args.cpu, "-smp", str(args.smp), "-m", f"{args.mem_mib}M",
           "-nodefaults", "-nographic", "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off", "-S"]
    if fill == "ram":
        # The RAM block is named after the backend id, so a destination of a file-backed
        # source needs a backend with the same id.
        cmd += ["-object", f"memory-backend-ram,id=mem0,size={args.mem_mib}M", "-machine", "memory-backend=mem0"]
    elif fill:
        cmd += ["-object", f"memory-backend-file,id=mem0,size={args.mem_mib}M,mem-path={fill},share=off",
                "-machine", "memory-backend=mem0"]
    return cmd + extra


def fill_file(path, size_mib):
    """Non-zero, incompressible-looking RAM: 1 MiB of urandom repeated (QEMU sends every non-zero page raw)."""
    want = size_mib * 1024 * 1024
    if os.path.exists(path) and os.path.getsize(path) == want:
        return
    block = os.urandom(1024 * 1024)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for i in range(size_mib):
            # vary each MiB a little so that no two pages are identical
            f.write(i.to_bytes(8, "little") + block[8:])
    os.replace(tmp, path)


def resident_fraction(path):
    """Share of the file in the page cache (util-linux `fincore`), None when unknown."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", path],
                             capture_output=True, text=True, timeout=60, check=True).stdout.split()
        resident, size = int(out[0]), int(out[1])
        return resident / size if size else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def warm_files(paths):
    """Read every file once: a measurement that reads its input cold pays the disk, not the relay."""
    report = []
    for path in paths:
        start, total = time.monotonic(), 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
        report.append({"file": os.path.basename(path), "bytes": total,
                       "seconds": round(time.monotonic() - start, 3), "resident": resident_fraction(path)})
    print(json.dumps(report))


def wait_migration(qmp, deadline_s):
    end = time.monotonic() + deadline_s
    while True:
        info = qmp.cmd("query-migrate")
        status = info.get("status")
        if status in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > end:
            raise RuntimeError(f"migration still {status} after {deadline_s}s")
        time.sleep(0.05)


def wait_running(qmp, deadline_s):
    """The destination resumes the guest shortly after its side of the migration completes."""
    end = time.monotonic() + deadline_s
    while True:
        status = qmp.cmd("query-status")
        if status.get("running") or time.monotonic() > end:
            return status
        time.sleep(0.02)


def start(cmd, log):
    print("+ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def stop(proc, qmp):
    try:
        if qmp:
            qmp.cmd("quit")
    except (RuntimeError, OSError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cmd_capture(args):
    with tempfile.TemporaryDirectory(prefix="migbench-") as tmp:
        qmp_path = os.path.join(tmp, "src.qmp")
        proc = start(qemu_cmdline(args, qmp_path, args.fill, []), subprocess.DEVNULL)
        qmp = None
        try:
            qmp = Qmp(qmp_path)
            qmp.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BANDWIDTH})
            partial = args.out + ".partial"
            qmp.cmd("migrate", uri=f"exec:cat > {shlex.quote(partial)}")
            info = wait_migration(qmp, args.timeout)
            if info.get("status") != "completed":
                raise RuntimeError(f"capture failed: {info}")
            os.replace(partial, args.out)
            print(json.dumps({"out": args.out, "bytes": os.path.getsize(args.out), "query-migrate": info}))
        finally:
            stop(proc, qmp)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port):
    """From /proc/net/tcp: a probe connection would reach the relay as a stray migration."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            pass
    return False


def proc_cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def start_relay(command, dest_port, log):
    listen = free_port()
    argv = [a.replace("{listen}", str(listen)).replace("{upstream}", str(dest_port)) for a in shlex.split(command)]
    proc = start(argv, log)
    end = time.monotonic() + 20
    while not is_listening(listen):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"relay {argv[0]} did not start listening on {listen}")
        time.sleep(0.01)
    return proc, listen


def cmd_migrate(args):
    """Source and destination QEMU 10.0; the source migrates either to the destination's own port
    (direct) or to a relay in front of it. The guest runs (no -S on the source): it executes nothing
    useful (no firmware) but makes QEMU iterate precopy and stop the VM for the final stage, so
    `downtime` is a real stop-and-copy time."""
    dest_port = free_port()
    # How much of the source's RAM file the page cache holds right before this run: the
    # report checks that every counted run started warm.
    fill_resident = resident_fraction(args.fill) if args.fill else None
    with tempfile.TemporaryDirectory(prefix="migbench-") as tmp:
        src_qmp_path = os.path.join(tmp, "src.qmp")
        dst_qmp_path = os.path.join(tmp, "dst.qmp")
        dst_log = open(os.path.join(tmp, "dst.log"), "wb")
        src_log = open(os.path.join(tmp, "src.log"), "wb")
        dst_ram = "ram" if args.fill else None
        # No -S: the destination resumes the guest after the migration, as in production.
        dst_cmd = [c for c in qemu_cmdline(args, dst_qmp_path, dst_ram, ["-incoming", "defer"]) if c != "-S"]
        dst = start(dst_cmd, dst_log)
        # A running guest that idles: `wfi; b .-4` at RAM + 128 MiB (the DTB sits at the start) (vCPU 0; the others
        # stay powered off, PSCI). Without code the vCPUs would spin through exceptions at
        # 100% CPU each and starve everything else on a small machine.
        idle = os.path.join(tmp, "idle.bin")
        with open(idle, "wb") as f:
            f.write((0xD503207F).to_bytes(4, "little") + (0x17FFFFFF).to_bytes(4, "little"))
        src_cmd = [c for c in qemu_cmdline(args, src_qmp_path, args.fill, []) if c != "-S"]
        src_cmd += ["-device", f"loader,file={idle},addr=0x48000000,cpu-num=0"]
        src = start(src_cmd, src_log)
        relay = None
        src_qmp = dst_qmp = None
        try:
            dst_qmp = Qmp(dst_qmp_path)
            src_qmp = Qmp(src_qmp_path)
            dst_qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{dest_port}")
            via = dest_port
            if args.relay:
                log = open(args.relay_log, "ab") if args.relay_log else subprocess.DEVNULL
                relay, via = start_relay(args.relay, dest_port, log)
                cpu_before = proc_cpu_ticks(relay.pid)
            src_qmp.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BANDWIDTH})
            src_qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{via}")
            info = wait_migration(src_qmp, args.timeout)
            dst_info = wait_migration(dst_qmp, args.timeout)
            dst_status = wait_running(dst_qmp, 10.0)
            result = {"source": info, "destination": dst_info, "destination_status": dst_status,
                      "fill_resident_before": fill_resident}
            if relay:
                hz = os.sysconf("SC_CLK_TCK")
                result["relay_cpu_s"] = (proc_cpu_ticks(relay.pid) - cpu_before) / hz
                result["relay_peak_rss_kib"] = proc_status_kib(relay.pid, "VmHWM")
            print(json.dumps(result))
            if info.get("status") != "completed" or dst_info.get("status") != "completed":
                raise RuntimeError(f"migration did not complete: {info.get('error-desc') or dst_info}")
        except (RuntimeError, OSError) as e:
            for name in ("src.log", "dst.log"):
                with open(os.path.join(tmp, name), "rb") as f:
                    text = f.read().decode(errors="replace").strip()
                if text:
                    print(f"qemu_bench: {name}: {text}", file=sys.stderr)
            raise RuntimeError(str(e)) from e
        finally:
            stop(src, src_qmp)
            stop(dst, dst_qmp)
            if relay:
                relay.kill()
                relay.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fill")
    f.add_argument("file")
    f.add_argument("size_mib", type=int)
    w = sub.add_parser("warm")
    w.add_argument("files", nargs="+")
    for name in ("capture", "migrate"):
        s = sub.add_parser(name)
        s.add_argument("--qemu", default="/usr/bin/qemu-system-aarch64")
        s.add_argument("--machine", default="virt-10.0")
        s.add_argument("--cpu", default="a64fx")
        s.add_argument("--smp", type=int, default=4)
        s.add_argument("--mem-mib", type=int, default=4096)
        s.add_argument("--fill", help="pre-filled file backing guest RAM (absent: zero RAM)")
        s.add_argument("--timeout", type=float, default=600)
        if name == "capture":
            s.add_argument("--out", required=True)
        else:
            s.add_argument("--relay", help="relay command line with {listen} and {upstream} port placeholders")
            s.add_argument("--relay-log", help="append the relay's output here")
    args = p.parse_args()
    if args.command == "fill":
        fill_file(args.file, args.size_mib)
    elif args.command == "warm":
        warm_files(args.files)
    elif args.command == "capture":
        cmd_capture(args)
    else:
        cmd_migrate(args)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"qemu_bench: {e}", file=sys.stderr)
        sys.exit(1)
