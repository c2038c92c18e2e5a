//! What every scenario shares: the simulation builder and its epoch, each host's world, the
//! control plane's port, link faults, the one place that prepares the control plane's
//! database before a run, and the fault loop ([`drive`]).

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use control_plane::auth::{self, Role, SecretKind};
use control_plane::storage::{EnrollAttempt, Enrollment, UserRow};
use world::World;

use crate::scenario::{Fault, Schedule};
use crate::trace;

/// Fixed wall-clock start of every simulation: 2026-01-01T00:00:00Z.
pub const EPOCH_S: u64 = 1_767_225_600;
/// The control plane listens here on host `cp`.
pub const CP_PORT: u16 = 8080;
const TICK: Duration = Duration::from_millis(10);

/// The simulation every scenario runs in: seeded, at the fixed epoch, a little longer than
/// the plan so the driver, not turmoil, decides when it ends.
pub fn new_sim<'a>(seed: u64, plan: &Schedule) -> turmoil::Sim<'a> {
    new_sim_ticking(seed, plan, TICK)
}

/// [`new_sim`] with steps of `tick`: a scenario whose deadlines are seconds and whose run is
/// an hour takes coarser steps.
pub fn new_sim_ticking<'a>(seed: u64, plan: &Schedule, tick: Duration) -> turmoil::Sim<'a> {
    new_sim_sized(seed, plan, tick, TCP_CAPACITY)
}

/// turmoil's default TCP capacity per host: pending connections on a listener, and segments
/// buffered per socket.
const TCP_CAPACITY: usize = 64;

/// [`new_sim_ticking`] with room for `tcp_capacity` pending connections on a listener (and
/// segments per socket): a fleet of agents all dialing one control plane needs more than
/// the default.
pub fn new_sim_sized<'a>(
    seed: u64,
    plan: &Schedule,
    tick: Duration,
    tcp_capacity: usize,
) -> turmoil::Sim<'a> {
    turmoil::Builder::new()
        .tcp_capacity(tcp_capacity)
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
        .simulation_duration(plan.run_for + Duration::from_secs(10))
        .tick_duration(tick)
        .build()
}

/// Partitions and holds in force on one agent's link (they may overlap); a partition wins
/// over a hold, and the link is repaired when neither is left.
#[derive(Debug, Default)]
pub struct LinkFaults {
    partitions: i32,
    holds: i32,
}

impl LinkFaults {
    /// Count `fault` if it partitions, holds, repairs or releases the link.
    pub fn count(&mut self, fault: &Fault) {
        match fault {
            Fault::Partition { .. } => self.partitions += 1,
            Fault::Repair { .. } => self.partitions -= 1,
            Fault::Hold { .. } => self.holds += 1,
            Fault::Release { .. } => self.holds -= 1,
            _ => {}
        }
    }

    /// Put the link between `a` and `b` in the state the counted faults say.
    pub fn apply(&self, sim: &mut turmoil::Sim<'_>, a: &str, b: &str) {
        if self.partitions > 0 {
            sim.partition(a, b);
        } else if self.holds > 0 {
            sim.hold(a, b);
        } else {
            sim.repair(a, b);
        }
    }
}

/// The world of simulated host `host`: its randomness follows the seed and the host's name.
pub fn host_world(seed: u64, host: &str) -> World {
    World::simulated(
        host_seed(seed, host),
        UNIX_EPOCH + Duration::from_secs(EPOCH_S),
    )
}

pub fn host_seed(seed: u64, host: &str) -> u64 {
    host.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Whether a simulated host runs, and the three ways a schedule changes that: a bounce
/// (restart now), a crash (down until started), a start. Crashing a host that is down, or
/// starting one that runs, does nothing and says so (`false`).
#[derive(Debug)]
pub struct Power {
    host: &'static str,
    up: bool,
}

impl Power {
    /// A host that runs.
    pub fn on(host: &'static str) -> Power {
        Power { host, up: true }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn bounce(&mut self, sim: &mut turmoil::Sim<'_>) {
        sim.bounce(self.host);
        self.up = true;
    }

    pub fn crash(&mut self, sim: &mut turmoil::Sim<'_>) -> bool {
        if !self.up {
            return false;
        }
        sim.crash(self.host);
        self.up = false;
        true
    }

    pub fn start(&mut self, sim: &mut turmoil::Sim<'_>) -> bool {
        if self.up {
            return false;
        }
        self.bounce(sim);
        true
    }
}

/// What to put into the control plane's database before the simulation starts, as an operator
/// would. Each step draws from the operator's world afresh (as separate operator commands do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepare {
    /// This many single-use enrollment tokens (valid a day), for agents that enroll themselves.
    EnrollTokens(usize),
    /// `agent1` enrolled already (id `agt_sim`): its credential.
    EnrolledAgent,
    /// This many agents enrolled already, named [`agent_name`]`(i)` with id `agt_sim{i}`:
    /// their credentials, in order.
    EnrolledAgents(usize),
    /// An operator user `ops` and an API token for it.
    OperatorToken,
    /// A webhook alert channel `ops` posting to this URL (signing key `sim-key`).
    AlertChannel(&'static str),
}

/// Open (and migrate) the control plane's database in `dir/cp` once, then run `steps` on it; one secret per enrollment
/// token, then the agent credential, then the API token, in the order of `steps`.
pub fn prepare(dir: &Path, seed: u64, steps: &[Prepare]) -> anyhow::Result<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let storage = rt.block_on(control_plane::server::open_storage(
        &host_world(seed, "operator"),
        &dir.join("cp"),
        None,
    ))?;
    let mut secrets = Vec::new();
    for step in steps {
        let world = host_world(seed, "operator");
        rt.block_on(async {
            let now = world.now_unix_ms();
            match *step {
                Prepare::EnrollTokens(n) => {
                    for _ in 0..n {
                        let token = auth::new_secret(&world, SecretKind::EnrollToken);
                        storage
                            .create_enroll_token(
                                &auth::secret_hash(&token),
                                now,
                                now + 24 * 3_600_000,
                            )
                            .await?;
                        secrets.push(token);
                    }
                }
                Prepare::EnrolledAgent => {
                    secrets.push(enroll(&world, &storage, "agent1", "").await?);
                }
                Prepare::EnrolledAgents(n) => {
                    for i in 0..n {
                        secrets
                            .push(enroll(&world, &storage, &agent_name(i), &i.to_string()).await?);
                    }
                }
                Prepare::AlertChannel(url) => {
                    let spec = serde_json::json!({"name": "ops", "kind": "webhook", "url": url,
                        "min_severity": "warning"});
                    storage
                        .create_spec(control_plane::storage::SpecRow {
                            kind: control_plane::alerts::channels::SPEC_KIND.into(),
                            id: "chn_sim".into(),
                            name: "ops".into(),
                            spec: spec.to_string(),
                            secret: Some("sim-key".into()),
                            created_ms: now,
                        })
                        .await?;
                }
                Prepare::OperatorToken => {
                    let user_id = auth::new_id(&world, "usr");
                    storage
                        .create_user(UserRow {
                            id: user_id.clone(),
                            name: "ops".into(),
                            role: Role::Operator,
                            password_hash: "unused".into(),
                            created_at_ms: now,
                        })
                        .await?;
                    let token = auth::new_secret(&world, SecretKind::ApiToken);
                    storage
                        .create_api_token(
                            &auth::secret_hash(&token),
                            &user_id,
                            now,
                            now + 86_400_000,
                        )
                        .await?;
                    secrets.push(token);
                }
            }
            anyhow::Ok(())
        })?;
    }
    Ok(secrets)
}

/// The name of the `i`-th of [`Prepare::EnrolledAgents`] (0-based): `agent001` on, so names
/// sort as the agents are numbered.
pub fn agent_name(i: usize) -> String {
    format!("agent{:03}", i + 1)
}

/// Enroll agent `name` (id `agt_sim{suffix}`) as its first start would: its credential.
async fn enroll(
    world: &World,
    storage: &control_plane::storage::Storage,
    name: &str,
    suffix: &str,
) -> anyhow::Result<String> {
    let now = world.now_unix_ms();
    let token = auth::new_secret(world, SecretKind::EnrollToken);
    storage
        .create_enroll_token(&auth::secret_hash(&token), now, now + 3_600_000)
        .await?;
    let credential = auth::new_secret(world, SecretKind::AgentCredential);
    let enrolled = storage
        .enroll_agent(EnrollAttempt {
            token_hash: auth::secret_hash(&token),
            enrollment_id: format!("sim{suffix}"),
            name: name.into(),
            new_agent_id: format!("agt_sim{suffix}"),
            credential_hash: auth::secret_hash(&credential),
            now_ms: now,
        })
        .await?;
    anyhow::ensure!(
        matches!(enrolled, Enrollment::Enrolled { .. }),
        "enroll {name}"
    );
    Ok(credential)
}

/// A scenario's side of the fault loop.
pub trait Driver<'a> {
    /// Before the faults due at `now` (nothing by default).
    fn tick(&mut self, _sim: &mut turmoil::Sim<'a>, _now: Duration) -> anyhow::Result<()> {
        Ok(())
    }
    /// One fault came due (already recorded in the trace).
    fn fault(
        &mut self,
        sim: &mut turmoil::Sim<'a>,
        fault: &Fault,
        now: Duration,
    ) -> anyhow::Result<()>;
    /// After each step of the simulation: the scenario's checks.
    fn stepped(&mut self, sim: &mut turmoil::Sim<'a>, now: Duration) -> anyhow::Result<()>;
}

/// The fault loop every scenario runs: until `plan.run_for`, apply the faults that came due,
/// step the simulation, check.
pub fn drive<'a>(
    sim: &mut turmoil::Sim<'a>,
    plan: &Schedule,
    driver: &mut impl Driver<'a>,
) -> anyhow::Result<()> {
    let mut due = plan.due();
    loop {
        let now = sim.elapsed();
        trace::set_driver_elapsed(now);
        if now >= plan.run_for {
            return Ok(());
        }
        driver.tick(sim, now)?;
        for fault in due.take(now) {
            trace::record(format!("fault {fault:?}"));
            driver.fault(sim, fault, now)?;
        }
        sim.step()
            .map_err(|e| anyhow::anyhow!("simulation error: {e}"))?;
        driver.stepped(sim, now)?;
    }
}

/// An agent host's life: enroll with `token` as `name` (see [`enroll_until_done`]), then keep
/// its control link up, publishing its state on `status`.
pub async fn run_enrolled_link(
    world: World,
    data_dir: &Path,
    token: &str,
    name: String,
    mut link: agent::link::LinkConfig,
    status: tokio::sync::watch::Sender<agent::link::LinkStatus>,
) {
    let identity = enroll_until_done(&world, data_dir, token, &name, &link).await;
    link.credential = identity.credential;
    link.hostname = name;
    agent::link::run_link(
        world,
        link,
        status,
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
}

/// Enroll (retrying, with a stable enrollment id) until an identity is on disk.
pub async fn enroll_until_done(
    world: &World,
    data_dir: &Path,
    token: &str,
    name: &str,
    link: &agent::link::LinkConfig,
) -> agent::identity::Identity {
    let mut backoff = agent::backoff::Backoff::new(link.backoff_base, link.backoff_max);
    loop {
        match agent::identity::load(data_dir) {
            Ok(Some(identity)) => return identity,
            Ok(None) => {}
            Err(e) => tracing::warn!(target: "agent::sim", error = %e, "identity unreadable"),
        }
        match agent::identity::enroll(
            world,
            data_dir,
            link.control_plane.as_str(),
            token,
            name,
            Default::default(),
        )
        .await
        {
            Ok(identity) => return identity,
            Err(e) => {
                tracing::info!(target: "agent::sim", error = %e, "enrollment failed; retrying");
                tokio::time::sleep(backoff.next_delay(world.random_u64())).await;
            }
        }
    }
}

/// The control plane as simulated host `cp`: its storage in `data_dir` (prepared by
/// [`prepare`]), serving on [`CP_PORT`] with `settings`, started again after each crash.
pub fn control_plane_host(
    sim: &mut turmoil::Sim<'_>,
    seed: u64,
    data_dir: std::path::PathBuf,
    settings: control_plane::settings::Settings,
) {
    let world = host_world(seed, "cp");
    sim.host("cp", move || {
        let (world, data_dir, settings) = (world.clone(), data_dir.clone(), settings.clone());
        async move {
            let storage = control_plane::server::open_storage(&world, &data_dir, None)
                .await
                .map_err(|e| e.to_string())?;
            let listener = world.net().bind(&format!("0.0.0.0:{CP_PORT}")).await?;
            let state = control_plane::state::AppState::new(
                world,
                storage,
                settings,
                tokio_util::sync::CancellationToken::new(),
            );
            control_plane::server::run(state, listener, std::future::pending())
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
    });
}

/// The lock of state a scenario's hosts and its driver share; a panic elsewhere does not
/// hide it.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The task runtime of a simulated agent in `dir`, over `processes`: `concurrency` commands
/// at once (as many more dispatched ahead), two retries from 1 s, missed runs run once, and
/// the pgBackRest kinds granted for stanza `main`.
pub fn task_runtime(
    dir: &Path,
    processes: &crate::processes::SimProcesses,
    concurrency: usize,
) -> agent::tasks::driver::RuntimeConfig {
    use std::sync::Arc;
    agent::tasks::driver::RuntimeConfig {
        db_path: dir.join("tasks.db"),
        core: agent::tasks::core::Config {
            concurrency_max: concurrency,
            dispatch_ahead: concurrency,
            retries_max: 2,
            retry_base_ms: 1_000,
            missed: agent::tasks::core::MissedRuns::RunOnce,
        },
        pool: agent::tasks::pool::PoolConfig {
            grace: Duration::from_secs(2),
            output_bytes_max: 1024,
            postgres: None,
            psql: "psql".into(),
            pg_dump: "pg_dump".into(),
            agent_exe: "outpost-agent".into(),
            data_dir: dir.to_path_buf(),
            run_as: agent::tasks::pool::RunAs::Agent,
            policy: Arc::new(agent::tasks::policy::TaskPolicy {
                backups: Some(agent::tasks::backup::BackupGrant {
                    pgbackrest: "pgbackrest".into(),
                    stanzas: vec!["main".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            processes: Arc::new(processes.clone()),
        },
        history_retention: Duration::from_secs(30 * 24 * 3600),
        backup_ended: Arc::default(),
    }
}
