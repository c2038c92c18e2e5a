//! The link scenarios (`partition`, `hold`, `bounce`, `mixed`): a control plane and agents
//! that enroll themselves, faults on their links and on the control plane, and the invariants
//! of the control channel checked every simulated 100 ms.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::link::{LinkConfig, LinkStatus};
use control_plane::settings::Settings;
use control_plane::state::AppState;
use control_plane::storage::AgentRow;
use rand::Rng;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, CP_PORT, Driver, EPOCH_S, Power, Prepare, host_world, new_sim};
use crate::scenario::{Fault, Scenario, Schedule, secs};
use crate::trace;

const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Deadlines the invariants are judged by, derived from the product's settings.
struct Bounds {
    /// A dead link must be noticed by both sides within this long.
    detect: Duration,
    /// After the last fault heals, everything is online again within this long.
    recover: Duration,
    dead_after: Duration,
}

/// What the hosts publish for the driver to check.
#[derive(Default)]
struct Observed {
    cp: Option<AppState>,
    agents: BTreeMap<usize, watch::Receiver<LinkStatus>>,
    /// Exact simulated time each agent last was online (recorded on every status change, so
    /// an online spell shorter than the check interval is not missed).
    last_online: BTreeMap<usize, Duration>,
}

type Shared = Arc<Mutex<Observed>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Observed> {
    match shared.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn agent_host(i: usize) -> String {
    format!("agent{}", i + 1)
}

/// Link faults (partitions, holds, bounces, agent restarts) on the scenario's agents; in
/// `mixed` they overlap.
pub fn schedule(scenario: Scenario, rng: &mut StdRng) -> Schedule {
    let agents = scenario.agents();
    let faults_until = Duration::from_secs(200);
    let mut t = match scenario {
        Scenario::Mixed => secs(rng, 0, 5),
        _ => secs(rng, 20, 30),
    };
    let mut events = Vec::new();
    while t < faults_until {
        let agent = rng.random_range(0..agents);
        let length = match rng.random_range(0..3) {
            0 => secs(rng, 1, 10),  // shorter than the dead deadline: the link may survive
            1 => secs(rng, 10, 20), // around the deadline
            _ => secs(rng, 20, 60), // well past it
        };
        let kind = match scenario {
            Scenario::Partition => 0,
            Scenario::Hold => 1,
            Scenario::Bounce => 2 + rng.random_range(0..2),
            Scenario::Mixed
            | Scenario::Tasks
            | Scenario::Metrics
            | Scenario::Ssh
            | Scenario::Terminal
            | Scenario::Alerts
            | Scenario::Rollouts => rng.random_range(0..5),
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
            Scenario::Mixed => secs(rng, 1, 30),
            _ => length + secs(rng, 5, 40),
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

pub fn simulate(seed: u64, scenario: Scenario, plan: &Schedule) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("outpost-sim-").tempdir()?;
    let agents = scenario.agents();
    let tokens = harness::prepare(dir.path(), seed, &[Prepare::EnrollTokens(agents)])?;
    let settings = Settings::default();
    let link_defaults = LinkConfig::new(
        url::Url::parse("http://cp:8080").map_err(|e| anyhow::anyhow!("{e}"))?,
        String::new(),
        String::new(),
    );
    let bounds = Bounds {
        detect: settings.dead_after + Duration::from_secs(1),
        recover: settings.dead_after
            + link_defaults.connect_timeout
            + link_defaults.backoff_max
            + Duration::from_secs(3),
        dead_after: settings.dead_after,
    };
    let shared: Shared = Arc::default();

    let mut sim = new_sim(seed, plan);

    // The control plane.
    {
        let world = host_world(seed, "cp");
        let data_dir = dir.path().join("cp");
        let shared = shared.clone();
        let settings = settings.clone();
        sim.host("cp", move || {
            let (world, data_dir, shared, settings) = (
                world.clone(),
                data_dir.clone(),
                shared.clone(),
                settings.clone(),
            );
            async move {
                let storage = control_plane::server::open_storage(&world, &data_dir, None)
                    .await
                    .map_err(|e| e.to_string())?;
                let listener = world.net().bind(&format!("0.0.0.0:{CP_PORT}")).await?;
                let state = AppState::new(world, storage, settings, CancellationToken::new());
                lock(&shared).cp = Some(state.clone());
                control_plane::server::run(state, listener, std::future::pending())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        });
    }
    // The agents: enroll (retrying, with a stable enrollment id) then keep the link up.
    for (i, token) in tokens.into_iter().enumerate() {
        let name = agent_host(i);
        let world = host_world(seed, &name);
        let data_dir = dir.path().join(&name);
        let shared = shared.clone();
        let link_defaults = link_defaults.clone();
        sim.host(agent_host(i).as_str(), move || {
            let (world, data_dir, shared, token, name) = (
                world.clone(),
                data_dir.clone(),
                shared.clone(),
                token.clone(),
                name.clone(),
            );
            let link = link_defaults.clone();
            async move {
                let (status, receiver) = watch::channel(LinkStatus::Connecting { attempt: 0 });
                lock(&shared).agents.insert(i, receiver.clone());
                // Ends when the link (the sender) goes away with the host.
                tokio::spawn(record_online_spells(i, receiver, shared.clone()));
                harness::run_enrolled_link(world, &data_dir, &token, name, link, status).await;
                Ok(())
            }
        });
    }

    let checker = Checker::new(
        agents,
        bounds,
        dir.path()
            .join("cp")
            .join(control_plane::server::SQLITE_FILE),
    );
    let mut driver = LinkDriver {
        checker,
        shared,
        cp: Power::on("cp"),
        next_check: Duration::ZERO,
        quiet_from: plan.quiet_from,
    };
    harness::drive(&mut sim, plan, &mut driver)?;
    let LinkDriver {
        mut checker,
        shared,
        ..
    } = driver;
    checker.final_check(&shared, sim.since_epoch())?;
    Ok(())
}

struct LinkDriver {
    checker: Checker,
    shared: Shared,
    cp: Power,
    next_check: Duration,
    quiet_from: Duration,
}

impl<'a> Driver<'a> for LinkDriver {
    fn fault(
        &mut self,
        sim: &mut turmoil::Sim<'a>,
        fault: &Fault,
        now: Duration,
    ) -> anyhow::Result<()> {
        apply(
            sim,
            fault,
            &mut self.checker,
            &self.shared,
            &mut self.cp,
            now,
        );
        Ok(())
    }

    fn stepped(&mut self, sim: &mut turmoil::Sim<'a>, now: Duration) -> anyhow::Result<()> {
        if now >= self.next_check {
            self.next_check = now + CHECK_EVERY;
            let since_epoch = sim.since_epoch();
            self.checker.check(
                &self.shared,
                now,
                since_epoch,
                self.cp.is_up(),
                self.quiet_from,
            )?;
        }
        Ok(())
    }
}

async fn record_online_spells(
    agent: usize,
    mut status: watch::Receiver<LinkStatus>,
    shared: Shared,
) {
    let mut was_online = false;
    loop {
        let online = matches!(*status.borrow_and_update(), LinkStatus::Online { .. });
        if (online || was_online)
            && let Some(now) = turmoil::sim_elapsed()
        {
            lock(&shared).last_online.insert(agent, now);
        }
        was_online = online;
        if status.changed().await.is_err() {
            return;
        }
    }
}

fn apply(
    sim: &mut turmoil::Sim<'_>,
    fault: &Fault,
    checker: &mut Checker,
    shared: &Shared,
    cp: &mut Power,
    now: Duration,
) {
    match fault {
        Fault::Partition { agent } => checker.link_fault(sim, *agent, 0, 1, now),
        Fault::Repair { agent } => checker.link_fault(sim, *agent, 0, -1, now),
        Fault::Hold { agent } => checker.link_fault(sim, *agent, 1, 1, now),
        Fault::Release { agent } => checker.link_fault(sim, *agent, 1, -1, now),
        Fault::BounceCp => {
            lock(shared).cp = None;
            cp.bounce(sim);
            checker.cp_restarted(now);
        }
        Fault::CrashCp => {
            if cp.crash(sim) {
                lock(shared).cp = None;
                checker.cp_down(now);
            }
        }
        Fault::StartCp => {
            if cp.start(sim) {
                checker.cp_restarted(now);
            }
        }
        Fault::BounceAgent { agent }
        | Fault::CrashAgent { agent }
        | Fault::StartAgent { agent } => {
            sim.bounce(agent_host(*agent));
            checker.agent_restarted(*agent, now);
        }
        // Only the metrics, terminal and alerts scenarios inject these.
        Fault::DiskCrash { .. }
        | Fault::SinkDown { .. }
        | Fault::SinkUp
        | Fault::StoreOutage
        | Fault::StoreBack
        | Fault::PartitionBrowser
        | Fault::RepairBrowser => {}
    }
}

/// Invariants, judged from what the hosts publish and what the control plane stored.
struct Checker {
    bounds: Bounds,
    db: PathBuf,
    /// Per agent: [partitions, holds] currently in force and when the link last broke.
    faults: Vec<[i32; 2]>,
    broken_since: Vec<Option<Duration>>,
    /// Per agent: when the agent last said it was online (its own view).
    last_online: Vec<Option<Duration>>,
    /// When the whole system last changed for the worse (fault applied or healed).
    last_disturbance: Duration,
    conn: Option<rusqlite::Connection>,
}

impl Checker {
    fn new(agents: usize, bounds: Bounds, db: PathBuf) -> Checker {
        Checker {
            bounds,
            db,
            faults: vec![[0, 0]; agents],
            broken_since: vec![None; agents],
            last_online: vec![None; agents],
            last_disturbance: Duration::ZERO,
            conn: None,
        }
    }

    /// Count a fault of `kind` (0 partition, 1 hold) on `agent`'s link and set the link to
    /// what the counts say. turmoil keeps one state per link, so overlapping faults are
    /// resolved here: any partition wins over a hold; healthy only when both counts are 0.
    fn link_fault(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        agent: usize,
        kind: usize,
        delta: i32,
        now: Duration,
    ) {
        self.faults[agent][kind] = (self.faults[agent][kind] + delta).max(0);
        let [partitions, holds] = self.faults[agent];
        let host = agent_host(agent);
        if partitions > 0 {
            sim.partition(host.as_str(), "cp");
        } else if holds > 0 {
            sim.hold(host.as_str(), "cp");
        } else {
            sim.repair(host.as_str(), "cp");
        }
        let broken = partitions > 0 || holds > 0;
        match (broken, self.broken_since[agent]) {
            (true, None) => self.broken_since[agent] = Some(now),
            (false, Some(_)) => self.broken_since[agent] = None,
            _ => {}
        }
        self.last_disturbance = now;
    }

    fn cp_down(&mut self, now: Duration) {
        self.last_disturbance = now;
    }

    fn cp_restarted(&mut self, now: Duration) {
        self.last_disturbance = now;
    }

    fn agent_restarted(&mut self, _agent: usize, now: Duration) {
        self.last_disturbance = now;
    }

    /// The agents table as the control plane stored it.
    fn stored_agents(&mut self) -> anyhow::Result<Vec<AgentRow>> {
        if self.conn.is_none() {
            self.conn = Some(rusqlite::Connection::open_with_flags(
                &self.db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?);
        }
        let conn = self.conn.as_ref().ok_or_else(|| anyhow::anyhow!("no db"))?;
        let mut stmt =
            conn.prepare("SELECT id, name, connected, last_seen_ms FROM agents ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AgentRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    created_at_ms: 0,
                    connected: r.get::<_, i64>(2)? != 0,
                    last_seen_ms: r.get(3)?,
                    buffer: None,
                    health: None,
                    labels: None,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn check(
        &mut self,
        shared: &Shared,
        now: Duration,
        since_epoch: Duration,
        cp_up: bool,
        quiet_from: Duration,
    ) -> anyhow::Result<()> {
        let observed = lock(shared);
        let statuses: Vec<Option<LinkStatus>> = (0..self.faults.len())
            .map(|i| observed.agents.get(&i).map(|r| r.borrow().clone()))
            .collect();
        let connected: Vec<String> = observed
            .cp
            .as_ref()
            .map(|s| s.channels.connected())
            .unwrap_or_default();
        for (i, at) in &observed.last_online {
            if let Some(slot) = self.last_online.get_mut(*i) {
                *slot = (*slot).max(Some(*at));
            }
        }
        drop(observed);
        let now_ms = i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX);

        for (i, status) in statuses.iter().enumerate() {
            let name = agent_host(i);
            if matches!(status, Some(LinkStatus::Stopped)) {
                anyhow::bail!("{name}: the link stopped; agents must never give up");
            }
            let online = matches!(status, Some(LinkStatus::Online { .. }));
            if online {
                self.last_online[i] = Some(now);
            }
            // Half-open / partition: both sides notice within the detection bound.
            if let Some(since) = self.broken_since[i]
                && now.saturating_sub(since) > self.bounds.detect
            {
                if online {
                    anyhow::bail!(
                        "{name}: still online {:?} into a broken link (bound {:?})",
                        now - since,
                        self.bounds.detect
                    );
                }
                if let Some(LinkStatus::Online { agent_id, .. }) = status
                    && connected.contains(agent_id)
                {
                    anyhow::bail!("{name}: control plane still holds the channel of a broken link");
                }
            }
        }

        if now.as_millis().is_multiple_of(1000) || now >= quiet_from {
            let dead_after_ms =
                i64::try_from(self.bounds.dead_after.as_millis()).unwrap_or(i64::MAX);
            let stored = if cp_up || self.conn.is_some() {
                self.stored_agents()?
            } else {
                Vec::new()
            };
            // No duplicate identity: at most one row per agent host, whatever was retried.
            let mut names = BTreeMap::new();
            for row in &stored {
                let name = &row.name;
                if let Some(other) = names.insert(name.clone(), row.id.clone()) {
                    anyhow::bail!("duplicate identity for {name}: {other} and {}", row.id);
                }
                // Status correctness: shown online only if the agent was really online recently.
                let shown_online = row.connected
                    && row
                        .last_seen_ms
                        .is_some_and(|s| now_ms - s <= dead_after_ms);
                if shown_online {
                    let index = (0..self.faults.len()).find(|i| agent_host(*i) == *name);
                    if let Some(i) = index {
                        let recently = self.last_online[i].is_some_and(|t| {
                            now.saturating_sub(t) <= self.bounds.dead_after + Duration::from_secs(1)
                        });
                        if !recently {
                            anyhow::bail!(
                                "{name} shown online but the agent has not been online for more than {:?} \
                                 (now {now_ms} ms, last_seen {:?} ms, agent last online at {:?})",
                                self.bounds.dead_after,
                                row.last_seen_ms,
                                self.last_online[i].map(|t| EPOCH_S * 1000 + t.as_millis() as u64),
                            );
                        }
                    }
                }
            }
        }

        // Liveness after heal: once the last disturbance is older than the recovery bound,
        // every agent is online on both sides and in storage.
        if now >= quiet_from && now.saturating_sub(self.last_disturbance) > self.bounds.recover {
            for (i, status) in statuses.iter().enumerate() {
                let name = agent_host(i);
                let Some(LinkStatus::Online { agent_id, .. }) = status else {
                    anyhow::bail!(
                        "{name}: not back online {:?} after the last fault healed (now {status:?})",
                        now - self.last_disturbance
                    );
                };
                if !connected.contains(agent_id) {
                    anyhow::bail!(
                        "{name}: online in its own view but the control plane holds no channel"
                    );
                }
            }
        }
        Ok(())
    }

    fn final_check(&mut self, shared: &Shared, since_epoch: Duration) -> anyhow::Result<()> {
        let agents = self.faults.len();
        let stored = self.stored_agents()?;
        if stored.len() != agents {
            anyhow::bail!(
                "{} agent identities stored for {agents} hosts",
                stored.len()
            );
        }
        let now_ms = i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX);
        let observed = lock(shared);
        let Some(cp) = observed.cp.as_ref() else {
            anyhow::bail!("control plane not running at the end");
        };
        for row in &stored {
            if !cp.settings.is_online(row, now_ms) {
                anyhow::bail!("{} ({}) not online in the API at the end", row.name, row.id);
            }
        }
        trace::record(format!(
            "final: {agents} agents online, {} identities",
            stored.len()
        ));
        Ok(())
    }
}
