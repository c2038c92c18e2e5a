//! The `rollouts` scenario: a control plane drives one rollout of a `command` task over 200
//! agents, each running the real task runtime behind its real control link (over simulated
//! processes whose outcome the scenario chose). The agents live in 20 racks of 10 (simulated
//! hosts, each its own network address: turmoil links every pair of hosts and visits every
//! link on every step, so 200 hosts would cost 40 times what 20 do); a rack holds agents
//! `r`, `r + 20`, … so every rack has hosts in every wave, and network faults cut whole racks. Waves: a canary of one host, then 50 %, then
//! the rest; at most 20 hosts at once; 2 % of a wave may fail; 30 s soak; offline hosts wait 4
//! minutes. Even seeds make 3 % of wave 2 fail (the rollout must halt there); odd seeds make
//! 2 % of wave 2 and one host of wave 3 fail (within the budgets: it must finish).
//!
//! Faults: the control plane crashed mid-rollout (the one driving it: the next start takes the
//! rollout over once the dead driver's lease has run out) and bounced; short partitions of
//! racks while waves run (a dispatch or its answer lost, a host offline at its wave's gate);
//! racks cut off from the start, two coming back before wave 2's deadline and one only after
//! it (its wave-2 hosts are reported offline, its wave-3 hosts run when their wave comes).
//!
//! Checked at the end: the rollout ended (halted or done, as the seed's failures say); every
//! host ran the action at most once; each host's recorded outcome is what its process did (ok:
//! exit 0, failed: exit 1, offline or not started: no process); no host of a wave after the
//! halted one started; agents back before the deadline ran, the others are reported offline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::link::{LinkConfig, LinkStatus};
use agent::tasks::bridge::Bridge;
use agent::tasks::driver::{self, Reader};
use agent::tasks::policy::TaskPolicy;
use agent::tasks::store::Store;
use control_plane::rollouts::driver::{HostState, Loaded, State};
use control_plane::rollouts::{Amount, RolloutSpec, Target};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::harness::{self, CP_PORT, Driver, LinkFaults, Power, Prepare, agent_name, host_world};
use crate::processes::SimProcesses;
use crate::scenario::{Fault, Schedule, secs};
use crate::trace;

pub const AGENTS: usize = 200;
/// Simulated hosts the agents live in: agent `i` in rack `i % RACKS`.
pub const RACKS: usize = 20;
/// Wave 2 is agents 2..=101 (names sort as numbered), wave 3 the rest.
const WAVE2: std::ops::Range<usize> = 1..101;
const WAVE3: std::ops::Range<usize> = 101..AGENTS;
/// Racks cut off from the start that come back at 60 to 150 s, well before wave 2's
/// deadline. Not rack 0: it holds the canary.
const RETURNING: [usize; 2] = [3, 7];
/// A rack cut off from the start until long after wave 2's deadline (wave 2 starts within
/// the first two minutes, its deadline is 4 minutes later), before wave 3's.
const STAYING_AWAY: usize = 5;
const STAY_AWAY_UNTIL: Duration = Duration::from_secs(480);
/// After the last fault: time for the waves left (up to 200 hosts, 20 at once, ≤ 12 s each,
/// two soaks) and the agents' reports.
const DRAIN: Duration = Duration::from_secs(420);

/// Even seeds halt in wave 2.
fn halting(seed: u64) -> bool {
    seed.is_multiple_of(2)
}

fn rack(agent: usize) -> usize {
    agent % RACKS
}

fn rack_name(rack: usize) -> String {
    format!("rack{:02}", rack + 1)
}

/// Network faults name a rack (`agent` is the rack's number).
pub fn schedule(rng: &mut StdRng) -> Schedule {
    let mut events = Vec::new();
    for agent in RETURNING {
        events.push((Duration::ZERO, Fault::Partition { agent }));
        events.push((secs(rng, 60, 150), Fault::Repair { agent }));
    }
    events.push((
        Duration::ZERO,
        Fault::Partition {
            agent: STAYING_AWAY,
        },
    ));
    events.push((
        STAY_AWAY_UNTIL,
        Fault::Repair {
            agent: STAYING_AWAY,
        },
    ));
    // The driving control plane dies mid-rollout (wave 2 or 3), and later bounces.
    let crash = secs(rng, 50, 200);
    events.push((crash, Fault::CrashCp));
    events.push((crash + secs(rng, 1, 30), Fault::StartCp));
    events.push((crash + secs(rng, 60, 240), Fault::BounceCp));
    // Short partitions of racks while waves run: a task given or its answer lost.
    for _ in 0..8 {
        let agent = rng.random_range(0..RACKS);
        if RETURNING.contains(&agent) || agent == STAYING_AWAY {
            continue;
        }
        let at = secs(rng, 20, 400);
        events.push((at, Fault::Partition { agent }));
        events.push((at + secs(rng, 2, 40), Fault::Repair { agent }));
    }
    events.sort_by_key(|(at, _)| *at);
    let quiet_from = events.last().map(|(at, _)| *at).unwrap_or_default();
    Schedule {
        events,
        quiet_from,
        run_for: quiet_from + DRAIN,
    }
}

fn spec() -> RolloutSpec {
    RolloutSpec {
        name: "sim change".into(),
        agents: vec!["agent*".into()],
        task: proto::TaskRequest {
            kind: "command".into(),
            argv: vec!["apply-change".into()],
            timeout: Some("60s".into()),
            ..Default::default()
        },
        waves: vec![
            Amount::Count(1),
            Amount::Share("50%".into()),
            Amount::Share("100%".into()),
        ],
        max_in_flight: Some(20),
        max_errors: Some(Amount::Share("2%".into())),
        max_errors_total: None,
        soak: Some("30s".into()),
        replicas_first: false,
        approve_after_canary: false,
        offline: Some("wait".into()),
        offline_deadline: Some("4m".into()),
        gate_wait: None,
        max_replication_lag: None,
    }
}

/// Agents whose command fails: 3 of wave 2 (halting seeds), or 2 of wave 2 and 1 of wave 3;
/// never one of those cut off from the start.
fn failing(seed: u64) -> BTreeSet<usize> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa11);
    let usable = |r: std::ops::Range<usize>| -> Vec<usize> {
        r.filter(|i| !RETURNING.contains(&rack(*i)) && rack(*i) != STAYING_AWAY)
            .collect()
    };
    let (mut two, mut three) = (usable(WAVE2), usable(WAVE3));
    two.shuffle(&mut rng);
    three.shuffle(&mut rng);
    if halting(seed) {
        two.into_iter().take(3).collect()
    } else {
        two.into_iter()
            .take(2)
            .chain(three.into_iter().take(1))
            .collect()
    }
}

/// Enroll the agents and create the rollout, as an operator would before the run: the
/// agents' credentials and the rollout's id.
fn prepare(dir: &Path, seed: u64) -> anyhow::Result<(Vec<String>, String)> {
    let credentials = harness::prepare(dir, seed, &[Prepare::EnrolledAgents(AGENTS)])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let world = host_world(seed, "operator");
    let id = rt.block_on(async {
        let storage = control_plane::server::open_storage(&world, &dir.join("cp"), None).await?;
        let agents = storage.list_agents().await?;
        let settings = control_plane::settings::Settings::default();
        let targets = Target::all(&agents, &settings, world.now_unix_ms());
        let plan = spec().plan(&targets).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            plan.waves.len() == 3
                && plan.waves[1].hosts.len() == WAVE2.len()
                && plan.waves[1].errors_tolerated == 2
                && plan.waves[2].errors_tolerated == 1,
            "the plan is not the one the scenario is built on: {}",
            plan.describe()
        );
        let created =
            control_plane::rollouts::driver::create(&storage, &world, spec(), plan, "ops").await?;
        anyhow::Ok(created.rollout.id)
    })?;
    Ok((credentials, id))
}

fn task_id(rollout: &str, agent: usize) -> String {
    proto::task_id(&format!("rollout:{rollout}:{}", agent_name(agent)))
}

pub fn simulate_rollouts(seed: u64, plan: &Schedule) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-sim-rollouts-")
        .tempdir()?;
    let (credentials, rollout) = prepare(dir.path(), seed)?;
    trace::record(format!("rollout {rollout} over {AGENTS} agents"));
    let fails = failing(seed);
    // Seconds matter here (soaks, leases, deadlines, the link's heartbeats): 250 ms steps.
    // Every agent dials the control plane at once (and again after each of its restarts).
    let mut sim = harness::new_sim_sized(seed, plan, Duration::from_millis(250), 4 * AGENTS);
    harness::control_plane_host(
        &mut sim,
        seed,
        dir.path().join("cp"),
        control_plane::settings::Settings::default(),
    );
    let link_defaults = LinkConfig::new(
        url::Url::parse(&format!("http://cp:{CP_PORT}")).map_err(|e| anyhow::anyhow!("{e}"))?,
        String::new(),
        String::new(),
    );
    let mut processes = Vec::new();
    let mut racks: Vec<Vec<Agent>> = (0..RACKS).map(|_| Vec::new()).collect();
    for (i, credential) in credentials.into_iter().enumerate() {
        let name = agent_name(i);
        let failing: BTreeSet<String> = fails
            .contains(&i)
            .then(|| task_id(&rollout, i))
            .into_iter()
            .collect();
        let procs = SimProcesses::new(harness::host_seed(seed, &name)).decided(failing);
        processes.push(procs.clone());
        let data_dir = dir.path().join(&name);
        std::fs::create_dir_all(&data_dir)?;
        let mut link = link_defaults.clone();
        link.credential = credential;
        link.hostname = name.clone();
        racks[rack(i)].push(Agent {
            world: host_world(seed, &name),
            data_dir,
            processes: procs,
            link,
        });
    }
    for (r, agents) in racks.into_iter().enumerate() {
        sim.host(rack_name(r).as_str(), move || {
            let agents = agents.clone();
            async move {
                let mut all = tokio::task::JoinSet::new();
                for a in agents {
                    all.spawn(async move {
                        if let Err(e) = run_agent(a.world, &a.data_dir, a.processes, a.link).await {
                            tracing::warn!(target: "agent::sim", error = %e, "agent ended");
                        }
                    });
                }
                while all.join_next().await.is_some() {}
                Ok(())
            }
        });
    }
    let mut driver = RolloutsDriver {
        cp: Power::on("cp"),
        links: (0..RACKS).map(|_| LinkFaults::default()).collect(),
    };
    harness::drive(&mut sim, plan, &mut driver)?;
    final_check(dir.path(), seed, &rollout, &fails, &processes)
}

/// One agent: its task runtime (recovered first), then its control link carrying tasks.
async fn run_agent(
    world: world::World,
    data_dir: &Path,
    processes: SimProcesses,
    mut link: LinkConfig,
) -> anyhow::Result<()> {
    let config = harness::task_runtime(data_dir, &processes, 3);
    let db = config.db_path.clone();
    let (requests, requests_rx) = mpsc::channel(64);
    let (ready, recovered) = oneshot::channel();
    {
        let world = world.clone();
        // Owned by the host: it ends with the host, like the process it stands for.
        tokio::spawn(async move {
            if let Err(e) =
                driver::run(world, config, requests_rx, ready, CancellationToken::new()).await
            {
                tracing::warn!(target: "agent::sim", error = %e, "task runtime ended");
            }
        });
    }
    recovered
        .await
        .map_err(|_| anyhow::anyhow!("the task runtime stopped during recovery"))?;
    let store = Store::open(&db)?;
    link.tasks = Some(Bridge {
        reader: Reader {
            world: world.clone(),
            store: Arc::new(Mutex::new(store)),
        },
        requests,
        has_postgres: false,
        policy: Arc::new(TaskPolicy::default()),
    });
    let (status, _receiver) = watch::channel(LinkStatus::Connecting { attempt: 0 });
    agent::link::run_link(world, link, status, CancellationToken::new()).await;
    Ok(())
}

/// One agent as its rack starts it.
#[derive(Clone)]
struct Agent {
    world: world::World,
    data_dir: std::path::PathBuf,
    processes: SimProcesses,
    link: LinkConfig,
}

struct RolloutsDriver {
    cp: Power,
    links: Vec<LinkFaults>,
}

impl<'a> Driver<'a> for RolloutsDriver {
    fn fault(
        &mut self,
        sim: &mut turmoil::Sim<'a>,
        fault: &Fault,
        _now: Duration,
    ) -> anyhow::Result<()> {
        match fault {
            Fault::Partition { agent } | Fault::Repair { agent } => {
                let links = &mut self.links[*agent];
                links.count(fault);
                links.apply(sim, "cp", &rack_name(*agent));
            }
            Fault::CrashCp => {
                self.cp.crash(sim);
            }
            Fault::StartCp => {
                self.cp.start(sim);
            }
            Fault::BounceCp => self.cp.bounce(sim),
            other => anyhow::bail!("the rollouts scenario has no fault {other:?}"),
        }
        Ok(())
    }

    fn stepped(&mut self, _sim: &mut turmoil::Sim<'a>, _now: Duration) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The rollout as the control plane stored it.
fn stored(dir: &Path, seed: u64, id: &str) -> anyhow::Result<Loaded> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let world = host_world(seed, "checker");
        let storage = control_plane::server::open_storage(&world, &dir.join("cp"), None).await?;
        let (row, hosts) = storage
            .rollout(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("rollout {id} is gone"))?;
        Loaded::from_rows(&row, &hosts).map_err(anyhow::Error::msg)
    })
}

fn final_check(
    dir: &Path,
    seed: u64,
    id: &str,
    fails: &BTreeSet<usize>,
    processes: &[SimProcesses],
) -> anyhow::Result<()> {
    let r = stored(dir, seed, id)?;
    let third_started = r
        .hosts
        .iter()
        .filter(|h| h.wave == 3 && h.dispatched_ms.is_some())
        .count();
    match (halting(seed), r.rollout.state) {
        (true, State::Halted) if r.rollout.wave == 2 && third_started == 0 => {}
        (true, state) => anyhow::bail!(
            "3 of wave 2's 100 hosts failed (2 tolerated): expected a halt in wave 2 with no wave-3 host started, found {state:?} in wave {} with {third_started} wave-3 hosts started",
            r.rollout.wave
        ),
        (false, State::Done) => {}
        (false, state) => anyhow::bail!(
            "every wave stayed within its budget and every host that ran stayed up, yet the rollout is {state:?} in wave {} ({:?})",
            r.rollout.wave,
            r.rollout.reason
        ),
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (i, procs) in processes.iter().enumerate() {
        if let Some(v) = procs.violations().first() {
            anyhow::bail!("{}: {v}", agent_name(i));
        }
        let all = procs.procs();
        let name = agent_name(i);
        let host = r
            .hosts
            .iter()
            .find(|h| h.agent == name)
            .ok_or_else(|| anyhow::anyhow!("{name} is not a target of the rollout"))?;
        let mine = task_id(id, i);
        if let Some(other) = all.iter().find(|p| p.task_id != mine) {
            anyhow::bail!(
                "{name} ran task {} that the rollout never gave",
                other.task_id
            );
        }
        if all.len() > 1 {
            anyhow::bail!("{name} ran the action {} times", all.len());
        }
        let ran = all.first();
        let agrees = match (host.state, ran) {
            (HostState::Ok, Some(p)) => p.exit_code == 0 && p.ended_naturally(),
            (HostState::Failed, Some(p)) => p.exit_code != 0 && p.ended_naturally(),
            (HostState::Offline | HostState::NotStarted, None) => true,
            _ => false,
        };
        if !agrees {
            anyhow::bail!(
                "{name} (wave {}) is recorded {:?} ({:?}) but its process says {:?}",
                host.wave,
                host.state,
                host.detail,
                ran.map(|p| (p.exit_code, p.ends_at))
            );
        }
        *counts.entry(format!("{:?}", host.state)).or_default() += 1;
        if host.state == HostState::Failed && !fails.contains(&i) {
            anyhow::bail!("{name} is recorded failed, but its command succeeded");
        }
        // Back before the deadline of the wave: it ran (unless the rollout halted first).
        let back_in_time =
            RETURNING.contains(&rack(i)) || (rack(i) == STAYING_AWAY && host.wave == 3);
        if back_in_time && !halting(seed) && ran.is_none() {
            anyhow::bail!(
                "{name} (wave {}) came back before its wave's deadline but never ran ({:?})",
                host.wave,
                host.state
            );
        }
        if rack(i) == STAYING_AWAY
            && host.wave == 2
            && !matches!(host.state, HostState::Offline | HostState::NotStarted)
        {
            anyhow::bail!(
                "{name} was away past wave 2's deadline but is recorded {:?}",
                host.state
            );
        }
    }
    trace::record(format!(
        "final: rollout {:?} in wave {} ({:?}); hosts {counts:?}",
        r.rollout.state, r.rollout.wave, r.rollout.reason
    ));
    Ok(())
}
