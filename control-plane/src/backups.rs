//! Backup status: what an agent's `backup_info` and `archiver` records say, summarised for the
//! agent's row (so the Backups page and the fleet ranking read no metrics), and the risk each
//! host runs, ranked: no valid backup, then the recovery point objective breached, then WAL
//! archiving failing or lagging, then the newest backup, check, verify or restore drill
//! failed, then a status that cannot be read, then healthy.
//!
//! Pure: rows and `now` in, summaries and verdicts out.

use serde::{Deserialize, Serialize};

use crate::storage::MetricRow;

/// pgBackRest's stanza status codes (`pgbackrest info`): 0 is ok; 2 "no valid backups".
const STATUS_OK: i64 = 0;
const STATUS_NO_BACKUP: i64 = 2;

/// One stanza's summary: its status and the newest good backup of each type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Stanza {
    pub name: String,
    /// pgBackRest's status code (0 ok, 1 missing stanza path, 2 no valid backups, 3 missing
    /// stanza data, 4 different across repositories, 5 database mismatch, 99 other).
    pub code: i64,
    pub message: String,
    /// A backup holds the stanza's lock now.
    pub running: bool,
    pub full: Option<Backup>,
    pub diff: Option<Backup>,
    pub incr: Option<Backup>,
    /// The newest backup, if it ended in error (its label).
    pub newest_failed: Option<String>,
    /// The newest archived WAL segment.
    pub wal_max: Option<String>,
    /// How the newest check, verify and restore drill of the stanza ended (as the agent's
    /// task store says).
    pub check: Option<LastRun>,
    pub verify: Option<LastRun>,
    pub drill: Option<LastRun>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LastRun {
    /// `done`, `failed`, `aborted`, `canceled` or `skipped`.
    pub status: String,
    /// When it ended, Unix ms.
    pub at_ms: i64,
    pub error: Option<String>,
    /// A drill's measured recovery time: restore start to check end, seconds.
    pub rto_s: Option<f64>,
    /// The backup a drill restored.
    pub set: Option<String>,
}

fn last_run(v: &serde_json::Value) -> Option<LastRun> {
    Some(LastRun {
        status: str_of(&v["status"])?,
        at_ms: v["at_ms"].as_i64()?,
        error: str_of(&v["error"]),
        rto_s: v["rto_s"].as_f64(),
        set: str_of(&v["set"]),
    })
}

/// A backup that completed without error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Backup {
    pub label: String,
    /// When it ended, Unix ms.
    pub stop_ms: i64,
    pub duration_s: i64,
    /// Database size backed up, bytes.
    pub size: u64,
    /// What it added to the repository, bytes.
    pub repo_delta: u64,
}

/// What the newest `backup_info` record said.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Backups {
    pub ts_ms: i64,
    /// `pgbackrest info` failed on the host: why.
    pub error: Option<String>,
    pub stanzas: Vec<Stanza>,
}

/// What the newest `archiver` record said (`pg_stat_archiver`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Archiver {
    pub ts_ms: i64,
    pub archive_mode: String,
    pub archived_count: i64,
    pub failed_count: i64,
    pub last_archived_wal: Option<String>,
    pub last_archived_ms: Option<i64>,
    pub last_failed_wal: Option<String>,
    pub last_failed_ms: Option<i64>,
    /// Segments waiting to be archived.
    pub ready_count: i64,
}

impl Archiver {
    /// A segment failed to archive after the last success.
    pub fn failing(&self) -> bool {
        match (self.last_failed_ms, self.last_archived_ms) {
            (Some(failed), Some(archived)) => failed > archived,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

fn str_of(v: &serde_json::Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

fn stanza(v: &serde_json::Value) -> Option<Stanza> {
    let backups = v["backups"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    // Newest first, as the agent sends them.
    let good = |kind: &str| {
        backups
            .iter()
            .filter(|b| b["error"] != serde_json::Value::Bool(true))
            .find(|b| b["type"].as_str() == Some(kind))
            .and_then(|b| {
                let (start, stop) = (b["start"].as_i64()?, b["stop"].as_i64()?);
                Some(Backup {
                    label: str_of(&b["label"])?,
                    stop_ms: stop.saturating_mul(1000),
                    duration_s: stop.saturating_sub(start),
                    size: b["size"].as_u64().unwrap_or(0),
                    repo_delta: b["repo_delta"].as_u64().unwrap_or(0),
                })
            })
    };
    let newest_failed = backups
        .first()
        .filter(|b| b["error"] == serde_json::Value::Bool(true))
        .and_then(|b| str_of(&b["label"]));
    let wal_max = v["archive"]
        .as_array()
        .and_then(|a| a.iter().filter_map(|x| x["max"].as_str()).max())
        .map(str::to_string);
    Some(Stanza {
        name: str_of(&v["name"])?,
        code: v["status"]["code"].as_i64().unwrap_or(99),
        message: str_of(&v["status"]["message"]).unwrap_or_default(),
        running: v["status"]["backup_running"].as_bool().unwrap_or(false),
        full: good("full"),
        diff: good("diff"),
        incr: good("incr"),
        newest_failed,
        wal_max,
        check: last_run(&v["last_runs"]["pgbackrest_check"]),
        verify: last_run(&v["last_runs"]["pgbackrest_verify"]),
        drill: last_run(&v["last_runs"]["restore_drill"]),
    })
}

/// The summary of one `backup_info` record; `None` when it is not one.
pub fn backups(row: &MetricRow) -> Option<Backups> {
    let v: serde_json::Value = serde_json::from_str(&row.data).ok()?;
    let error = str_of(&v["error"]);
    let stanzas = v["stanzas"]
        .as_array()
        .map(|s| s.iter().filter_map(stanza).collect())
        .unwrap_or_default();
    Some(Backups {
        ts_ms: row.ts_ms,
        error,
        stanzas,
    })
}

/// The summary of one `archiver` record.
pub fn archiver(row: &MetricRow) -> Option<Archiver> {
    let v: serde_json::Value = serde_json::from_str(&row.data).ok()?;
    Some(Archiver {
        ts_ms: row.ts_ms,
        archive_mode: str_of(&v["archive_mode"]).unwrap_or_default(),
        archived_count: v["archived_count"].as_i64().unwrap_or(0),
        failed_count: v["failed_count"].as_i64().unwrap_or(0),
        last_archived_wal: str_of(&v["last_archived_wal"]),
        last_archived_ms: v["last_archived_ms"].as_i64(),
        last_failed_wal: str_of(&v["last_failed_wal"]),
        last_failed_ms: v["last_failed_ms"].as_i64(),
        ready_count: v["ready_count"].as_i64().unwrap_or(0),
    })
}

/// Bounds a host is judged by.
#[derive(Clone, Copy, Debug)]
pub struct Objectives {
    /// The newest good backup (any type) may be at most this old.
    pub rpo_ms: i64,
    /// Segments may wait to be archived at most this long since the last success.
    pub archive_lag_ms: i64,
    /// A status older than this is not trusted.
    pub stale_ms: i64,
}

impl Default for Objectives {
    fn default() -> Objectives {
        Objectives {
            rpo_ms: 26 * 3600 * 1000,
            archive_lag_ms: 15 * 60 * 1000,
            stale_ms: 30 * 60 * 1000,
        }
    }
}

/// How much a host's backups need attention; the order of the Backups page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    Healthy,
    /// The status could not be read, or is old.
    Unknown,
    /// The newest backup ended in error (a later one may still succeed in time), or the last
    /// check, verify or restore drill failed.
    LastFailed,
    ArchiveFailing,
    RpoBreached,
    NoBackup,
}

/// The verdict on one host: its risk and every reason, worst first.
pub fn assess(
    backups: Option<&Backups>,
    archiver: Option<&Archiver>,
    now_ms: i64,
    objectives: Objectives,
) -> (Risk, Vec<String>) {
    let mut found: Vec<(Risk, String)> = Vec::new();
    match backups {
        None => found.push((Risk::Unknown, "no backup status received".into())),
        Some(b) => {
            if now_ms.saturating_sub(b.ts_ms) > objectives.stale_ms {
                found.push((
                    Risk::Unknown,
                    format!("backup status is {} min old", (now_ms - b.ts_ms) / 60_000),
                ));
            }
            if let Some(error) = &b.error {
                found.push((Risk::Unknown, format!("pgbackrest info failed: {error}")));
            }
            for s in &b.stanzas {
                found.extend(assess_stanza(s, now_ms, objectives));
            }
        }
    }
    if let Some(a) = archiver {
        found.extend(assess_archiver(a, objectives));
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let risk = found.first().map_or(Risk::Healthy, |f| f.0);
    (risk, found.into_iter().map(|f| f.1).collect())
}

impl Stanza {
    /// When the newest valid backup of any type stopped.
    pub fn newest_stop_ms(&self) -> Option<i64> {
        [&self.full, &self.diff, &self.incr]
            .into_iter()
            .flatten()
            .map(|b| b.stop_ms)
            .max()
    }
}

fn assess_stanza(s: &Stanza, now_ms: i64, objectives: Objectives) -> Vec<(Risk, String)> {
    let mut found = Vec::new();
    let newest = s.newest_stop_ms();
    match newest {
        None => found.push((Risk::NoBackup, format!("{}: no valid backup", s.name))),
        Some(stop_ms) if now_ms.saturating_sub(stop_ms) > objectives.rpo_ms => found.push((
            Risk::RpoBreached,
            format!(
                "{}: newest backup is {} h old (objective {} h)",
                s.name,
                (now_ms - stop_ms) / 3_600_000,
                objectives.rpo_ms / 3_600_000
            ),
        )),
        Some(_) => {}
    }
    if s.code == STATUS_NO_BACKUP && newest.is_some() {
        found.push((Risk::NoBackup, format!("{}: {}", s.name, s.message)));
    } else if s.code != STATUS_OK && s.code != STATUS_NO_BACKUP {
        found.push((
            Risk::Unknown,
            format!("{}: status {} ({})", s.name, s.code, s.message),
        ));
    }
    if let Some(label) = &s.newest_failed {
        found.push((
            Risk::LastFailed,
            format!("{}: the newest backup ({label}) ended in error", s.name),
        ));
    }
    for (what, run) in [
        ("check", &s.check),
        ("verify", &s.verify),
        ("restore drill", &s.drill),
    ] {
        if let Some(run) = run
            && (run.status == "failed" || run.status == "aborted")
        {
            found.push((
                Risk::LastFailed,
                format!(
                    "{}: the last {what} {} {} h ago{}",
                    s.name,
                    run.status,
                    now_ms.saturating_sub(run.at_ms) / 3_600_000,
                    run.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    found
}

/// What is wrong with WAL archiving, worst first (the archiver half of [`assess`]).
pub fn assess_archiver(a: &Archiver, objectives: Objectives) -> Vec<(Risk, String)> {
    let mut found = Vec::new();
    if a.archive_mode == "off" {
        found.push((
            Risk::ArchiveFailing,
            "WAL archiving is off (archive_mode = off): no point-in-time recovery".to_string(),
        ));
        return found;
    }
    if a.failing() {
        found.push((
            Risk::ArchiveFailing,
            format!(
                "WAL archiving failing: {} failed last{}",
                a.last_failed_wal.as_deref().unwrap_or("a segment"),
                match a.ready_count {
                    0 => String::new(),
                    1 => ", 1 segment waiting".to_string(),
                    n => format!(", {n} segments waiting"),
                }
            ),
        ));
    } else if a.ready_count > 0
        && let Some(archived) = a.last_archived_ms
        && a.ts_ms.saturating_sub(archived) > objectives.archive_lag_ms
    {
        found.push((
            Risk::ArchiveFailing,
            format!(
                "WAL archiving lags: {} segments waiting, the last archived {} min before the sample",
                a.ready_count,
                (a.ts_ms - archived) / 60_000
            ),
        ));
    }
    found
}

/// The backup gauges of `/metrics`, per agent (and stanza): what the alert rules in
/// `deploy/alerts` watch. Every family is written, with or without samples, so a scrape
/// names each series the rules use.
pub fn write_metrics(
    out: &mut proto::prometheus::Exposition,
    agents: &[(&str, Option<Backups>, Option<Archiver>)],
) {
    let ms_s = |ms: i64| ms as f64 / 1000.0;
    out.family(
        "outpost_backup_last_success_timestamp_seconds",
        "gauge",
        "When the newest backup of each type that ended without error stopped (pgBackRest, per agent and stanza).",
    );
    for (agent, backups, _) in agents {
        for s in backups.iter().flat_map(|b| &b.stanzas) {
            for (kind, b) in [("full", &s.full), ("diff", &s.diff), ("incr", &s.incr)] {
                if let Some(b) = b {
                    out.sample(
                        "outpost_backup_last_success_timestamp_seconds",
                        &[("agent", agent), ("stanza", &s.name), ("type", kind)],
                        ms_s(b.stop_ms),
                    );
                }
            }
        }
    }
    out.family(
        "outpost_backup_status_code",
        "gauge",
        "pgBackRest's stanza status code (0 ok, 2 no valid backup; see pgbackrest info).",
    );
    for (agent, backups, _) in agents {
        for s in backups.iter().flat_map(|b| &b.stanzas) {
            out.sample(
                "outpost_backup_status_code",
                &[("agent", agent), ("stanza", &s.name)],
                s.code as f64,
            );
        }
    }
    out.family(
        "outpost_backup_info_error",
        "gauge",
        "1 when the agent's last `pgbackrest info` failed, else 0 (agents that report backup status).",
    );
    for (agent, backups, _) in agents {
        if let Some(b) = backups {
            let failed = if b.error.is_some() { 1.0 } else { 0.0 };
            out.sample("outpost_backup_info_error", &[("agent", agent)], failed);
        }
    }
    out.family(
        "outpost_wal_archive_failing",
        "gauge",
        "1 when the agent's server failed to archive a WAL segment after its last success (pg_stat_archiver), else 0.",
    );
    out.family(
        "outpost_wal_archive_ready_segments",
        "gauge",
        "WAL segments waiting to be archived on the agent's server.",
    );
    for (agent, _, archiver) in agents {
        if let Some(a) = archiver {
            let failing = a.failing();
            let labels = [("agent", *agent)];
            out.sample(
                "outpost_wal_archive_failing",
                &labels,
                if failing { 1.0 } else { 0.0 },
            );
            out.sample(
                "outpost_wal_archive_ready_segments",
                &labels,
                a.ready_count as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, ts_ms: i64, data: serde_json::Value) -> MetricRow {
        MetricRow {
            seq: 0,
            ts_ms,
            kind: kind.into(),
            data: data.to_string(),
        }
    }

    const HOUR_MS: i64 = 3_600_000;

    fn info(now_s: i64, backups: serde_json::Value, code: i64) -> Backups {
        backups_of(&row(
            "backup_info",
            now_s * 1000,
            serde_json::json!({"tool": "pgbackrest", "stanzas": [{
                "name": "main", "status": {"code": code, "message": "m", "backup_running": false},
                "archive": [{"id": "15-1", "min": "000000010000000000000001", "max": "000000010000000000000009"}],
                "backups": backups, "backups_total": 2}]}),
        ))
    }

    fn backups_of(r: &MetricRow) -> Backups {
        backups(r).expect("a backup_info record")
    }

    fn archiver_at(ts_ms: i64, archived_ms: i64, failed_ms: Option<i64>, ready: i64) -> Archiver {
        archiver(&row(
            "archiver",
            ts_ms,
            serde_json::json!({"archive_mode": "on", "archived_count": 9, "failed_count": 1,
                "last_archived_wal": "000000010000000000000009", "last_archived_ms": archived_ms,
                "last_failed_wal": "00000001000000000000000A", "last_failed_ms": failed_ms,
                "ready_count": ready}),
        ))
        .expect("an archiver record")
    }

    #[test]
    fn the_newest_good_backup_of_each_type_is_kept() {
        let now_s = 1_000_000;
        let b = info(
            now_s,
            serde_json::json!([
                {"label": "F_I2", "type": "incr", "start": now_s - 100, "stop": now_s - 90, "size": 5, "repo_delta": 1, "error": true},
                {"label": "F_I1", "type": "incr", "start": now_s - 200, "stop": now_s - 150, "size": 5, "repo_delta": 1, "error": false},
                {"label": "F", "type": "full", "start": now_s - 400, "stop": now_s - 300, "size": 50, "repo_delta": 20, "error": false},
            ]),
            0,
        );
        let s = &b.stanzas[0];
        assert_eq!(s.incr.as_ref().map(|b| b.label.as_str()), Some("F_I1"));
        assert_eq!(
            s.full.as_ref().map(|b| (b.duration_s, b.size)),
            Some((100, 50))
        );
        assert_eq!(s.diff, None);
        assert_eq!(s.newest_failed.as_deref(), Some("F_I2"));
        assert_eq!(s.wal_max.as_deref(), Some("000000010000000000000009"));
    }

    #[test]
    fn a_failed_check_verify_or_drill_is_a_reason_and_a_drill_keeps_its_rto() {
        let now_ms = 10 * 24 * HOUR_MS;
        let now_s = now_ms / 1000;
        let r = row(
            "backup_info",
            now_ms,
            serde_json::json!({"stanzas": [{"name": "main", "status": {"code": 0, "message": "ok"},
            "backups": [{"label": "F", "type": "full", "start": now_s - 100, "stop": now_s - 60, "size": 1, "error": false}],
            "last_runs": {
                "pgbackrest_verify": {"status": "failed", "at_ms": now_ms - 2 * HOUR_MS, "error": "exit code 1"},
                "restore_drill": {"status": "done", "at_ms": now_ms - HOUR_MS, "error": null, "rto_s": 12.5, "set": "F"},
            }}]}),
        );
        let b = backups(&r).expect("backup_info");
        let s = &b.stanzas[0];
        assert_eq!(s.drill.as_ref().and_then(|d| d.rto_s), Some(12.5));
        assert_eq!(s.check, None);
        let (risk, why) = assess(Some(&b), None, now_ms, Objectives::default());
        assert_eq!(risk, Risk::LastFailed);
        assert_eq!(why, ["main: the last verify failed 2 h ago (exit code 1)"]);
    }

    #[test]
    fn hosts_rank_no_backup_then_rpo_then_archiving_then_unknown() {
        let o = Objectives::default();
        let now_ms = 100 * 24 * HOUR_MS;
        let now_s = now_ms / 1000;
        let fresh = |stop_s: i64| serde_json::json!([{"label": "F", "type": "full", "start": stop_s - 60, "stop": stop_s, "size": 1, "repo_delta": 1, "error": false}]);
        let healthy = archiver_at(now_ms, now_ms - 60_000, Some(now_ms - HOUR_MS), 0);

        let none = info(now_s, serde_json::json!([]), 2);
        let (risk, why) = assess(Some(&none), Some(&healthy), now_ms, o);
        assert_eq!(risk, Risk::NoBackup, "{why:?}");
        assert!(why[0].contains("no valid backup"), "{why:?}");

        let old = info(now_s, fresh(now_s - 30 * 3600), 0);
        let (risk, why) = assess(Some(&old), Some(&healthy), now_ms, o);
        assert_eq!(risk, Risk::RpoBreached);
        assert!(why[0].contains("30 h old (objective 26 h)"), "{why:?}");

        let good = info(now_s, fresh(now_s - 3600), 0);
        assert_eq!(
            assess(Some(&good), Some(&healthy), now_ms, o),
            (Risk::Healthy, vec![])
        );

        let failing = archiver_at(now_ms, now_ms - HOUR_MS, Some(now_ms - 60_000), 4);
        let (risk, why) = assess(Some(&good), Some(&failing), now_ms, o);
        assert_eq!(risk, Risk::ArchiveFailing);
        assert!(
            why[0].contains("00000001000000000000000A failed last, 4 segments waiting"),
            "{why:?}"
        );

        let lagging = archiver_at(now_ms, now_ms - HOUR_MS, None, 3);
        assert_eq!(
            assess(Some(&good), Some(&lagging), now_ms, o).0,
            Risk::ArchiveFailing
        );

        let stale = info(now_s - 3600, fresh(now_s - 3600), 0);
        assert_eq!(
            assess(Some(&stale), Some(&healthy), now_ms, o).0,
            Risk::Unknown
        );
        assert_eq!(assess(None, None, now_ms, o).0, Risk::Unknown);

        // The worst reason decides, and every reason is listed.
        let (risk, why) = assess(Some(&none), Some(&failing), now_ms, o);
        assert_eq!((risk, why.len()), (Risk::NoBackup, 2));
        assert!(Risk::NoBackup > Risk::RpoBreached && Risk::RpoBreached > Risk::ArchiveFailing);
        assert!(Risk::ArchiveFailing > Risk::LastFailed && Risk::LastFailed > Risk::Unknown);
        assert!(Risk::Unknown > Risk::Healthy);
    }
}
