"""Statistics of `migbench switchover` results shared by report.py and report_switchover.py.

migbench runs every relay once per round, in a rotated order, so the samples of one round were taken
within a few milliseconds of each other. The added latency of a relay is judged on per-round
differences (relay - direct of the same round): whatever drifts between rounds (the machine's speed,
the direct path's own wakeup latency, other work on the cores) shifts both samples of a round alike
and cancels, where the difference of two medians taken over the whole run keeps it.
"""
import random
import statistics


def paired_added_us(relay, direct, field="from_tail_start_us"):
    """Per-round added latency (relay - direct, microseconds) in round order, or None when the rounds
    cannot be matched (a result written before migbench recorded them, with a failed iteration)."""
    r_samples, d_samples = relay.get(field) or [], direct.get(field) or []
    r_rounds, d_rounds = relay.get("rounds"), direct.get("rounds")
    if r_rounds is None or d_rounds is None:
        # Before rounds were recorded: sample k is round k only if no iteration failed.
        if relay.get("errors") or direct.get("errors") or len(r_samples) != len(d_samples):
            return None
        return [r - d for r, d in zip(r_samples, d_samples)]
    by_round = dict(zip(d_rounds, d_samples))
    return [v - by_round[k] for k, v in zip(r_rounds, r_samples) if k in by_round]


def block_medians(samples, blocks):
    """Medians of `blocks` consecutive stretches of the samples (each a repetition taken at a different
    time of the run); [] when a block would hold fewer than 3 samples."""
    n = len(samples)
    if n < blocks * 3:
        return []
    return [statistics.median(samples[i * n // blocks:(i + 1) * n // blocks]) for i in range(blocks)]


def shuffled_block_range(samples, blocks, shuffles=200, seed=0):
    """Median range (max - min) of the block medians once the samples' order is shuffled: the spread
    that sampling noise alone gives blocks of this size. A measured spread far above it is drift (the
    machine changed during the run), not too few samples. Deterministic (fixed seed)."""
    if len(samples) < blocks * 3:
        return None
    rng = random.Random(seed)
    order = list(samples)
    ranges = []
    for _ in range(shuffles):
        rng.shuffle(order)
        medians = block_medians(order, blocks)
        ranges.append(max(medians) - min(medians))
    return statistics.median(ranges)
