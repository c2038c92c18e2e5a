//! The scenarios, the faults they inject and the schedule type; each scenario's file draws its
//! own schedule from the seed (`run::schedule` dispatches).

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

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
    /// Alerts: agents offline longer than the rule allows while the webhook receiver is down
    /// for an hour (cut off or refusing) and the control plane crashes; every notification
    /// arrives afterwards, in order, at most once more.
    Alerts,
    /// Rollouts: one rollout over 200 agents' real task runtimes, halting on a wave's error
    /// budget or finishing, with the driving control plane crashed mid-wave, agents cut off
    /// before and during their wave; every host runs the action at most once.
    Rollouts,
}

pub const ALL: [Scenario; 10] = [
    Scenario::Partition,
    Scenario::Hold,
    Scenario::Bounce,
    Scenario::Mixed,
    Scenario::Tasks,
    Scenario::Metrics,
    Scenario::Ssh,
    Scenario::Terminal,
    Scenario::Alerts,
    Scenario::Rollouts,
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
            Scenario::Alerts => "alerts",
            Scenario::Rollouts => "rollouts",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        ALL.into_iter().find(|c| c.name() == s)
    }

    pub fn agents(self) -> usize {
        match self {
            Scenario::Mixed | Scenario::Alerts => 3,
            Scenario::Rollouts => 200,
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
    /// The alert receiver goes down (its network cut, or answering 503 when `refuse`), then
    /// comes back.
    SinkDown {
        refuse: bool,
    },
    SinkUp,
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
