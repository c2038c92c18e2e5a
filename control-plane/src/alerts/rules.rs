//! The built-in alert rules, their default thresholds, the overrides an admin sets for some
//! agents, and what each rule measures on one agent's stored row (pure).

use serde::{Deserialize, Serialize};

use crate::health::Health;
use crate::storage::AgentRow;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// A built-in rule: what it measures and its default thresholds (a value at or above a
/// threshold holds the condition at that severity).
pub struct RuleDef {
    pub name: &'static str,
    /// What the value is, for the rules list.
    pub measures: &'static str,
    pub warning: Option<f64>,
    pub critical: Option<f64>,
    /// How long the condition must hold before the alert fires.
    pub for_s: u64,
}

/// Every built-in rule.
pub const RULES: &[RuleDef] = &[
    RuleDef {
        name: "agent_offline",
        measures: "seconds since the agent was last heard from while offline",
        warning: None,
        critical: Some(300.0),
        for_s: 0,
    },
    RuleDef {
        name: "xid_age",
        measures: "transaction-ID age of the oldest database",
        warning: Some(1.0e9),
        critical: Some(1.5e9),
        for_s: 0,
    },
    RuleDef {
        name: "replication_lag",
        measures: "largest replay lag of a streaming standby, in seconds",
        warning: Some(60.0),
        critical: Some(600.0),
        for_s: 60,
    },
    RuleDef {
        name: "connections",
        measures: "client connections as a share of max_connections (0 to 1)",
        warning: Some(0.9),
        critical: Some(0.97),
        for_s: 120,
    },
    RuleDef {
        name: "metrics_buffer_full",
        measures: "how full the agent's metrics buffer is (0 to 1)",
        warning: Some(0.8),
        critical: Some(0.95),
        for_s: 300,
    },
    RuleDef {
        name: "metrics_delivery_failing",
        measures: "consecutive failed deliveries of the agent's metrics",
        warning: Some(5.0),
        critical: None,
        for_s: 300,
    },
    RuleDef {
        name: "backup_rpo",
        measures: "hours since the newest valid backup of the worst stanza",
        warning: None,
        critical: Some(26.0),
        for_s: 0,
    },
    RuleDef {
        name: "critical_task_failed",
        measures: "tasks marked critical whose latest finished run failed",
        warning: None,
        critical: Some(1.0),
        for_s: 0,
    },
    RuleDef {
        name: "archiving_failing",
        measures: "1 while WAL archiving fails or is off",
        warning: None,
        critical: Some(1.0),
        for_s: 300,
    },
];

pub fn rule(name: &str) -> Option<&'static RuleDef> {
    RULES.iter().find(|r| r.name == name)
}

/// The thresholds in force for one rule on one agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Thresholds {
    pub enabled: bool,
    pub warning: Option<f64>,
    pub critical: Option<f64>,
    pub for_s: u64,
}

impl Thresholds {
    pub fn default_of(def: &RuleDef) -> Thresholds {
        Thresholds {
            enabled: true,
            warning: def.warning,
            critical: def.critical,
            for_s: def.for_s,
        }
    }

    /// The severity a value has under these thresholds.
    pub fn severity(&self, value: f64) -> Option<Severity> {
        if !self.enabled {
            return None;
        }
        if self.critical.is_some_and(|t| value >= t) {
            Some(Severity::Critical)
        } else if self.warning.is_some_and(|t| value >= t) {
            Some(Severity::Warning)
        } else {
            None
        }
    }
}

/// An admin's change to one rule for some agents (stored as a spec of kind `alert_rule`).
/// Overrides apply in name order; a later one wins for the fields it sets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleOverride {
    /// Unique, 1 to 64 printable characters.
    pub name: String,
    /// The built-in rule it changes.
    pub rule: String,
    /// Agent names or patterns (`*` any characters), or labels `KEY=VALUE`.
    pub agents: Vec<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub warning: Option<f64>,
    #[serde(default)]
    pub critical: Option<f64>,
    /// How long the condition must hold, e.g. `5m` (`0s` fires at once).
    #[serde(default, rename = "for")]
    pub for_: Option<String>,
}

const NAME_BYTES_MAX: usize = 64;
/// Overrides kept at most.
pub const OVERRIDES_MAX: usize = 500;

impl RuleOverride {
    /// Every refusal names the field.
    pub fn validate(&self) -> Result<(), String> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > NAME_BYTES_MAX || name.chars().any(char::is_control) {
            return Err(format!(
                "name must be 1 to {NAME_BYTES_MAX} printable bytes"
            ));
        }
        if rule(&self.rule).is_none() {
            let names: Vec<&str> = RULES.iter().map(|r| r.name).collect();
            return Err(format!("rule must be one of {}", names.join(", ")));
        }
        crate::labels::selector_ok(&self.agents)?;
        for (field, v) in [("warning", self.warning), ("critical", self.critical)] {
            if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                return Err(format!("{field} must be a number at or above 0"));
            }
        }
        if let Some(f) = &self.for_ {
            let d =
                humantime::parse_duration(f).map_err(|e| format!("for: {e} (e.g. 30s, 5m, 1h)"))?;
            if d > std::time::Duration::from_secs(86_400) {
                return Err("for must be at most 24h".into());
            }
        }
        Ok(())
    }

    fn selects(&self, agent: &str, labels: &crate::labels::Labels) -> bool {
        crate::labels::selects(&self.agents, agent, labels)
    }
}

/// The thresholds of `def` on agent `agent` after the overrides (in name order).
pub fn thresholds(
    def: &RuleDef,
    overrides: &[RuleOverride],
    agent: &str,
    labels: &crate::labels::Labels,
) -> Thresholds {
    let mut t = Thresholds::default_of(def);
    for o in overrides
        .iter()
        .filter(|o| o.rule == def.name && o.selects(agent, labels))
    {
        if let Some(e) = o.enabled {
            t.enabled = e;
        }
        if o.warning.is_some() {
            t.warning = o.warning;
        }
        if o.critical.is_some() {
            t.critical = o.critical;
        }
        if let Some(d) = o
            .for_
            .as_deref()
            .and_then(|f| humantime::parse_duration(f).ok())
        {
            t.for_s = d.as_secs();
        }
    }
    t
}

/// What an agent's stored row says, read once per round.
pub struct Facts<'a> {
    pub row: &'a AgentRow,
    pub online: bool,
    pub health: Option<Health>,
    pub buffer: Option<proto::BufferStats>,
    /// Its tasks marked critical whose latest finished run failed.
    pub failing: &'a [proto::TaskSnapshot],
}

/// Figures older than this are not judged (the agent is likely offline, which its own rule
/// says).
const STALE_MS: i64 = 30 * 60 * 1000;

/// What rule `name` measures on an agent now, with a one-line summary; `None` when there is
/// nothing to judge (no figure, or an old one).
pub fn measure(name: &str, f: &Facts<'_>, now_ms: i64) -> Option<(f64, String)> {
    let fresh = |ts: i64| now_ms.saturating_sub(ts) <= STALE_MS;
    match name {
        "agent_offline" => {
            if f.online {
                return None;
            }
            let seen = f.row.last_seen_ms.unwrap_or(f.row.created_at_ms);
            let s = now_ms.saturating_sub(seen) as f64 / 1000.0;
            Some((s, format!("no word from the agent for {}", human_s(s))))
        }
        "xid_age" => {
            let x = f.health.as_ref()?.xid_age.as_ref()?;
            fresh(x.ts_ms).then(|| {
                (
                    x.age as f64,
                    format!(
                        "database {} is at transaction-ID age {:.2} billion (wraparound at 2.1)",
                        x.database,
                        x.age as f64 / 1e9
                    ),
                )
            })
        }
        "replication_lag" => {
            let r = f.health.as_ref()?.replication.as_ref()?;
            (fresh(r.ts_ms) && r.standbys > 0).then(|| {
                (
                    r.max_lag_s,
                    format!("a standby replays {} behind", human_s(r.max_lag_s)),
                )
            })
        }
        "connections" => {
            let c = f.health.as_ref()?.connections.as_ref()?;
            (fresh(c.ts_ms) && c.max > 0).then(|| {
                (
                    c.ratio(),
                    format!(
                        "{} of max_connections {} in use ({:.0} %)",
                        c.used,
                        c.max,
                        c.ratio() * 100.0
                    ),
                )
            })
        }
        "metrics_buffer_full" => {
            let b = f.buffer.as_ref()?;
            Some((
                b.utilization,
                format!(
                    "metrics buffer {:.0} % full, oldest record {}",
                    b.utilization * 100.0,
                    human_s(b.oldest_record_age_s as f64)
                ),
            ))
        }
        "metrics_delivery_failing" => {
            let b = f.buffer.as_ref()?;
            Some((
                b.delivery_failures as f64,
                format!("{} metrics deliveries failed in a row", b.delivery_failures),
            ))
        }
        "backup_rpo" => backup_age(f.health.as_ref()?, now_ms),
        "critical_task_failed" => Some(failing_tasks(f.failing)),
        "archiving_failing" => {
            let a = f.health.as_ref()?.archiver.as_ref()?;
            if !fresh(a.ts_ms) {
                return None;
            }
            let reasons = crate::backups::assess_archiver(a, crate::backups::Objectives::default());
            Some(match reasons.first() {
                Some((_, r)) => (1.0, r.clone()),
                None => (0.0, "WAL archiving works".into()),
            })
        }
        _ => None,
    }
}

/// How many critical tasks failed, naming the first few with their errors.
fn failing_tasks(failing: &[proto::TaskSnapshot]) -> (f64, String) {
    let named: Vec<String> = failing
        .iter()
        .take(3)
        .map(|t| {
            let last = t
                .runs
                .iter()
                .filter(|r| r.finished_at.is_some())
                .max_by_key(|r| r.run_id);
            let why = last
                .and_then(|r| r.error.clone())
                .or_else(|| last.and_then(|r| r.exit_code.map(|c| format!("exit code {c}"))))
                .unwrap_or_else(|| "failed".into());
            let key = if t.key.is_empty() { &t.id } else { &t.key };
            format!("{} {key}: {why}", t.kind)
        })
        .collect();
    let more = failing.len().saturating_sub(named.len());
    let mut summary = named.join("; ");
    if more > 0 {
        summary.push_str(&format!("; and {more} more"));
    }
    if summary.is_empty() {
        summary = "no critical task failing".into();
    }
    (failing.len() as f64, summary)
}

/// Hours since the newest valid backup of the stanza that has gone longest without one.
fn backup_age(h: &Health, now_ms: i64) -> Option<(f64, String)> {
    let b = h.backups.as_ref()?;
    if now_ms.saturating_sub(b.ts_ms) > STALE_MS {
        return None;
    }
    b.stanzas
        .iter()
        .map(|s| {
            let newest = s.newest_stop_ms();
            match newest {
                Some(stop) => {
                    let h = now_ms.saturating_sub(stop) as f64 / 3_600_000.0;
                    (
                        h,
                        format!("stanza {}: newest backup is {h:.1} h old", s.name),
                    )
                }
                None => (f64::MAX, format!("stanza {}: no valid backup", s.name)),
            }
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

fn human_s(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        _ => format!("{:.1} h", s as f64 / 3600.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over(name: &str, agents: &[&str], critical: Option<f64>) -> RuleOverride {
        RuleOverride {
            name: name.into(),
            rule: "xid_age".into(),
            agents: agents.iter().map(|a| a.to_string()).collect(),
            enabled: None,
            warning: None,
            critical,
            for_: Some("2m".into()),
        }
    }

    #[test]
    fn overrides_apply_in_order_to_the_agents_they_select() {
        let def = rule("xid_age").expect("rule");
        let o = [
            over("a-all", &["*"], Some(1.2e9)),
            over("b-prod", &["prod-*"], Some(1.1e9)),
        ];
        let t = thresholds(def, &o, "prod-db1", &Default::default());
        assert_eq!(
            (t.critical, t.warning, t.for_s),
            (Some(1.1e9), Some(1.0e9), 120)
        );
        assert_eq!(
            thresholds(def, &o, "dev-db", &Default::default()).critical,
            Some(1.2e9)
        );
        assert_eq!(t.severity(1.15e9), Some(Severity::Critical));
        assert_eq!(t.severity(1.05e9), Some(Severity::Warning));
        assert_eq!(t.severity(0.5e9), None);
    }

    #[test]
    fn connections_are_judged_against_max_connections() {
        let row = AgentRow {
            id: "agt_1".into(),
            name: "db1".into(),
            created_at_ms: 0,
            last_seen_ms: Some(1_000),
            connected: true,
            buffer: None,
            health: None,
            labels: None,
        };
        let health = Health {
            connections: Some(crate::health::Connections {
                used: 92,
                max: 100,
                ts_ms: 1_000,
            }),
            ..Health::default()
        };
        let facts = Facts {
            row: &row,
            online: true,
            health: Some(health),
            buffer: None,
            failing: &[],
        };
        let (value, summary) = measure("connections", &facts, 2_000).expect("measured");
        assert_eq!(summary, "92 of max_connections 100 in use (92 %)");
        let t = thresholds(
            rule("connections").expect("rule"),
            &[],
            "db1",
            &Default::default(),
        );
        assert_eq!(t.severity(value), Some(Severity::Warning));
        assert_eq!(t.severity(0.98), Some(Severity::Critical));
    }

    /// Only the latest finished run counts: a critical task that failed and then succeeded
    /// is no longer failing; a cancelled one neither; the summary names task and error.
    #[test]
    fn a_critical_task_fails_by_its_latest_finished_run() {
        let run = |id: i64, status: &str, error: Option<&str>, finished: bool| proto::RunSnapshot {
            run_id: id,
            started_at: Some("2027-01-01T00:00:00Z".into()),
            finished_at: finished.then(|| "2027-01-01T00:01:00Z".into()),
            status: status.into(),
            exit_code: Some(1),
            error: error.map(str::to_string),
            output_bytes: 0,
            output_dropped_bytes: 0,
        };
        let task = |runs: Vec<proto::RunSnapshot>| proto::TaskSnapshot {
            id: "tsk_1".into(),
            kind: "pg_dump".into(),
            status: "scheduled".into(),
            schedule: "every 1d".into(),
            key: "nightly-dump".into(),
            created_at: "2027-01-01T00:00:00Z".into(),
            next_run_at: None,
            runs,
            window: None,
            critical: true,
        };
        let failed = task(vec![
            run(1, "done", None, true),
            run(2, "failed", Some("disk full"), true),
            run(3, "doing", None, false),
        ]);
        assert!(crate::storage::model::failing_critical(&failed));
        let (value, summary) = failing_tasks(std::slice::from_ref(&failed));
        assert_eq!(
            (value, summary.as_str()),
            (1.0, "pg_dump nightly-dump: disk full")
        );
        let recovered = task(vec![
            run(2, "failed", None, true),
            run(3, "done", None, true),
        ]);
        assert!(!crate::storage::model::failing_critical(&recovered));
        let cancelled = proto::TaskSnapshot {
            status: "canceled".into(),
            ..failed.clone()
        };
        assert!(!crate::storage::model::failing_critical(&cancelled));
        let unmarked = proto::TaskSnapshot {
            critical: false,
            ..failed
        };
        assert!(!crate::storage::model::failing_critical(&unmarked));
    }

    #[test]
    fn an_override_is_refused_with_the_field_named() {
        let mut o = over("x", &["*"], Some(-1.0));
        assert!(o.validate().expect_err("refused").contains("critical"));
        o.critical = None;
        o.rule = "nope".into();
        assert!(
            o.validate()
                .expect_err("refused")
                .contains("rule must be one of")
        );
        o.rule = "xid_age".into();
        o.for_ = Some("soon".into());
        assert!(o.validate().expect_err("refused").starts_with("for:"));
    }
}
