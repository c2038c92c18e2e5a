//! `GET /api/v1/backups`: every agent's backup status and the risk it runs, worst first (the
//! Backups page). Read from the summaries on the agents' rows: no metric is read.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::backups::{Archiver, Backups, Objectives, Risk, assess};
use crate::edge::ApiError;
use crate::handles::Handles;

/// Longest objective accepted (a year).
const OBJECTIVE_MAX: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

#[derive(Deserialize, schemars::JsonSchema)]
pub struct BackupsQuery {
    /// Recovery point objective: the newest good backup may be this old (default: the first
    /// backup policy selecting the host sets it, else `26h`).
    rpo: Option<String>,
    /// WAL may wait this long to be archived (default: as the policy says, else `15m`).
    max_archive_lag: Option<String>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct BackupView {
    agent_id: String,
    name: String,
    status: &'static str,
    /// `no_backup`, `rpo_breached`, `archive_failing`, `last_failed`, `unknown` or `healthy`.
    risk: Risk,
    /// Every reason, worst first; empty when healthy.
    reasons: Vec<String>,
    /// What the newest `backup_info` record said; `null` when none arrived.
    backups: Option<Backups>,
    /// What the newest `archiver` record said; `null` when none arrived.
    archiver: Option<Archiver>,
}

/// An objective from the request, in ms.
fn objective(field: &str, v: &str) -> Result<i64, ApiError> {
    let d = humantime::parse_duration(v).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{field}: {v:?} is not a duration (examples: 26h, 15m): {e}"),
        )
    })?;
    if d.is_zero() || d > OBJECTIVE_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{field}: must be more than 0 and at most 366 days"),
        ));
    }
    Ok(crate::time::duration_ms(d))
}

/// `GET /api/v1/backups?rpo=26h&max_archive_lag=15m`
pub async fn list(
    State(state): State<Handles>,
    Query(q): Query<BackupsQuery>,
) -> Result<Json<Vec<BackupView>>, ApiError> {
    let defaults = Objectives::default();
    let asked = (
        q.rpo.as_deref().map(|v| objective("rpo", v)).transpose()?,
        q.max_archive_lag
            .as_deref()
            .map(|v| objective("max_archive_lag", v))
            .transpose()?,
    );
    let policies: Vec<crate::backup_policies::PolicySpec> = state
        .storage
        .backup_policies()
        .await
        .map_err(ApiError::internal)?
        .iter()
        .filter_map(|p| serde_json::from_str(&p.spec).ok())
        .collect();
    // The request's objectives win; then the first policy (by name) selecting the host.
    let objectives = |name: &str, labels: &crate::labels::Labels| {
        let base = policies
            .iter()
            .find(|p| p.selects(name, labels))
            .map_or(defaults, |p| p.objectives(defaults));
        Objectives {
            rpo_ms: asked.0.unwrap_or(base.rpo_ms),
            archive_lag_ms: asked.1.unwrap_or(base.archive_lag_ms),
            ..base
        }
    };
    let rows = state
        .storage
        .list_agents()
        .await
        .map_err(ApiError::internal)?;
    let now_ms = state.world.now_unix_ms();
    let mut views: Vec<BackupView> = rows
        .into_iter()
        .map(|row| {
            let health: crate::health::Health = row
                .health
                .as_deref()
                .and_then(|h| serde_json::from_str(h).ok())
                .unwrap_or_default();
            let (risk, reasons) = assess(
                health.backups.as_ref(),
                health.archiver.as_ref(),
                now_ms,
                objectives(&row.name, &crate::labels::of(row.labels.as_deref())),
            );
            BackupView {
                status: if state.settings.is_online(&row, now_ms) {
                    "online"
                } else {
                    "offline"
                },
                agent_id: row.id,
                name: row.name,
                risk,
                reasons,
                backups: health.backups,
                archiver: health.archiver,
            }
        })
        .collect();
    // Worst risk first; at one level, more reasons first; then by name.
    views.sort_by(|a, b| {
        b.risk
            .cmp(&a.risk)
            .then_with(|| b.reasons.len().cmp(&a.reasons.len()))
            .then_with(|| a.name.cmp(&b.name))
    });
    Ok(Json(views))
}
