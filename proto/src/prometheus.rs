//! The Prometheus text exposition format (0.0.4), written by both binaries' `/metrics`.

use std::fmt::Write as _;

/// The `Content-Type` of an exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escape a label value (backslash, quote, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Builds an exposition: each family's HELP and TYPE once, then its samples.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        self
    }

    /// One sample; `labels` are (name, value) pairs.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// The metrics-buffer families, one sample per `(agent name, stats)`: the control plane
/// reports its whole fleet, an agent's own listener reports itself.
pub fn write_buffers(out: &mut Exposition, buffers: &[(&str, crate::BufferStats)]) {
    type Gauge = (&'static str, &'static str, fn(&crate::BufferStats) -> f64);
    let gauges: [Gauge; 5] = [
        (
            "outpost_agent_buffer_rows",
            "Rows waiting in an agent's metrics buffer.",
            |b| b.rows as f64,
        ),
        (
            "outpost_agent_buffer_size_bytes",
            "Size of an agent's metrics buffer.",
            |b| b.size_bytes as f64,
        ),
        (
            "outpost_agent_buffer_oldest_record_age_seconds",
            "Age of the oldest undelivered record in an agent's buffer (delivery lag).",
            |b| b.oldest_record_age_s as f64,
        ),
        (
            "outpost_agent_buffer_utilization_ratio",
            "An agent's buffer size over its bound (0-1).",
            |b| b.utilization,
        ),
        (
            "outpost_agent_buffer_delivery_failures",
            "Consecutive failed deliveries an agent reports.",
            |b| b.delivery_failures as f64,
        ),
    ];
    for (name, help, value) in gauges {
        out.family(name, "gauge", help);
        for (agent, stats) in buffers {
            out.sample(name, &[("agent", agent)], value(stats));
        }
    }
    out.family(
        "outpost_agent_buffer_dropped_total",
        "counter",
        "Records an agent's buffer dropped by policy, by reason (age, size, quarantine).",
    );
    for (agent, stats) in buffers {
        for (reason, n) in &stats.dropped_total {
            out.sample(
                "outpost_agent_buffer_dropped_total",
                &[("agent", agent), ("reason", reason)],
                *n as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_announced_once_and_label_values_escaped() {
        let mut out = Exposition::default();
        out.family("t", "gauge", "test")
            .sample("t", &[("name", "a\"b\\c\nd")], 1.0)
            .sample("t", &[], 2.5);
        out.single("u_total", "counter", "other", 3.0);
        assert_eq!(
            out.finish(),
            "# HELP t test\n# TYPE t gauge\nt{name=\"a\\\"b\\\\c\\nd\"} 1\nt 2.5\n# HELP u_total other\n# TYPE u_total counter\nu_total 3\n"
        );
    }
}
