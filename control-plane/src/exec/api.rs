//! Fleet exec through the API (the web UI's exec page): `POST /api/v1/exec` starts one
//! command on the selected hosts of the configured inventory; `GET /api/v1/exec/{op_id}` shows
//! each host's outcome and output so far, so a page polling it sees output live.
//!
//! The run is the same supervised SSH execution as `outpost exec`: layered timeouts,
//! classified outcomes, receipts on the hosts, retries only when safe, strict host keys.
//! Runs are written to storage as they happen (the run when it starts, each changed host at
//! most every [`FLUSH_EVERY`], the end), so any replica answers `GET`, also after the replica
//! running it died: a run whose replica stopped writing for [`ABANDONED_AFTER`] is shown
//! ended, its unfinished hosts `uncertain`, and `outpost exec status OP_ID` reconciles them
//! from the receipts on the hosts. The replica running a run keeps it in memory too, for
//! admission and the freshest output.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use remote_exec::fleet::{self, Captured, ErrorBudget, Event, Plan, Pool};
use remote_exec::quote::command_line;
use remote_exec::{Client, HostKeyPolicy, Inventory, OpId, OutputKind, RetryPolicy, Timeouts};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use world::World;

use crate::audit::{Audit, action};
use crate::edge::{ApiError, AuthUser};
use crate::settings::Settings;
use crate::storage::{ExecRunRow, Storage};

/// What the exec routes and their runs use.
#[derive(Clone)]
pub struct ExecContext {
    pub world: World,
    pub settings: Arc<Settings>,
    pub shutdown: CancellationToken,
    /// Runs are spawned here, so shutdown waits for them.
    pub background: TaskTracker,
    pub runs: Runs,
    pub audit: Audit,
    pub storage: Storage,
}

/// How often a running run's changed hosts (and its heartbeat) are written.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// A run not written for this long lost its replica.
pub const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// Exec runs are kept this long.
pub const RUNS_KEPT_MS: i64 = 30 * crate::time::DAY_MS;
/// Runs at once on one replica.
const RUNNING_MAX: usize = 4;
/// Hosts one run works on at once.
const CONCURRENCY: usize = 32;
const ARGV_MAX: usize = 256;
const PATTERN_BYTES_MAX: usize = 1024;

#[derive(Deserialize, schemars::JsonSchema)]
pub struct ExecRequest {
    /// Host selection as in `outpost exec --hosts`: globs, `@group`, `!exclusion` (default `*`).
    #[serde(default)]
    hosts: Option<String>,
    /// The command and its arguments; each reaches the remote program exactly as given.
    argv: Vec<String>,
    /// Safe to run twice: also retry `uncertain` and `timed_out` hosts.
    #[serde(default)]
    idempotent: bool,
    /// Deadline of the command on each host (humantime, default 10m).
    #[serde(default)]
    command_timeout: Option<String>,
    /// Stop starting hosts after N (or P%) failures.
    #[serde(default)]
    max_errors: Option<String>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct Started {
    op_id: String,
    hosts: usize,
}

/// One host of a run in progress here, its output as captured (converted to text whole when
/// shown, so a character split across two chunks stays intact).
#[derive(Clone)]
struct HostView {
    host: String,
    outcome: Option<&'static str>,
    attempts: u32,
    exit_code: Option<i32>,
    error: Option<String>,
    duration_ms: Option<u64>,
    stdout: Captured,
    stderr: Captured,
}

/// A run in progress on this replica, with the hosts changed since its last write.
#[derive(Clone)]
struct LiveRun {
    op_id: String,
    user: String,
    argv: Vec<String>,
    started_ms: i64,
    hosts: Vec<HostView>,
    dirty: std::collections::BTreeSet<String>,
}

/// What a run was asked to do, as stored (its hosts are rows of their own).
#[derive(Serialize, Deserialize)]
struct StoredRun {
    user: String,
    argv: Vec<String>,
}

/// One host of a run, as `GET` shows it and storage keeps it.
#[derive(Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HostOut {
    host: String,
    /// `null` while it runs; then `ok`, `command_failed`, `not_started`, `uncertain`, `timed_out`.
    outcome: Option<String>,
    attempts: u32,
    exit_code: Option<i32>,
    error: Option<String>,
    duration_ms: Option<u64>,
    /// Output as text (invalid UTF-8 replaced).
    stdout: String,
    stderr: String,
    /// Output bytes beyond what is kept per stream, both streams.
    truncated_bytes: u64,
}

impl HostOut {
    fn of(h: &HostView) -> HostOut {
        HostOut {
            host: h.host.clone(),
            outcome: h.outcome.map(str::to_string),
            attempts: h.attempts,
            exit_code: h.exit_code,
            error: h.error.clone(),
            duration_ms: h.duration_ms,
            stdout: String::from_utf8_lossy(&h.stdout.bytes).into_owned(),
            stderr: String::from_utf8_lossy(&h.stderr.bytes).into_owned(),
            truncated_bytes: h.stdout.truncated_bytes + h.stderr.truncated_bytes,
        }
    }
}

#[derive(Clone, Serialize, schemars::JsonSchema)]
pub struct RunView {
    op_id: String,
    user: String,
    argv: Vec<String>,
    started_at: String,
    finished: bool,
    /// The replica running it stopped before it ended: its unfinished hosts are `uncertain`
    /// (`outpost exec status OP_ID` reads what the hosts' receipts say).
    abandoned: bool,
    hosts: Vec<HostOut>,
}

impl LiveRun {
    fn view(&self) -> RunView {
        RunView {
            op_id: self.op_id.clone(),
            user: self.user.clone(),
            argv: self.argv.clone(),
            started_at: crate::time::rfc3339_ms(self.started_ms),
            finished: false,
            abandoned: false,
            hosts: self.hosts.iter().map(HostOut::of).collect(),
        }
    }

    /// The write that brings storage up to date: the changed hosts (all of them when
    /// `finished_ms` is given), which are then no longer changed.
    fn take_write(&mut self, now_ms: i64, finished_ms: Option<i64>) -> ExecRunRow {
        let hosts = self
            .hosts
            .iter()
            .filter(|h| finished_ms.is_some() || self.dirty.contains(&h.host))
            .map(|h| {
                let json = serde_json::to_string(&HostOut::of(h)).unwrap_or_default();
                (h.host.clone(), json)
            })
            .collect();
        self.dirty.clear();
        ExecRunRow {
            op_id: self.op_id.clone(),
            run: serde_json::to_string(&StoredRun {
                user: self.user.clone(),
                argv: self.argv.clone(),
            })
            .unwrap_or_default(),
            started_ms: self.started_ms,
            updated_ms: now_ms,
            finished_ms,
            hosts,
        }
    }
}

/// A stored run as `GET` shows it; `now_ms` decides whether it was abandoned.
fn stored_view(row: ExecRunRow, now_ms: i64) -> RunView {
    let asked: StoredRun = serde_json::from_str(&row.run).unwrap_or(StoredRun {
        user: String::new(),
        argv: Vec::new(),
    });
    let abandoned = row.finished_ms.is_none()
        && now_ms.saturating_sub(row.updated_ms) > ABANDONED_AFTER.as_millis() as i64;
    let hosts = row
        .hosts
        .iter()
        .filter_map(|(_, json)| serde_json::from_str::<HostOut>(json).ok())
        .map(|mut h| {
            if abandoned && h.outcome.is_none() {
                h.outcome = Some("uncertain".into());
                h.error = Some(format!(
                    "the replica running this stopped before the host finished; `outpost exec status {}` reads the host's receipt",
                    row.op_id
                ));
            }
            h
        })
        .collect();
    RunView {
        op_id: row.op_id,
        user: asked.user,
        argv: asked.argv,
        started_at: crate::time::rfc3339_ms(row.started_ms),
        finished: row.finished_ms.is_some() || abandoned,
        abandoned,
        hosts,
    }
}

/// Runs in progress on this replica, by op id.
#[derive(Clone, Default)]
pub struct Runs(Arc<Mutex<BTreeMap<String, LiveRun>>>);

impl Runs {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, LiveRun>) -> T) -> T {
        let mut runs = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut runs)
    }

    fn host(&self, op_id: &str, host: &str, f: impl FnOnce(&mut HostView)) {
        self.with(|runs| {
            if let Some(run) = runs.get_mut(op_id)
                && let Some(h) = run.hosts.iter_mut().find(|h| h.host == host)
            {
                f(h);
                run.dirty.insert(host.to_string());
            }
        });
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// `POST /api/v1/exec` → 202 `{op_id, hosts}`.
pub async fn start(
    State(state): State<ExecContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Json(request): Json<ExecRequest>,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    let Some(inventory) = state.settings.inventory.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no inventory is configured: start `outpost serve --inventory FILE` to run commands from here",
        ));
    };
    if request.argv.is_empty() || request.argv.len() > ARGV_MAX {
        return Err(bad(format!("argv: give 1-{ARGV_MAX} arguments")));
    }
    let pattern = request.hosts.unwrap_or_else(|| "*".to_string());
    if pattern.len() > PATTERN_BYTES_MAX {
        return Err(bad("hosts: pattern too long"));
    }
    let command = command_line(&request.argv).map_err(|e| bad(format!("argv: {e}")))?;
    let command_timeout = match &request.command_timeout {
        Some(v) => super::duration_flag("command_timeout", v).map_err(|e| bad(e.to_string()))?,
        None => Timeouts::default().command,
    };
    let budget = match &request.max_errors {
        Some(v) => ErrorBudget::parse(v).map_err(|e| bad(format!("max_errors: {e}")))?,
        None => ErrorBudget::Unlimited,
    };
    let hosts = select_hosts(&state.world, inventory, &pattern).await?;
    let client = client_for(&state.world, command_timeout, &hosts)?;
    let op_id = OpId::generate(&state.world);
    let now_ms = state.world.now_unix_ms();
    let mut live = new_run(&op_id, &user.name, &request.argv, &hosts, now_ms);
    let first_write = live.take_write(now_ms, None);
    admit(&state.runs, live)?;
    // On record before it starts: every replica can answer for it from here on.
    if let Err(e) = state.storage.exec_write(first_write).await {
        state.runs.with(|runs| runs.remove(op_id.as_str()));
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the run could not be recorded, so it was not started: {e}"),
        ));
    }
    state
        .audit
        .record(
            &user.name,
            action::EXEC_RUN,
            op_id.as_str(),
            serde_json::json!({"hosts": pattern, "host_count": hosts.len(), "argv": request.argv}),
        )
        .await;
    let plan = Arc::new(Plan {
        op_id: op_id.clone(),
        command,
        receipts: true,
        concurrency: CONCURRENCY,
        budget,
        retry: RetryPolicy {
            idempotent: request.idempotent,
            ..RetryPolicy::default()
        },
        output_bytes_max: fleet::OUTPUT_BYTES_MAX,
    });
    let count = hosts.len();
    let background = state.background.clone();
    background.spawn(run(state, user.name, op_id.clone(), plan, client, hosts));
    Ok((
        StatusCode::ACCEPTED,
        Json(Started {
            op_id: op_id.to_string(),
            hosts: count,
        }),
    ))
}

/// The inventory's hosts that `pattern` selects, read afresh (an edited file counts at once).
async fn select_hosts(
    world: &World,
    inventory: std::path::PathBuf,
    pattern: &str,
) -> Result<Vec<remote_exec::Host>, ApiError> {
    world
        .blocking(move || Inventory::load(&inventory).map_err(|e| e.to_string()))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("inventory: {e}")))?
        .select(pattern)
        .map_err(|e| bad(format!("hosts: {e}")))
}

/// An SSH client holding every selected host's key, verifying host keys strictly.
fn client_for(
    world: &World,
    command_timeout: std::time::Duration,
    hosts: &[remote_exec::Host],
) -> Result<Arc<Client>, ApiError> {
    let client = Arc::new(Client::new(
        world.clone(),
        Timeouts {
            command: command_timeout,
            ..Timeouts::default()
        },
        HostKeyPolicy::Strict,
    ));
    for h in hosts {
        client.load_key(&h.identity_file).map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("host {}: {e}", h.name),
            )
        })?;
    }
    Ok(client)
}

/// A run before any host answered.
fn new_run(
    op_id: &OpId,
    user: &str,
    argv: &[String],
    hosts: &[remote_exec::Host],
    now_ms: i64,
) -> LiveRun {
    LiveRun {
        op_id: op_id.to_string(),
        user: user.to_string(),
        argv: argv.to_vec(),
        started_ms: now_ms,
        hosts: hosts
            .iter()
            .map(|h| HostView {
                host: h.name.clone(),
                outcome: None,
                attempts: 0,
                exit_code: None,
                error: None,
                duration_ms: None,
                stdout: Captured::default(),
                stderr: Captured::default(),
            })
            .collect(),
        // The first write holds every host.
        dirty: hosts.iter().map(|h| h.name.clone()).collect(),
    }
}

/// Keep `run` among the runs in progress here, unless [`RUNNING_MAX`] are.
fn admit(runs: &Runs, run: LiveRun) -> Result<(), ApiError> {
    let admitted = runs.with(|runs| {
        if runs.len() >= RUNNING_MAX {
            return false;
        }
        runs.insert(run.op_id.clone(), run);
        true
    });
    if admitted {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{RUNNING_MAX} exec runs are already in progress here; wait for one to finish"),
        ))
    }
}

/// The run itself: progress events update the view as they come, a writer brings storage up
/// to date every [`FLUSH_EVERY`], and the end is written with every host's final word.
async fn run(
    state: ExecContext,
    user: String,
    op_id: OpId,
    plan: Arc<Plan>,
    client: Arc<Client>,
    hosts: Vec<remote_exec::Host>,
) {
    let runs = state.runs.clone();
    let id = op_id.to_string();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let progress = {
        let runs = runs.clone();
        let id = id.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                match event {
                    Event::Started { host, attempt } => {
                        runs.host(&id, &host, |h| h.attempts = attempt);
                    }
                    Event::Output { host, kind, bytes } => runs.host(&id, &host, |h| {
                        let out = match kind {
                            OutputKind::Stdout => &mut h.stdout,
                            OutputKind::Stderr => &mut h.stderr,
                        };
                        out.push(&bytes, fleet::OUTPUT_BYTES_MAX);
                    }),
                    Event::Finished(r) => runs.host(&id, &r.host.clone(), |h| finish(h, &r)),
                }
            }
        })
    };
    let writing = CancellationToken::new();
    let writer = tokio::spawn(write_while_running(
        state.clone(),
        id.clone(),
        writing.clone(),
    ));
    let pool = Arc::new(Pool::new(client));
    // Ends with the control plane: running commands get TERM, no more hosts start.
    let cancel: CancellationToken = state.shutdown.child_token();
    let (results, summary) = fleet::run(pool.clone(), hosts, plan, Some(tx), cancel).await;
    let _ = progress.await;
    writing.cancel();
    let _ = writer.await;
    pool.close().await;
    // The final word per host: the results hold the whole captured output.
    let now_ms = state.world.now_unix_ms();
    let last = runs.with(|all| {
        let run = all.get_mut(&id)?;
        for r in &results {
            if let Some(h) = run.hosts.iter_mut().find(|h| h.host == r.host) {
                finish(h, r);
            }
        }
        Some(run.take_write(now_ms, Some(now_ms)))
    });
    if let Some(last) = last {
        write_end(&state, last).await;
    }
    runs.with(|all| all.remove(&id));
    let by_outcome: BTreeMap<&str, usize> = summary
        .by_outcome
        .iter()
        .map(|(o, n)| (o.as_str(), *n))
        .collect();
    state
        .audit
        .record(
            &user,
            action::EXEC_FINISHED,
            &id,
            serde_json::json!({"outcomes": by_outcome, "skipped": summary.skipped}),
        )
        .await;
}

/// A host's final word: outcome, attempts, exit code, error, duration and all its output.
fn finish(h: &mut HostView, r: &fleet::HostResult) {
    h.outcome = Some(r.report.outcome.as_str());
    h.attempts = r.attempts;
    h.exit_code = r.report.exit_code;
    h.error = r.report.error.clone();
    h.duration_ms = u64::try_from(r.report.elapsed.as_millis()).ok();
    h.stdout = r.stdout.clone();
    h.stderr = r.stderr.clone();
}

/// Every [`FLUSH_EVERY`] while the run goes: its changed hosts and its heartbeat. A failed
/// write leaves the hosts changed, for the next one.
async fn write_while_running(state: ExecContext, id: String, done: CancellationToken) {
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(FLUSH_EVERY) => {}
        }
        let now_ms = state.world.now_unix_ms();
        let Some(write) = state
            .runs
            .with(|all| all.get_mut(&id).map(|r| r.take_write(now_ms, None)))
        else {
            return;
        };
        let changed: Vec<String> = write.hosts.iter().map(|(h, _)| h.clone()).collect();
        if let Err(e) = state.storage.exec_write(write).await {
            tracing::warn!(op_id = %id, error = %e, "exec run progress not written; trying again");
            state.runs.with(|all| {
                if let Some(r) = all.get_mut(&id) {
                    r.dirty.extend(changed);
                }
            });
        }
    }
}

/// The end of a run, written until it lands (storage may be away for a while); given up only
/// when the control plane stops, and then the run reads as abandoned.
async fn write_end(state: &ExecContext, last: ExecRunRow) {
    let mut wait = std::time::Duration::from_millis(200);
    loop {
        match state.storage.exec_write(last.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(op_id = %last.op_id, error = %e, "exec run end not written; trying again");
            }
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(10));
    }
}

/// `GET /api/v1/exec/{op_id}`: from memory when it runs here, else from storage.
pub async fn show(
    State(state): State<ExecContext>,
    Path(op_id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    if let Some(view) = state.runs.with(|runs| runs.get(&op_id).map(LiveRun::view)) {
        return Ok(Json(view));
    }
    match state
        .storage
        .exec_read(&op_id)
        .await
        .map_err(ApiError::internal)?
    {
        Some(row) => Ok(Json(stored_view(row, state.world.now_unix_ms()))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no exec run {op_id} (runs are kept 30 days); `outpost exec status {op_id}` reads the hosts' receipts"
            ),
        )),
    }
}
