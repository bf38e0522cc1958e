#!/usr/bin/env python3
"""The switchover part of docs/benchmarks.md: the hold's added latency against its tight targets and
the instructions per switchover (`switchover_instructions.py`), from one scripts/bench.sh results
directory. Used by report.py through `section(results_dir)` and `targets(results_dir)`.

    report_switchover.py RESULTS_DIR     print the section and the target rows
"""
import json
import os
import statistics
import sys

from switchover_stats import paired_added_us

# Added latency vs direct, first tail byte -> destination's last byte, median, milliseconds.
TARGETS_MS = {
    "migproxy": ("checking relay", 0.15),
    "migproxy-to-7.2": ("rewriting 4 vCPUs towards a QEMU 7.2 profile", 0.25),
}
WHY = ("the hold walks the whole device state with its description and rewrites every vCPU while "
       "both QEMUs are stopped; see the instructions per switchover for where the time goes")


# Where the hold goes, measured by hand (callgrind of the whole migration, `strace -f -tt -T` and
# `perf stat -e page-faults,context-switches,task-clock -p PID` over 10 and 110 migrations of the
# 4-vCPU stream, 2026-11-30); kept here so the numbers below read in context.
HOLD_BREAKDOWN = (
    "Where the hold goes (4-vCPU stream, 77.8 KB tail of which ~28 KB description; instructions per "
    "switchover): the description parse (`json::parse`, a document of ~1,900 values) ~0.55 M on a "
    "description-cache miss only; the section walk ~0.26 M looking every field up by name, ~0.035 M "
    "with the walk plan a cache hit uses (codec `walk_plan.rs`, compiled once per cached "
    "description after a device state was released); the candidate scan ~0.0035 M (one memrchr per read "
    "and at most six positions checked; ~0.087 M when it visited every `{`); towards 7.2 also "
    "`rewrite_cpus` ~0.21 M and the re-encode ~0.065 M. Syscalls on the hold path (strace): the "
    "whole tail arrives in one `recvfrom` and leaves in one `writev` of one buffer, with no wakeup, "
    "lock or allocation syscall in between; the log lines come after the write. Outside the counted "
    "functions, per migration: each migration read into a freshly allocated 1 MiB buffer, so the "
    "kernel faulted in and zeroed a page per 4 KiB received, the tail's included (212 page faults "
    "per migration on the checking relay, 471 towards 7.2, about 3.2 and 4.4 ms of CPU per "
    "migration); the read buffer is now kept across a listener's migrations (~6 page faults per "
    "migration, 2.8 and 2.9 ms of CPU).\n")

# The description cache (codec `description_cache.rs`), so the hold path reads in context.
DESCRIPTION_CACHE = (
    "Description cache: each listener keeps its last accepted description (text and parse, and "
    "whether it matched the source reference). A description byte-for-byte equal to it is not "
    "parsed or reference-checked again (the same bytes give the same parse, so nothing accepted or "
    "refused changes). The checking relay's first migration of a configuration pays the parse, "
    "later ones reuse it; a rewriting relay's cache is seeded with the source reference's own "
    "description at start, so with a reference the first migration already reuses it. Hence two "
    "hold-path columns: the first migration of a freshly started daemon, and each later one.\n")


def _load(results, name):
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _added_ms(sw):
    """Relay name -> added latency vs direct (ms), from the first tail byte: the median of the per-round
    differences (switchover_stats.py), or the difference of the medians where rounds cannot be matched."""
    relays = {r["relay"]["name"]: r for r in sw.get("relays", [])}
    direct = relays.get("direct")
    if not direct or not direct["from_tail_start"].get("n"):
        return {}
    base = direct["from_tail_start"]["median"]
    added = {}
    for name, r in relays.items():
        if not r["from_tail_start"].get("n"):
            continue
        per_round = paired_added_us(r, direct)
        added[name] = (statistics.median(per_round) if per_round else r["from_tail_start"]["median"] - base) / 1000
    return added


def targets(results_dir):
    """[(name, value, target, "met"|"missed", why)] for the switchover latency targets."""
    sw = _load(results_dir, "switchover.json")
    rows = []
    added = _added_ms(sw) if sw else {}
    for relay, (label, limit) in TARGETS_MS.items():
        name = f"added switchover latency, {label}"
        if relay not in added:
            rows.append((name, "not measured", f"<= {limit} ms", "missed", "no switchover run for this relay"))
            continue
        value = added[relay]
        met = value <= limit
        rows.append((name, f"{value:.3f} ms vs direct", f"<= {limit} ms", "met" if met else "missed",
                     "" if met else WHY))
    return rows


def section(results_dir):
    """Markdown: target rows and the instructions per switchover."""
    out = ["## Switchover: hold latency targets and instructions\n"]
    out.append("| target | measured | limit | |")
    out.append("|---|---|---|---|")
    for name, value, limit, verdict, why in targets(results_dir):
        out.append(f"| {name} | {value} | {limit} | {verdict}{': ' + why if why else ''} |")
    out.append("")
    instr = _load(results_dir, "switchover-instructions.json")
    if not instr:
        out.append("Instructions per switchover: not measured in this run.\n")
        return "\n".join(out)
    out.append(f"Instructions counted by `{instr['tool']}` in `migproxy run` while `migbench switchover` "
               f"drives it: per migration = (total of {instr['few'] + instr['iterations']} iterations - total of "
               f"{instr['few']}) / {instr['iterations']} (RAM part and tail, start-up and exit cancel out); hold "
               "path = inclusive instructions of the functions that run while both QEMUs are stopped, per "
               "iteration.\n")
    out.append(HOLD_BREAKDOWN)
    out.append(DESCRIPTION_CACHE)
    out.append("| relay | instructions per later migration | hold path, first migration | "
               "hold path per later switchover | by function (later) |")
    out.append("|---|---|---|---|---|")
    for name, r in instr["relays"].items():
        parts = ", ".join(f"{k.split('::')[-2]}::{k.split('::')[-1]} {v:,}"
                          for k, v in sorted(r["hold_path_by_function"].items(), key=lambda kv: -kv[1]))
        # Results written before the first migration was counted apart have no such column.
        first = r.get("hold_path_first")
        first = f"{first:,}" if first is not None else "not measured"
        out.append(f"| {name} | {r['per_migration']:,} | {first} | {r['hold_path']:,} | {parts} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(section(sys.argv[1]))
