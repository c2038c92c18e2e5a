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
    Delivered,
    Empty,
    Shed(Duration),
    Failed(String),
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

async fn attempt(world: &World, buffer: &Arc<Mutex<Buffer>>, config: &DeliveryConfig) -> Attempt {
    let now_ms = world.now_unix_ms();
    let limit = config.batch_rows_max;
    let batch = with_buffer(world, buffer, move |b| {
        b.expire(now_ms)?;
        Ok((b.epoch().to_string(), b.oldest(limit)?))
    })
    .await;
    let (epoch, rows) = match batch {
        Ok(b) => b,
        Err(e) => return Attempt::Failed(format!("read the buffer: {e}")),
    };
    if rows.is_empty() {
        return Attempt::Empty;
    }
    let mut records = Vec::with_capacity(rows.len());
    for r in rows {
        // Stored by the collector as JSON; a row that is not (a damaged file) goes as null
        // rather than block delivery forever.
        let data = serde_json::value::RawValue::from_string(r.data)
            .or_else(|_| serde_json::value::RawValue::from_string("null".into()));
        match data {
            Ok(data) => records.push(proto::MetricRecord {
                seq: r.seq,
                ts_ms: r.ts_ms,
                kind: r.kind,
                data,
            }),
            Err(e) => return Attempt::Failed(e.to_string()),
        }
    }
    let encoded = world
        .blocking(move || encode(&proto::MetricsBatch { epoch, records }))
        .await;
    let body = match encoded {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Attempt::Failed(format!("encode a batch: {e}")),
        Err(e) => return Attempt::Failed(e.to_string()),
    };
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
        body.into(),
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
        code => return Attempt::Failed(format!("control plane answered HTTP {code}")),
    }
    let ack: proto::MetricsAck = match serde_json::from_slice(&response.body) {
        Ok(a) => a,
        Err(e) => return Attempt::Failed(format!("unreadable acknowledgement: {e}")),
    };
    match with_buffer(world, buffer, move |b| {
        b.delete_through(ack.stored_through)?;
        b.delivery_result(true)
    })
    .await
    {
        Ok(()) => Attempt::Delivered,
        Err(e) => Attempt::Failed(format!("forget delivered rows: {e}")),
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

/// Deliver until `shutdown`.
pub async fn run_delivery(
    world: World,
    buffer: Arc<Mutex<Buffer>>,
    config: DeliveryConfig,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let wait = match attempt(&world, &buffer, &config).await {
            Attempt::Delivered => {
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
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
