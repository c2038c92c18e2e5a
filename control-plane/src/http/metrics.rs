//! Metrics ingest (agents) and reads (users).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::edge::{ApiError, AuthAgent};
use crate::handles::{Handles, IngestPermits};
use crate::storage::{MetricQuery, MetricRow};

/// Largest metrics batch body.
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;
/// How long a batch waits for an ingest permit before it is shed (429).
const INGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
const EPOCH_BYTES_MAX: usize = 64;
const KIND_BYTES_MAX: usize = 64;
const READ_ROWS_MAX: i64 = 10_000;
use proto::METRIC_RECORD_BYTES_MAX as RECORD_BYTES_MAX;
/// Data returned by one metrics read (with [`READ_ROWS_MAX`], whichever comes first).
const READ_BYTES_MAX: i64 = 8 * 1024 * 1024;
/// How far ahead of this clock a record may be stamped.
const FUTURE_MS_MAX: i64 = crate::time::DAY_MS;
/// Seconds an agent is told to wait when ingest sheds load.
const RETRY_AFTER_S: u64 = 1;

/// `POST /api/v1/agent/metrics`: durable before the ack, idempotent on (agent, epoch, seq).
pub async fn ingest(
    State(state): State<Handles>,
    State(ingest): State<IngestPermits>,
    Extension(AuthAgent(agent)): Extension<AuthAgent>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let result = ingest_batch(&state, &ingest, &agent, &headers, body).await;
    if let Err(e) = &result
        && e.status.is_client_error()
    {
        crate::observe::add(&state.observed.ingest_batches_rejected_total, 1);
    }
    result
}

async fn ingest_batch(
    state: &Handles,
    ingest: &IngestPermits,
    agent: &crate::storage::AgentRow,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    // One batch in flight per agent: a credential whose bodies never arrive holds one permit
    // (for at most body_timeout), never all of them.
    let Some(_slot) = ingest.agent_slot(&agent.id) else {
        crate::observe::add(&state.observed.ingest_batches_concurrent_total, 1);
        return Ok(crate::edge::retry_later(
            RETRY_AFTER_S,
            "this agent has another metrics batch in flight; send one at a time",
        ));
    };
    // Admission first: a shed batch costs no body read (up to 16 MiB per request). A batch
    // arriving in a burst waits briefly for a permit (its body unread) before it is shed:
    // a fleet's deliveries bunch up, and a retry costs the agent far more than the wait.
    let permit = tokio::time::timeout(INGEST_WAIT, ingest.permits.clone().acquire_owned()).await;
    let Ok(Ok(_permit)) = permit else {
        tracing::warn!(agent_id = %agent.id, "ingest at capacity: shedding a metrics batch (429)");
        crate::observe::add(&state.observed.ingest_batches_shed_total, 1);
        return Ok(crate::edge::retry_later(
            RETRY_AFTER_S,
            "ingest at capacity; retry after the Retry-After delay",
        ));
    };
    let gzip = match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str()) {
        None | Some(Ok("identity")) => false,
        Some(Ok("gzip")) => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content-encoding {other:?} is not supported; send gzip or identity"),
            ));
        }
    };
    let body = axum::body::to_bytes(body, BATCH_BYTES_MAX)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a batch body is at most {BATCH_BYTES_MAX} bytes: {e}"),
            )
        })?;
    let batch = state
        .world
        .blocking(move || decode(&body, gzip))
        .await
        .map_err(ApiError::internal)??;
    let now_ms = state.world.now_unix_ms();
    let retention_ms = crate::time::duration_ms(state.settings.metrics_retention);
    let Admitted {
        epoch,
        rows,
        expired,
        stored_through,
    } = admit(batch, now_ms, retention_ms).map_err(|refused| {
        let status = match refused {
            Refused::TooManyRecords | Refused::RecordTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, refused.to_string())
    })?;
    let offered = rows.len();
    let health = crate::health::update(agent.health.as_deref(), &rows, now_ms);
    let new_records = state
        .storage
        .insert_metrics(&agent.id, &epoch, rows)
        .await
        .map_err(ApiError::internal)?;
    let observed = &state.observed;
    if let Some(health) = health
        && let Err(e) = state.storage.set_agent_health(&agent.id, &health).await
    {
        // The metrics are stored; only the fleet page's summary is late.
        tracing::warn!(agent_id = %agent.id, error = %e, "could not store the agent's health summary");
    }
    crate::observe::add(&observed.ingest_batches_total, 1);
    crate::observe::add(&observed.ingest_rows_stored_total, new_records);
    crate::observe::add(
        &observed.ingest_rows_duplicate_total,
        (offered as u64).saturating_sub(new_records),
    );
    crate::observe::add(&observed.ingest_rows_expired_total, expired as u64);
    if expired > 0 {
        tracing::info!(agent_id = %agent.id, expired, "metric records older than the retention period were not stored");
    }
    tracing::debug!(agent_id = %agent.id, epoch = %epoch, offered, new_records, stored_through, "metrics stored");
    Ok(Json(proto::MetricsAck {
        stored_through,
        new_records,
    })
    .into_response())
}

/// A decoded batch that ingest will store: its rows within retention, how many were older (acknowledged, not stored), and the
/// `seq` the acknowledgement covers.
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    pub epoch: String,
    pub rows: Vec<MetricRow>,
    pub expired: usize,
    pub stored_through: i64,
}

/// Why a batch is refused (each a 4xx: the agent's request, not the control plane, is wrong).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("epoch is missing or too long")]
    Epoch,
    #[error("at most {} records per batch", proto::METRICS_BATCH_ROWS_MAX)]
    TooManyRecords,
    #[error("empty batch")]
    Empty,
    #[error("record {seq}: seq must be positive and kind 1-{KIND_BYTES_MAX} bytes")]
    BadRecord { seq: i64 },
    #[error("record {seq}: its data is {bytes} bytes; at most {RECORD_BYTES_MAX}")]
    RecordTooLarge { seq: i64, bytes: usize },
    #[error(
        "record {seq} is stamped {stamped}, more than a day ahead of the control plane's clock; fix the agent host's clock"
    )]
    FromTheFuture { seq: i64, stamped: String },
}

/// Ingest admission, pure: check a decoded batch against the limits, the clock (`now_ms`) and
/// the retention period, and split it into rows to store and rows too old to keep.
pub fn admit(
    batch: proto::MetricsBatch,
    now_ms: i64,
    retention_ms: i64,
) -> Result<Admitted, Refused> {
    if batch.epoch.is_empty() || batch.epoch.len() > EPOCH_BYTES_MAX {
        return Err(Refused::Epoch);
    }
    if batch.records.len() > proto::METRICS_BATCH_ROWS_MAX {
        return Err(Refused::TooManyRecords);
    }
    let Some(stored_through) = batch.records.iter().map(|r| r.seq).max() else {
        return Err(Refused::Empty);
    };
    let horizon_ms = now_ms.saturating_sub(retention_ms);
    let mut expired = 0usize;
    let mut rows = Vec::with_capacity(batch.records.len());
    for r in batch.records {
        if r.seq <= 0 || r.kind.is_empty() || r.kind.len() > KIND_BYTES_MAX {
            return Err(Refused::BadRecord { seq: r.seq });
        }
        if r.data.get().len() > RECORD_BYTES_MAX {
            return Err(Refused::RecordTooLarge {
                seq: r.seq,
                bytes: r.data.get().len(),
            });
        }
        if r.ts_ms > now_ms.saturating_add(FUTURE_MS_MAX) {
            return Err(Refused::FromTheFuture {
                seq: r.seq,
                stamped: crate::time::rfc3339_ms(r.ts_ms),
            });
        }
        if r.ts_ms < horizon_ms {
            // Older than retention would keep it: acknowledged, not stored.
            expired += 1;
            continue;
        }
        rows.push(MetricRow {
            seq: r.seq,
            ts_ms: r.ts_ms,
            kind: r.kind,
            data: r.data.get().to_string(),
        });
    }
    Ok(Admitted {
        epoch: batch.epoch,
        rows,
        expired,
        stored_through,
    })
}

/// A batch body, gunzipped when `gzip`, never inflated beyond [`BATCH_BYTES_MAX`].
pub(crate) fn decode(body: &[u8], gzip: bool) -> Result<proto::MetricsBatch, ApiError> {
    use std::io::Read;
    let inflated;
    let json = if gzip {
        let mut out = Vec::with_capacity(body.len() * 4);
        flate2::read::GzDecoder::new(body)
            .take(BATCH_BYTES_MAX as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad gzip body: {e}")))?;
        if out.len() > BATCH_BYTES_MAX {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a batch inflates to at most {BATCH_BYTES_MAX} bytes"),
            ));
        }
        inflated = out;
        &inflated[..]
    } else {
        body
    };
    serde_json::from_slice(json)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad metrics batch: {e}")))
}

#[derive(Deserialize, schemars::JsonSchema)]
pub struct ReadQuery {
    #[serde(rename = "type")]
    kind: Option<String>,
    /// RFC 3339 or Unix milliseconds; default an hour ago.
    from: Option<String>,
    /// RFC 3339 or Unix milliseconds; default now.
    to: Option<String>,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct MetricView {
    epoch: String,
    seq: i64,
    ts: String,
    #[serde(rename = "type")]
    kind: String,
    data: serde_json::Value,
}

fn parse_ts(field: &str, v: &str) -> Result<i64, ApiError> {
    crate::time::parse_ms(field, v).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))
}

/// `GET /api/v1/agents/{id}/metrics?type=T&from=TS&to=TS`
pub async fn read(
    State(state): State<Handles>,
    Path(agent_id): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<Vec<MetricView>>, ApiError> {
    if state
        .storage
        .agent(&agent_id)
        .await
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no agent {agent_id}"),
        ));
    }
    let now_ms = state.world.now_unix_ms();
    let to_ms = match &q.to {
        Some(v) => parse_ts("to", v)?,
        None => now_ms + 1,
    };
    let from_ms = match &q.from {
        Some(v) => parse_ts("from", v)?,
        None => to_ms - 3_600_000,
    };
    let rows = state
        .storage
        .metrics(MetricQuery {
            agent_id,
            kind: q.kind,
            from_ms,
            to_ms,
            limit: READ_ROWS_MAX,
            bytes_max: READ_BYTES_MAX,
        })
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        rows.into_iter()
            .map(|m| MetricView {
                epoch: m.epoch,
                seq: m.row.seq,
                ts: crate::time::rfc3339_ms(m.row.ts_ms),
                kind: m.row.kind,
                data: serde_json::from_str(&m.row.data).unwrap_or(serde_json::Value::Null),
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::{Refused, admit};

    const NOW_MS: i64 = 1_767_225_600_000;
    const DAY_MS: i64 = 86_400_000;

    fn record(seq: i64, ts_ms: i64, kind: &str) -> proto::MetricRecord {
        proto::MetricRecord {
            seq,
            ts_ms,
            kind: kind.into(),
            data: RawValue::from_string("{\"x\":1}".into()).expect("json"),
        }
    }

    fn batch(records: Vec<proto::MetricRecord>) -> proto::MetricsBatch {
        proto::MetricsBatch {
            epoch: "ep1".into(),
            records,
        }
    }

    #[test]
    fn rows_within_retention_are_admitted_and_older_ones_acknowledged() {
        let admitted = admit(
            batch(vec![
                record(3, NOW_MS - 40 * DAY_MS, "db"),
                record(4, NOW_MS - 1000, "db"),
                record(5, NOW_MS, "locks"),
            ]),
            NOW_MS,
            30 * DAY_MS,
        )
        .expect("admitted");
        assert_eq!(admitted.expired, 1);
        assert_eq!(
            admitted.stored_through, 5,
            "the ack covers the expired row too"
        );
        let seqs: Vec<i64> = admitted.rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![4, 5]);
        assert_eq!(
            admitted.rows[0].data, "{\"x\":1}",
            "payloads pass through untouched"
        );
    }

    #[test]
    fn bad_batches_are_refused_with_the_reason() {
        let retention = 30 * DAY_MS;
        let mut no_epoch = batch(vec![record(1, NOW_MS, "db")]);
        no_epoch.epoch.clear();
        assert_eq!(admit(no_epoch, NOW_MS, retention), Err(Refused::Epoch));
        assert_eq!(admit(batch(vec![]), NOW_MS, retention), Err(Refused::Empty));
        assert_eq!(
            admit(batch(vec![record(0, NOW_MS, "db")]), NOW_MS, retention),
            Err(Refused::BadRecord { seq: 0 })
        );
        assert_eq!(
            admit(batch(vec![record(1, NOW_MS, "")]), NOW_MS, retention),
            Err(Refused::BadRecord { seq: 1 })
        );
        let too_many = (1..=proto::METRICS_BATCH_ROWS_MAX as i64 + 1)
            .map(|seq| record(seq, NOW_MS, "db"))
            .collect();
        assert_eq!(
            admit(batch(too_many), NOW_MS, retention),
            Err(Refused::TooManyRecords)
        );
        let mut huge = record(4, NOW_MS, "db");
        let text = format!("\"{}\"", "x".repeat(proto::METRIC_RECORD_BYTES_MAX));
        huge.data = serde_json::value::RawValue::from_string(text).expect("raw json");
        assert_eq!(
            admit(
                batch(vec![record(3, NOW_MS, "db"), huge]),
                NOW_MS,
                retention
            ),
            Err(Refused::RecordTooLarge {
                seq: 4,
                bytes: proto::METRIC_RECORD_BYTES_MAX + 2
            })
        );
        let ahead = admit(
            batch(vec![record(9, NOW_MS + 2 * DAY_MS, "db")]),
            NOW_MS,
            retention,
        )
        .expect_err("from the future");
        assert!(matches!(ahead, Refused::FromTheFuture { seq: 9, .. }));
        // Found by the metrics_ingest fuzz target: a year past 9999 panicked in the message.
        let far = admit(
            batch(vec![record(2, 340_000_000_400_400, "db")]),
            NOW_MS,
            retention,
        )
        .expect_err("far future");
        assert!(far.to_string().contains("9999-12-31"), "{far}");
        assert!(ahead.to_string().contains("fix the agent host's clock"));
        assert!(
            admit(
                batch(vec![record(9, NOW_MS + DAY_MS / 2, "db")]),
                NOW_MS,
                retention
            )
            .is_ok(),
            "a host clock a little ahead is fine"
        );
    }
}
