//! What an agent's newest metrics say about its server, kept on the agent's row so the fleet
//! page can rank agents by what needs attention without reading metrics: the database
//! closest to transaction-ID wraparound and the largest replication lag. Updated at ingest,
//! and written only when a figure moved enough to matter or the stored one is old, so a
//! steady fleet costs no write per batch.

use serde::{Deserialize, Serialize};

use crate::storage::MetricRow;

/// A stored summary older than this is written again even when nothing moved (its age is
/// how the page tells a summary from a stale one).
pub const REFRESH_MS: i64 = 5 * 60 * 1000;
/// Transaction-ID ages are compared in steps of this many.
const XID_STEP: i64 = 1_000_000;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The database with the oldest transaction ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xid_age: Option<XidAge>,
    /// Streaming standbys and their largest replay lag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
    /// pgBackRest's status of the granted stanzas (`backup_info`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backups: Option<crate::backups::Backups>,
    /// WAL archiving (`archiver`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archiver: Option<crate::backups::Archiver>,
    /// Client connections against `max_connections` (`connections`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Connections>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    pub used: i64,
    pub max: i64,
    pub ts_ms: i64,
}

impl Connections {
    /// The share of `max_connections` in use (0 when the maximum is unknown).
    pub fn ratio(&self) -> f64 {
        if self.max > 0 {
            self.used as f64 / self.max as f64
        } else {
            0.0
        }
    }
}

fn connections(row: &MetricRow) -> Option<Connections> {
    let v: serde_json::Value = serde_json::from_str(&row.data).ok()?;
    Some(Connections {
        used: v["used"].as_i64()?,
        max: v["max"].as_i64()?,
        ts_ms: row.ts_ms,
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct XidAge {
    pub database: String,
    pub age: i64,
    pub ts_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Replication {
    pub standbys: usize,
    pub max_lag_s: f64,
    pub ts_ms: i64,
}

fn xid_age(row: &MetricRow) -> Option<XidAge> {
    let ages: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&row.data).ok()?;
    let (database, age) = ages
        .into_iter()
        .filter_map(|(db, v)| Some((db, v.as_i64()?)))
        .max_by_key(|(_, age)| *age)?;
    Some(XidAge {
        database,
        age,
        ts_ms: row.ts_ms,
    })
}

fn replication(row: &MetricRow) -> Option<Replication> {
    let standbys: Vec<serde_json::Value> = serde_json::from_str(&row.data).ok()?;
    let max_lag_s = standbys
        .iter()
        .filter_map(|s| s["replay_lag_s"].as_f64())
        .fold(0.0, f64::max);
    Some(Replication {
        standbys: standbys.len(),
        max_lag_s,
        ts_ms: row.ts_ms,
    })
}

/// The summary to store after `rows` arrived, given the stored one; `None` when the stored
/// one still says the same (no write needed).
pub fn update(stored: Option<&str>, rows: &[MetricRow], now_ms: i64) -> Option<String> {
    let old: Health = stored
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let mut new = old.clone();
    for row in rows {
        match row.kind.as_str() {
            "xid_age" => {
                if let Some(x) = xid_age(row)
                    && new.xid_age.as_ref().is_none_or(|o| o.ts_ms <= x.ts_ms)
                {
                    new.xid_age = Some(x);
                }
            }
            "replication" => {
                if let Some(r) = replication(row)
                    && new.replication.as_ref().is_none_or(|o| o.ts_ms <= r.ts_ms)
                {
                    new.replication = Some(r);
                }
            }
            "backup_info" => {
                if let Some(b) = crate::backups::backups(row)
                    && new.backups.as_ref().is_none_or(|o| o.ts_ms <= b.ts_ms)
                {
                    new.backups = Some(b);
                }
            }
            "connections" => {
                if let Some(c) = connections(row)
                    && new.connections.as_ref().is_none_or(|o| o.ts_ms <= c.ts_ms)
                {
                    new.connections = Some(c);
                }
            }
            "archiver" => {
                if let Some(a) = crate::backups::archiver(row)
                    && new.archiver.as_ref().is_none_or(|o| o.ts_ms <= a.ts_ms)
                {
                    new.archiver = Some(a);
                }
            }
            _ => {}
        }
    }
    let fresh = |ts: Option<i64>| ts.is_some_and(|ts| now_ms.saturating_sub(ts) < REFRESH_MS);
    let same_xid = match (&old.xid_age, &new.xid_age) {
        (Some(a), Some(b)) => {
            a.database == b.database && a.age / XID_STEP == b.age / XID_STEP && fresh(Some(a.ts_ms))
        }
        (None, None) => true,
        _ => false,
    };
    let same_replication = match (&old.replication, &new.replication) {
        (Some(a), Some(b)) => {
            a.standbys == b.standbys
                && a.max_lag_s.round() == b.max_lag_s.round()
                && fresh(Some(a.ts_ms))
        }
        (None, None) => true,
        _ => false,
    };
    // Backups: rewritten when anything but the sample time changed, or the summary aged.
    let same_backups = match (&old.backups, &new.backups) {
        (Some(a), Some(b)) => a.error == b.error && a.stanzas == b.stanzas && fresh(Some(a.ts_ms)),
        (None, None) => true,
        _ => false,
    };
    let same_archiver = match (&old.archiver, &new.archiver) {
        (Some(a), Some(b)) => {
            let moved = |x: &crate::backups::Archiver| {
                (
                    x.archive_mode.clone(),
                    x.failed_count,
                    x.last_archived_wal.clone(),
                    x.ready_count,
                )
            };
            moved(a) == moved(b) && fresh(Some(a.ts_ms))
        }
        (None, None) => true,
        _ => false,
    };
    // Connections: rewritten when the share in use moved by a percent or more.
    let same_connections = match (&old.connections, &new.connections) {
        (Some(a), Some(b)) => {
            (a.ratio() * 100.0).floor() == (b.ratio() * 100.0).floor() && fresh(Some(a.ts_ms))
        }
        (None, None) => true,
        _ => false,
    };
    if same_xid && same_replication && same_backups && same_archiver && same_connections {
        return None;
    }
    serde_json::to_string(&new).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, ts_ms: i64, data: &str) -> MetricRow {
        MetricRow {
            seq: 0,
            ts_ms,
            kind: kind.into(),
            data: data.into(),
        }
    }

    #[test]
    fn the_oldest_database_and_the_largest_lag_are_kept() {
        let rows = [
            row("xid_age", 1_000, r#"{"app":1500000000,"postgres":2000}"#),
            row(
                "replication",
                1_000,
                r#"[{"application_name":"s1","replay_lag_s":3.5},{"application_name":"s2","replay_lag_s":120.2}]"#,
            ),
            row("activity", 1_000, r#"{"active":1}"#),
        ];
        let stored = update(None, &rows, 1_000).expect("a first summary is written");
        let h: Health = serde_json::from_str(&stored).expect("json");
        assert_eq!(
            h.xid_age,
            Some(XidAge {
                database: "app".into(),
                age: 1_500_000_000,
                ts_ms: 1_000
            })
        );
        let r = h.replication.expect("replication");
        assert_eq!((r.standbys, r.max_lag_s), (2, 120.2));
    }

    #[test]
    fn nothing_is_written_until_a_figure_moves_or_the_summary_ages() {
        let first = [row("xid_age", 1_000, r#"{"app":1500000000}"#)];
        let stored = update(None, &first, 1_000).expect("first");
        let small = [row("xid_age", 16_000, r#"{"app":1500000100}"#)];
        assert_eq!(
            update(Some(&stored), &small, 16_000),
            None,
            "an age within a million"
        );
        let moved = [row("xid_age", 31_000, r#"{"app":1502000000}"#)];
        assert!(update(Some(&stored), &moved, 31_000).is_some());
        let later = [row("xid_age", 1_000 + REFRESH_MS, r#"{"app":1500000100}"#)];
        assert!(
            update(Some(&stored), &later, 1_000 + REFRESH_MS).is_some(),
            "rewritten once old, so its age says it is current"
        );
        let older = [row("xid_age", 500, r#"{"app":9}"#)];
        assert_eq!(
            update(Some(&stored), &older, 1_000),
            None,
            "an older sample (a late batch) does not replace a newer one"
        );
    }
}
