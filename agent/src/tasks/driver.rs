//! The scheduler actor: owns the sans-IO core and the store, batches requests and pool
//! events, commits each batch's effects in one transaction (group commit), and only then
//! answers callers and hands runs to the pool. Recovery at start-up terminates runs a
//! previous agent left behind (pid + start time) before recording them `aborted`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use world::World;

use super::core::{self, CancelError, Effect, RescheduleError, Scheduler, SubmitError, TaskState};
use super::model::{Schedule, TaskSpec};
use super::pool::{self, PoolCommand, PoolConfig, PoolEvent};
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
pub fn task_id(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("t_{}", hex_lower(&digest[..8]))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

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

/// Run the task runtime until `shutdown`: recovery, then the scheduling loop, then a
/// shutdown that terminates running groups and records them.
pub async fn run(
    world: World,
    config: RuntimeConfig,
    mut requests: mpsc::Receiver<Request>,
    ready: oneshot::Sender<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let path = config.db_path.clone();
    let store = world
        .blocking(move || Store::open(&path))
        .await?
        .with_context(|| format!("open task store {}", config.db_path.display()))?;
    let store = Arc::new(Mutex::new(store));
    let mut scheduler = Scheduler::new(config.core.clone());
    recover(&world, &config, &store, &mut scheduler).await?;
    let _ = ready.send(());

    let pool_shutdown = CancellationToken::new();
    let (mut pool_tx, mut events, mut pool) = start_pool(&config, &pool_shutdown);
    let mut last_purge = tokio::time::Instant::now();
    let mut callers_remain = true;
    // Processes of the runs in flight, to stop them if the pool that owns them dies.
    let mut pids: std::collections::BTreeMap<i64, (i32, Option<u64>)> =
        std::collections::BTreeMap::new();
    loop {
        let mut batch = Vec::new();
        let mut pool_events = Vec::new();
        // Sleep until the next task is due (capped, so wall-clock jumps are noticed).
        let wake_in = match scheduler.next_due_ms() {
            Some(at) => Duration::from_millis(u64::try_from(at - world.now_unix_ms()).unwrap_or(0))
                .min(IDLE_WAKE),
            None => IDLE_WAKE,
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            request = requests.recv(), if callers_remain => match request {
                Some(r) => {
                    batch.push(r);
                    while batch.len() < BATCH_MAX {
                        match requests.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
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
                // The pool died: the scheduler carries on, ends what it was running, restarts it.
                tracing::error!("worker pool stopped unexpectedly; restarting it");
                // Its children outlive it: stop them before recording their runs aborted.
                for (run_id, (pid, ticks)) in std::mem::take(&mut pids) {
                    if config.pool.processes.alive(pid, ticks) {
                        tracing::warn!(run_id, pid, "terminating a run of the dead worker pool");
                        config.pool.processes.terminate(pid, ticks, config.pool.grace).await;
                    }
                }
                let now_ms = world.now_unix_ms();
                let effects = scheduler.abort_running(now_ms, "the worker pool stopped; run aborted");
                commit(&world, &store, now_ms, effects, Vec::new()).await?;
                (pool_tx, events, pool) = start_pool(&config, &pool_shutdown);
            }
            _ = tokio::time::sleep(wake_in) => {}
        }
        let now_ms = world.now_unix_ms();
        let mut effects = Vec::new();
        let mut started = Vec::new();
        for event in pool_events {
            match event {
                PoolEvent::Started {
                    task_id,
                    run_id,
                    pid,
                    pid_start_ticks,
                } => {
                    pids.insert(run_id, (pid, pid_start_ticks));
                    effects.extend(scheduler.started(&task_id, run_id));
                    started.push(Started {
                        run_id,
                        started_ms: now_ms,
                        pid,
                        pid_start_ticks,
                    });
                }
                PoolEvent::Finished {
                    task_id,
                    run_id,
                    outcome,
                } => {
                    pids.remove(&run_id);
                    effects.extend(scheduler.finished(now_ms, &task_id, run_id, outcome));
                }
            }
        }
        let mut replies: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
        for request in batch {
            match request {
                Request::Submit { mut spec, reply } => {
                    if spec.key.is_empty() {
                        spec.key = signature(&spec, now_ms);
                    }
                    let id = task_id(&spec.key);
                    let result = scheduler.submit(now_ms, id.clone(), spec);
                    settle(&scheduler, &id, result, reply, &mut effects, &mut replies);
                }
                Request::Reschedule {
                    id,
                    schedule,
                    reply,
                } => {
                    let result = scheduler.reschedule(now_ms, &id, schedule);
                    settle(&scheduler, &id, result, reply, &mut effects, &mut replies);
                }
                Request::Cancel { id, reply } => {
                    let result = scheduler.cancel(&id);
                    settle(&scheduler, &id, result, reply, &mut effects, &mut replies);
                }
            }
        }
        effects.extend(scheduler.tick(now_ms));
        let to_pool: Vec<PoolCommand> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Dispatch(job) => Some(PoolCommand::Run(job.clone())),
                Effect::Kill { run_id, .. } => Some(PoolCommand::Kill { run_id: *run_id }),
                _ => None,
            })
            .collect();
        if !effects.is_empty() || !started.is_empty() {
            // Durable first, then answers and dispatches. A failed write stops the runtime:
            // nothing unsynced is ever acknowledged, and a restart recovers from disk.
            commit(&world, &store, now_ms, effects, started).await?;
        }
        for reply in replies {
            reply();
        }
        for command in to_pool {
            if pool_tx.send(command).await.is_err() {
                tracing::warn!(
                    "worker pool queue closed; the run is retried after the pool restarts"
                );
            }
        }
        if last_purge.elapsed() >= PURGE_EVERY {
            last_purge = tokio::time::Instant::now();
            let before =
                now_ms - i64::try_from(config.history_retention.as_millis()).unwrap_or(i64::MAX);
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
        }
    }
    // Shutdown: stop the pool (it terminates running groups) and record what it reports.
    pool_shutdown.cancel();
    drop(pool_tx);
    let mut effects = Vec::new();
    let now_ms = world.now_unix_ms();
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
    commit(&world, &store, now_ms, effects, Vec::new()).await?;
    Ok(())
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
    let queue = config.core.concurrency_max * 2 + 16;
    let (tx, rx) = mpsc::channel(queue);
    let (events_tx, events) = mpsc::channel(queue);
    let handle = tokio::spawn(pool::run_pool(
        config.pool.clone(),
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
) -> anyhow::Result<()> {
    let store = store.clone();
    world
        .blocking(move || -> anyhow::Result<()> {
            let mut store = store
                .lock()
                .map_err(|_| anyhow::anyhow!("task store lock poisoned"))?;
            store.apply(now_ms, &effects, &started)?;
            Ok(())
        })
        .await?
        .context("write the task store")
}

async fn recover(
    world: &World,
    config: &RuntimeConfig,
    store: &Arc<Mutex<Store>>,
    scheduler: &mut Scheduler,
) -> anyhow::Result<()> {
    let s = store.clone();
    let loaded = world
        .blocking(move || {
            s.lock()
                .map_err(|_| anyhow::anyhow!("task store lock poisoned"))?
                .load()
                .map_err(anyhow::Error::from)
        })
        .await??;
    for run in &loaded.interrupted {
        if let Some(pid) = run.pid
            && config.pool.processes.alive(pid, run.pid_start_ticks)
        {
            tracing::warn!(task_id = %run.task_id, run_id = run.run_id, pid, "a run from before the restart is still running; terminating its process group");
            config
                .pool
                .processes
                .terminate(pid, run.pid_start_ticks, config.pool.grace)
                .await;
        }
    }
    let now_ms = world.now_unix_ms();
    let interrupted = loaded
        .interrupted
        .iter()
        .map(|r| (r.run_id, r.task_id.clone()))
        .collect();
    let live = loaded.tasks.len();
    scheduler.remember_ended(loaded.ended);
    let effects = scheduler.recover(now_ms, loaded.tasks, interrupted, loaded.max_run_id);
    let aborted = effects
        .iter()
        .filter(|e| matches!(e, Effect::RunEnded { .. }))
        .count();
    commit(world, store, now_ms, effects, Vec::new()).await?;
    tracing::info!(
        tasks = live,
        aborted_runs = aborted,
        "task runtime recovered"
    );
    Ok(())
}
