//! `GET /metrics` (Prometheus text) and `GET /api/v1/audit`.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::edge::ApiError;
use crate::handles::Handles;
use crate::observe::{Exposition, write_counters, write_process};
use crate::storage::AuditQuery;
use crate::terminal::Terminal;

/// `GET /metrics`.
pub async fn metrics(
    State(state): State<Handles>,
    State(terminal): State<Terminal>,
) -> Result<Response, ApiError> {
    let mut out = Exposition::default();
    write_process(&state.observed, &mut out);
    write_fleet(&state, &mut out).await?;
    write_alerts(&state, &mut out).await?;
    write_terminal(&terminal, &mut out).await;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, proto::prometheus::CONTENT_TYPE)],
        out.finish(),
    )
        .into_response())
}

/// Agents online and offline, and each agent's metrics buffer as it last reported it.
async fn write_fleet(state: &Handles, out: &mut Exposition) -> Result<(), ApiError> {
    let agents = state
        .storage
        .list_agents()
        .await
        .map_err(ApiError::internal)?;
    let now_ms = state.world.now_unix_ms();
    let online = agents
        .iter()
        .filter(|a| state.settings.is_online(a, now_ms))
        .count();
    out.family(
        "outpost_agents",
        "gauge",
        "Enrolled agents by status (online: a control channel is open and heard from).",
    )
    .sample("outpost_agents", &[("status", "online")], online as f64)
    .sample(
        "outpost_agents",
        &[("status", "offline")],
        (agents.len() - online) as f64,
    );
    let buffers: Vec<(&str, proto::BufferStats)> = agents
        .iter()
        .filter_map(|a| {
            let stats = serde_json::from_str(a.buffer.as_deref()?).ok()?;
            Some((a.name.as_str(), stats))
        })
        .collect();
    proto::prometheus::write_buffers(out, &buffers);
    let backups: Vec<_> = agents
        .iter()
        .filter_map(|a| {
            let h: crate::health::Health = serde_json::from_str(a.health.as_deref()?).ok()?;
            Some((a.name.as_str(), h.backups, h.archiver))
        })
        .collect();
    crate::backups::write_metrics(out, &backups);
    Ok(())
}

/// Alerts by rule, severity and state, and each channel's outbox: what waits and for how long
/// (a receiver that has been down shows here before anyone misses a message).
async fn write_alerts(state: &Handles, out: &mut Exposition) -> Result<(), ApiError> {
    use std::collections::BTreeMap;
    let alerts = state.storage.alerts().await.map_err(ApiError::internal)?;
    let mut counts: BTreeMap<(String, &'static str, &'static str), u64> = BTreeMap::new();
    for row in &alerts {
        let Ok(a) = serde_json::from_str::<crate::alerts::state::Alert>(&row.data) else {
            continue;
        };
        let phase = match a.phase {
            crate::alerts::state::Phase::Pending => "pending",
            crate::alerts::state::Phase::Firing => "firing",
            crate::alerts::state::Phase::Resolved => continue,
        };
        *counts
            .entry((a.rule, a.severity.as_str(), phase))
            .or_default() += 1;
    }
    out.family(
        "outpost_alerts",
        "gauge",
        "Alerts pending or firing, by rule, severity and state.",
    );
    for ((rule, severity, state), n) in &counts {
        out.sample(
            "outpost_alerts",
            &[("rule", rule), ("severity", severity), ("state", state)],
            *n as f64,
        );
    }
    let channels: BTreeMap<String, String> = state
        .storage
        .specs(crate::alerts::channels::SPEC_KIND)
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .map(|r| (r.id, r.name))
        .collect();
    let pending = state
        .storage
        .notifications_pending(100_000)
        .await
        .map_err(ApiError::internal)?;
    let now_ms = state.world.now_unix_ms();
    // Per channel: (waiting, the oldest's creation time).
    let mut waiting: BTreeMap<&str, (u64, i64)> = channels
        .values()
        .map(|name| (name.as_str(), (0, now_ms)))
        .collect();
    for n in &pending {
        if let Some(name) = channels.get(&n.channel) {
            let w = waiting.entry(name.as_str()).or_insert((0, now_ms));
            w.0 += 1;
            w.1 = w.1.min(n.created_ms);
        }
    }
    out.family(
        "outpost_notifications_pending",
        "gauge",
        "Notifications in the outbox not delivered yet, per channel.",
    );
    for (name, (n, _)) in &waiting {
        out.sample(
            "outpost_notifications_pending",
            &[("channel", name)],
            *n as f64,
        );
    }
    out.family(
        "outpost_notifications_oldest_pending_seconds",
        "gauge",
        "Age of each channel's oldest undelivered notification (0 when none waits).",
    );
    for (name, (_, oldest)) in &waiting {
        out.sample(
            "outpost_notifications_oldest_pending_seconds",
            &[("channel", name)],
            (now_ms - oldest).max(0) as f64 / 1000.0,
        );
    }
    Ok(())
}

/// The terminal's counters, whether its stream store answers, and the sessions live.
async fn write_terminal(terminal: &Terminal, out: &mut Exposition) {
    let live = terminal.streams.live().await.map(|l| l.len());
    let terminal_streams = &terminal.streams;
    let terminal = &terminal.counters;
    write_counters(
        out,
        &[
            (
                "outpost_terminal_sessions_opened_total",
                "Terminal sessions opened through this replica.",
                &terminal.sessions_opened_total,
            ),
            (
                "outpost_terminal_sessions_refused_total",
                "Terminal sessions refused (unknown or offline agent, limit reached, no answer).",
                &terminal.sessions_refused_total,
            ),
            (
                "outpost_terminal_output_bytes_total",
                "Terminal output bytes stored by this replica's agent handlers.",
                &terminal.output_bytes_total,
            ),
            (
                "outpost_terminal_store_failures_total",
                "Failed writes to the terminal stream store (sessions were marked degraded).",
                &terminal.store_failures_total,
            ),
            (
                "outpost_terminal_input_replays_dropped_total",
                "Terminal input entries not forwarded because their sequence was already forwarded (a copy in Redis, or its cursor set back).",
                &terminal.input_replays_dropped_total,
            ),
            (
                "outpost_relay_replays_dropped_total",
                "Relayed agent requests (terminal opens, task commands) not handled because they were handled once already (a copy re-added to Redis).",
                &terminal.relay_replays_dropped_total,
            ),
            (
                "outpost_terminal_recording_chunks_total",
                "Terminal recording chunks this replica stored.",
                &terminal.recording_chunks_total,
            ),
            (
                "outpost_terminal_recording_failures_total",
                "Failed storage calls while recording terminal sessions (the session was told; fail_closed closes it).",
                &terminal.recording_failures_total,
            ),
            (
                "outpost_terminal_recording_notes_dropped_total",
                "Output batches a busy recorder did not take at once (it read them back from the stream store).",
                &terminal.recording_notes_dropped_total,
            ),
        ],
    );
    out.single(
        "outpost_terminal_store_up",
        "gauge",
        "1 when the terminal stream store (Redis) answered this scrape, 0 when it did not (terminals are refused; everything else works).",
        if live.is_ok() { 1.0 } else { 0.0 },
    );
    if let Some(redis) = terminal_streams.shared() {
        out.single(
            "outpost_signing_key_id",
            "gauge",
            "The id of the key this replica signs Redis entries with (changes after `outpost admin rotate-signing-key`).",
            f64::from(redis.signing_key_id()),
        );
    }
    match live {
        Ok(n) => {
            out.single(
                "outpost_terminal_sessions_live",
                "gauge",
                "Terminal sessions not closed, across every replica sharing the stream store.",
                n as f64,
            );
        }
        Err(error) => tracing::warn!(%error, "metrics: terminal store unavailable"),
    }
}

/// Most records one audit page returns.
const AUDIT_PAGE_MAX: i64 = 500;

#[derive(Deserialize, schemars::JsonSchema)]
pub struct AuditParams {
    /// Only this action (`login`, `terminal.opened`, `task.created`, …).
    action: Option<String>,
    /// Only records about this target (a user name, agent, session or task id).
    target: Option<String>,
    /// Records older than this id (the `id` of the last record of the previous page).
    before: Option<i64>,
    /// Page size, 1-500 (default 100).
    limit: Option<i64>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct AuditView {
    id: i64,
    ts: String,
    actor: String,
    action: String,
    target: String,
    detail: serde_json::Value,
}

/// `GET /api/v1/audit?action=A&target=T&before=ID&limit=N`: newest first.
pub async fn audit(
    State(state): State<Handles>,
    Query(params): Query<AuditParams>,
) -> Result<Json<Vec<AuditView>>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=AUDIT_PAGE_MAX).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1-{AUDIT_PAGE_MAX}"),
        ));
    }
    if params.action.as_ref().is_some_and(|a| a.len() > 64) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "action is too long"));
    }
    if params.target.as_ref().is_some_and(|t| t.len() > 256) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "target is too long"));
    }
    let rows = state
        .storage
        .audit_list(AuditQuery {
            action: params.action,
            target: params.target,
            before_id: params.before,
            limit,
        })
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        rows.into_iter()
            .map(|r| AuditView {
                id: r.id,
                ts: crate::time::rfc3339_ms(r.ts_ms),
                actor: r.actor,
                action: r.action,
                target: r.target,
                detail: serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null),
            })
            .collect(),
    ))
}
