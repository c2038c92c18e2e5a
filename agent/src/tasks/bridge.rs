//! The one way into the task runtime for every caller: the local socket API ([`super::api`])
//! and the control channel (`crate::link`). A request is validated into a spec here, sent
//! to the scheduler, and its answer shown as the task with its runs; the durable outbox of
//! task changes is read and acknowledged here for the control plane.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::core::{CancelError, RescheduleError, SubmitError, TaskState};
use super::cron::Cron;
use super::driver::{Reader, Request as SchedulerRequest};
use super::model::{KINDS, Kind, Schedule, TaskSpec, Window, status};
use super::policy::TaskPolicy;

/// Limits on what a request may carry.
const PARAM_BYTES_MAX: usize = 4096;
const KEY_BYTES_MAX: usize = 256;
const ARGV_ITEMS_MAX: usize = 256;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
const TIMEOUT_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

pub use proto::{RunSnapshot as RunView, TaskRequest as AddRequest, TaskSnapshot as TaskView};

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_default()
}

fn parse_duration(field: &str, v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v)
        .map_err(|_| format!("{field}: {v:?} is not a duration (examples: 30s, 10m, 6h)"))
}

/// The schedule fields of a request (`at`, `in`, `every`, `cron` + `tz`); none means now.
pub fn schedule_from(req: &AddRequest, now_ms: i64) -> Result<Schedule, String> {
    let chosen = [
        req.at.is_some(),
        req.in_.is_some(),
        req.every.is_some(),
        req.cron.is_some(),
    ];
    if chosen.iter().filter(|c| **c).count() > 1 {
        return Err("give at most one of --at, --in, --every, --cron".into());
    }
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let schedule = if let Some(at) = &req.at {
        let t: jiff::Timestamp = at.parse().map_err(|_| {
            format!("--at: {at:?} is not an RFC 3339 time (example: 2026-11-22T03:00:00Z)")
        })?;
        Schedule::Once {
            at_ms: t.as_millisecond(),
        }
    } else if let Some(d) = &req.in_ {
        Schedule::Once {
            at_ms: now_ms.saturating_add(ms(parse_duration("--in", d)?)),
        }
    } else if let Some(d) = &req.every {
        let interval = parse_duration("--every", d)?;
        if interval < Duration::from_secs(1) {
            return Err("--every must be at least 1s".into());
        }
        Schedule::Every {
            interval_ms: ms(interval),
            first_ms: now_ms,
        }
    } else if let Some(expr) = &req.cron {
        let tz = req.tz.clone().unwrap_or_else(|| "UTC".to_string());
        Cron::parse(expr, &tz).map_err(|e| format!("--cron: {e}"))?;
        Schedule::Cron {
            expr: expr.clone(),
            tz,
        }
    } else {
        Schedule::Once { at_ms: now_ms }
    };
    if req.tz.is_some() && req.cron.is_none() {
        return Err("--tz goes with --cron".into());
    }
    Ok(schedule)
}

/// Validate a request into a spec; every refusal names what is wrong.
pub fn spec_from_request(
    req: AddRequest,
    now_ms: i64,
    has_postgres: bool,
    policy: &TaskPolicy,
) -> Result<TaskSpec, String> {
    let kind = Kind::parse(&req.kind).ok_or_else(|| {
        let known: Vec<&str> = KINDS.iter().map(|k| k.name()).collect();
        format!(
            "unknown kind {:?}; use one of: {}",
            req.kind,
            known.join(", ")
        )
    })?;
    let (required, accepted) = kind.params();
    for name in required {
        if !req.params.contains_key(*name) {
            return Err(format!("{} needs --param {name}=…", kind.name()));
        }
    }
    for (name, value) in &req.params {
        if !accepted.contains(&name.as_str()) {
            return Err(format!(
                "{} does not take parameter {name:?} (it takes: {})",
                kind.name(),
                accepted.join(", ")
            ));
        }
        if value.len() > PARAM_BYTES_MAX {
            return Err(format!(
                "parameter {name} is longer than {PARAM_BYTES_MAX} bytes"
            ));
        }
    }
    if kind == Kind::Command {
        if req.argv.is_empty() {
            return Err("command needs the program and its arguments after --".into());
        }
        if req.argv.len() > ARGV_ITEMS_MAX || req.argv.iter().any(|a| a.len() > PARAM_BYTES_MAX) {
            return Err(format!(
                "argv is limited to {ARGV_ITEMS_MAX} arguments of {PARAM_BYTES_MAX} bytes"
            ));
        }
    } else if !req.argv.is_empty() {
        return Err(format!("{} takes no argv; only command does", kind.name()));
    }
    if kind == Kind::PgDump
        && let Some(path) = req.params.get("path")
    {
        policy.check_dump_path(path)?;
    }
    if kind.is_backup() {
        super::backup::check(policy.backups.as_ref(), kind, &req.params)?;
    }
    if matches!(
        kind,
        Kind::Vacuum | Kind::Analyze | Kind::HealthCheck | Kind::PgDump | Kind::Sql
    ) && !has_postgres
    {
        return Err(format!(
            "{} needs a Postgres connection: start the agent with --postgres",
            kind.name()
        ));
    }
    if let Some(v) = req.params.get("older_than") {
        parse_duration("older_than", v)?;
    }
    let schedule = schedule_from(&req, now_ms)?;
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let timeout = match &req.timeout {
        Some(t) => parse_duration("--timeout", t)?,
        None => DEFAULT_TIMEOUT,
    };
    if timeout.is_zero() || timeout > TIMEOUT_MAX {
        return Err("--timeout must be between 1s and 7d".into());
    }
    let key = req.key.unwrap_or_default();
    if key.len() > KEY_BYTES_MAX {
        return Err(format!("--key is longer than {KEY_BYTES_MAX} bytes"));
    }
    let window = req.window.as_ref().map(window_from).transpose()?;
    Ok(TaskSpec {
        kind,
        params: req.params,
        argv: req.argv,
        schedule,
        timeout_ms: ms(timeout),
        key,
        window,
        critical: req.critical,
    })
}

/// A request's window, checked; every field is needed here (the control plane fills them in
/// from a window's name).
fn window_from(w: &proto::TaskWindow) -> Result<Window, String> {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let (Some(cron), Some(duration)) = (&w.cron, &w.duration) else {
        return Err(format!(
            "window {:?} needs its cron and duration here (through the control plane, its name is enough)",
            w.name
        ));
    };
    let window = Window {
        name: w.name.clone(),
        cron: cron.clone(),
        tz: w.tz.clone().unwrap_or_else(|| "UTC".to_string()),
        duration_ms: ms(parse_duration("window duration", duration)?),
        cutoff_ms: match &w.cutoff {
            Some(c) => ms(parse_duration("window cutoff", c)?),
            None => 0,
        },
        grace_ms: match &w.grace {
            Some(g) => Some(ms(parse_duration("window grace", g)?)),
            None => None,
        },
    };
    window.check()?;
    Ok(window)
}

/// A task with its runs, as every interface shows it.
pub(crate) async fn snapshot(reader: &Reader, task: TaskState) -> Result<TaskView, String> {
    let id = task.id.clone();
    let runs = reader.with(move |store| store.runs(&id)).await?;
    Ok(task_view(task, runs))
}

/// A task and the given runs in the shape every interface shows.
fn task_view(task: TaskState, runs: Vec<super::store::RunRow>) -> TaskView {
    TaskView {
        id: task.id,
        kind: task.spec.kind.name().into(),
        status: status::name(task.status).into(),
        schedule: task.spec.schedule.describe(),
        key: task.spec.key,
        created_at: rfc3339(task.created_ms),
        next_run_at: task.next_run_ms.map(rfc3339),
        window: task.spec.window.as_ref().map(|w| w.name.clone()),
        critical: task.spec.critical,
        runs: runs
            .into_iter()
            .map(|r| RunView {
                run_id: r.run_id,
                started_at: r.started_ms.map(rfc3339),
                finished_at: r.finished_ms.map(rfc3339),
                status: status::name(r.status).into(),
                exit_code: r.exit_code,
                error: r.error,
                output_bytes: r.output_bytes,
                output_dropped_bytes: r.output_dropped_bytes,
            })
            .collect(),
    }
}

/// Why a task request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("{0}")]
    Invalid(String),
    /// This host's policy does not allow it.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Duplicate(String),
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    Finished(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// Adds and cancels tasks for every caller (the local API and the control channel), and
/// reads the durable outbox of task changes for the control plane.
#[derive(Clone)]
pub struct Bridge {
    pub reader: Reader,
    pub requests: mpsc::Sender<SchedulerRequest>,
    pub has_postgres: bool,
    /// What this host lets be run ([`TaskPolicy`]).
    pub policy: Arc<TaskPolicy>,
}

impl Bridge {
    /// Send a request to the scheduler and wait for its answer.
    async fn ask<E>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<TaskState, E>>) -> SchedulerRequest,
    ) -> Result<Result<TaskState, E>, BridgeError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(request(reply))
            .await
            .map_err(|_| BridgeError::Unavailable("the task scheduler is not running".into()))?;
        answer.await.map_err(|_| {
            BridgeError::Unavailable("the task scheduler stopped before answering".into())
        })
    }

    /// Add a task the control plane asked for: only of a kind `[tasks] remote_kinds` allows.
    pub async fn add_remote(&self, req: AddRequest) -> Result<TaskView, BridgeError> {
        if let Some(kind) = Kind::parse(&req.kind) {
            self.policy
                .allow_remote(kind)
                .map_err(BridgeError::Refused)?;
        }
        self.add(req).await
    }

    pub async fn add(&self, req: AddRequest) -> Result<TaskView, BridgeError> {
        let now_ms = self.reader.world.now_unix_ms();
        let spec = spec_from_request(req, now_ms, self.has_postgres, &self.policy)
            .map_err(BridgeError::Invalid)?;
        match self
            .ask(|reply| SchedulerRequest::Submit { spec, reply })
            .await?
        {
            // A task that was just created has no runs yet: nothing to read.
            Ok(task) => Ok(task_view(task, Vec::new())),
            Err(e @ SubmitError::Duplicate { .. }) => Err(BridgeError::Duplicate(e.to_string())),
            Err(e) => Err(BridgeError::Invalid(e.to_string())),
        }
    }

    pub async fn cancel(&self, id: String) -> Result<TaskView, BridgeError> {
        match self
            .ask(|reply| SchedulerRequest::Cancel { id, reply })
            .await?
        {
            Ok(task) => snapshot(&self.reader, task)
                .await
                .map_err(BridgeError::Internal),
            Err(e @ CancelError::Unknown(_)) => Err(BridgeError::Unknown(e.to_string())),
            Err(e) => Err(BridgeError::Finished(e.to_string())),
        }
    }

    /// Give a task a new schedule (`at`, `in`, `every` or `cron` + `tz` of `req`).
    pub async fn reschedule(&self, id: String, req: AddRequest) -> Result<TaskView, BridgeError> {
        let now_ms = self.reader.world.now_unix_ms();
        let schedule = schedule_from(&req, now_ms).map_err(BridgeError::Invalid)?;
        match self
            .ask(|reply| SchedulerRequest::Reschedule {
                id,
                schedule,
                reply,
            })
            .await?
        {
            Ok(task) => snapshot(&self.reader, task)
                .await
                .map_err(BridgeError::Internal),
            Err(e @ RescheduleError::Unknown(_)) => Err(BridgeError::Unknown(e.to_string())),
            Err(e @ RescheduleError::Finished { .. }) => Err(BridgeError::Finished(e.to_string())),
            Err(e) => Err(BridgeError::Invalid(e.to_string())),
        }
    }

    /// Up to `limit` unacknowledged task changes, oldest first, each as the task's state now.
    pub async fn pending_events(&self, limit: usize) -> Result<Vec<proto::TaskEvent>, String> {
        let pending = self
            .reader
            .with(move |store| {
                let rows = store.outbox(limit)?;
                rows.into_iter()
                    .map(|(seq, id)| Ok((seq, store.get(&id)?)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let mut events = Vec::with_capacity(pending.len());
        for (seq, task) in pending {
            // A task purged since it changed has nothing left to report; the ack clears it.
            if let Some(task) = task {
                events.push(proto::TaskEvent {
                    seq,
                    task: snapshot(&self.reader, task).await?,
                });
            }
        }
        Ok(events)
    }

    /// The control plane stored every change up to `upto_seq`.
    pub async fn ack(&self, upto_seq: i64) -> Result<(), String> {
        self.reader
            .with(move |store| store.ack_outbox(upto_seq))
            .await
    }
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("has_postgres", &self.has_postgres)
            .finish_non_exhaustive()
    }
}
