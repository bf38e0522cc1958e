"""Where the CPU goes during one two-host migration (two_host.py): per process, per thread, per core.

A 2-core machine runs both QEMUs, the relay, the link's softirqs and whatever else is running; this
module takes /proc snapshots before and after a migration and turns their difference into seconds,
so a report can tell a link-limited run from a CPU-limited one and name the consumer.

  snapshot(pids)          pids: {"source_qemu": pid, ...}; per-thread ticks (by thread name), /proc/stat
  account(before, after, wall_s) -> dict
      processes:   {name: {"cpu_s": .., "threads": {thread name: cpu_s}}}
      cores:       [{"busy": fraction, "softirq": fraction, ...} per core] over wall_s
      machine:     user/system/softirq/irq/iowait seconds summed over the cores, busy seconds
      others_cpu_s machine busy seconds minus the named processes' (other processes, and softirq work
                   charged to no process)
  tcp_counters(ns) -> dict   Tcp RetransSegs / OutSegs / InSegs of a network namespace (/proc/net/snmp)
"""
import os
import subprocess

HZ = os.sysconf("SC_CLK_TCK")
# /proc/stat cpu line: user nice system idle iowait irq softirq steal
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _thread_ticks(pid):
    """{thread name: utime+stime ticks} summed over the threads of pid; threads that are gone are lost."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        # Thread names like "multifdsend_3" or "CPU 2/TCG" are kept apart; worker pools share a name.
        out[name] = out.get(name, 0) + int(fields[11]) + int(fields[12])
    return out


def _process_ticks(pid):
    """(utime, stime) ticks of pid, all its threads, ended ones included; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]), int(fields[12])


def _proc_stat():
    cores = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *values = line.split()
                cores[name] = dict(zip(STAT_FIELDS, (int(v) for v in values)))
    return cores


def snapshot(pids):
    return {"processes": {name: {"ticks": _process_ticks(pid), "threads": _thread_ticks(pid)}
                          for name, pid in pids.items() if pid},
            "cores": _proc_stat()}


def account(before, after, wall_s):
    processes = {}
    ours = 0.0
    for name, b in before["processes"].items():
        a = after["processes"].get(name)
        if not a or a["ticks"] is None or b["ticks"] is None:
            continue
        user_s = (a["ticks"][0] - b["ticks"][0]) / HZ
        # System time includes the network stack work done on the process's behalf: a write into a
        # TUN device runs the receiving namespace's TCP (an ACK, and the data it lets out) right there.
        system_s = (a["ticks"][1] - b["ticks"][1]) / HZ
        cpu_s = user_s + system_s
        ours += cpu_s
        threads = {t: (ticks - b["threads"].get(t, 0)) / HZ for t, ticks in a["threads"].items()}
        # A thread that ended before the second snapshot (the source's migration thread does, at
        # completion) is only in the process's total.
        exited = cpu_s - sum(threads.values())
        if exited > 0:
            threads["(threads that ended)"] = exited
        busiest_first = {t: v for t, v in sorted(threads.items(), key=lambda x: -x[1]) if v > 0}
        processes[name] = {"cpu_s": cpu_s, "user_s": user_s, "system_s": system_s, "threads": busiest_first}
    cores = []
    machine = dict.fromkeys(STAT_FIELDS, 0.0)
    for core in sorted(after["cores"], key=lambda c: int(c[3:])):
        b, a = before["cores"].get(core), after["cores"][core]
        if not b:
            continue
        d = {k: (a[k] - b[k]) / HZ for k in STAT_FIELDS}
        total = sum(d.values()) or 1e-9
        busy = total - d["idle"] - d["iowait"]
        # Niced user time (other people's `nice -n 10` builds on a shared machine) yields to the
        # benchmark's normal-priority processes: CFS gives a nice-10 task about a tenth of the weight.
        cores.append({"core": core, "busy": busy / total, "busy_not_niced": (busy - d["nice"]) / total,
                      "softirq": d["softirq"] / total,
                      "system": d["system"] / total, "user": (d["user"] + d["nice"]) / total})
        for k in STAT_FIELDS:
            machine[k] += d[k]
    machine_busy = sum(machine.values()) - machine["idle"] - machine["iowait"]
    return {"wall_s": wall_s, "processes": processes, "cores": cores,
            "machine": {**{k: round(v, 3) for k, v in machine.items()}, "busy_s": machine_busy},
            "others_cpu_s": machine_busy - ours}


def tcp_counters(ns):
    """RetransSegs, OutSegs, InSegs of namespace ns (the kernel's Tcp MIB, per network namespace)."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], capture_output=True, text=True,
                          check=True).stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    if len(rows) != 2:
        raise RuntimeError(f"/proc/net/snmp of {ns}: no Tcp header and values")
    values = dict(zip(rows[0], rows[1]))
    return {k: int(values[k]) for k in ("RetransSegs", "OutSegs", "InSegs")}
