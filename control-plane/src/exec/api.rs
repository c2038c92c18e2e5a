//! Fleet exec through the API (the web UI's exec page): `POST /api/v1/exec` starts one
//! command on the selected hosts of the configured inventory; `GET /api/v1/exec/{op_id}` shows
//! each host's outcome and output so far, so a page polling it sees output live.
//!
//! The run is the same supervised SSH execution as `outpost exec`: layered timeouts,
//! classified outcomes, receipts on the hosts, retries only when safe, strict host keys.
//! Runs live in this replica's memory (the last [`RUNS_KEPT`]); the receipts on the hosts and
//! the audit log are the durable record, and `outpost exec status OP_ID` reads the receipts.

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
}

/// Finished runs kept for `GET`; the oldest finished run goes first.
pub const RUNS_KEPT: usize = 50;
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

/// One host of a run, as the page shows it.
#[derive(Clone, Serialize, schemars::JsonSchema)]
pub struct HostView {
    host: String,
    /// `null` while it runs; then `ok`, `command_failed`, `not_started`, `uncertain`, `timed_out`.
    outcome: Option<&'static str>,
    attempts: u32,
    exit_code: Option<i32>,
    error: Option<String>,
    duration_ms: Option<u64>,
    #[serde(serialize_with = "text")]
    #[schemars(with = "String")]
    stdout: Captured,
    #[serde(serialize_with = "text")]
    #[schemars(with = "String")]
    stderr: Captured,
    /// Output bytes beyond what is kept per stream, both streams (derived from them in `show`).
    truncated_bytes: u64,
}

/// Captured output as text (invalid UTF-8 replaced), converted whole so a character split
/// across two chunks stays intact.
fn text<S: serde::Serializer>(out: &Captured, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&String::from_utf8_lossy(&out.bytes))
}

#[derive(Clone, Serialize, schemars::JsonSchema)]
pub struct RunView {
    op_id: String,
    user: String,
    argv: Vec<String>,
    started_at: String,
    finished: bool,
    hosts: Vec<HostView>,
}

/// Runs started through this replica, by op id.
#[derive(Clone, Default)]
pub struct Runs(Arc<Mutex<BTreeMap<String, RunView>>>);

impl Runs {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, RunView>) -> T) -> T {
        let mut runs = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut runs)
    }

    fn host(&self, op_id: &str, host: &str, f: impl FnOnce(&mut HostView)) {
        self.with(|runs| {
            if let Some(h) = runs
                .get_mut(op_id)
                .and_then(|r| r.hosts.iter_mut().find(|h| h.host == host))
            {
                f(h);
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
    admit(
        &state.runs,
        new_view(&op_id, &user.name, &request.argv, &hosts, now_ms),
    )?;
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

/// A run's view before any host answered.
fn new_view(
    op_id: &OpId,
    user: &str,
    argv: &[String],
    hosts: &[remote_exec::Host],
    now_ms: i64,
) -> RunView {
    RunView {
        op_id: op_id.to_string(),
        user: user.to_string(),
        argv: argv.to_vec(),
        started_at: crate::time::rfc3339_ms(now_ms),
        finished: false,
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
                truncated_bytes: 0,
            })
            .collect(),
    }
}

/// Keep `view` among the runs, unless [`RUNNING_MAX`] are in progress; the oldest finished
/// runs make room beyond [`RUNS_KEPT`].
fn admit(runs: &Runs, view: RunView) -> Result<(), ApiError> {
    let admitted = runs.with(|runs| {
        if runs.values().filter(|r| !r.finished).count() >= RUNNING_MAX {
            return false;
        }
        while runs.len() >= RUNS_KEPT {
            let Some(oldest) = runs
                .values()
                .filter(|r| r.finished)
                .min_by(|a, b| a.started_at.cmp(&b.started_at))
                .map(|r| r.op_id.clone())
            else {
                break;
            };
            runs.remove(&oldest);
        }
        runs.insert(view.op_id.clone(), view);
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

/// The run itself: progress events update the view as they come.
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
                    Event::Finished(_) => {}
                }
            }
        })
    };
    let pool = Arc::new(Pool::new(client));
    // Ends with the control plane: running commands get TERM, no more hosts start.
    let cancel: CancellationToken = state.shutdown.child_token();
    let (results, summary) = fleet::run(pool.clone(), hosts, plan, Some(tx), cancel).await;
    let _ = progress.await;
    pool.close().await;
    // The final word per host: the results hold the whole captured output.
    runs.with(|all| {
        if let Some(view) = all.get_mut(&id) {
            for r in &results {
                if let Some(h) = view.hosts.iter_mut().find(|h| h.host == r.host) {
                    h.outcome = Some(r.report.outcome.as_str());
                    h.attempts = r.attempts;
                    h.exit_code = r.report.exit_code;
                    h.error = r.report.error.clone();
                    h.duration_ms = u64::try_from(r.report.elapsed.as_millis()).ok();
                    h.stdout = r.stdout.clone();
                    h.stderr = r.stderr.clone();
                }
            }
            view.finished = true;
        }
    });
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

/// `GET /api/v1/exec/{op_id}`.
pub async fn show(
    State(state): State<ExecContext>,
    Path(op_id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    state
        .runs
        .with(|runs| runs.get(&op_id).cloned())
        .map(|mut run| {
            for h in &mut run.hosts {
                h.truncated_bytes = h.stdout.truncated_bytes + h.stderr.truncated_bytes;
            }
            Json(run)
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no exec run {op_id} on this control plane (runs are kept in memory, the last {RUNS_KEPT}); `outpost exec status {op_id}` reads the hosts' receipts"
                ),
            )
        })
}
