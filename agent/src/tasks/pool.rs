//! The worker pool: a subprocess supervisor. Every run is a process group of its own, started
//! by a run keeper ([`super::keeper`]), so a hung, leaking or deadlocked task can be stopped
//! unconditionally: on timeout or cancellation the group gets SIGTERM, a grace period, then
//! SIGKILL. The keeper keeps the output (stdout and stderr interleaved) up to a limit, counts
//! the rest, and records the exit status in its slot, so a run outlives the agent: when the
//! agent stops, its runs keep going and the next agent adopts them (see [`super::os`]). The
//! pool shares no memory with the scheduler: jobs come in and events go out on bounded
//! queues; where runs execute is a [`Processes`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::signal::killpg_as;
use nix::unistd::Pid;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::command::{Launch, Setup, launch_for};
use super::core::Job;
use super::model::{RunOutcome, status};

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    pub output_bytes_max: usize,
    /// Connection string for the Postgres kinds; `None` makes them fail with a reason.
    pub postgres: Option<String>,
    pub psql: PathBuf,
    pub pg_dump: PathBuf,
    /// This agent binary, for `retention_cleanup` (`outpost-agent tasks purge`).
    pub agent_exe: PathBuf,
    pub data_dir: PathBuf,
    /// Whose rights the commands get.
    pub run_as: RunAs,
    /// What this host lets be run (pg_dump's directories are checked again before each run).
    pub policy: Arc<crate::tasks::policy::TaskPolicy>,
    /// Where runs execute.
    pub processes: Arc<dyn Processes>,
}

impl PoolConfig {
    /// What the command lines are made from.
    pub fn setup(&self) -> Setup<'_> {
        Setup {
            postgres: self.postgres.as_deref(),
            psql: &self.psql,
            pg_dump: &self.pg_dump,
            agent_exe: &self.agent_exe,
            data_dir: &self.data_dir,
            run_as: &self.run_as,
            policy: &self.policy,
        }
    }
}

pub use super::process::{Environment, alive, start_ticks};
pub use crate::run_as::RunAs;

pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// Where runs execute: real OS processes ([`OsProcesses`]) or a simulation's. A run outlives
/// the agent that started it; the next agent finds it with [`Processes::leftover`].
pub trait Processes: Send + Sync + std::fmt::Debug + 'static {
    /// Start the run and supervise it to its end: [`PoolEvent::Started`] once its process
    /// exists, then [`PoolEvent::Finished`]. If `shutdown` fires first the run is left
    /// running for the next agent and nothing more is reported.
    fn run(&self, run: ProcessRun) -> BoxFuture<()>;
    /// Supervise the process `pid` (started at `ticks`) a previous agent left running for this
    /// run, exactly like one of [`Processes::run`]'s (only `Finished` is reported).
    fn adopt(&self, run: ProcessRun, pid: i32, ticks: Option<u64>) -> BoxFuture<()>;
    /// What is left of run `run_id`, which a previous agent had in flight. A run whose process
    /// never got going is claimed here, so that it never will. `host_restarted`: the host
    /// booted since the run was dispatched, so its process is gone and what it wrote without
    /// syncing may be too (a missing claim then proves nothing).
    fn leftover(
        &self,
        run_id: i64,
        output_bytes_max: usize,
        host_restarted: bool,
    ) -> BoxFuture<Result<Leftover, String>>;
    /// An id of the host's current boot, if it has one.
    fn boot_id(&self) -> Option<String>;
    /// The run's end is in the store: forget it.
    fn release(&self, run_id: i64) -> BoxFuture<()>;
    /// [`Processes::release`] for every run of a batch whose ends were committed together.
    fn release_all(&self, run_ids: Vec<i64>) -> BoxFuture<()> {
        let each: Vec<_> = run_ids.into_iter().map(|id| self.release(id)).collect();
        Box::pin(async move {
            for release in each {
                release.await;
            }
        })
    }
    /// Forget every run not in `in_flight`, stopping (SIGTERM, `grace`, SIGKILL) any process of
    /// theirs still alive: nothing may run that no agent accounts for. Returns how many
    /// processes had to be stopped.
    fn sweep(&self, in_flight: Vec<i64>, grace: Duration) -> BoxFuture<usize>;
}

/// What a stopped agent left of a run it had in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leftover {
    /// Its process never started the command, and now never will.
    NeverStarted,
    /// Still running: adopt it.
    Running { pid: i32, ticks: Option<u64> },
    /// It ended while no agent watched: its real outcome, or `aborted` if it left none.
    Ended(RunOutcome),
}

/// One run for [`Processes::run`] or [`Processes::adopt`].
pub struct ProcessRun {
    pub task_id: String,
    pub run_id: i64,
    /// Empty for an adopted run.
    pub argv: Vec<String>,
    /// The environment the run's process starts with.
    pub env: Environment,
    /// What is left of the run's timeout.
    pub timeout: Duration,
    pub grace: Duration,
    pub output_bytes_max: usize,
    /// Fires on cancellation: stop the run.
    pub kill: CancellationToken,
    /// Fires when the agent stops: leave the run running.
    pub shutdown: CancellationToken,
    pub events: mpsc::Sender<PoolEvent>,
}

/// Why a run is recorded `aborted` when its keeper ended without recording how the command
/// ended (also what the agent logs then).
pub const KEEPER_DIED: &str = "the run's keeper ended without recording how the command ended";
/// What the agent logs when a run keeper it lent died under a run (or stopped answering).
pub const KEEPER_LOST: &str = "a run keeper was lost; its slot says how the run ended";
/// Why a run is recorded `aborted` when a recovering agent found its process gone without an
/// exit status.
pub const LEFT_NO_STATUS: &str =
    "its process ended while no agent watched it and left no exit status (killed with SIGKILL)";

pub enum PoolCommand {
    Run(Job),
    /// Supervise a run a previous agent left running.
    Adopt {
        job: Job,
        pid: i32,
        ticks: Option<u64>,
        /// What is left of its timeout.
        timeout: Duration,
    },
    Kill {
        run_id: i64,
    },
}

#[derive(Debug)]
pub enum PoolEvent {
    Started {
        task_id: String,
        run_id: i64,
        pid: i32,
        pid_start_ticks: Option<u64>,
        /// When the process started (unix ms), if known better than "now": a keeper reports a
        /// short command's start with its end.
        at_ms: Option<i64>,
    },
    Finished {
        task_id: String,
        run_id: i64,
        outcome: RunOutcome,
    },
}

/// SIGTERM the process group led by `pid` (as the agent and as `run_uid`), wait up to
/// `grace`, then SIGKILL it.
pub async fn terminate_group(
    pid: i32,
    grace: Duration,
    run_uid: Option<u32>,
    mut exited: impl FnMut() -> bool,
) {
    let group = Pid::from_raw(pid);
    killpg_as(group, Signal::SIGTERM, run_uid);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if exited() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Also reaps stragglers the leader left behind in its group.
    killpg_as(group, Signal::SIGKILL, run_uid);
}

pub(crate) fn failed(error: String) -> RunOutcome {
    RunOutcome {
        status: status::FAILED,
        exit_code: None,
        error: Some(error),
        output: Vec::new(),
        output_dropped_bytes: 0,
    }
}

async fn run_job(
    job: Job,
    config: Arc<PoolConfig>,
    kill: CancellationToken,
    shutdown: CancellationToken,
    events: mpsc::Sender<PoolEvent>,
    adopted: Option<(i32, Option<u64>, Duration)>,
) {
    let Job {
        task_id,
        run_id,
        spec,
    } = job;
    let launch = match adopted {
        Some(_) => Launch::default(),
        None => match launch_for(&spec, &config.setup()) {
            Ok(launch) => launch,
            Err(e) => {
                let _ = events
                    .send(PoolEvent::Finished {
                        task_id,
                        run_id,
                        outcome: failed(e),
                    })
                    .await;
                return;
            }
        },
    };
    let full = Duration::from_millis(u64::try_from(spec.timeout_ms).unwrap_or(0));
    let run = ProcessRun {
        task_id,
        run_id,
        argv: launch.argv,
        env: launch.env,
        timeout: adopted.map_or(full, |(_, _, left)| left),
        grace: config.grace,
        output_bytes_max: config.output_bytes_max,
        kill,
        shutdown,
        events,
    };
    match adopted {
        Some((pid, ticks, _)) => config.processes.adopt(run, pid, ticks).await,
        None => config.processes.run(run).await,
    }
}

/// Wait for one of the pool's slots. A run dispatched ahead waits here; `None` when it is
/// canceled first (reported `canceled`, its command never started) or the agent stops (it
/// never started: the next agent runs it again).
async fn slot_for(
    slots: &Arc<Semaphore>,
    job: &Job,
    kill: &CancellationToken,
    shutdown: &CancellationToken,
    events: &mpsc::Sender<PoolEvent>,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    tokio::select! {
        permit = slots.clone().acquire_owned() => permit.ok(),
        _ = shutdown.cancelled() => None,
        _ = kill.cancelled() => {
            let outcome = RunOutcome {
                status: status::CANCELED,
                ..failed("canceled while it waited for a free slot; its command never started".into())
            };
            let _ = events
                .send(PoolEvent::Finished {
                    task_id: job.task_id.clone(),
                    run_id: job.run_id,
                    outcome,
                })
                .await;
            None
        }
    }
}

/// Run jobs until `commands` closes or `shutdown` fires, at most `slots` commands at once
/// (runs dispatched beyond that wait for a slot). On shutdown the runs in flight are left
/// running, unreported: the next agent adopts them.
pub async fn run_pool(
    config: PoolConfig,
    slots: usize,
    mut commands: mpsc::Receiver<PoolCommand>,
    events: mpsc::Sender<PoolEvent>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(slots));
    let mut jobs = JoinSet::new();
    let mut kills: BTreeMap<i64, CancellationToken> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                if let Ok(run_id) = done {
                    kills.remove(&run_id);
                }
            }
            command = commands.recv() => {
                let (job, adopted) = match command {
                    None => break,
                    Some(PoolCommand::Run(job)) => (job, None),
                    Some(PoolCommand::Adopt { job, pid, ticks, timeout }) => {
                        (job, Some((pid, ticks, timeout)))
                    }
                    Some(PoolCommand::Kill { run_id }) => {
                        if let Some(token) = kills.remove(&run_id) {
                            token.cancel();
                        }
                        continue;
                    }
                };
                let kill = CancellationToken::new();
                kills.insert(job.run_id, kill.clone());
                let run_id = job.run_id;
                // An adopted run's command already runs: it takes a slot if one is free (here,
                // in order: adoptions come before new runs) and never waits for one.
                let adopted_permit = adopted.and_then(|_| slots.clone().try_acquire_owned().ok());
                let (config, slots) = (config.clone(), slots.clone());
                let (shutdown, events) = (shutdown.clone(), events.clone());
                jobs.spawn(async move {
                    let permit = match adopted {
                        Some(_) => adopted_permit,
                        None => match slot_for(&slots, &job, &kill, &shutdown, &events).await {
                            Some(permit) => Some(permit),
                            None => return run_id,
                        },
                    };
                    run_job(job, config, kill, shutdown, events, adopted).await;
                    drop(permit);
                    run_id
                });
            }
        }
    }
    // Shutdown: every run sees it and lets go of its process.
    while jobs.join_next().await.is_some() {}
}
