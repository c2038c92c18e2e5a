//! The rollout driver: every replica runs [`run_forever`]; a rollout is driven by the replica
//! holding its lease (`rollout:{id}`, 15 s, renewed each step), and another takes over within
//! one lease when that one dies. Everything a step decides is written with the rollout's
//! version: a write that read an older state (an operator's pause, another replica's step) is
//! refused and the step is taken again from storage, so nothing is decided twice.
//!
//! Each host is given the rollout's task with the key `rollout:{id}:{agent}` (`…:{attempt}`
//! after `retry-failed`); the agent's task runtime refuses a second task with a key it holds,
//! and a task's id follows from its key ([`proto::task_id`]), so a step that dies between the
//! send and its write finds the task again instead of running it twice. A host's outcome is
//! its task's, as the agent reports it (stored on the agent's task list).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use proto::{Command, CommandResult, TaskSnapshot};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Plan, RolloutSpec};
use crate::channel::CommandError;
use crate::handles::Handles;
use crate::storage::{RolloutHostRow, RolloutRow, Storage};
use crate::terminal::TerminalContext;
use crate::terminal::relay::send_anywhere;

/// A rollout's lease lasts this long; a dead driver's rollout is taken over after it.
pub const LEASE_MS: i64 = 15_000;
/// How often each replica steps the rollouts it may drive.
const STEP_EVERY: Duration = Duration::from_secs(1);
/// Active rollouts one replica looks at per round, at most.
const ACTIVE_MAX: i64 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    /// No host is started; runs in flight go on and are recorded.
    Paused,
    /// The first wave ended well; the next waits for an operator.
    AwaitingApproval,
    /// A budget was spent or a gate failed: the reason says which.
    Halted,
    Aborted,
    Done,
}

impl State {
    /// Whether hosts may still be started (after `resume` or `approve` for the paused ones).
    fn open(self) -> bool {
        matches!(
            self,
            State::Running | State::Paused | State::AwaitingApproval
        )
    }
}

/// A rollout as stored and shown.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Rollout {
    pub id: String,
    pub spec: RolloutSpec,
    pub plan: Plan,
    pub state: State,
    /// The wave being run (1-based).
    pub wave: usize,
    pub wave_started_ms: i64,
    /// Set when the current wave's last host ended: the next starts after it.
    pub soak_until_ms: Option<i64>,
    /// Why it halted, or who paused or aborted it.
    pub reason: Option<String>,
    /// `abort --cancel-running`: the hosts' tasks in flight are canceled too.
    pub cancel_running: bool,
    pub created_by: String,
    pub created_ms: i64,
    pub ended_ms: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Pending,
    /// Its task was given to the agent; the outcome comes with the agent's task reports.
    Dispatched,
    Ok,
    Failed,
    /// The host's policy refused the task (`[tasks] remote_kinds`, a bad parameter).
    RefusedByPolicy,
    /// Offline when its wave came (`skip`) or past `offline_deadline` (`wait`): not charged
    /// to the error budget.
    Offline,
    Canceled,
    /// Its wave never came (the rollout halted or was aborted first).
    NotStarted,
}

impl HostState {
    /// Charged to the error budget.
    pub fn failed(self) -> bool {
        matches!(self, HostState::Failed | HostState::RefusedByPolicy)
    }
}

/// One target host as stored and shown.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Host {
    pub agent: String,
    pub agent_id: String,
    pub wave: usize,
    pub cluster: Option<String>,
    pub state: HostState,
    /// 0, then one more per `retry-failed` that retried it.
    pub attempt: u32,
    pub task_id: Option<String>,
    pub detail: Option<String>,
    pub dispatched_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    /// When its task was first sent without a known answer (lost on the way there or back):
    /// it is sent again while the rollout runs (the key makes that safe); once the rollout
    /// has closed, the host is not recorded `not_started` before its agent has had time to
    /// report the task, should it have arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_uncertain_ms: Option<i64>,
}

impl Host {
    /// The key of this host's task: a host never runs one attempt twice.
    pub fn key(&self, rollout_id: &str) -> String {
        match self.attempt {
            0 => format!("rollout:{rollout_id}:{}", self.agent),
            n => format!("rollout:{rollout_id}:{}:{n}", self.agent),
        }
    }

    fn end(&mut self, state: HostState, detail: Option<String>, now_ms: i64) {
        self.state = state;
        self.detail = detail;
        self.ended_ms = Some(now_ms);
    }
}

/// A rollout with its hosts, as read at `version`.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub rollout: Rollout,
    pub hosts: Vec<Host>,
    pub version: i64,
}

impl Loaded {
    pub fn from_rows(row: &RolloutRow, hosts: &[RolloutHostRow]) -> Result<Loaded, String> {
        let rollout: Rollout =
            serde_json::from_str(&row.data).map_err(|e| format!("rollout {}: {e}", row.id))?;
        let hosts = hosts
            .iter()
            .map(|h| serde_json::from_str(&h.data).map_err(|e| format!("rollout host: {e}")))
            .collect::<Result<Vec<Host>, String>>()?;
        Ok(Loaded {
            rollout,
            hosts,
            version: row.version,
        })
    }

    /// Whether the driver still has work here: hosts to start, or outcomes to collect.
    pub fn active(&self) -> bool {
        self.rollout.state.open()
            || self.hosts.iter().any(|h| {
                h.state == HostState::Dispatched
                    || (h.state == HostState::Pending && h.sent_uncertain_ms.is_some())
            })
    }

    /// The rows to write: the rollout and the hosts in `changed` (indexes).
    pub fn rows(
        &self,
        now_ms: i64,
        changed: &BTreeSet<usize>,
    ) -> (RolloutRow, Vec<RolloutHostRow>) {
        let row = RolloutRow {
            id: self.rollout.id.clone(),
            data: serde_json::to_string(&self.rollout).unwrap_or_default(),
            active: self.active(),
            version: self.version,
            created_ms: self.rollout.created_ms,
            updated_ms: now_ms,
        };
        let hosts = changed
            .iter()
            .filter_map(|i| self.hosts.get(*i))
            .map(|h| RolloutHostRow {
                agent_id: h.agent_id.clone(),
                wave: h.wave as i64,
                data: serde_json::to_string(h).unwrap_or_default(),
            })
            .collect();
        (row, hosts)
    }

    /// Failures charged in wave `wave`, and over the whole rollout.
    pub fn failures(&self, wave: usize) -> (usize, usize) {
        let failed = |h: &&Host| h.state.failed();
        (
            self.hosts
                .iter()
                .filter(|h| h.wave == wave)
                .filter(failed)
                .count(),
            self.hosts.iter().filter(failed).count(),
        )
    }
}

/// A new rollout from its spec and plan: wave 1 running, every host pending.
pub fn new_rollout(
    id: String,
    spec: RolloutSpec,
    plan: Plan,
    created_by: String,
    now_ms: i64,
) -> Loaded {
    let hosts = plan
        .waves
        .iter()
        .flat_map(|w| {
            w.hosts.iter().map(|h| Host {
                agent: h.agent.clone(),
                agent_id: h.agent_id.clone(),
                wave: w.wave,
                cluster: h.cluster.clone(),
                state: HostState::Pending,
                attempt: 0,
                task_id: None,
                detail: None,
                dispatched_ms: None,
                ended_ms: None,
                sent_uncertain_ms: None,
            })
        })
        .collect();
    Loaded {
        rollout: Rollout {
            id,
            spec,
            plan,
            state: State::Running,
            wave: 1,
            wave_started_ms: now_ms,
            soak_until_ms: None,
            reason: None,
            cancel_running: false,
            created_by,
            created_ms: now_ms,
            ended_ms: None,
        },
        hosts,
        version: 0,
    }
}

/// Step every active rollout this replica may drive, until `shutdown`.
pub async fn run_forever(
    state: Handles,
    relay: TerminalContext,
    holder: String,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(error) = round(&state, &relay, &holder).await {
            tracing::warn!(%error, "rollouts: a round failed; tried again next round");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(STEP_EVERY) => {}
        }
    }
}

async fn round(state: &Handles, relay: &TerminalContext, holder: &str) -> Result<(), String> {
    let active = state
        .storage
        .rollouts(true, ACTIVE_MAX)
        .await
        .map_err(|e| e.to_string())?;
    for row in active {
        let now_ms = state.world.now_unix_ms();
        let lease = format!("rollout:{}", row.id);
        let held = state
            .storage
            .take_lease(&lease, holder, now_ms, LEASE_MS)
            .await
            .map_err(|e| e.to_string())?;
        if held.is_none() {
            continue;
        }
        if let Err(error) = step(state, relay, &row.id).await {
            tracing::warn!(rollout = %row.id, %error, "rollout step failed; taken again next round");
        }
    }
    Ok(())
}

/// One step of rollout `id`: collect outcomes, judge the budgets, start hosts, advance.
pub async fn step(state: &Handles, relay: &TerminalContext, id: &str) -> Result<(), String> {
    let Some((row, host_rows)) = state.storage.rollout(id).await.map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let mut r = Loaded::from_rows(&row, &host_rows)?;
    let now_ms = state.world.now_unix_ms();
    // The agents online now and their replication lags, read once for the step.
    let agents = state
        .storage
        .list_agents()
        .await
        .map_err(|e| e.to_string())?;
    let online: BTreeSet<String> = agents
        .iter()
        .filter(|a| state.settings.is_online(a, now_ms))
        .map(|a| a.id.clone())
        .collect();
    let lags = replication_lags(&agents);
    let mut changed = BTreeSet::new();
    let before = (r.rollout.state, r.rollout.wave);
    collect(state, relay, &mut r, &mut changed, now_ms).await?;
    if r.rollout.state == State::Running {
        judge(&mut r, now_ms);
    }
    if r.rollout.state == State::Running {
        start_hosts(relay, &mut r, &online, &mut changed, now_ms).await;
        if !wave_open(&r) {
            let soak_ms = r.rollout.plan.soak_s as i64 * 1000;
            r.rollout.soak_until_ms.get_or_insert(now_ms + soak_ms);
        }
        let gate = if gate_due(&r, now_ms) {
            Some(gate_check(state, &r, &online, &lags).await?)
        } else {
            None
        };
        let wave = r.rollout.wave;
        advance(&mut r, gate.as_deref(), now_ms);
        // The next wave starts in the step its gate passed.
        if r.rollout.state == State::Running && r.rollout.wave != wave {
            start_hosts(relay, &mut r, &online, &mut changed, now_ms).await;
        }
    }
    if !r.rollout.state.open() {
        close_pending(state, &mut r, &mut changed, now_ms).await?;
    }
    let (row, hosts) = r.rows(now_ms, &changed);
    let written = state
        .storage
        .rollout_write(row, hosts)
        .await
        .map_err(|e| e.to_string())?;
    if written && (r.rollout.state, r.rollout.wave) != before {
        record_transition(state, &r.rollout).await;
    }
    Ok(())
}

/// Outcomes of the hosts whose task was given: what the agent reported last. With
/// `abort --cancel-running`, their tasks are canceled first.
async fn collect(
    state: &Handles,
    relay: &TerminalContext,
    r: &mut Loaded,
    changed: &mut BTreeSet<usize>,
    now_ms: i64,
) -> Result<(), String> {
    let cancel = r.rollout.state == State::Aborted && r.rollout.cancel_running;
    for (i, h) in r.hosts.iter_mut().enumerate() {
        let (HostState::Dispatched, Some(task_id)) = (h.state, h.task_id.clone()) else {
            continue;
        };
        if cancel {
            let _ = send_anywhere(
                relay,
                &h.agent_id,
                Command::TaskCancel {
                    task_id: task_id.clone(),
                },
            )
            .await;
        }
        let Some(json) = state
            .storage
            .agent_task(&h.agent_id, &task_id)
            .await
            .map_err(|e| e.to_string())?
        else {
            continue;
        };
        let Ok(task) = serde_json::from_str::<TaskSnapshot>(&json) else {
            continue;
        };
        let last_error = || task.runs.iter().find_map(|run| run.error.clone());
        let ended = match task.status.as_str() {
            "done" | "skipped" => Some((HostState::Ok, None)),
            "failed" | "aborted" => Some((
                HostState::Failed,
                Some(last_error().unwrap_or_else(|| format!("the task {}", task.status))),
            )),
            "canceled" => Some((HostState::Canceled, last_error())),
            _ => None,
        };
        if let Some((to, detail)) = ended {
            h.end(to, detail, now_ms);
            changed.insert(i);
        }
    }
    Ok(())
}

/// Halt when the wave's or the rollout's failures exceed what is tolerated.
fn judge(r: &mut Loaded, now_ms: i64) {
    let wave = r.rollout.wave;
    let (in_wave, total) = r.failures(wave);
    let tolerated = r
        .rollout
        .plan
        .waves
        .get(wave - 1)
        .map_or(0, |w| w.errors_tolerated);
    let reason = if in_wave > tolerated {
        Some(format!(
            "wave {wave}: {in_wave} hosts failed, more than the {tolerated} tolerated"
        ))
    } else {
        r.rollout
            .plan
            .errors_tolerated_total
            .filter(|t| total > *t)
            .map(|t| format!("{total} hosts failed in all, more than the {t} tolerated"))
    };
    if let Some(reason) = reason {
        r.rollout.state = State::Halted;
        r.rollout.reason = Some(reason);
        r.rollout.ended_ms = Some(now_ms);
    }
}

/// Give the wave's pending hosts their task, up to `max_in_flight` at once and one host per
/// cluster at a time; offline hosts wait (until the deadline) or are skipped.
async fn start_hosts(
    relay: &TerminalContext,
    r: &mut Loaded,
    online: &BTreeSet<String>,
    changed: &mut BTreeSet<usize>,
    now_ms: i64,
) {
    let wave = r.rollout.wave;
    let plan = &r.rollout.plan;
    let in_flight = r
        .hosts
        .iter()
        .filter(|h| h.state == HostState::Dispatched)
        .count();
    let mut busy: BTreeSet<String> = r
        .hosts
        .iter()
        .filter(|h| h.state == HostState::Dispatched)
        .filter_map(|h| h.cluster.clone())
        .collect();
    let deadline = r.rollout.wave_started_ms + plan.offline_deadline_s as i64 * 1000;
    let skip_offline = plan.offline == "skip";
    let (max_in_flight, rollout_id, task) = (
        plan.max_in_flight,
        r.rollout.id.clone(),
        r.rollout.spec.task.clone(),
    );
    // The hosts to start now, chosen in order; then their tasks are sent at once.
    let mut chosen = Vec::new();
    for (i, h) in r.hosts.iter_mut().enumerate() {
        if in_flight + chosen.len() >= max_in_flight {
            break;
        }
        if h.wave != wave || h.state != HostState::Pending {
            continue;
        }
        if h.cluster.as_ref().is_some_and(|c| busy.contains(c)) {
            continue;
        }
        if !online.contains(&h.agent_id) {
            if skip_offline || now_ms >= deadline {
                h.end(
                    HostState::Offline,
                    Some("offline when its wave came".into()),
                    now_ms,
                );
                changed.insert(i);
            }
            continue;
        }
        if let Some(c) = &h.cluster {
            busy.insert(c.clone());
        }
        chosen.push((i, h.agent_id.clone(), h.key(&rollout_id)));
    }
    let sent: Vec<_> = futures_util::stream::iter(chosen)
        .map(|(i, agent_id, key)| {
            let mut request = task.clone();
            request.key = Some(key.clone());
            async move {
                let command = Command::TaskAdd {
                    task: Box::new(request),
                };
                (i, key, send_anywhere(relay, &agent_id, command).await)
            }
        })
        .buffer_unordered(SENDS_AT_ONCE)
        .collect()
        .await;
    for (i, key, answer) in sent {
        let h = &mut r.hosts[i];
        match answer {
            Ok(CommandResult::Task { task }) => dispatched(h, task.id, now_ms),
            Ok(_) => continue,
            Err(CommandError::Refused(e)) if e.message.contains("already exists") => {
                dispatched(h, proto::task_id(&key), now_ms);
            }
            Err(CommandError::Refused(e)) if e.code == proto::ErrorCode::Refused => {
                h.sent_uncertain_ms = None;
                h.end(HostState::RefusedByPolicy, Some(e.message), now_ms);
            }
            // The agent answered that it cannot take tasks now (its task runtime is down):
            // tried again next step; so is a command this replica never sent (too many queued).
            Err(CommandError::Refused(_) | CommandError::Busy) => continue,
            // Not delivered, or not known to be: tried again next step (the key keeps a task
            // that did arrive from running twice).
            Err(_) => {
                if h.sent_uncertain_ms.is_none() {
                    h.sent_uncertain_ms = Some(now_ms);
                    changed.insert(i);
                }
                continue;
            }
        }
        changed.insert(i);
    }
}

/// Tasks a step sends to agents at once.
const SENDS_AT_ONCE: usize = 64;

/// How long a closed rollout waits for an agent to report a task whose sending was uncertain
/// before recording the host `not_started`.
const UNCERTAIN_WAIT_MS: i64 = 5 * 60_000;

/// Once a rollout has closed (halted, aborted, done), its pending hosts never start: each is
/// `not_started`, except one whose task may have arrived: it is followed like any given
/// task once its agent reports it, and `not_started` only when none came within
/// [`UNCERTAIN_WAIT_MS`].
async fn close_pending(
    state: &Handles,
    r: &mut Loaded,
    changed: &mut BTreeSet<usize>,
    now_ms: i64,
) -> Result<(), String> {
    let rollout_id = r.rollout.id.clone();
    for (i, h) in r.hosts.iter_mut().enumerate() {
        if h.state != HostState::Pending {
            continue;
        }
        if let Some(sent_ms) = h.sent_uncertain_ms {
            let task_id = proto::task_id(&h.key(&rollout_id));
            let reported = state
                .storage
                .agent_task(&h.agent_id, &task_id)
                .await
                .map_err(|e| e.to_string())?
                .is_some();
            if reported {
                dispatched(h, task_id, sent_ms);
                changed.insert(i);
                continue;
            }
            if now_ms < sent_ms + UNCERTAIN_WAIT_MS {
                continue;
            }
            h.end(
                HostState::NotStarted,
                Some("its task was sent without an answer and its agent never reported it".into()),
                now_ms,
            );
        } else {
            h.end(HostState::NotStarted, None, now_ms);
        }
        changed.insert(i);
    }
    Ok(())
}

fn dispatched(h: &mut Host, task_id: String, now_ms: i64) {
    h.sent_uncertain_ms = None;
    h.state = HostState::Dispatched;
    h.task_id = Some(task_id);
    h.dispatched_ms = Some(now_ms);
}

/// Whether the current wave has ended and soaked: its gate is to be checked.
fn gate_due(r: &Loaded, now_ms: i64) -> bool {
    !wave_open(r) && r.rollout.soak_until_ms.is_some_and(|until| now_ms >= until)
}

fn wave_open(r: &Loaded) -> bool {
    let wave = r.rollout.wave;
    r.hosts
        .iter()
        .any(|h| h.wave == wave && matches!(h.state, HostState::Pending | HostState::Dispatched))
}

/// Task history read per host for the gate, at most.
const GATE_TASKS_READ: i64 = 200;

/// Each agent's largest streaming-replication lag in seconds, from the server summary its
/// newest metrics left on its row (agents without standbys have none).
fn replication_lags(agents: &[crate::storage::AgentRow]) -> BTreeMap<String, f64> {
    agents
        .iter()
        .filter_map(|a| {
            let health: crate::health::Health = serde_json::from_str(a.health.as_deref()?).ok()?;
            Some((a.id.clone(), health.replication?.max_lag_s))
        })
        .collect()
}

/// The health gate after a wave: each host the wave changed must be online, its replication
/// lag within `max_replication_lag` when the spec sets one, and no task of its own may have
/// failed since the rollout's task was given to it. What fails it, one line per host.
async fn gate_check(
    state: &Handles,
    r: &Loaded,
    online: &BTreeSet<String>,
    lags: &BTreeMap<String, f64>,
) -> Result<Vec<String>, String> {
    let mut failing = Vec::new();
    for h in r
        .hosts
        .iter()
        .filter(|h| h.wave == r.rollout.wave && h.state == HostState::Ok)
    {
        if !online.contains(&h.agent_id) {
            failing.push(format!("{}: offline since the change", h.agent));
            continue;
        }
        if let (Some(bound), Some(lag)) =
            (r.rollout.plan.max_replication_lag_s, lags.get(&h.agent_id))
            && *lag > bound as f64
        {
            failing.push(format!(
                "{}: replication lag {lag:.0} s, more than the {bound} s allowed",
                h.agent
            ));
            continue;
        }
        let since = h.dispatched_ms.unwrap_or(r.rollout.wave_started_ms);
        let tasks = state
            .storage
            .agent_tasks(&h.agent_id, GATE_TASKS_READ)
            .await
            .map_err(|e| e.to_string())?;
        let failed = tasks
            .iter()
            .filter_map(|json| serde_json::from_str::<TaskSnapshot>(json).ok())
            .filter(|t| h.task_id.as_deref() != Some(t.id.as_str()))
            .find(|t| t.runs.iter().any(|run| failed_since(run, since)));
        if let Some(t) = failed {
            failing.push(format!(
                "{}: its task {} ({}) failed since the change",
                h.agent,
                if t.key.is_empty() { &t.id } else { &t.key },
                t.kind
            ));
        }
    }
    Ok(failing)
}

/// A run that failed (or was aborted) after `since_ms`.
fn failed_since(run: &proto::RunSnapshot, since_ms: i64) -> bool {
    matches!(run.status.as_str(), "failed" | "aborted")
        && run
            .finished_at
            .as_deref()
            .and_then(|t| crate::time::parse_ms("finished_at", t).ok())
            .is_some_and(|ms| ms >= since_ms)
}

/// When the wave's hosts have all ended: soak, then the gate (`gate`: what fails it, checked
/// once the soak is over, [`gate_due`]); the rollout waits up to `gate_wait` for it to pass,
/// then halts; past it, the next wave (or wait for approval after the canary, or end).
fn advance(r: &mut Loaded, gate: Option<&[String]>, now_ms: i64) {
    let wave = r.rollout.wave;
    if wave_open(r) {
        return;
    }
    let soak_until = *r
        .rollout
        .soak_until_ms
        .get_or_insert(now_ms + r.rollout.plan.soak_s as i64 * 1000);
    if now_ms < soak_until {
        return;
    }
    let Some(failing) = gate else {
        // Checked on the next step.
        return;
    };
    if !failing.is_empty() {
        let wait_until = soak_until + r.rollout.plan.gate_wait_s as i64 * 1000;
        let what = failing.join("; ");
        if now_ms < wait_until {
            r.rollout.reason = Some(format!(
                "health gate after wave {wave}: waiting up to {} s more for: {what}",
                (wait_until - now_ms + 999) / 1000
            ));
            return;
        }
        r.rollout.state = State::Halted;
        r.rollout.reason = Some(format!("health gate after wave {wave}: {what}"));
        r.rollout.ended_ms = Some(now_ms);
        return;
    }
    r.rollout.reason = None;
    let waves = r.rollout.plan.waves.len();
    if wave >= waves {
        r.rollout.state = State::Done;
        r.rollout.ended_ms = Some(now_ms);
        return;
    }
    r.rollout.wave = wave + 1;
    r.rollout.wave_started_ms = now_ms;
    r.rollout.soak_until_ms = None;
    if wave == 1 && r.rollout.spec.approve_after_canary {
        r.rollout.state = State::AwaitingApproval;
        r.rollout.reason = Some("the canary wave ended well; waiting for approval".into());
    }
}

/// A wave's start or a halt, in the audit log (operators' own actions are recorded by the
/// API).
async fn record_transition(state: &Handles, r: &Rollout) {
    let what = match r.state {
        State::Halted => crate::audit::action::ROLLOUT_HALTED,
        State::Done => crate::audit::action::ROLLOUT_DONE,
        _ => crate::audit::action::ROLLOUT_WAVE,
    };
    state
        .audit
        .record(
            "rollout-driver",
            what,
            &r.id,
            serde_json::json!({"state": r.state, "wave": r.wave, "reason": r.reason}),
        )
        .await;
}

/// Store a new rollout of `spec` as planned (`plan`), created by `user`.
pub async fn create(
    storage: &Storage,
    world: &world::World,
    spec: RolloutSpec,
    plan: Plan,
    user: &str,
) -> Result<Loaded, crate::storage::StorageError> {
    let now_ms = world.now_unix_ms();
    let id = crate::auth::new_id(world, "ro");
    let loaded = new_rollout(id, spec, plan, user.to_string(), now_ms);
    let every: BTreeSet<usize> = (0..loaded.hosts.len()).collect();
    let (row, hosts) = loaded.rows(now_ms, &every);
    storage.rollout_insert(row, hosts).await?;
    tracing::info!(rollout = %loaded.rollout.id, %user, hosts = loaded.hosts.len(), "rollout created");
    Ok(loaded)
}

/// What the audit log keeps of a new rollout.
pub fn created_detail(r: &Loaded) -> serde_json::Value {
    serde_json::json!({
        "name": r.rollout.plan.name,
        "targets": r.hosts.len(),
        "waves": r.rollout.plan.waves.len(),
        "task": r.rollout.spec.task,
    })
}

/// Why an operator's action was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no such rollout")]
    NotFound,
    #[error("{0}")]
    NotNow(String),
    #[error("the rollout kept changing under this request; try again")]
    Busy,
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

/// Writes an operator's action tries when the driver keeps writing first.
const CONTROL_TRIES: usize = 10;

/// Apply an operator's action (`pause`, `resume`, `approve`, `abort`, `retry-failed`) to
/// rollout `id`, written with the version it read (read again when the driver wrote first).
/// The rollout as written and what the audit log keeps of the action.
pub async fn control(
    storage: &Storage,
    world: &world::World,
    id: &str,
    what: &str,
    user: &str,
    cancel_running: bool,
) -> Result<(Loaded, serde_json::Value), ControlError> {
    for _ in 0..CONTROL_TRIES {
        let (row, hosts) = storage.rollout(id).await?.ok_or(ControlError::NotFound)?;
        let mut loaded = Loaded::from_rows(&row, &hosts).map_err(ControlError::NotNow)?;
        let now_ms = world.now_unix_ms();
        let changed =
            apply(&mut loaded, what, user, cancel_running, now_ms).map_err(ControlError::NotNow)?;
        let (row, hosts) = loaded.rows(now_ms, &changed);
        if storage.rollout_write(row, hosts).await? {
            loaded.version += 1;
            let detail = serde_json::json!({
                "action": what,
                "state": loaded.rollout.state,
                "wave": loaded.rollout.wave,
                "cancel_running": cancel_running,
                "hosts_retried": changed.len(),
            });
            return Ok((loaded, detail));
        }
    }
    Err(ControlError::Busy)
}

/// Apply an operator's action; the hosts it changed, or why it does not apply now.
pub fn apply(
    r: &mut Loaded,
    what: &str,
    user: &str,
    cancel_running: bool,
    now_ms: i64,
) -> Result<BTreeSet<usize>, String> {
    let ro = &mut r.rollout;
    let state = ro.state;
    let not_now = || format!("cannot {what} a rollout that is {}", name_of(state));
    let mut changed = BTreeSet::new();
    match what {
        "pause" if matches!(state, State::Running | State::AwaitingApproval) => {
            ro.state = State::Paused;
            ro.reason = Some(format!("paused by {user}"));
        }
        "resume" if state == State::Paused => {
            ro.state = State::Running;
            ro.reason = None;
        }
        "approve" if state == State::AwaitingApproval => {
            ro.state = State::Running;
            ro.reason = Some(format!("approved by {user}"));
            ro.wave_started_ms = now_ms;
        }
        "abort" if !matches!(state, State::Aborted | State::Done) => {
            ro.state = State::Aborted;
            ro.reason = Some(format!("aborted by {user}"));
            ro.cancel_running = cancel_running;
            ro.ended_ms = Some(now_ms);
        }
        "retry-failed" if state != State::Aborted => {
            for (i, h) in r.hosts.iter_mut().enumerate() {
                if h.state.failed() {
                    h.state = HostState::Pending;
                    h.attempt += 1;
                    h.task_id = None;
                    h.detail = None;
                    h.dispatched_ms = None;
                    h.ended_ms = None;
                    h.sent_uncertain_ms = None;
                    changed.insert(i);
                }
            }
            let Some(first) = changed.iter().map(|i| r.hosts[*i].wave).min() else {
                return Err("no host failed: nothing to retry".into());
            };
            // The waves a halt kept from starting come again too.
            for (i, h) in r.hosts.iter_mut().enumerate() {
                if h.state == HostState::NotStarted {
                    h.state = HostState::Pending;
                    h.ended_ms = None;
                    changed.insert(i);
                }
            }
            let ro = &mut r.rollout;
            if first < ro.wave || state != State::Running {
                ro.wave = first.min(ro.wave);
                ro.wave_started_ms = now_ms;
                ro.soak_until_ms = None;
            }
            ro.state = State::Running;
            ro.reason = Some(format!("failed hosts retried by {user}"));
            ro.ended_ms = None;
        }
        "pause" | "resume" | "approve" | "abort" | "retry-failed" => return Err(not_now()),
        other => {
            return Err(format!(
                "unknown action {other:?}: pause, resume, approve, abort or retry-failed"
            ));
        }
    }
    Ok(changed)
}

/// A state's name as the API spells it.
pub fn name_of<T: Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// A rollout as text: one line of state, the hosts counted by state, and (`hosts`) a line per
/// host that started or ended.
pub fn describe(r: &Loaded, hosts: bool) -> String {
    let ro = &r.rollout;
    let mut out = format!(
        "{} {}: {}, wave {} of {}",
        ro.id,
        ro.plan.name,
        name_of(ro.state),
        ro.wave.min(ro.plan.waves.len()),
        ro.plan.waves.len()
    );
    if let Some(reason) = &ro.reason {
        out.push_str(&format!(" ({reason})"));
    }
    out.push('\n');
    let mut counts = std::collections::BTreeMap::new();
    for h in &r.hosts {
        *counts.entry(name_of(h.state)).or_insert(0usize) += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    out.push_str(&format!("  hosts: {}\n", counts.join(", ")));
    if hosts {
        for h in r.hosts.iter().filter(|h| h.state != HostState::Pending) {
            out.push_str(&format!(
                "  wave {} {}: {}",
                h.wave,
                h.agent,
                name_of(h.state)
            ));
            if let Some(detail) = &h.detail {
                out.push_str(&format!(" ({detail})"));
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollouts::Target;

    /// A rollout of `waves` over db1..db`n` (ids a1..), every host pending.
    fn rollout(n: usize, extra: &str) -> Loaded {
        let spec: RolloutSpec = toml::from_str(&format!(
            "name = \"t\"\nagents = [\"db*\"]\n{extra}\n[task]\nkind = \"command\"\nargv = [\"true\"]\n"
        ))
        .expect("spec");
        let targets: Vec<Target> = (1..=n)
            .map(|i| Target {
                id: format!("a{i}"),
                name: format!("db{i:02}"),
                labels: Default::default(),
                online: true,
            })
            .collect();
        let plan = spec.plan(&targets).expect("plan");
        new_rollout("ro_t".into(), spec, plan, "alice".into(), 0)
    }

    fn set(r: &mut Loaded, wave: usize, to: HostState, count: usize) {
        for h in r.hosts.iter_mut().filter(|h| h.wave == wave).take(count) {
            h.state = to;
        }
    }

    #[test]
    fn a_wave_halts_at_the_failure_past_its_budget_and_the_total_budget_too() {
        let mut r = rollout(
            100,
            "waves = [1, \"10%\", \"100%\"]\nmax_errors = 1\nmax_errors_total = 2",
        );
        r.rollout.wave = 2;
        set(&mut r, 2, HostState::Failed, 1);
        judge(&mut r, 5);
        assert_eq!(r.rollout.state, State::Running, "one failure is tolerated");
        set(&mut r, 2, HostState::Failed, 2);
        judge(&mut r, 5);
        assert_eq!(r.rollout.state, State::Halted);
        assert_eq!(
            r.rollout.reason.as_deref(),
            Some("wave 2: 2 hosts failed, more than the 1 tolerated")
        );
        // Offline hosts are not charged; refusals by the host's policy are.
        let mut r = rollout(
            100,
            "waves = [1, \"10%\", \"100%\"]\nmax_errors = 5\nmax_errors_total = 2",
        );
        r.rollout.wave = 3;
        set(&mut r, 3, HostState::Offline, 10);
        set(&mut r, 2, HostState::RefusedByPolicy, 2);
        judge(&mut r, 5);
        assert_eq!(r.rollout.state, State::Running);
        r.hosts
            .iter_mut()
            .find(|h| h.wave == 3)
            .expect("host")
            .state = HostState::Failed;
        judge(&mut r, 5);
        assert_eq!(
            r.rollout.reason.as_deref(),
            Some("3 hosts failed in all, more than the 2 tolerated")
        );
    }

    #[test]
    fn an_ended_wave_soaks_passes_its_gate_and_the_canary_waits_for_approval() {
        let mut r = rollout(
            10,
            "waves = [1, \"100%\"]\nsoak = \"10s\"\napprove_after_canary = true",
        );
        set(&mut r, 1, HostState::Ok, 1);
        advance(&mut r, None, 1_000);
        assert_eq!((r.rollout.wave, r.rollout.soak_until_ms), (1, Some(11_000)));
        assert!(!gate_due(&r, 10_999));
        advance(&mut r, Some(&[]), 10_999);
        assert_eq!(r.rollout.wave, 1, "still soaking");
        assert!(gate_due(&r, 11_000));
        advance(&mut r, Some(&[]), 11_000);
        assert_eq!(
            (r.rollout.wave, r.rollout.state),
            (2, State::AwaitingApproval)
        );
        assert!(apply(&mut r, "resume", "bob", false, 12_000).is_err());
        apply(&mut r, "approve", "bob", false, 12_000).expect("approve");
        assert_eq!(
            (r.rollout.state, r.rollout.wave_started_ms),
            (State::Running, 12_000)
        );
        set(&mut r, 2, HostState::Ok, 9);
        advance(&mut r, None, 13_000);
        let down = ["db05: offline since the change".to_string()];
        // The gate waits (5 minutes by default) for the host to come back.
        advance(&mut r, Some(&down), 23_000);
        assert_eq!(r.rollout.state, State::Running, "{:?}", r.rollout.reason);
        assert!(r.rollout.reason.as_deref().unwrap_or("").contains("300 s"));
        advance(&mut r, Some(&down), 23_000 + 299_999);
        assert_eq!(r.rollout.state, State::Running);
        advance(&mut r, Some(&down), 23_000 + 300_000);
        assert_eq!(
            r.rollout.state,
            State::Halted,
            "a host stayed offline after the change"
        );
        assert!(
            r.rollout.reason.as_deref().unwrap_or("").contains("db05"),
            "{:?}",
            r.rollout.reason
        );
    }

    #[test]
    fn the_gate_reads_replication_lags_from_the_agents_rows_and_failed_runs_after_the_change() {
        let row = |id: &str, health: Option<&str>| crate::storage::AgentRow {
            id: id.into(),
            name: id.into(),
            created_at_ms: 0,
            last_seen_ms: None,
            connected: true,
            buffer: None,
            health: health.map(str::to_string),
            labels: None,
        };
        let lags = replication_lags(&[
            row(
                "a1",
                Some(r#"{"replication":{"standbys":2,"max_lag_s":42.5,"ts_ms":1}}"#),
            ),
            row("a2", Some("{}")),
            row("a3", None),
        ]);
        assert_eq!(
            lags.into_iter().collect::<Vec<_>>(),
            [("a1".to_string(), 42.5)]
        );
        let spec: RolloutSpec = toml::from_str(
            "name = \"t\"\nagents = [\"*\"]\nmax_replication_lag = \"30s\"\n[task]\nkind = \"command\"\n",
        )
        .expect("spec");
        let target = Target {
            id: "a1".into(),
            name: "db1".into(),
            labels: Default::default(),
            online: true,
        };
        assert_eq!(
            spec.plan(&[target]).expect("plan").max_replication_lag_s,
            Some(30)
        );
        let run = |status: &str, finished: Option<&str>| proto::RunSnapshot {
            run_id: 1,
            started_at: None,
            finished_at: finished.map(str::to_string),
            status: status.into(),
            exit_code: None,
            error: None,
            output_bytes: 0,
            output_dropped_bytes: 0,
        };
        let change_ms = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        assert!(failed_since(
            &run("failed", Some("2026-01-01T00:00:01Z")),
            change_ms
        ));
        assert!(failed_since(
            &run("aborted", Some("2026-01-01T00:00:00Z")),
            change_ms
        ));
        assert!(!failed_since(
            &run("failed", Some("2025-12-31T23:59:59Z")),
            change_ms
        ));
        assert!(!failed_since(
            &run("done", Some("2026-01-01T00:00:01Z")),
            change_ms
        ));
        assert!(!failed_since(&run("failed", None), change_ms));
    }

    #[test]
    fn retry_failed_rewinds_to_the_earliest_failed_wave_under_new_keys_and_reopens_later_waves() {
        let mut r = rollout(10, "waves = [2, 3, \"100%\"]");
        set(&mut r, 1, HostState::Ok, 1);
        set(&mut r, 1, HostState::Failed, 1);
        r.rollout.wave = 3;
        r.rollout.state = State::Halted;
        let failed = r
            .hosts
            .iter()
            .position(|h| h.state == HostState::Failed)
            .expect("one");
        let key = r.hosts[failed].key("ro_t");
        // The halt kept the last wave from starting.
        set(&mut r, 3, HostState::NotStarted, 10);
        let changed = apply(&mut r, "retry-failed", "bob", false, 50).expect("retry");
        let later: Vec<usize> = (0..r.hosts.len())
            .filter(|i| r.hosts[*i].wave == 3)
            .collect();
        assert_eq!(
            changed.into_iter().collect::<Vec<_>>(),
            [vec![failed], later.clone()].concat()
        );
        assert!(
            later
                .iter()
                .all(|i| r.hosts[*i].state == HostState::Pending && r.hosts[*i].attempt == 0)
        );
        let h = &r.hosts[failed];
        assert_eq!((h.state, h.attempt), (HostState::Pending, 1));
        assert_ne!(h.key("ro_t"), key, "a retry is a new task");
        assert_eq!((r.rollout.state, r.rollout.wave), (State::Running, 1));
        assert!(
            apply(&mut r, "retry-failed", "bob", false, 60).is_err(),
            "nothing failed now"
        );
        apply(&mut r, "abort", "bob", true, 70).expect("abort");
        assert!(r.rollout.cancel_running);
        assert!(apply(&mut r, "resume", "bob", false, 80).is_err());
        assert!(apply(&mut r, "speed-up", "bob", false, 80).is_err());
    }
}
