//! The schedule of a relay comparison (`throughput`, `scale`, `multifd-relay`): uncounted
//! warm-up rounds of every relay, then counted repetitions whose relay order rotates each time,
//! so that no relay always runs first (or right after the same neighbour) while the machine's
//! load drifts. A failed run is kept as an error of its relay, not a reason to stop.

use crate::relay_process::RelaySpec;
use crate::BenchError;

/// What the counted repetitions of one relay gave.
#[derive(Debug)]
pub struct Outcomes<R> {
    pub runs: Vec<R>,
    pub errors: Vec<String>,
}

/// Run `warmup` rounds and `reps` counted repetitions of every relay; `run(relay, n)` is one run
/// (`n`: the round or repetition), `describe` the progress line of a counted one. `what` names
/// the benchmark in the progress lines. Returns one [`Outcomes`] per relay, in `relays` order.
pub fn rotate<R>(
    what: &str,
    relays: &[RelaySpec],
    warmup: usize,
    reps: usize,
    mut run: impl FnMut(&RelaySpec, usize) -> Result<R, BenchError>,
    describe: impl Fn(&R) -> String,
) -> Vec<Outcomes<R>> {
    for round in 0..warmup {
        for relay in relays {
            eprintln!(
                "migbench: {what} warm-up {}/{warmup} {} (not counted)",
                round + 1,
                relay.name
            );
            if let Err(e) = run(relay, round) {
                // Not counted either way; a relay that keeps failing shows in the counted runs.
                eprintln!("migbench:   warm-up failed: {e}");
            }
        }
    }
    let mut outcomes: Vec<Outcomes<R>> = relays
        .iter()
        .map(|_| Outcomes {
            runs: Vec::new(),
            errors: Vec::new(),
        })
        .collect();
    for rep in 0..reps {
        for k in 0..relays.len() {
            let index = (rep + k) % relays.len();
            let (Some(relay), Some(slot)) = (relays.get(index), outcomes.get_mut(index)) else {
                continue;
            };
            eprintln!("migbench: {what} rep {}/{reps} {}", rep + 1, relay.name);
            match run(relay, rep) {
                Ok(result) => {
                    eprintln!("migbench:   {}", describe(&result));
                    slot.runs.push(result);
                }
                Err(e) => {
                    eprintln!("migbench:   failed: {e}");
                    slot.errors.push(e.to_string());
                }
            }
        }
    }
    outcomes
}
