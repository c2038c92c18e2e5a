//! Delivery: the oldest rows go to the control plane in batches, one batch in flight, and are
//! deleted only through the `seq` the control plane acknowledged as durably stored. A `429`
//! waits for its `Retry-After`; other failures back off with jitter. Expired rows are
//! discarded (and counted) before each batch, so a long outage shows as a gap.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use world::World;

use super::store::Buffer;
use crate::link::Backoff;

#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// `http://cp:8080/api/v1/agent/metrics`
    pub url: url::Url,
    pub credential: String,
    pub batch_rows_max: usize,
    /// Wait when the buffer is empty.
    pub idle_poll: Duration,
    pub request_timeout: Duration,
}

/// Longest `Retry-After` honoured.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
const RESPONSE_BYTES_MAX: usize = 64 * 1024;

enum Attempt {
    /// Stored through `stored_through`.
    Delivered {
        stored_through: i64,
    },
    Empty,
    Shed(Duration),
    Failed(String),
}

/// A batch read from the buffer and encoded, ready to send.
struct Prepared {
    last_seq: i64,
    body: Vec<u8>,
}

async fn with_buffer<T: Send + 'static>(
    world: &World,
    buffer: &Arc<Mutex<Buffer>>,
    f: impl FnOnce(&mut Buffer) -> Result<T, super::store::BufferError> + Send + 'static,
) -> Result<T, String> {
    let buffer = buffer.clone();
    world
        .blocking(move || {
            let mut b = buffer
                .lock()
                .map_err(|_| "buffer lock poisoned".to_string())?;
            f(&mut b).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
}

/// Read and encode the oldest rows above `after`. With `expire`, stale rows are discarded
/// (and counted) first; that is only done while no batch is in flight, so a row is never both
/// delivered and counted as dropped.
async fn prepare(
    world: &World,
    buffer: &Arc<Mutex<Buffer>>,
    after: i64,
    limit: usize,
    expire: bool,
) -> Result<Option<Prepared>, String> {
    let now_ms = world.now_unix_ms();
    let (epoch, rows) = with_buffer(world, buffer, move |b| {
        if expire {
            b.expire(now_ms)?;
        }
        let rows = b.after(after, limit)?;
        if let Some(last) = rows.last() {
            b.make_durable_through(last.seq)?;
        }
        Ok((b.epoch().to_string(), rows))
    })
    .await
    .map_err(|e| format!("read the buffer: {e}"))?;
    let Some(last_seq) = rows.last().map(|r| r.seq) else {
        return Ok(None);
    };
    let encoded = world
        .blocking(move || {
            let mut records = Vec::with_capacity(rows.len());
            for r in rows {
                // Stored by the collector as JSON; a row that is not (a damaged file) goes as
                // null rather than block delivery forever.
                let data = serde_json::value::RawValue::from_string(r.data)
                    .or_else(|_| serde_json::value::RawValue::from_string("null".into()))?;
                records.push(proto::MetricRecord {
                    seq: r.seq,
                    ts_ms: r.ts_ms,
                    kind: r.kind,
                    data,
                });
            }
            encode(&proto::MetricsBatch { epoch, records }).map_err(serde_json::Error::io)
        })
        .await
        .map_err(|e| e.to_string())?;
    let body = encoded.map_err(|e| format!("encode a batch: {e}"))?;
    Ok(Some(Prepared { last_seq, body }))
}

async fn send(world: &World, config: &DeliveryConfig, batch: &Prepared) -> Attempt {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::CONTENT_ENCODING,
        http::HeaderValue::from_static("gzip"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {}", config.credential)) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let response = match world::http_request(
        world,
        http::Method::POST,
        &config.url,
        headers,
        batch.body.clone().into(),
        config.request_timeout,
        RESPONSE_BYTES_MAX,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return Attempt::Failed(e.to_string()),
    };
    match response.status.as_u16() {
        200 => {}
        429 => {
            let wait = response
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs)
                .unwrap_or(Duration::from_secs(1));
            return Attempt::Shed(wait.min(RETRY_AFTER_MAX));
        }
        401 => {
            return Attempt::Failed(
                "the control plane rejected this agent's credential; enroll again".into(),
            );
        }
        code => {
            let detail = serde_json::from_slice::<proto::ErrorBody>(&response.body)
                .map(|b| format!(": {}", b.error))
                .unwrap_or_default();
            return Attempt::Failed(format!("control plane answered HTTP {code}{detail}"));
        }
    }
    match serde_json::from_slice::<proto::MetricsAck>(&response.body) {
        Ok(ack) if ack.stored_through >= batch.last_seq => Attempt::Delivered {
            stored_through: ack.stored_through,
        },
        Ok(ack) => Attempt::Failed(format!(
            "acknowledgement through {} does not cover the batch (through {})",
            ack.stored_through, batch.last_seq
        )),
        Err(e) => Attempt::Failed(format!("unreadable acknowledgement: {e}")),
    }
}

/// A batch as gzip-compressed JSON. The fastest level: metric JSON is repetitive, so level 1
/// already shrinks it several times while costing a fraction of the drain rate.
pub fn encode(batch: &proto::MetricsBatch) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    serde_json::to_writer(&mut gz, batch)?;
    gz.flush()?;
    gz.finish()
}

/// Deliver until `shutdown`. While a batch is in flight the next one is read and encoded, so
/// the agent's work overlaps the control plane's; only one request is ever on the wire.
pub async fn run_delivery(
    world: World,
    buffer: Arc<Mutex<Buffer>>,
    config: DeliveryConfig,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let limit = config.batch_rows_max;
    let mut next: Option<Prepared> = None;
    loop {
        let current = match next.take() {
            Some(p) => Ok(Some(p)),
            None => prepare(&world, &buffer, i64::MIN, limit, true).await,
        };
        let outcome = match current {
            Err(e) => Attempt::Failed(e),
            Ok(None) => Attempt::Empty,
            Ok(Some(batch)) => {
                let (sent, prefetched) = tokio::join!(
                    send(&world, &config, &batch),
                    prepare(&world, &buffer, batch.last_seq, limit, false)
                );
                match sent {
                    Attempt::Delivered { stored_through } => {
                        match with_buffer(&world, &buffer, move |b| {
                            b.delete_through(stored_through)?;
                            b.delivery_result(true)
                        })
                        .await
                        {
                            Ok(()) => {
                                next = prefetched.ok().flatten();
                                Attempt::Delivered { stored_through }
                            }
                            Err(e) => Attempt::Failed(format!("forget delivered rows: {e}")),
                        }
                    }
                    other => other,
                }
            }
        };
        let wait = match outcome {
            Attempt::Delivered { .. } => {
                backoff.reset();
                Duration::ZERO
            }
            Attempt::Empty => config.idle_poll,
            Attempt::Shed(wait) => {
                tracing::info!(
                    retry_after_ms = wait.as_millis() as u64,
                    "control plane shed a metrics batch; waiting"
                );
                wait
            }
            Attempt::Failed(error) => {
                let delay = backoff.next_delay(world.random_u64());
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "metrics delivery failed");
                if let Err(e) = with_buffer(&world, &buffer, |b| b.delivery_result(false)).await {
                    tracing::warn!(error = %e, "record delivery failure");
                }
                delay
            }
        };
        if wait.is_zero() {
            if shutdown.is_cancelled() {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
