//! `GET /metrics`: the control plane's own figures in the Prometheus text format (0.0.4).
//!
//! Counters and histograms live in [`Observed`] (one per process, in the app state); fleet
//! figures (agents online, each agent's metrics-buffer health) are read from storage at scrape
//! time, so every replica reports the same fleet.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use proto::prometheus::Exposition;

/// Upper bounds (seconds) of the request latency histogram buckets.
const LATENCY_BUCKETS_S: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default, Clone)]
struct Histogram {
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS_S`].
    buckets: [u64; LATENCY_BUCKETS_S.len()],
    count: u64,
    sum_s: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bucket, le) in self.buckets.iter_mut().zip(LATENCY_BUCKETS_S) {
            if seconds <= le {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum_s += seconds;
    }
}

/// Process-wide counters of one control plane.
#[derive(Default)]
pub struct Observed {
    /// (method, route template, status) → latency histogram.
    requests: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    pub ingest_batches_total: AtomicU64,
    pub ingest_rows_stored_total: AtomicU64,
    pub ingest_rows_duplicate_total: AtomicU64,
    pub ingest_rows_expired_total: AtomicU64,
    pub ingest_batches_shed_total: AtomicU64,
    pub ingest_batches_rejected_total: AtomicU64,
    /// Task state changes reported by agents, by the status they reached.
    task_events: Mutex<BTreeMap<String, u64>>,
    pub audit_write_failures_total: AtomicU64,
    pub login_failures_total: AtomicU64,
    pub login_lockouts_total: AtomicU64,
    pub login_refused_busy_total: AtomicU64,
    pub agent_frames_throttled_total: AtomicU64,
    pub login_refusals_unaudited_total: AtomicU64,
    /// Requests whose body did not arrive within body_timeout (answered 408, closed).
    pub http_body_deadlines_total: AtomicU64,
    /// Requests not answered within request_timeout (answered 503, closed).
    pub http_request_deadlines_total: AtomicU64,
    /// Metrics batches refused because the same agent had one in flight.
    pub ingest_batches_concurrent_total: AtomicU64,
    /// Connections and TLS handshakes, counted by the server loop.
    pub connections: std::sync::Arc<world::ConnectionCounters>,
}

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Observed {
    pub fn request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let mut requests = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        requests
            .entry((method.to_string(), route.to_string(), status))
            .or_default()
            .observe(took.as_secs_f64());
    }

    pub fn task_event(&self, status: &str) {
        let mut events = self
            .task_events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *events.entry(status.to_string()).or_default() += 1;
    }
}

/// Counters, each one family with one sample: (name, help, value).
pub fn write_counters(out: &mut Exposition, counters: &[(&str, &str, &AtomicU64)]) {
    for (name, help, value) in counters {
        out.single(name, "counter", help, value.load(Ordering::Relaxed) as f64);
    }
}

/// The process's counters, written into `out`.
pub fn write_process(observed: &Observed, out: &mut Exposition) {
    write_request_latency(observed, out);
    write_counters(out, &plain_counters(observed));
    out.single(
        "outpost_http_connections_open",
        "gauge",
        "Connections being served now (WebSockets included), against max_connections.",
        observed.connections.open.load(Ordering::Relaxed) as f64,
    );
    out.family(
        "outpost_task_events_total",
        "counter",
        "Task state changes reported by agents, by the status reached (a resent event counts again).",
    );
    let events = observed
        .task_events
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for (status, n) in &events {
        out.sample(
            "outpost_task_events_total",
            &[("status", status)],
            *n as f64,
        );
    }
}

/// `outpost_http_request_duration_seconds`: a histogram per method, route and status.
fn write_request_latency(observed: &Observed, out: &mut Exposition) {
    out.family(
        "outpost_http_request_duration_seconds",
        "histogram",
        "HTTP request latency by method, route template and status (WebSocket routes: until the upgrade).",
    );
    let requests = observed
        .requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for ((method, route, status), h) in &requests {
        let status = status.to_string();
        let base = [
            ("method", method.as_str()),
            ("route", route.as_str()),
            ("status", status.as_str()),
        ];
        for (le, n) in LATENCY_BUCKETS_S.iter().zip(h.buckets) {
            let le = le.to_string();
            let mut labels = base.to_vec();
            labels.push(("le", &le));
            out.sample(
                "outpost_http_request_duration_seconds_bucket",
                &labels,
                n as f64,
            );
        }
        let mut labels = base.to_vec();
        labels.push(("le", "+Inf"));
        out.sample(
            "outpost_http_request_duration_seconds_bucket",
            &labels,
            h.count as f64,
        );
        out.sample("outpost_http_request_duration_seconds_sum", &base, h.sum_s);
        out.sample(
            "outpost_http_request_duration_seconds_count",
            &base,
            h.count as f64,
        );
    }
}

/// The plain counters: name, help, value.
fn plain_counters(observed: &Observed) -> [(&'static str, &'static str, &AtomicU64); 19] {
    [
        (
            "outpost_ingest_batches_total",
            "Metrics batches stored and acknowledged.",
            &observed.ingest_batches_total,
        ),
        (
            "outpost_ingest_rows_stored_total",
            "Metric rows stored for the first time.",
            &observed.ingest_rows_stored_total,
        ),
        (
            "outpost_ingest_rows_duplicate_total",
            "Metric rows delivered again after an earlier store (acknowledged, not stored twice).",
            &observed.ingest_rows_duplicate_total,
        ),
        (
            "outpost_ingest_rows_expired_total",
            "Metric rows older than the retention period (acknowledged, not stored).",
            &observed.ingest_rows_expired_total,
        ),
        (
            "outpost_ingest_batches_shed_total",
            "Metrics batches answered 429 because ingest was at capacity.",
            &observed.ingest_batches_shed_total,
        ),
        (
            "outpost_ingest_batches_rejected_total",
            "Metrics batches refused as malformed (4xx other than 429).",
            &observed.ingest_batches_rejected_total,
        ),
        (
            "outpost_login_failures_total",
            "Logins refused for a wrong user name or password.",
            &observed.login_failures_total,
        ),
        (
            "outpost_login_lockouts_total",
            "Lockouts started after repeated failed logins for one name.",
            &observed.login_lockouts_total,
        ),
        (
            "outpost_login_refused_busy_total",
            "Logins answered 429 without a password check: the name is locked out or its free attempts are being checked.",
            &observed.login_refused_busy_total,
        ),
        (
            "outpost_login_refusals_unaudited_total",
            "Refused logins beyond the 60 per minute written to the audit log (counted only).",
            &observed.login_refusals_unaudited_total,
        ),
        (
            "outpost_agent_frames_throttled_total",
            "Agent channel frames held back because the agent sent more than 20 per second beyond a burst of 200.",
            &observed.agent_frames_throttled_total,
        ),
        (
            "outpost_http_connections_refused_total",
            "Connections closed on accept because max_connections were open.",
            &observed.connections.refused,
        ),
        (
            "outpost_http_connections_refused_per_address_total",
            "Connections closed on accept because their source address had max_connections_per_address open.",
            &observed.connections.refused_per_address,
        ),
        (
            "outpost_http_body_deadlines_total",
            "Requests whose body did not arrive within body_timeout (answered 408, connection closed).",
            &observed.http_body_deadlines_total,
        ),
        (
            "outpost_http_request_deadlines_total",
            "Requests not answered within request_timeout (answered 503, connection closed).",
            &observed.http_request_deadlines_total,
        ),
        (
            "outpost_ingest_batches_concurrent_total",
            "Metrics batches answered 429 because the same agent had another batch in flight.",
            &observed.ingest_batches_concurrent_total,
        ),
        (
            "outpost_tls_handshakes_evicted_total",
            "TLS handshakes dropped unfinished because 256 were pending and a new connection came.",
            &observed.connections.handshakes_evicted,
        ),
        (
            "outpost_tls_handshakes_failed_total",
            "TLS handshakes that failed or did not finish within 10 s.",
            &observed.connections.handshakes_failed,
        ),
        (
            "outpost_audit_write_failures_total",
            "Audit records that could not be stored (each was logged at error level).",
            &observed.audit_write_failures_total,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let observed = Observed::default();
        observed.request("GET", "/x", 200, Duration::from_millis(3));
        observed.request("GET", "/x", 200, Duration::from_millis(300));
        let mut out = Exposition::default();
        write_process(&observed, &mut out);
        let text = out.finish();
        assert!(text.contains(
            "outpost_http_request_duration_seconds_bucket{method=\"GET\",route=\"/x\",status=\"200\",le=\"0.001\"} 0\n"
        ));
        assert!(text.contains(
            "outpost_http_request_duration_seconds_bucket{method=\"GET\",route=\"/x\",status=\"200\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains(
            "outpost_http_request_duration_seconds_bucket{method=\"GET\",route=\"/x\",status=\"200\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains("outpost_http_request_duration_seconds_count{method=\"GET\",route=\"/x\",status=\"200\"} 2\n"));
    }
}
