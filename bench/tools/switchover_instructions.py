#!/usr/bin/env python3
"""Instructions per switchover: migproxy under `valgrind --tool=callgrind`, driven by
`migbench switchover`, for the checking relay and the rewrite towards a QEMU 7.2 profile.

Each relay runs twice, for FEW (= 1) and for FEW + K iterations (one iteration = one migration:
the RAM part, then the device-state tail); the difference of the two instruction totals over K is
the instructions of one later migration without the daemon's start-up and exit. The hold path (what
runs while both QEMUs are stopped: the candidate scan, the walk with the description, the rewrite,
the re-encode) is the part of that in the functions named in HOLD_PATH. It is reported twice,
because the daemon keeps the last accepted description parsed (codec `description_cache.rs`): for
the first migration (the short run: a checking relay parses its description there; a relay with a
source reference already reuses the reference's) and per later migration (the difference of the two
runs over K: every later migration of the same configuration reuses it).

    switchover_instructions.py --migbench BIN --migproxy BIN --stream S --dest-profile P
        --dest-profile-q72 P72 --source-reference R [--iterations K] --work-dir DIR --out FILE.json

Prints nothing but errors; writes JSON:
    {"iterations": K, "relays": {"migproxy": {"per_migration": N, "hold_path": N, ...}, ...}}
"""

import argparse
import json
import os
import re
import subprocess
import sys

# The short run is exactly the first migration, so its hold path is the first migration's.
FEW = 1
# Inclusive costs of these functions make up the hold path (none calls another of the list).
HOLD_PATH = [
    "migproxy_codec::candidates::CandidateScanner::advance",
    "migproxy_codec::device_phase::walk",
    "migproxy::migration::rewrite::rewrite_cpus",
    "migproxy::migration::rewrite::fix_subsections",
    "migproxy_codec::device_phase::DeviceState::to_bytes",
]


def run_migbench(args, iterations, tag):
    relays = {
        "migproxy": [],
        "migproxy-to-7.2": ["--dest-profile", args.dest_profile_q72, "--source-profile", args.dest_profile,
                            "--source-reference", args.source_reference],
    }
    outputs = {}
    # No warm-up iterations: every migration the daemon runs is one of the counted ones, so the hold
    # path's total divides by exactly the number of migrations (migbench's default of 10 uncounted
    # ones made the hold path read 1.45x too high at 20 iterations, 1.8x at 10).
    command = [args.migbench, "switchover", "--stream", args.stream, "--iterations", str(iterations),
               "--warmup", "0",
               "--log-dir", os.path.join(args.work_dir, "logs"),
               "--out", os.path.join(args.work_dir, f"switchover-{tag}.json")]
    for name, extra in relays.items():
        out = os.path.join(args.work_dir, f"callgrind-{tag}-{name}.out")
        if os.path.exists(out):
            os.remove(out)
        outputs[name] = out
        relay = " ".join(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", args.migproxy,
                          "run", "--admin", "none", "--listen", "tcp:127.0.0.1:{listen}",
                          "--upstream", "tcp:127.0.0.1:{upstream}", *extra])
        command += ["--relay", f"{name}={relay}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return outputs


def totals(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    raise SystemExit(f"switchover_instructions: no totals in {path}")


def inclusive(path):
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                          check=True, capture_output=True, text=True).stdout
    found = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(\S.*)$", line)
        if not m:
            continue
        cost = int(m.group(1).replace(",", ""))
        for name in HOLD_PATH:
            # The function's own entry ("file:name [binary]"), not a line inlined into a caller.
            if re.search(r":" + re.escape(name) + r"(\s|$)", m.group(2)):
                found[name] = max(found.get(name, 0), cost)
    return found


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--migbench", required=True)
    p.add_argument("--migproxy", required=True)
    p.add_argument("--stream", required=True)
    p.add_argument("--dest-profile", required=True)
    p.add_argument("--dest-profile-q72", required=True)
    # A rewriting relay ends the device phase on the source's reference layout (README, "The source
    # reference"); without one it refuses every migration.
    p.add_argument("--source-reference", required=True)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    few = run_migbench(args, FEW, "few")
    many = run_migbench(args, FEW + args.iterations, "many")
    relays = {}
    for name in few:
        per_migration = (totals(many[name]) - totals(few[name])) / args.iterations
        hold_first = inclusive(few[name])
        hold_all = inclusive(many[name])
        if not hold_first or not hold_all:
            sys.exit(f"switchover_instructions: relay {name} never reached the hold path "
                     f"(see the logs in {args.work_dir}/logs)")
        # Later migrations: the longer run's hold path minus its first migration's (the short run's
        # first migration is the same work: same daemon configuration, same stream).
        later = {k: (v - hold_first.get(k, 0)) / args.iterations for k, v in hold_all.items()}
        relays[name] = {
            "per_migration": round(per_migration),
            "hold_path": round(sum(later.values())),
            "hold_path_by_function": {k: round(v) for k, v in later.items()},
            "hold_path_first": round(sum(hold_first.values()) / FEW),
            "hold_path_first_by_function": {k: round(v / FEW) for k, v in hold_first.items()},
        }
    report = {"iterations": args.iterations, "few": FEW, "tool": "valgrind --tool=callgrind",
              "relays": relays}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
