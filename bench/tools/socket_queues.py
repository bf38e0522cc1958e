#!/usr/bin/env python3
"""What the source host holds back during a two-host migration: its TCP queues, sampled.

Every byte queued on the source host when the guest stops must cross the link before the destination
can resume, so these queues are what a relay on the source host adds to the guest's pause. Unlike the
pause, which varies by several ms between runs, they barely move, which makes them the measure to
compare placements by.

  socket_queues.py sample --dst-addr A --relay-port P --out FILE [--interval S]
      run inside the source host's network namespace (`ip netns exec`) until SIGTERM: every interval,
      one JSON line per sample with the queues below, read from /proc/net/tcp (no process per sample)

Per sample, over the namespace's established IPv4 sockets:
  source_send   Send-Q of the source QEMU's sockets towards the destination address: bytes written
                and not yet acknowledged (with a relay on this host, acknowledged by the relay)
  relay_receive Recv-Q of the relay's sockets accepted on the relay port (the redirected connections)
  relay_send    Send-Q of the relay's own sockets towards the destination
A socket towards the destination is the source QEMU's when the relay accepted a connection from it (it
was redirected), or when there is no relay on this host; otherwise it is the relay's. Pipes between a
relay's sockets are not visible here.

summarize(path) -> {"samples", "source_send_bytes", "relay_receive_bytes", "relay_send_bytes"} (means).
"""
import argparse
import json
import signal
import socket
import statistics
import struct
import sys
import time

ESTABLISHED = "01"


def _address(hex_addr_port):
    """/proc/net/tcp's `0100007F:115C` -> ("127.0.0.1", 4444)."""
    addr, port = hex_addr_port.split(":")
    return socket.inet_ntoa(struct.pack("<I", int(addr, 16))), int(port, 16)


def established(lines):
    """(local, remote, send_q, recv_q) of every established socket in /proc/net/tcp's lines."""
    out = []
    for line in lines[1:]:
        f = line.split()
        if len(f) < 5 or f[3] != ESTABLISHED:
            continue
        send_q, recv_q = (int(x, 16) for x in f[4].split(":"))
        out.append((_address(f[1]), _address(f[2]), send_q, recv_q))
    return out


def classify(sockets, dst_addr, relay_port):
    """One sample's queues (see the module text)."""
    accepted = [s for s in sockets if s[0][1] == relay_port]
    redirected_from = {s[1] for s in accepted}
    towards = [s for s in sockets if s[1][0] == dst_addr]
    source = [s for s in towards if s[0] in redirected_from] if accepted else towards
    relay = [s for s in towards if s[0] not in redirected_from] if accepted else []
    return {"source_send": sum(s[2] for s in source), "relay_receive": sum(s[3] for s in accepted),
            "relay_send": sum(s[2] for s in relay), "source_sockets": len(source)}


def cmd_sample(args):
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    with open(args.out, "w") as out:
        while not stopping:
            with open("/proc/net/tcp") as f:
                sample = classify(established(f.readlines()), args.dst_addr, args.relay_port)
            if sample["source_sockets"]:
                sample["t"] = time.time()
                out.write(json.dumps(sample) + "\n")
                out.flush()
            time.sleep(args.interval)


def summarize(path):
    with open(path) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    if not samples:
        return {"samples": 0}
    mean = lambda key: statistics.mean(s[key] for s in samples)  # noqa: E731
    return {"samples": len(samples), "source_send_bytes": mean("source_send"),
            "relay_receive_bytes": mean("relay_receive"), "relay_send_bytes": mean("relay_send")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--dst-addr", required=True)
    s.add_argument("--relay-port", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--interval", type=float, default=0.05)
    args = p.parse_args()
    cmd_sample(args)


if __name__ == "__main__":
    sys.exit(main())
