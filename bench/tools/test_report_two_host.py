#!/usr/bin/env python3
"""How the two-host report judges its targets, on run records written the way two_host.py writes
them: a pause target is met or missed only where the repetitions can tell, and a run the link did
not pace is never judged. Run: python3 -m unittest discover -s bench/tools -p 'test_*.py'
"""
import json
import os
import tempfile
import unittest

import report_two_host as report

LINK = "2.5g"
TOTAL_MS = 4000
# 95 % of 2.5 Gbit/s over the run: link-limited.
ON_THE_WIRE = int(2.5e9 * 0.95 * TOTAL_MS / 1000 / 8)


def run_record(path, rep, pause_ms, busiest_core=0.5):
    return {
        "name": f"{LINK}-{path}-rep{rep}", "link": LINK, "multifd": False, "path": path, "warmup": False,
        "converged": True, "guest_dirtying": True, "total_time_ms": TOTAL_MS, "downtime_ms": pause_ms - 5,
        "stop_to_resume_ms": pause_ms, "ram_transferred": ON_THE_WIRE - 1_000_000, "link_tx_bytes": ON_THE_WIRE,
        "cpu": {"cores": [{"busy": busiest_core, "busy_not_niced": busiest_core}], "processes": {}},
    }


def judged(direct_pauses, relayed_pauses, busiest_core=0.5):
    """The downtime row of migproxy on the destination host, from runs with these pauses."""
    with tempfile.TemporaryDirectory() as results:
        records = [run_record("direct", i, p) for i, p in enumerate(direct_pauses)]
        records += [run_record("migproxy-dst", i, p, busiest_core) for i, p in enumerate(relayed_pauses)]
        for record in records:
            with open(os.path.join(results, f"run-{record['name']}.json"), "w") as f:
                json.dump(record, f)
        rows = [row for row in report.targets(results) if row[0].startswith("downtime")]
    if len(rows) != 1:
        raise AssertionError(f"expected one downtime row, got {rows}")
    _, value, _, status, why = rows[0]
    return value, status, why


class PauseJudgement(unittest.TestCase):
    def test_a_difference_within_the_target_is_met(self):
        value, status, _ = judged([100, 104, 101, 103], [101, 104, 102, 103])
        self.assertEqual((value, status), ("+0.50 ms vs direct", "met"))

    def test_a_difference_beyond_every_repetition_is_missed(self):
        value, status, why = judged([100, 104, 101, 103], [110, 112, 111, 113])
        self.assertEqual((value, status), ("+9.50 ms vs direct", "missed"))
        self.assertIn("median of 4 runs", why)

    def test_a_difference_inside_the_spread_of_the_runs_is_inconclusive(self):
        _, status, why = judged([100, 110, 101, 109], [103, 112, 105, 111])
        self.assertEqual(status, "implausible")
        self.assertIn("the ranges overlap", why)

    def test_one_run_per_side_decides_nothing_either_way(self):
        for relayed, value in ((100.5, "+0.50 ms vs direct"), (108, "+8.00 ms vs direct")):
            got, status, why = judged([100], [relayed])
            self.assertEqual((got, status), (value, "implausible"))
            self.assertIn("one run per side", why)

    def test_a_run_the_cpu_paced_is_not_judged(self):
        _, status, why = judged([100, 104], [101, 103], busiest_core=0.97)
        self.assertEqual(status, "implausible")
        self.assertIn("CPU-bound", why)


if __name__ == "__main__":
    unittest.main()
