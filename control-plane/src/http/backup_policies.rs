//! `POST|GET /api/v1/backup-policies`, `DELETE /api/v1/backup-policies/{id}`, and the
//! reconciler that makes every connected agent hold the tasks its policies want.
//!
//! The reconciler runs on every replica, every [`RECONCILE_EVERY`]: for each connected agent
//! where the policies changed since it last succeeded there (or [`RECHECK_EVERY`] passed: a
//! task store the host had to start afresh), it sends the
//! missing tasks (deterministic keys: a second replica sending the same task changes
//! nothing, the agent answers with the existing one) and cancels the tasks of deleted
//! policies. An agent that was offline gets its tasks when it connects; a refusal (a stanza
//! the host does not grant, say) is shown with the policy and tried again next round.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backup_policies::{KEY_PREFIX, PolicySpec};
use crate::edge::{ApiError, AuthUser};
use crate::handles::Handles;
use crate::storage::BackupPolicyRow;
use crate::terminal::TerminalContext;

/// How often each replica reconciles.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(15);
/// Agents already in order are looked at again this often.
pub const RECHECK_EVERY: Duration = Duration::from_secs(600);

/// What the last round did per (policy id, agent name): `None` when all is in place, else the
/// agent's refusal or why it could not be asked. Replica-local, rebuilt every round.
/// Per (policy id, agent name): the last round's error, `None` when all was in place.
type OutcomeMap = BTreeMap<(String, String), Option<String>>;

#[derive(Clone, Default)]
pub struct Outcomes(Arc<Mutex<OutcomeMap>>);

impl Outcomes {
    fn set(&self, policy: &str, agent: &str, outcome: Option<String>) {
        if let Ok(mut o) = self.0.lock() {
            o.insert((policy.to_string(), agent.to_string()), outcome);
        }
    }

    fn of(&self, policy: &str) -> Vec<(String, Option<String>)> {
        self.0
            .lock()
            .map(|o| {
                o.iter()
                    .filter(|((p, _), _)| p == policy)
                    .map(|((_, a), e)| (a.clone(), e.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct PolicyView {
    id: String,
    created_at: String,
    #[serde(flatten)]
    spec: PolicySpec,
    /// Agents the policy selects that this replica reconciled: `error` is `null` when their
    /// tasks are in place.
    agents_reconciled: Vec<AgentOutcome>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct AgentOutcome {
    agent: String,
    error: Option<String>,
}

fn view(row: BackupPolicyRow, outcomes: &Outcomes) -> Option<PolicyView> {
    let spec: PolicySpec = serde_json::from_str(&row.spec).ok()?;
    Some(PolicyView {
        agents_reconciled: outcomes
            .of(&row.id)
            .into_iter()
            .map(|(agent, error)| AgentOutcome { agent, error })
            .collect(),
        id: row.id,
        created_at: crate::time::rfc3339_ms(row.created_ms),
        spec,
    })
}

/// `GET /api/v1/backup-policies`
pub async fn list(
    State(state): State<Handles>,
    State(outcomes): State<Outcomes>,
) -> Result<Json<Vec<PolicyView>>, ApiError> {
    let rows = state
        .storage
        .backup_policies()
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        rows.into_iter()
            .filter_map(|r| view(r, &outcomes))
            .collect(),
    ))
}

/// `POST /api/v1/backup-policies`
pub async fn create(
    State(state): State<Handles>,
    State(outcomes): State<Outcomes>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Json(spec): Json<PolicySpec>,
) -> Result<(StatusCode, Json<PolicyView>), ApiError> {
    use crate::backup_policies::CreateError;
    let row = crate::backup_policies::create(&state.world, &state.storage, &spec)
        .await
        .map_err(|e| match e {
            CreateError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            CreateError::Exists(_) | CreateError::TooMany => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            CreateError::Storage(e) => ApiError::internal(e),
        })?;
    state
        .audit
        .record(
            &user.name,
            crate::audit::action::BACKUP_POLICY_CREATED,
            &row.id,
            serde_json::to_value(&spec).unwrap_or_default(),
        )
        .await;
    let id = row.id.clone();
    let view = view(row, &outcomes).ok_or_else(|| ApiError::internal("stored spec unreadable"))?;
    tracing::info!(policy = %id, name = %view.spec.name, "backup policy created");
    Ok((StatusCode::CREATED, Json(view)))
}

/// `DELETE /api/v1/backup-policies/{id}`: its tasks are canceled on the agents by the next
/// round (at once on those connected).
pub async fn delete(
    State(state): State<Handles>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !state
        .storage
        .delete_backup_policy(&id)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no backup policy {id}"),
        ));
    }
    state
        .audit
        .record(
            &user.name,
            crate::audit::action::BACKUP_POLICY_DELETED,
            &id,
            serde_json::json!({}),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Reconcile every [`RECONCILE_EVERY`] until `shutdown`.
pub async fn reconcile_forever(
    state: Handles,
    relay: TerminalContext,
    outcomes: Outcomes,
    shutdown: CancellationToken,
) {
    // Per agent: (policies' fingerprint, recheck period) of the last round that left nothing
    // to do there.
    let mut settled: BTreeMap<String, (String, i64)> = BTreeMap::new();
    loop {
        let period = state.world.now_unix_ms() / RECHECK_EVERY.as_millis() as i64;
        if let Err(error) = reconcile(&state, &relay, &outcomes, &mut settled, period).await {
            tracing::warn!(%error, "backup policies: reconcile round failed; tried again next round");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
    }
}

async fn reconcile(
    state: &Handles,
    relay: &TerminalContext,
    outcomes: &Outcomes,
    settled: &mut BTreeMap<String, (String, i64)>,
    period: i64,
) -> Result<(), String> {
    let rows = state
        .storage
        .backup_policies()
        .await
        .map_err(|e| e.to_string())?;
    let policies: Vec<(String, PolicySpec)> = rows
        .iter()
        .filter_map(|r| Some((r.id.clone(), serde_json::from_str(&r.spec).ok()?)))
        .collect();
    let fingerprint: String = rows
        .iter()
        .map(|r| r.id.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let agents = state
        .storage
        .list_agents()
        .await
        .map_err(|e| e.to_string())?;
    for agent in agents.iter().filter(|a| a.connected) {
        let now = (fingerprint.clone(), period);
        if settled.get(&agent.id) == Some(&now) {
            continue;
        }
        let labels = crate::labels::of(agent.labels.as_deref());
        let wanted: Vec<(String, String, proto::TaskRequest)> = policies
            .iter()
            .filter(|(_, p)| p.selects(&agent.name, &labels))
            .flat_map(|(id, p)| {
                p.tasks(id)
                    .into_iter()
                    .map(move |(key, task)| (id.clone(), key, task))
            })
            .collect();
        if reconcile_agent(state, relay, outcomes, agent, &wanted).await {
            settled.insert(agent.id.clone(), now);
        } else {
            settled.remove(&agent.id);
        }
    }
    Ok(())
}

/// Send `agent` what it lacks of `wanted` (policy id, key, task) and cancel its policy tasks
/// nobody wants; whether everything is in place.
async fn reconcile_agent(
    state: &Handles,
    relay: &TerminalContext,
    outcomes: &Outcomes,
    agent: &crate::storage::AgentRow,
    wanted: &[(String, String, proto::TaskRequest)],
) -> bool {
    let held: Vec<proto::TaskSnapshot> = match state.storage.agent_tasks(&agent.id, 1000).await {
        Ok(rows) => rows
            .iter()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect(),
        Err(_) => return false,
    };
    let live = |t: &&proto::TaskSnapshot| t.status != "canceled";
    let mut all_well = true;
    let mut errors: BTreeMap<&str, Option<String>> = BTreeMap::new();
    for (policy, key, task) in wanted {
        errors.entry(policy.as_str()).or_insert(None);
        if held.iter().filter(live).any(|t| &t.key == key) {
            continue;
        }
        let command = proto::Command::TaskAdd {
            task: Box::new(task.clone()),
        };
        if let Err(e) = super::tasks::command(state, relay, &agent.id, command).await {
            // The same task added earlier and still live: the agent names it, which is what is
            // wanted. One that ended (canceled on the host) stays an error, shown with the
            // policy: the host had the last word.
            if !e.message.contains("already exists") {
                all_well = false;
                errors.insert(policy.as_str(), Some(e.message));
            }
        } else {
            tracing::info!(agent = %agent.name, key = %key, "backup policy task created");
        }
    }
    for task in held.iter().filter(live) {
        let ours = task.key.starts_with(KEY_PREFIX);
        if ours && !wanted.iter().any(|(_, key, _)| key == &task.key) {
            let command = proto::Command::TaskCancel {
                task_id: task.id.clone(),
            };
            match super::tasks::command(state, relay, &agent.id, command).await {
                Ok(_) => {
                    tracing::info!(agent = %agent.name, key = %task.key, "backup policy task canceled (policy deleted)")
                }
                Err(e) => {
                    all_well = false;
                    tracing::warn!(agent = %agent.name, key = %task.key, error = %e.message, "cancel a deleted policy's task");
                }
            }
        }
    }
    for (policy, error) in errors {
        outcomes.set(policy, &agent.name, error);
    }
    all_well
}
