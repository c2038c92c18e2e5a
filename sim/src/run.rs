//! One seeded run: draw the scenario's schedule from the seed, run the scenario, hash its
//! trace. Only dispatch lives here; each scenario is its own file.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::scenario::{Scenario, Schedule};
use crate::trace;

#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub scenario: Scenario,
    pub failure: Option<String>,
    pub trace_hash: String,
    pub events: u64,
    pub tail: Vec<String>,
    pub simulated: Duration,
}

/// The fault schedule of `scenario` for `seed`.
pub fn schedule(scenario: Scenario, seed: u64) -> Schedule {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_fa17);
    match scenario {
        Scenario::Tasks => crate::tasks::schedule(&mut rng),
        Scenario::Metrics => crate::metrics::schedule(&mut rng),
        Scenario::Ssh => crate::ssh::schedule(),
        Scenario::Terminal => crate::terminal::schedule(&mut rng),
        Scenario::Alerts => crate::alerts::schedule(&mut rng),
        Scenario::Rollouts => crate::rollouts::schedule(&mut rng),
        Scenario::Partition | Scenario::Hold | Scenario::Bounce | Scenario::Mixed => {
            crate::link::schedule(scenario, &mut rng)
        }
    }
}

pub fn run_seed(seed: u64, scenario: Scenario, echo: bool) -> Outcome {
    trace::reset(echo);
    let plan = schedule(scenario, seed);
    let result = match scenario {
        Scenario::Tasks => crate::tasks::simulate_tasks(seed, &plan),
        Scenario::Metrics => crate::metrics::simulate_metrics(seed, &plan),
        Scenario::Ssh => crate::ssh::simulate_ssh(seed, &plan),
        Scenario::Terminal => crate::terminal::simulate_terminal(seed, &plan),
        Scenario::Alerts => crate::alerts::simulate_alerts(seed, &plan),
        Scenario::Rollouts => crate::rollouts::simulate_rollouts(seed, &plan),
        Scenario::Partition | Scenario::Hold | Scenario::Bounce | Scenario::Mixed => {
            crate::link::simulate(seed, scenario, &plan)
        }
    };
    let (trace_hash, events, tail) = trace::finish();
    Outcome {
        seed,
        scenario,
        failure: result.err().map(|e| format!("{e:#}")),
        trace_hash,
        events,
        tail,
        simulated: plan.run_for,
    }
}

#[cfg(test)]
mod tests {
    use super::schedule;
    use crate::scenario::{ALL, Fault};

    #[test]
    fn schedules_follow_the_seed_and_heal_everything() {
        for scenario in ALL {
            for seed in 0..50 {
                let a = schedule(scenario, seed);
                assert_eq!(a.events, schedule(scenario, seed).events);
                let mut open = std::collections::BTreeMap::new();
                for (_, f) in &a.events {
                    match f {
                        Fault::Partition { agent } | Fault::Hold { agent } => {
                            *open.entry(*agent).or_insert(0) += 1
                        }
                        Fault::Repair { agent } | Fault::Release { agent } => {
                            *open.entry(*agent).or_insert(0) -= 1
                        }
                        _ => {}
                    }
                }
                assert!(
                    open.values().all(|n| *n == 0),
                    "{scenario:?}/{seed}: unhealed fault"
                );
                assert!(a.run_for >= a.quiet_from + std::time::Duration::from_secs(60));
            }
        }
    }
}
