//! The scheduler actor: owns the sans-IO core and the store, batches requests and pool
//! events, commits each batch's effects in one transaction (group commit), and only then
//! answers callers and hands runs to the pool. Runs outlive the agent: at shutdown they are
//! left running, and recovery at start-up adopts every run a previous agent left that still
//! runs, records the real outcome of those that ended meanwhile, and withdraws (no record:
//! nothing ran) and runs again the ones whose process provably never started, such as runs
//! dispatched ahead that still waited for a slot (see [`super::rundir`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use world::World;

use super::core::{
    self, CancelError, Effect, Found, Job, RescheduleError, Scheduler, SubmitError, TaskState,
};
use super::model::{Schedule, TaskSpec};
use super::pool::{self, Leftover, PoolCommand, PoolConfig, PoolEvent};
use super::store::{Started, Store};

/// Requests answered per commit at most.
const BATCH_MAX: usize = 4096;
/// Requests waiting for the scheduler at most (callers wait beyond that: back-pressure).
pub const REQUESTS_QUEUED_MAX: usize = 8192;
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// Longest sleep of an idle scheduler.
const IDLE_WAKE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub db_path: PathBuf,
    pub core: core::Config,
    pub pool: PoolConfig,
    /// Ended tasks older than this are purged.
    pub history_retention: Duration,
    /// Told when a run of a pgBackRest kind or a drill ends (the backup status is collected
    /// again).
    pub backup_ended: Arc<tokio::sync::Notify>,
}

pub enum Request {
    Submit {
        spec: TaskSpec,
        reply: oneshot::Sender<Result<TaskState, SubmitError>>,
    },
    Cancel {
        id: String,
        reply: oneshot::Sender<Result<TaskState, CancelError>>,
    },
    Reschedule {
        id: String,
        schedule: Schedule,
        reply: oneshot::Sender<Result<TaskState, RescheduleError>>,
    },
}

/// The id a signature maps to: the same signature always gives the same id.
pub use proto::task_id;

/// The default operation signature: kind, parameters, argv and the hour of the first run,
/// e.g. `vacuum:database=app:table=orders:2026-11-22T03`.
pub fn signature(spec: &TaskSpec, now_ms: i64) -> String {
    let mut parts = vec![spec.kind.name().to_string()];
    parts.extend(spec.params.iter().map(|(k, v)| format!("{k}={v}")));
    parts.extend(spec.argv.iter().cloned());
    match &spec.schedule {
        Schedule::Once { at_ms } => {
            let hour = jiff::Timestamp::from_millisecond(*at_ms)
                .map(|t| t.strftime("%Y-%m-%dT%H").to_string())
                .unwrap_or_default();
            parts.push(hour);
        }
        other => parts.push(other.describe()),
    }
    let _ = now_ms;
    parts.join(":")
}

/// Shared read access for the API (reads never go through the scheduler).
#[derive(Clone)]
pub struct Reader {
    pub world: World,
    pub store: Arc<Mutex<Store>>,
}

impl Reader {
    /// Run `f` on the store on the blocking executor.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, super::store::StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let store = self.store.clone();
        self.world
            .blocking(move || {
                let mut store = store
                    .lock()
                    .map_err(|_| "task store lock poisoned".to_string())?;
                f(&mut store).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
    }
}

/// First and longest wait between attempts to write the task store after a failure.
const COMMIT_RETRY_FIRST: Duration = Duration::from_millis(500);
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(10);

/// Run the task runtime until `shutdown`: recovery, then the scheduling loop, then a
/// shutdown that terminates running groups and records them.
pub async fn run(
    world: World,
    config: RuntimeConfig,
    mut requests: mpsc::Receiver<Request>,
    ready: oneshot::Sender<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = open_store(&world, &config).await?;
    let mut scheduler = Scheduler::new(config.core.clone());
    // When each run in flight started (or was queued), for what is left of its timeout
    // should it have to be adopted again.
    let mut since = BTreeMap::new();
    let adopt = recover(&world, &config, &store, &mut scheduler, &mut since).await?;
    let _ = ready.send(());

    let pool_shutdown = CancellationToken::new();
    let (mut pool_tx, mut events, mut pool) = start_pool(&config, &pool_shutdown);
    for command in adopt {
        let _ = pool_tx.send(command).await;
    }
    let mut last_purge = tokio::time::Instant::now();
    let mut callers_remain = true;
    let mut deferred = DeferredStarts::default();
    loop {
        let mut batch = Vec::new();
        let mut pool_events = Vec::new();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            request = requests.recv(), if callers_remain => match request {
                Some(r) => {
                    batch.push(r);
                    while batch.len() < BATCH_MAX && let Ok(r) = requests.try_recv() {
                        batch.push(r);
                    }
                }
                // Nobody can submit any more; scheduled tasks still run.
                None => callers_remain = false,
            },
            Some(event) = events.recv() => {
                pool_events.push(event);
                while let Ok(e) = events.try_recv() {
                    pool_events.push(e);
                }
            }
            _ = &mut pool => {
                // The pool died; its runs did not (they outlive whoever watches them). A new
                // pool takes them over exactly as a restarted agent would.
                tracing::error!("worker pool stopped unexpectedly; restarting it");
                (pool_tx, events, pool) = start_pool(&config, &pool_shutdown);
                let adopt =
                    take_over(&world, &config, &store, &mut scheduler, &mut since, &shutdown).await?;
                for command in adopt {
                    let _ = pool_tx.send(command).await;
                }
            }
            _ = tokio::time::sleep(wake_in(&world, &scheduler).min(deferred.wait(&world))) => {}
        }
        let now_ms = world.now_unix_ms();
        let only_starts = batch.is_empty()
            && pool_events
                .iter()
                .all(|e| matches!(e, PoolEvent::Started { .. }));
        let (mut effects, started) = from_pool_events(
            &mut scheduler,
            &mut since,
            pool_events,
            now_ms,
            &config.backup_ended,
        );
        let replies = from_requests(&mut scheduler, batch, now_ms, &mut effects);
        let ticked = scheduler.tick(now_ms);
        if only_starts && ticked.is_empty() && deferred.may_wait(now_ms) {
            // Nothing to answer, dispatch or release: the starts wait for the next commit.
            deferred.hold(effects, started, now_ms);
            continue;
        }
        effects.extend(ticked);
        let (effects, started) = deferred.take_before(effects, started);
        let to_pool = pool_commands(&effects);
        note_dispatches(&effects, &mut since, now_ms);
        scheduler.debug_assert_invariants();
        let ended = ended_runs(&effects);
        if !effects.is_empty() || !started.is_empty() {
            // Durable first, then answers and dispatches: nothing unsynced is ever
            // acknowledged. A failed write is retried until it lands or the agent stops.
            commit(&world, &store, now_ms, effects, started, Some(&shutdown)).await?;
        }
        for reply in replies {
            reply();
        }
        dispatch(&pool_tx, to_pool).await;
        // Only now that the ends are durable may their traces go; after the dispatches, so
        // removing ended runs' directories never holds up new runs.
        release(&config, &ended, &mut since).await;
        if last_purge.elapsed() >= PURGE_EVERY {
            last_purge = tokio::time::Instant::now();
            purge_history(&world, &config, &store, &mut scheduler, now_ms).await?;
        }
    }
    // Shutdown: stop the pool and record the ends it still reports. Runs in flight keep
    // running; the next agent adopts them.
    pool_shutdown.cancel();
    drop(pool_tx);
    let now_ms = world.now_unix_ms();
    let effects = last_ends(&mut scheduler, events, pool, now_ms).await;
    let ended = ended_runs(&effects);
    let (effects, started) = deferred.take_before(effects, Vec::new());
    commit(&world, &store, now_ms, effects, started, None).await?;
    release(&config, &ended, &mut since).await;
    let left = scheduler.running();
    if left > 0 {
        tracing::info!(
            runs = left,
            "runs in flight keep running; the next agent start adopts them"
        );
    }
    Ok(())
}

/// What a stopping pool still reports before it ends: the runs that finished meanwhile
/// (those it watched and were still running keep running, for the next agent to adopt).
async fn last_ends(
    scheduler: &mut Scheduler,
    mut events: mpsc::Receiver<PoolEvent>,
    pool: tokio::task::JoinHandle<()>,
    now_ms: i64,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    while let Some(event) = events.recv().await {
        if let PoolEvent::Finished {
            task_id,
            run_id,
            outcome,
        } = event
        {
            effects.extend(scheduler.finish_one(now_ms, &task_id, run_id, outcome));
        }
    }
    let _ = pool.await;
    effects
}

/// Open the task store (moved aside and started empty when it fails its integrity check).
async fn open_store(world: &World, config: &RuntimeConfig) -> anyhow::Result<Arc<Mutex<Store>>> {
    let path = config.db_path.clone();
    let now_ms = world.now_unix_ms();
    let (store, moved) = world
        .blocking(move || Store::open_checked(&path, now_ms))
        .await?
        .with_context(|| format!("open task store {}", config.db_path.display()))?;
    if let Some((to, reason)) = moved {
        tracing::error!(
            moved_to = %to.display(),
            %reason,
            "the task store failed its integrity check and was moved aside; the agent starts with no tasks: re-create them (the control plane's task list shows what they were)"
        );
    }
    Ok(Arc::new(Mutex::new(store)))
}

/// How long the loop may sleep: until the next task is due, capped so that wall-clock jumps
/// are noticed.
/// Runs' starts whose commit waits for the next one that must be durable anyway (an answer, a
/// dispatch, an end), or for [`START_COMMIT_WAIT_MS`]: a start needs no sync of its own,
/// because a recovering agent finds a started run through its keeper's slot, not through the
/// pid in the store. In a drain this halves the commits, one per end instead of two per run.
#[derive(Default)]
struct DeferredStarts {
    effects: Vec<Effect>,
    started: Vec<Started>,
    due_ms: Option<i64>,
}

/// How long a start may wait for its commit (the store shows the run `queued` until then).
const START_COMMIT_WAIT_MS: i64 = 50;

impl DeferredStarts {
    fn may_wait(&self, now_ms: i64) -> bool {
        self.due_ms.is_none_or(|due| now_ms < due)
    }

    fn hold(&mut self, effects: Vec<Effect>, started: Vec<Started>, now_ms: i64) {
        self.effects.extend(effects);
        self.started.extend(started);
        self.due_ms.get_or_insert(now_ms + START_COMMIT_WAIT_MS);
    }

    /// What waits, then `effects` and `started`: one batch, in order.
    fn take_before(
        &mut self,
        effects: Vec<Effect>,
        started: Vec<Started>,
    ) -> (Vec<Effect>, Vec<Started>) {
        self.due_ms = None;
        let mut all = std::mem::take(&mut self.effects);
        all.extend(effects);
        let mut starts = std::mem::take(&mut self.started);
        starts.extend(started);
        (all, starts)
    }

    /// Until the starts must be committed.
    fn wait(&self, world: &World) -> Duration {
        match self.due_ms {
            Some(due) => {
                Duration::from_millis(u64::try_from(due - world.now_unix_ms()).unwrap_or(0))
            }
            None => IDLE_WAKE,
        }
    }
}

fn wake_in(world: &World, scheduler: &Scheduler) -> Duration {
    match scheduler.next_due_ms() {
        Some(at) => Duration::from_millis(u64::try_from(at - world.now_unix_ms()).unwrap_or(0))
            .min(IDLE_WAKE),
        None => IDLE_WAKE,
    }
}

/// After the pool died: look again for every run in flight, as a restarted agent would, and
/// record what ended meanwhile; the pool commands that adopt the runs still running.
async fn take_over(
    world: &World,
    config: &RuntimeConfig,
    store: &Arc<Mutex<Store>>,
    scheduler: &mut Scheduler,
    since: &mut BTreeMap<i64, i64>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<PoolCommand>> {
    let now_ms = world.now_unix_ms();
    let runs = scheduler
        .runs_in_flight()
        .into_iter()
        .filter_map(|(run_id, task_id)| {
            let spec = scheduler.task(&task_id)?.spec.clone();
            Some((
                run_id,
                task_id,
                spec,
                since.get(&run_id).copied().unwrap_or(now_ms),
            ))
        })
        .collect();
    let found = reclaim(config, now_ms, runs, false).await?;
    let mut effects = Vec::new();
    for (run_id, task_id, f) in found.runs {
        effects.extend(scheduler.reclaimed(now_ms, &task_id, run_id, f));
    }
    let ended = ended_runs(&effects);
    commit(world, store, now_ms, effects, found.started, Some(shutdown)).await?;
    release(config, &ended, since).await;
    Ok(found.adopt)
}

/// What the pool reported: the scheduler's effects, and the starts to record with them.
fn from_pool_events(
    scheduler: &mut Scheduler,
    since: &mut BTreeMap<i64, i64>,
    events: Vec<PoolEvent>,
    now_ms: i64,
    backup_ended: &tokio::sync::Notify,
) -> (Vec<Effect>, Vec<Started>) {
    let mut effects = Vec::new();
    let mut started = Vec::new();
    for event in events {
        match event {
            PoolEvent::Started {
                task_id,
                run_id,
                pid,
                pid_start_ticks,
                at_ms,
            } => {
                let started_ms = at_ms.map_or(now_ms, |at| at.min(now_ms));
                since.insert(run_id, started_ms);
                effects.extend(scheduler.started(&task_id, run_id));
                started.push(Started {
                    run_id,
                    started_ms,
                    pid,
                    pid_start_ticks,
                });
            }
            PoolEvent::Finished {
                task_id,
                run_id,
                mut outcome,
            } => {
                if let Some(task) = scheduler.task(&task_id)
                    && task.spec.kind.is_backup()
                    && outcome.exit_code == Some(super::backup::SKIPPED_EXIT)
                {
                    // The role gate declined: the reason is the output's first line.
                    let text = String::from_utf8_lossy(&outcome.output);
                    outcome.status = super::model::status::SKIPPED;
                    outcome.error = Some(text.lines().next().unwrap_or("skipped").to_string());
                } else if outcome.status == super::model::status::FAILED
                    && let Some(task) = scheduler.task(&task_id)
                    && let Some(hint) = task.spec.kind.privilege_hint(&outcome.output)
                {
                    let error = outcome.error.take().unwrap_or_default();
                    outcome.error = Some(format!("{error}; {hint}"));
                }
                if scheduler
                    .task(&task_id)
                    .is_some_and(|t| t.spec.kind.is_backup())
                {
                    backup_ended.notify_one();
                }
                effects.extend(scheduler.finished(now_ms, &task_id, run_id, outcome));
            }
        }
    }
    (effects, started)
}

/// The callers' requests applied to the scheduler (their effects added to `effects`); the
/// answers, to give once the batch is committed.
fn from_requests(
    scheduler: &mut Scheduler,
    batch: Vec<Request>,
    now_ms: i64,
    effects: &mut Vec<Effect>,
) -> Vec<Box<dyn FnOnce() + Send>> {
    let mut replies: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    for request in batch {
        match request {
            Request::Submit { mut spec, reply } => {
                if spec.key.is_empty() {
                    spec.key = signature(&spec, now_ms);
                }
                let id = task_id(&spec.key);
                let result = scheduler.submit(now_ms, id.clone(), spec);
                settle(scheduler, &id, result, reply, effects, &mut replies);
            }
            Request::Reschedule {
                id,
                schedule,
                reply,
            } => {
                let result = scheduler.reschedule(now_ms, &id, schedule);
                settle(scheduler, &id, result, reply, effects, &mut replies);
            }
            Request::Cancel { id, reply } => {
                let result = scheduler.cancel(&id);
                settle(scheduler, &id, result, reply, effects, &mut replies);
            }
        }
    }
    replies
}

/// Forget the history of tasks that ended longer ago than the retention.
async fn purge_history(
    world: &World,
    config: &RuntimeConfig,
    store: &Arc<Mutex<Store>>,
    scheduler: &mut Scheduler,
    now_ms: i64,
) -> anyhow::Result<()> {
    let before = now_ms - i64::try_from(config.history_retention.as_millis()).unwrap_or(i64::MAX);
    let store = store.clone();
    match world
        .blocking(move || {
            store
                .lock()
                .map_err(|_| anyhow::anyhow!("store lock poisoned"))?
                .purge(before)
                .map_err(anyhow::Error::from)
        })
        .await?
    {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(tasks = ids.len(), "purged task history");
            scheduler.forget(&ids);
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "purge task history"),
    }
    Ok(())
}

/// What the pool must do for these effects.
/// Hand the committed dispatches (and kills) to the pool.
async fn dispatch(pool_tx: &mpsc::Sender<PoolCommand>, commands: Vec<PoolCommand>) {
    for command in commands {
        if pool_tx.send(command).await.is_err() {
            tracing::warn!("worker pool queue closed; the run is retried after the pool restarts");
        }
    }
}

fn pool_commands(effects: &[Effect]) -> Vec<PoolCommand> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(job) => Some(PoolCommand::Run(job.clone())),
            Effect::Kill { run_id, .. } => Some(PoolCommand::Kill { run_id: *run_id }),
            _ => None,
        })
        .collect()
}

/// Runs dispatched in this batch are in flight since `now_ms`.
fn note_dispatches(effects: &[Effect], since: &mut BTreeMap<i64, i64>, now_ms: i64) {
    for e in effects {
        if let Effect::Dispatch(job) = e {
            since.insert(job.run_id, now_ms);
        }
    }
}

fn ended_runs(effects: &[Effect]) -> Vec<i64> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::RunEnded { run_id, .. } | Effect::RunWithdrawn { run_id, .. } => Some(*run_id),
            _ => None,
        })
        .collect()
}

/// Forget runs whose end is in the store.
async fn release(config: &RuntimeConfig, runs: &[i64], since: &mut BTreeMap<i64, i64>) {
    for run_id in runs {
        since.remove(run_id);
    }
    if !runs.is_empty() {
        config.pool.processes.release_all(runs.to_vec()).await;
    }
}

/// What [`reclaim`] found.
struct Reclaimed {
    runs: Vec<(i64, String, Found)>,
    /// For the runs still running.
    adopt: Vec<PoolCommand>,
    started: Vec<Started>,
}

/// Look for the processes of runs in flight that nobody watches any more: (run id, task id,
/// spec, when the run started or was queued).
async fn reclaim(
    config: &RuntimeConfig,
    now_ms: i64,
    runs: Vec<(i64, String, TaskSpec, i64)>,
    host_restarted: bool,
) -> anyhow::Result<Reclaimed> {
    let mut out = Reclaimed {
        runs: Vec::new(),
        adopt: Vec::new(),
        started: Vec::new(),
    };
    for (run_id, task_id, spec, since_ms) in runs {
        let left = config
            .pool
            .processes
            .leftover(run_id, config.pool.output_bytes_max, host_restarted)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("recover run {run_id} of task {task_id}"))?;
        let found = match left {
            Leftover::Running { pid, ticks } => {
                let elapsed = u64::try_from(now_ms - since_ms).unwrap_or(0);
                let timeout = u64::try_from(spec.timeout_ms)
                    .unwrap_or(0)
                    .saturating_sub(elapsed);
                tracing::info!(%task_id, run_id, pid, timeout_left_ms = timeout, "adopting a run that outlived the previous agent");
                out.started.push(Started {
                    run_id,
                    started_ms: since_ms,
                    pid,
                    pid_start_ticks: ticks,
                });
                out.adopt.push(PoolCommand::Adopt {
                    job: Job {
                        task_id: task_id.clone(),
                        run_id,
                        spec,
                    },
                    pid,
                    ticks,
                    timeout: Duration::from_millis(timeout),
                });
                Found::Running
            }
            Leftover::Ended(outcome) => {
                tracing::info!(%task_id, run_id, status = super::model::status::name(outcome.status), "a run ended while no agent watched it");
                Found::Ended(outcome)
            }
            Leftover::NeverStarted => {
                tracing::info!(%task_id, run_id, "a run never started before the agent stopped; its task runs again");
                Found::NeverStarted
            }
        };
        out.runs.push((run_id, task_id, found));
    }
    Ok(out)
}

/// A refusal is answered at once (nothing to persist); a success is answered after the
/// batch's commit, with the task as it then is.
fn settle<E: Send + 'static>(
    scheduler: &Scheduler,
    id: &str,
    result: Result<Vec<Effect>, E>,
    reply: oneshot::Sender<Result<TaskState, E>>,
    effects: &mut Vec<Effect>,
    replies: &mut Vec<Box<dyn FnOnce() + Send>>,
) {
    match result {
        Ok(e) => {
            effects.extend(e);
            if let Some(task) = scheduler.task(id).cloned() {
                replies.push(Box::new(move || {
                    let _ = reply.send(Ok(task));
                }));
            }
        }
        Err(e) => {
            let _ = reply.send(Err(e));
        }
    }
}

fn start_pool(
    config: &RuntimeConfig,
    shutdown: &CancellationToken,
) -> (
    mpsc::Sender<PoolCommand>,
    mpsc::Receiver<PoolEvent>,
    tokio::task::JoinHandle<()>,
) {
    let queue = (config.core.concurrency_max + config.core.dispatch_ahead) * 2 + 16;
    let (tx, rx) = mpsc::channel(queue);
    let (events_tx, events) = mpsc::channel(queue);
    let handle = tokio::spawn(pool::run_pool(
        config.pool.clone(),
        config.core.concurrency_max,
        rx,
        events_tx,
        shutdown.clone(),
    ));
    (tx, events, handle)
}

async fn commit(
    world: &World,
    store: &Arc<Mutex<Store>>,
    now_ms: i64,
    effects: Vec<Effect>,
    started: Vec<Started>,
    retry_until: Option<&CancellationToken>,
) -> anyhow::Result<()> {
    let effects = Arc::new(effects);
    let started = Arc::new(started);
    let mut wait = COMMIT_RETRY_FIRST;
    loop {
        let (s, e, st) = (store.clone(), Arc::clone(&effects), Arc::clone(&started));
        let written = world
            .blocking(move || -> anyhow::Result<()> {
                let mut store = s
                    .lock()
                    .map_err(|_| anyhow::anyhow!("task store lock poisoned"))?;
                store.apply(now_ms, &e, &st)?;
                Ok(())
            })
            .await?
            .context("write the task store");
        let error = match (written, retry_until) {
            (Ok(()), _) => return Ok(()),
            (Err(e), None) => return Err(e),
            (Err(e), Some(stop)) if stop.is_cancelled() => return Err(e),
            (Err(e), Some(_)) => e,
        };
        // The transaction rolled back: nothing of it is on disk, so the same write is tried
        // again. Until it lands nobody is answered and nothing is dispatched (a full disk
        // pauses the task runtime; metrics and the terminal go on).
        tracing::error!(error = %format!("{error:#}"), retry_in_ms = wait.as_millis() as u64, "the task store cannot be written (disk full?); the task runtime waits and retries");
        if let Some(stop) = retry_until {
            tokio::select! {
                () = stop.cancelled() => return Err(error),
                () = tokio::time::sleep(wait) => {}
            }
        }
        wait = (wait * 2).min(COMMIT_RETRY_MAX);
    }
}

/// Load the store and take over what the previous agent left; the pool commands that adopt
/// the runs still running (and stop those whose cancellation was asked).
async fn recover(
    world: &World,
    config: &RuntimeConfig,
    store: &Arc<Mutex<Store>>,
    scheduler: &mut Scheduler,
    since: &mut BTreeMap<i64, i64>,
) -> anyhow::Result<Vec<PoolCommand>> {
    let s = store.clone();
    let loaded = world
        .blocking(move || {
            s.lock()
                .map_err(|_| anyhow::anyhow!("task store lock poisoned"))?
                .load()
                .map_err(anyhow::Error::from)
        })
        .await??;
    let now_ms = world.now_unix_ms();
    let runs: Vec<_> = loaded
        .interrupted
        .iter()
        .filter_map(|run| {
            let task = loaded.tasks.iter().find(|t| t.id == run.task_id)?;
            let since_ms = run.started_ms.unwrap_or(run.queued_ms);
            Some((run.run_id, run.task_id.clone(), task.spec.clone(), since_ms))
        })
        .collect();
    // Runs dispatched in an earlier boot of the host died with it.
    let boot_id = config.pool.processes.boot_id();
    let host_restarted =
        matches!((&loaded.boot_id, &boot_id), (Some(then), Some(now)) if then != now);
    if host_restarted && !runs.is_empty() {
        tracing::warn!(
            runs = runs.len(),
            "the host restarted since the agent last ran: the runs it had in flight are recorded aborted"
        );
    }
    let found = reclaim(config, now_ms, runs, host_restarted).await?;
    let mut adopted = Vec::new();
    for command in &found.adopt {
        if let PoolCommand::Adopt { job, .. } = command {
            adopted.push(job.run_id);
        }
    }
    for s in &found.started {
        since.insert(s.run_id, s.started_ms);
    }
    let live = loaded.tasks.len();
    scheduler.remember_ended(loaded.ended);
    let effects = scheduler.recover(now_ms, loaded.tasks, found.runs, loaded.max_run_id);
    scheduler.debug_assert_invariants();
    let mut commands = found.adopt;
    commands.extend(pool_commands(&effects));
    let ended = ended_runs(&effects);
    commit(world, store, now_ms, effects, found.started, None).await?;
    if let Some(boot_id) = boot_id {
        // On disk before anything is dispatched in this boot.
        let s = store.clone();
        world
            .blocking(move || {
                s.lock()
                    .map_err(|_| anyhow::anyhow!("task store lock poisoned"))?
                    .set_boot_id(&boot_id)
                    .map_err(anyhow::Error::from)
            })
            .await??;
    }
    // The ends are durable: forget those runs, and anything else no run in flight accounts for.
    let stopped = config
        .pool
        .processes
        .sweep(adopted.clone(), config.pool.grace)
        .await;
    tracing::info!(
        tasks = live,
        adopted_runs = adopted.len(),
        ended_runs = ended.len(),
        stray_processes_stopped = stopped,
        "task runtime recovered"
    );
    Ok(commands)
}
