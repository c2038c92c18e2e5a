//! The worker pool: a subprocess supervisor. Every run is a process group of its own, led by
//! the run wrapper (forked by the run launcher, [`super::launcher`]), so a hung, leaking or deadlocked task can be
//! stopped unconditionally: on timeout or cancellation the group gets SIGTERM, a grace period,
//! then SIGKILL. The wrapper keeps the output (stdout and stderr interleaved) up to a limit,
//! counts the rest, and records the exit status in the run's directory, so a run outlives the
//! agent: when the agent stops, its runs keep going and the next agent adopts them (see
//! [`super::rundir`]). The pool shares no memory with the scheduler: jobs come in and events
//! go out on bounded queues.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::signal::killpg_as;
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::command::{Launch, Setup, launch_for};
use super::core::Job;
use super::launcher::Launcher;
use super::model::{RunOutcome, status};
use super::rundir::{self, Claim};
use world::World;

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

/// How often an adopted process (not this agent's child, so not waitable) is looked at.
const ADOPTED_POLL: Duration = Duration::from_millis(200);
/// How long a killed adopted process may take to disappear before it is given up on.
const ADOPTED_KILL_WAIT: Duration = Duration::from_secs(5);

/// Runs as OS processes: each in its own process group, through the run wrapper that records
/// its output and exit status in `runs/RUN_ID`.
#[derive(Clone, Debug)]
pub struct OsProcesses {
    world: World,
    /// `DATA_DIR/runs`.
    runs: PathBuf,
    /// Starts the wrappers (the agent binary's `launcher` subcommand).
    launcher: Arc<Launcher>,
    /// The user commands run as (`[tasks] run_as`) when it is not the agent's: run groups
    /// are signalled as that user too.
    run_uid: Option<u32>,
}

impl OsProcesses {
    pub fn new(world: World, data_dir: &Path, exe: PathBuf, run_uid: Option<u32>) -> OsProcesses {
        OsProcesses {
            world,
            runs: data_dir.join(crate::layout::RUNS_DIR),
            launcher: Arc::new(Launcher::new(exe)),
            run_uid,
        }
    }
}

impl Processes for OsProcesses {
    fn run(&self, run: ProcessRun) -> BoxFuture<()> {
        Box::pin(run_os_process(self.clone(), run))
    }

    fn adopt(&self, run: ProcessRun, pid: i32, ticks: Option<u64>) -> BoxFuture<()> {
        let this = self.clone();
        Box::pin(async move {
            let target = Watched::new(pid, ticks, None);
            watch(this, run, target).await
        })
    }

    fn leftover(
        &self,
        run_id: i64,
        output_bytes_max: usize,
        host_restarted: bool,
    ) -> BoxFuture<Result<Leftover, String>> {
        let (world, dir) = (self.world.clone(), rundir::dir(&self.runs, run_id));
        let run_uid = self.run_uid;
        Box::pin(async move {
            let shown = dir.display().to_string();
            world
                .blocking(move || os_leftover(&dir, output_bytes_max, host_restarted, run_uid))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("run directory {shown}: {e}"))
        })
    }

    fn boot_id(&self) -> Option<String> {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(id.trim().to_string()).filter(|id| !id.is_empty())
    }

    fn release(&self, run_id: i64) -> BoxFuture<()> {
        let (world, dir) = (self.world.clone(), rundir::dir(&self.runs, run_id));
        Box::pin(async move {
            let shown = dir.display().to_string();
            let removed = world.blocking(move || remove_dir(&dir)).await;
            if let Ok(Err(error)) = removed {
                tracing::warn!(run_id, dir = %shown, %error, "remove a finished run's directory");
            }
        })
    }

    /// One hand-off to a blocking thread for the whole batch, not one per run.
    fn release_all(&self, run_ids: Vec<i64>) -> BoxFuture<()> {
        let (world, runs) = (self.world.clone(), self.runs.clone());
        Box::pin(async move {
            let removed = world
                .blocking(move || {
                    run_ids
                        .into_iter()
                        .filter_map(|run_id| {
                            let dir = rundir::dir(&runs, run_id);
                            remove_dir(&dir)
                                .err()
                                .map(|error| (run_id, dir.display().to_string(), error))
                        })
                        .collect::<Vec<_>>()
                })
                .await;
            for (run_id, dir, error) in removed.unwrap_or_default() {
                tracing::warn!(run_id, %dir, %error, "remove a finished run's directory");
            }
        })
    }

    fn sweep(&self, in_flight: Vec<i64>, grace: Duration) -> BoxFuture<usize> {
        let this = self.clone();
        Box::pin(async move {
            let runs = this.runs.clone();
            let listed = this.world.blocking(move || rundir::list(&runs)).await;
            let ids = match listed {
                Ok(Ok(ids)) => ids,
                Ok(Err(error)) => {
                    tracing::warn!(runs = %this.runs.display(), %error, "list run directories");
                    return 0;
                }
                Err(_) => return 0,
            };
            let mut stopped = 0;
            for run_id in ids.into_iter().filter(|id| !in_flight.contains(id)) {
                let dir = rundir::dir(&this.runs, run_id);
                if let Ok(Some(Claim::Started { pid, ticks })) = rundir::read_claim(&dir)
                    && alive(pid, ticks)
                {
                    tracing::error!(
                        run_id,
                        pid,
                        "a process of a run the task store does not have in flight is alive; stopping it"
                    );
                    terminate_group(pid, grace, this.run_uid, || !alive(pid, ticks)).await;
                    stopped += 1;
                }
                this.release(run_id).await;
            }
            stopped
        })
    }
}

fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Why a run is recorded `aborted` when its wrapper ended and left no exit status (also what
/// the agent logs then).
pub const WRAPPER_DIED: &str = "the run's wrapper ended without recording an exit status";
/// Why a run is recorded `aborted` when a recovering agent found its wrapper gone without an
/// exit status.
pub const LEFT_NO_STATUS: &str =
    "its process ended while no agent watched it and left no exit status (killed with SIGKILL)";

/// [`Processes::leftover`] on a real run directory.
fn os_leftover(
    dir: &Path,
    output_bytes_max: usize,
    host_restarted: bool,
    run_uid: Option<u32>,
) -> std::io::Result<Leftover> {
    let ended = |exit: Option<rundir::Exit>, why: &str| {
        let (output, dropped) = rundir::read_output(dir, output_bytes_max, exit.as_ref());
        let outcome = match &exit {
            Some(exit) => exit.outcome(),
            None => RunOutcome {
                status: status::ABORTED,
                ..failed(why.into())
            },
        };
        Leftover::Ended(RunOutcome {
            output,
            output_dropped_bytes: dropped,
            ..outcome
        })
    };
    if host_restarted {
        // Every process of the old boot is gone, and a claim written just before the power
        // went may be lost with it: the run may have started, so it is not run again.
        return Ok(ended(
            rundir::read_exit(dir),
            "the host restarted while this run was in flight",
        ));
    }
    if !dir.is_dir() {
        // The directory comes before the process: no directory, no process.
        return Ok(Leftover::NeverStarted);
    }
    let (pid, ticks) = match rundir::claim(dir, Claim::Abandoned)? {
        Claim::Abandoned => return Ok(Leftover::NeverStarted),
        Claim::Started { pid, ticks } => (pid, ticks),
    };
    if let Some(exit) = rundir::read_exit(dir) {
        stop_leftover_group(pid, ticks, run_uid);
        return Ok(ended(Some(exit), LEFT_NO_STATUS));
    }
    if alive(pid, ticks) {
        return Ok(Leftover::Running { pid, ticks });
    }
    // The wrapper is gone, but what it started may not be (a wrapper killed while its command
    // ran leaves the command running in its group): nothing may run that no run accounts for.
    stop_leftover_group(pid, ticks, run_uid);
    // It may have written its status between the first look and the liveness check.
    Ok(ended(rundir::read_exit(dir), LEFT_NO_STATUS))
}

/// Stop whatever an ended run left in its process group (the group's id is its wrapper's
/// pid): a watching agent when the wrapper ends, a recovering one when it finds the wrapper
/// gone. Nothing is sent when that pid now
/// names another process: a pid still naming a group is never handed out again, so the
/// group is empty then.
fn stop_leftover_group(pid: i32, ticks: Option<u64>, run_uid: Option<u32>) {
    let ours_or_free = match (super::process::start_ticks(pid), ticks) {
        (None, _) => true,
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => false,
    };
    if ours_or_free {
        killpg_as(Pid::from_raw(pid), Signal::SIGKILL, run_uid);
    }
}

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

fn failed(error: String) -> RunOutcome {
    RunOutcome {
        status: status::FAILED,
        exit_code: None,
        error: Some(error),
        output: Vec::new(),
        output_dropped_bytes: 0,
    }
}

enum Stop {
    Exited,
    TimedOut,
    Killed,
}

/// A run's wrapper, the process `pid` started at `ticks`: told of its end by the launcher that
/// started it (`ended`), or, adopted from a previous agent or outliving its launcher, looked at
/// every [`ADOPTED_POLL`].
struct Watched {
    pid: i32,
    ticks: Option<u64>,
    ended: Option<oneshot::Receiver<()>>,
    /// The launcher said it ended.
    reaped: bool,
}

impl Watched {
    fn new(pid: i32, ticks: Option<u64>, ended: Option<oneshot::Receiver<()>>) -> Watched {
        Watched {
            pid,
            ticks,
            ended,
            reaped: false,
        }
    }

    async fn gone(&mut self) {
        if let Some(ended) = self.ended.as_mut() {
            self.reaped = ended.await.is_ok();
            self.ended = None;
        }
        while !self.reaped && alive(self.pid, self.ticks) {
            tokio::time::sleep(ADOPTED_POLL).await;
        }
    }

    fn exited(&mut self) -> bool {
        if let Some(ended) = self.ended.as_mut() {
            match ended.try_recv() {
                Ok(()) => self.reaped = true,
                Err(oneshot::error::TryRecvError::Empty) => return false,
                Err(oneshot::error::TryRecvError::Closed) => {}
            }
            self.ended = None;
        }
        self.reaped || !alive(self.pid, self.ticks)
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

async fn run_os_process(this: OsProcesses, run: ProcessRun) {
    let dir = rundir::dir(&this.runs, run.run_id);
    let finish = |outcome| PoolEvent::Finished {
        task_id: run.task_id.clone(),
        run_id: run.run_id,
        outcome,
    };
    let made = {
        let dir = dir.clone();
        this.world
            .blocking(move || std::fs::create_dir_all(&dir))
            .await
    };
    if let Err(e) = made
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        let error = format!("create the run directory {}: {e}", dir.display());
        let _ = run.events.send(finish(failed(error))).await;
        return;
    }
    let started = this
        .launcher
        .start(&dir, run.output_bytes_max as u64, &run.argv, &run.env)
        .await;
    let (pid, ticks, ended) = match started {
        Ok(started) => (started.pid, started.ticks, Some(started.ended)),
        Err(e) => {
            // The launcher may have forked the wrapper before it failed to answer: the run
            // directory says, and a wrapper that has not claimed it yet never will.
            let left = {
                let (dir, max, run_uid) = (dir.clone(), run.output_bytes_max, this.run_uid);
                this.world
                    .blocking(move || os_leftover(&dir, max, false, run_uid))
                    .await
            };
            match left {
                Ok(Ok(Leftover::Running { pid, ticks })) => {
                    tracing::warn!(run_id = run.run_id, pid, error = %e, "the run launcher failed after it started the run's wrapper; watching the wrapper");
                    (pid, ticks, None)
                }
                Ok(Ok(Leftover::Ended(outcome))) => {
                    let _ = run.events.send(finish(outcome)).await;
                    return;
                }
                other => {
                    let mut error = format!("start the run's wrapper: {e}");
                    if let Ok(Err(io)) = other {
                        error.push_str(&format!(" (and its directory: {io})"));
                    }
                    let _ = run.events.send(finish(failed(error))).await;
                    return;
                }
            }
        }
    };
    crate::crashpoint::pass(crate::crashpoint::AFTER_SPAWN);
    let _ = run
        .events
        .send(PoolEvent::Started {
            task_id: run.task_id.clone(),
            run_id: run.run_id,
            pid,
            pid_start_ticks: ticks,
        })
        .await;
    let target = Watched::new(pid, ticks, ended);
    watch(this, run, target).await
}

/// Supervise the run's process group (led by `pid`) to its end; then read what the wrapper
/// recorded and report it. Left alone, unreported, if the agent shuts down first.
async fn watch(this: OsProcesses, run: ProcessRun, mut target: Watched) {
    let pid = target.pid;
    let ProcessRun {
        task_id,
        run_id,
        timeout,
        grace,
        output_bytes_max,
        kill,
        shutdown,
        events,
        ..
    } = run;
    let stop = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return,
        _ = target.gone() => Stop::Exited,
        _ = tokio::time::sleep(timeout) => Stop::TimedOut,
        _ = kill.cancelled() => Stop::Killed,
    };
    match stop {
        Stop::TimedOut | Stop::Killed => {
            terminate_group(pid, grace, this.run_uid, || target.exited()).await;
            // SIGKILL was sent: the end is near, but an adopted process is not ours to wait for.
            let _ = tokio::time::timeout(ADOPTED_KILL_WAIT, target.gone()).await;
        }
        // The wrapper is gone; whatever the command left in its group goes too.
        Stop::Exited => stop_leftover_group(pid, target.ticks, this.run_uid),
    }
    let dir = rundir::dir(&this.runs, run_id);
    let recorded = this
        .world
        .blocking(move || {
            let exit = rundir::read_exit(&dir);
            let (output, dropped) = rundir::read_output(&dir, output_bytes_max, exit.as_ref());
            (exit, output, dropped)
        })
        .await;
    let (exit, output, dropped) = recorded.unwrap_or((None, Vec::new(), 0));
    let outcome = match stop {
        Stop::Exited => match exit {
            Some(exit) => exit.outcome(),
            None => {
                tracing::warn!(run_id, pid, "{WRAPPER_DIED}; its process group was stopped");
                RunOutcome {
                    status: status::ABORTED,
                    ..failed(WRAPPER_DIED.into())
                }
            }
        },
        Stop::TimedOut => failed(format!(
            "timed out after {}; process group terminated",
            humantime::format_duration(timeout)
        )),
        Stop::Killed => failed("stopped on request; process group terminated".into()),
    };
    let outcome = RunOutcome {
        output,
        output_dropped_bytes: dropped,
        ..outcome
    };
    let _ = events
        .send(PoolEvent::Finished {
            task_id,
            run_id,
            outcome,
        })
        .await;
}

/// Run jobs until `commands` closes or `shutdown` fires. On shutdown the runs in flight are
/// left running, unreported: the next agent adopts them.
pub async fn run_pool(
    config: PoolConfig,
    mut commands: mpsc::Receiver<PoolCommand>,
    events: mpsc::Sender<PoolEvent>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
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
                let run = run_job(job, config.clone(), kill, shutdown.clone(), events.clone(), adopted);
                jobs.spawn(async move {
                    run.await;
                    run_id
                });
            }
        }
    }
    // Shutdown: every run sees it and lets go of its process.
    while jobs.join_next().await.is_some() {}
}
