//! Fault schedules, drawn from the seed.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    /// Partition one agent from the control plane, then heal.
    Partition,
    /// Hold the link (half-open: everything stalls silently, nothing errors), then release.
    Hold,
    /// Bounce the control plane (restart), or crash it and bring it back later.
    Bounce,
    /// All of the above on three agents, plus agent restarts, starting during enrollment.
    Mixed,
    /// The task runtime: an agent killed and restarted at random points while runs are in
    /// flight, over simulated processes.
    Tasks,
    /// The metrics buffer: partitions, holds (slow or lost acks), control-plane bounces, agent
    /// kills, and agent crashes inside a SQLite write with unsynced bytes lost or torn.
    Metrics,
    /// Supervised SSH execution against simulated russh hosts: partitions and half-open holds
    /// before connect, during the handshake, auth or output; slow remotes; quiet commands.
    Ssh,
    /// The browser psql terminal over a simulated PTY and stream store: slow and vanishing
    /// browsers, agent link flaps inside and beyond the reconnect window, store outages,
    /// control-plane bounces.
    Terminal,
}

pub const ALL: [Scenario; 8] = [
    Scenario::Partition,
    Scenario::Hold,
    Scenario::Bounce,
    Scenario::Mixed,
    Scenario::Tasks,
    Scenario::Metrics,
    Scenario::Ssh,
    Scenario::Terminal,
];

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Partition => "partition",
            Scenario::Hold => "hold",
            Scenario::Bounce => "bounce",
            Scenario::Mixed => "mixed",
            Scenario::Tasks => "tasks",
            Scenario::Metrics => "metrics",
            Scenario::Ssh => "ssh",
            Scenario::Terminal => "terminal",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        ALL.into_iter().find(|c| c.name() == s)
    }

    pub fn agents(self) -> usize {
        match self {
            Scenario::Mixed => 3,
            Scenario::Tasks | Scenario::Metrics | Scenario::Ssh | Scenario::Terminal => 1,
            _ => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    Partition {
        agent: usize,
    },
    Repair {
        agent: usize,
    },
    Hold {
        agent: usize,
    },
    Release {
        agent: usize,
    },
    BounceCp,
    CrashCp,
    StartCp,
    BounceAgent {
        agent: usize,
    },
    CrashAgent {
        agent: usize,
    },
    StartAgent {
        agent: usize,
    },
    /// The agent's disk fails at its `after_ops`-th write, truncate or sync from now and the
    /// host dies there; the disk then keeps what `rollback` says of unsynced bytes
    /// (0 all, 1 none, 2 torn).
    /// The terminal stream store stops answering, then comes back.
    StoreOutage,
    StoreBack,
    /// The browser loses its network, then gets it back.
    PartitionBrowser,
    RepairBrowser,
    DiskCrash {
        agent: usize,
        after_ops: u64,
        rollback: u8,
    },
}

/// When the faults happen. Every fault is healed before `quiet_from`, so liveness after heal
/// is checked at the end of every run.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub events: Vec<(Duration, Fault)>,
    pub quiet_from: Duration,
    pub run_for: Duration,
}

/// Hands out a schedule's faults in time order as simulated time passes.
pub struct Due<'a> {
    events: &'a [(Duration, Fault)],
    next: usize,
}

impl Schedule {
    pub fn due(&self) -> Due<'_> {
        Due {
            events: &self.events,
            next: 0,
        }
    }
}

impl<'a> Due<'a> {
    /// The faults due by `now` that were not handed out yet, in order.
    pub fn take(&mut self, now: Duration) -> impl Iterator<Item = &'a Fault> + use<'a> {
        let from = self.next;
        while self.events.get(self.next).is_some_and(|(at, _)| *at <= now) {
            self.next += 1;
        }
        self.events[from..self.next].iter().map(|(_, f)| f)
    }
}

pub fn secs(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo * 1000..=hi * 1000))
}

pub fn schedule(scenario: Scenario, seed: u64) -> Schedule {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_fa17);
    if scenario == Scenario::Tasks {
        return task_schedule(&mut rng);
    }
    if scenario == Scenario::Metrics {
        return metrics_schedule(&mut rng);
    }
    if scenario == Scenario::Ssh {
        return crate::ssh::schedule();
    }
    if scenario == Scenario::Terminal {
        return crate::terminal::schedule(&mut rng);
    }
    let agents = scenario.agents();
    let faults_until = Duration::from_secs(200);
    let mut t = match scenario {
        Scenario::Mixed => secs(&mut rng, 0, 5),
        _ => secs(&mut rng, 20, 30),
    };
    let mut events = Vec::new();
    while t < faults_until {
        let agent = rng.random_range(0..agents);
        let length = match rng.random_range(0..3) {
            0 => secs(&mut rng, 1, 10), // shorter than the dead deadline: the link may survive
            1 => secs(&mut rng, 10, 20), // around the deadline
            _ => secs(&mut rng, 20, 60), // well past it
        };
        let kind = match scenario {
            Scenario::Partition => 0,
            Scenario::Hold => 1,
            Scenario::Bounce => 2 + rng.random_range(0..2),
            Scenario::Mixed
            | Scenario::Tasks
            | Scenario::Metrics
            | Scenario::Ssh
            | Scenario::Terminal => rng.random_range(0..5),
        };
        match kind {
            0 => {
                events.push((t, Fault::Partition { agent }));
                events.push((t + length, Fault::Repair { agent }));
            }
            1 => {
                events.push((t, Fault::Hold { agent }));
                events.push((t + length, Fault::Release { agent }));
            }
            2 => events.push((t, Fault::BounceCp)),
            3 => {
                events.push((t, Fault::CrashCp));
                events.push((t + length / 2, Fault::StartCp));
            }
            _ => events.push((t, Fault::BounceAgent { agent })),
        }
        // Faults in the mixed scenario overlap; elsewhere one at a time.
        t += match scenario {
            Scenario::Mixed => secs(&mut rng, 1, 30),
            _ => length + secs(&mut rng, 5, 40),
        };
    }
    events.sort_by_key(|(at, _)| *at);
    let last = events.last().map(|(at, _)| *at).unwrap_or_default();
    let quiet_from = last.max(Duration::from_secs(30));
    Schedule {
        events,
        quiet_from,
        run_for: quiet_from + Duration::from_secs(60),
    }
}

/// One fault at a time for 200 s, then a quiet minute for the backlog to drain.
fn metrics_schedule(rng: &mut StdRng) -> Schedule {
    let mut events = Vec::new();
    let mut t = secs(rng, 2, 10);
    while t < Duration::from_secs(200) {
        let length = secs(rng, 1, 30);
        match rng.random_range(0..6) {
            0 => {
                events.push((t, Fault::Partition { agent: 0 }));
                events.push((t + length, Fault::Repair { agent: 0 }));
            }
            1 => {
                // Short holds stall a batch past the agent's request timeout: the ack is lost
                // after the rows were stored, and the batch goes again.
                let length = secs(rng, 1, 4);
                events.push((t, Fault::Hold { agent: 0 }));
                events.push((t + length, Fault::Release { agent: 0 }));
            }
            2 => events.push((t, Fault::BounceCp)),
            3 => {
                events.push((t, Fault::CrashCp));
                events.push((t + length, Fault::StartCp));
            }
            4 => events.push((t, Fault::BounceAgent { agent: 0 })),
            _ => events.push((
                t,
                Fault::DiskCrash {
                    agent: 0,
                    after_ops: rng.random_range(1..150),
                    rollback: rng.random_range(0..3),
                },
            )),
        }
        t += length + secs(rng, 1, 15);
    }
    let quiet_from = events.last().map(|(at, _)| *at).unwrap_or_default() + Duration::from_secs(31);
    Schedule {
        events,
        quiet_from,
        run_for: quiet_from + Duration::from_secs(60),
    }
}

/// Agent restarts (instant, like a supervisor's) and crashes with downtime, at random points.
fn task_schedule(rng: &mut StdRng) -> Schedule {
    let mut events = Vec::new();
    let mut t = secs(rng, 1, 15);
    while t < Duration::from_secs(180) {
        if rng.random_range(0..2) == 0 {
            events.push((t, Fault::BounceAgent { agent: 0 }));
            t += secs(rng, 1, 25);
        } else {
            let down = secs(rng, 1, 40);
            events.push((t, Fault::CrashAgent { agent: 0 }));
            events.push((t + down, Fault::StartAgent { agent: 0 }));
            t += down + secs(rng, 1, 25);
        }
    }
    let quiet_from = events.last().map(|(at, _)| *at).unwrap_or_default();
    Schedule {
        events,
        quiet_from,
        run_for: quiet_from + Duration::from_secs(180),
    }
}

#[cfg(test)]
mod tests {
    use super::{ALL, Fault, schedule};

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
