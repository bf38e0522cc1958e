#!/usr/bin/env python3
"""QEMU side of the migproxy benchmark: capture a migration stream and run real live migrations.

Only the Python standard library is used. QMP is spoken directly over the unix socket.

  qemu_bench.py fill FILE SIZE_MIB          pre-fill a guest RAM file with non-zero data
  qemu_bench.py capture --out FILE ...      `migrate "exec:cat > FILE"` from a paused guest
  qemu_bench.py migrate --via PORT ...      one QEMU -> QEMU live migration over TCP, JSON result on stdout
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
    if fill:
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


def cmd_migrate(args):
    """Source and destination QEMU 10.0; the source migrates to 127.0.0.1:VIA, which is either the
    destination's own port (direct) or a relay in front of it (the relay forwards to --dest-port)."""
    with tempfile.TemporaryDirectory(prefix="migbench-") as tmp:
        src_qmp_path = os.path.join(tmp, "src.qmp")
        dst_qmp_path = os.path.join(tmp, "dst.qmp")
        dst = start(qemu_cmdline(args, dst_qmp_path, None, ["-incoming", "defer"]), subprocess.DEVNULL)
        src = start(qemu_cmdline(args, src_qmp_path, args.fill, []), subprocess.DEVNULL)
        src_qmp = dst_qmp = None
        try:
            dst_qmp = Qmp(dst_qmp_path)
            src_qmp = Qmp(src_qmp_path)
            dst_qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{args.dest_port}")
            src_qmp.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BANDWIDTH})
            src_qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{args.via}")
            info = wait_migration(src_qmp, args.timeout)
            dst_info = wait_migration(dst_qmp, args.timeout)
            dst_status = dst_qmp.cmd("query-status")
            print(json.dumps({"source": info, "destination": dst_info, "destination_status": dst_status}))
            if info.get("status") != "completed" or dst_info.get("status") != "completed":
                raise RuntimeError("migration did not complete")
        finally:
            stop(src, src_qmp)
            stop(dst, dst_qmp)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fill")
    f.add_argument("file")
    f.add_argument("size_mib", type=int)
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
            s.add_argument("--via", type=int, required=True, help="port the source migrates to")
            s.add_argument("--dest-port", type=int, required=True, help="port the destination listens on")
    args = p.parse_args()
    if args.command == "fill":
        fill_file(args.file, args.size_mib)
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
