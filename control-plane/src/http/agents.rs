//! Agent enrollment and the fleet list.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use crate::audit::action;
use crate::auth::{self, SecretKind};
use crate::edge::ApiError;
use crate::handles::Handles;
use crate::health::Health;
use crate::storage::{EnrollAttempt, EnrollRefusal, Enrollment};

const NAME_BYTES_MAX: usize = 128;
const ENROLLMENT_ID_BYTES_MAX: usize = 128;

pub async fn enroll(
    State(state): State<Handles>,
    Json(request): Json<proto::EnrollRequest>,
) -> Result<Json<proto::EnrollResponse>, ApiError> {
    let name = request.name.trim();
    if name.is_empty() || name.len() > NAME_BYTES_MAX || name.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("agent name must be 1 to {NAME_BYTES_MAX} printable bytes"),
        ));
    }
    if request.enrollment_id.is_empty() || request.enrollment_id.len() > ENROLLMENT_ID_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "enrollment_id is missing or too long",
        ));
    }
    crate::labels::validate(&request.labels)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let credential = auth::new_secret(&state.world, SecretKind::AgentCredential);
    let attempt = EnrollAttempt {
        token_hash: auth::secret_hash(&request.token),
        enrollment_id: request.enrollment_id.clone(),
        name: name.to_string(),
        new_agent_id: auth::new_id(&state.world, "agt"),
        credential_hash: auth::secret_hash(&credential),
        now_ms: state.world.now_unix_ms(),
    };
    match state
        .storage
        .enroll_agent(attempt)
        .await
        .map_err(ApiError::internal)?
    {
        Enrollment::Enrolled { agent_id } => {
            tracing::info!(agent_id = %agent_id, name = ?name, "agent enrolled");
            // A retry of the same enrollment sets them again.
            if !request.labels.is_empty() {
                let labels = serde_json::to_string(&request.labels).map_err(ApiError::internal)?;
                state
                    .storage
                    .set_agent_labels(&agent_id, Some(labels))
                    .await
                    .map_err(ApiError::internal)?;
            }
            state
                .audit
                .record(
                    "enrollment token",
                    action::AGENT_ENROLLED,
                    &agent_id,
                    serde_json::json!({"name": name, "labels": request.labels}),
                )
                .await;
            Ok(Json(proto::EnrollResponse {
                agent_id,
                credential,
            }))
        }
        Enrollment::Refused(reason) => {
            let message = match reason {
                EnrollRefusal::UnknownToken => "unknown enrollment token",
                EnrollRefusal::Expired => {
                    "enrollment token expired; create a new one with `outpost admin enroll-token`"
                }
                EnrollRefusal::AlreadyUsed => {
                    "enrollment token already used; create a new one with `outpost admin enroll-token`"
                }
            };
            tracing::info!(?reason, name = ?name, "enrollment refused");
            Err(ApiError::unauthorized(message))
        }
    }
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct AgentView {
    id: String,
    name: String,
    status: &'static str,
    last_seen: Option<String>,
    /// Buffer health, once the agent reports it (metrics buffer); `null` until then.
    buffer: Option<serde_json::Value>,
    /// What its newest metrics said about its server: the database closest to transaction-ID
    /// wraparound (`xid_age`) and the largest replication lag (`replication`), each with the
    /// time of its sample; `null` until metrics arrive.
    health: Option<serde_json::Value>,
    /// The risk its backups run and why (as `GET /api/v1/backups` with the default
    /// objectives); `null` for a host that reports no pgBackRest status (WAL archiving alone
    /// does not count: a host without `[backups]` is not judged on the fleet page).
    backup: Option<BackupRisk>,
    /// Its labels, for selectors (`KEY=VALUE` wherever agents are chosen).
    labels: crate::labels::Labels,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct BackupRisk {
    risk: crate::backups::Risk,
    reasons: Vec<String>,
}

/// What the fleet page shows of an agent's stored server summary, read once: wraparound and
/// replication, and the backup verdict (with the default objectives; none for a host without
/// pgBackRest status). The backup summaries themselves stay on `GET /api/v1/backups`, which
/// keeps the fleet list small.
fn fleet_health(
    stored: Option<&str>,
    now_ms: i64,
) -> (Option<serde_json::Value>, Option<BackupRisk>) {
    let Some(health) = stored.and_then(|h| serde_json::from_str::<Health>(h).ok()) else {
        return (None, None);
    };
    let backup = health.backups.as_ref().map(|backups| {
        let (risk, reasons) = crate::backups::assess(
            Some(backups),
            health.archiver.as_ref(),
            now_ms,
            crate::backups::Objectives::default(),
        );
        BackupRisk { risk, reasons }
    });
    let shown = Health {
        backups: None,
        archiver: None,
        ..health
    };
    (serde_json::to_value(&shown).ok(), backup)
}

pub async fn list(State(state): State<Handles>) -> Result<Json<Vec<AgentView>>, ApiError> {
    let rows = state
        .storage
        .list_agents()
        .await
        .map_err(ApiError::internal)?;
    let now_ms = state.world.now_unix_ms();
    let views = rows
        .into_iter()
        .map(|row| {
            let (health, backup) = fleet_health(row.health.as_deref(), now_ms);
            AgentView {
                status: if state.settings.is_online(&row, now_ms) {
                    "online"
                } else {
                    "offline"
                },
                last_seen: row.last_seen_ms.map(crate::time::rfc3339_ms),
                id: row.id,
                name: row.name,
                buffer: row
                    .buffer
                    .as_deref()
                    .and_then(|b| serde_json::from_str(b).ok()),
                health,
                backup,
                labels: crate::labels::of(row.labels.as_deref()),
            }
        })
        .collect();
    Ok(Json(views))
}

/// `PUT /api/v1/agents/{id}/labels`: replace an agent's labels (`{}` clears them).
pub async fn set_labels(
    State(state): State<Handles>,
    axum::Extension(crate::edge::AuthUser(user)): axum::Extension<crate::edge::AuthUser>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Json(labels): Json<crate::labels::Labels>,
) -> Result<Json<crate::labels::Labels>, ApiError> {
    crate::labels::validate(&labels).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let stored = (!labels.is_empty())
        .then(|| serde_json::to_string(&labels))
        .transpose()
        .map_err(ApiError::internal)?;
    if !state
        .storage
        .set_agent_labels(&id, stored)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no agent {id}"),
        ));
    }
    state
        .audit
        .record(
            &user.name,
            action::AGENT_LABELED,
            &id,
            serde_json::json!({"labels": labels}),
        )
        .await;
    Ok(Json(labels))
}
