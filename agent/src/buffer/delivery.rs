//! Delivery, the driver: the oldest rows go to the control plane in batches and are deleted
//! only through the `seq` the control plane acknowledged as durably stored. What to read, how
//! long to wait and when a failure counts are the policy's (`policy`); this file does the
//! SQLite and HTTP work. Expired rows are discarded (and counted) before each fresh batch, so
//! a long outage shows as a gap.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use world::World;

use super::SharedBuffer;
use super::policy::{Attempt, DeliveryPolicy, Read};

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

const RESPONSE_BYTES_MAX: usize = 64 * 1024;

/// How sending one batch ended.
enum Sent {
    /// Stored through `stored_through`.
    Stored {
        stored_through: i64,
    },
    Shed(Duration),
    Failed(String),
}

/// A batch read from the buffer and encoded, ready to send.
struct Prepared {
    last_seq: i64,
    body: Vec<u8>,
}

/// Read and encode the rows `read` names, at most `limit`, synced through the last one first
/// (nothing leaves the host unsynced).
async fn prepare(
    world: &World,
    buffer: &SharedBuffer,
    read: Read,
    limit: usize,
) -> Result<Option<Prepared>, String> {
    let Read { after, expire } = read;
    let now_ms = world.now_unix_ms();
    let (epoch, rows) = buffer
        .with(world, move |b| {
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

async fn send(world: &World, config: &DeliveryConfig, batch: &Prepared) -> Sent {
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
        Err(e) => return Sent::Failed(e.to_string()),
    };
    match response.status.as_u16() {
        200 => {}
        429 => {
            let header = response
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok());
            return Sent::Shed(super::policy::retry_after(header));
        }
        401 => {
            return Sent::Failed(
                "the control plane rejected this agent's credential; enroll again".into(),
            );
        }
        code => {
            let detail = serde_json::from_slice::<proto::ErrorBody>(&response.body)
                .map(|b| format!(": {}", b.error))
                .unwrap_or_default();
            return Sent::Failed(format!("control plane answered HTTP {code}{detail}"));
        }
    }
    match serde_json::from_slice::<proto::MetricsAck>(&response.body) {
        Ok(ack) if ack.stored_through >= batch.last_seq => Sent::Stored {
            stored_through: ack.stored_through,
        },
        Ok(ack) => Sent::Failed(format!(
            "acknowledgement through {} does not cover the batch (through {})",
            ack.stored_through, batch.last_seq
        )),
        Err(e) => Sent::Failed(format!("unreadable acknowledgement: {e}")),
    }
}

/// A batch as gzip-compressed JSON. The fastest level: metric JSON is repetitive, so level 1
/// already shrinks it several times while costing a fraction of the drain rate.
/// The JSON is written whole first and compressed in one call: written straight into the
/// encoder, every token became a small compression call of its own.
pub fn encode(batch: &proto::MetricsBatch) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let json = serde_json::to_vec(batch)?;
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(&json)?;
    gz.finish()
}

/// Deliver until `shutdown`. While a batch is in flight the rows the previous acknowledgement
/// covered are deleted and the next batch is read and encoded, so the agent's work overlaps
/// the control plane's; only one request is ever on the wire. Rows are deleted only through
/// an acknowledged `seq`, and always before a read from scratch (which would send them again).
pub async fn run_delivery(
    world: World,
    buffer: SharedBuffer,
    config: DeliveryConfig,
    shutdown: CancellationToken,
) {
    let mut policy = DeliveryPolicy::new(config.idle_poll);
    let limit = config.batch_rows_max;
    let mut next: Option<Prepared> = None;
    // Acknowledged through this `seq`, not yet deleted.
    let mut acked: Option<i64> = None;
    loop {
        let current = match next.take() {
            Some(p) => Ok(Some(p)),
            None => match forget(&world, &buffer, acked.take()).await {
                Ok(()) => prepare(&world, &buffer, DeliveryPolicy::fresh_read(), limit).await,
                Err((e, through)) => {
                    acked = through;
                    Err(e)
                }
            },
        };
        let (attempt, prefetched) = match current {
            Err(e) => (Err(e), None),
            Ok(None) => (Ok(Attempt::Empty), None),
            Ok(Some(batch)) => {
                let earlier = acked.take();
                let (sent, (forgotten, prefetched)) =
                    tokio::join!(send(&world, &config, &batch), async {
                        let forgotten = forget(&world, &buffer, earlier).await;
                        let read = DeliveryPolicy::prefetch_read(batch.last_seq);
                        (forgotten, prepare(&world, &buffer, read, limit).await)
                    });
                let attempt = match (sent, forgotten) {
                    (_, Err((e, through))) => {
                        // Deleted again before the next read; later acknowledgements cover
                        // more.
                        acked = through;
                        Err(e)
                    }
                    (Sent::Stored { stored_through }, Ok(())) => {
                        acked = Some(stored_through);
                        buffer
                            .with(&world, |b| b.delivery_result(true))
                            .await
                            .map(|()| Attempt::Delivered)
                            .map_err(|e| format!("record the delivery: {e}"))
                    }
                    (Sent::Shed(wait), Ok(())) => Ok(Attempt::Shed(wait)),
                    (Sent::Failed(e), Ok(())) => Err(e),
                };
                (attempt, prefetched.ok().flatten())
            }
        };
        let step = match &attempt {
            Ok(attempt) => policy.after(*attempt, || world.random_u64()),
            Err(_) => policy.after(Attempt::Failed, || world.random_u64()),
        };
        if step.use_prefetched {
            next = prefetched;
        }
        match attempt {
            Ok(Attempt::Shed(wait)) => tracing::info!(
                retry_after_ms = wait.as_millis() as u64,
                "control plane shed a metrics batch; waiting"
            ),
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = step.wait.as_millis() as u64, "metrics delivery failed");
            }
            Ok(_) => {}
        }
        if step.record_failure
            && let Err(e) = buffer.with(&world, |b| b.delivery_result(false)).await
        {
            tracing::warn!(error = %e, "record delivery failure");
        }
        if step.wait.is_zero() && !shutdown.is_cancelled() {
            continue;
        }
        let stop = shutdown.is_cancelled()
            || tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tokio::time::sleep(step.wait) => false,
            };
        if stop {
            // What the control plane holds need not be sent again at the next start.
            let _ = forget(&world, &buffer, acked.take()).await;
            return;
        }
    }
}

/// Delete the rows acknowledged through `through`; on failure the error and what is still to
/// delete.
async fn forget(
    world: &World,
    buffer: &SharedBuffer,
    through: Option<i64>,
) -> Result<(), (String, Option<i64>)> {
    let Some(through) = through else {
        return Ok(());
    };
    buffer
        .with(world, move |b| {
            crate::crashpoint::pass(crate::crashpoint::AFTER_ACK);
            b.delete_through(through)
        })
        .await
        .map(|_| ())
        .map_err(|e| (format!("forget delivered rows: {e}"), Some(through)))
}
