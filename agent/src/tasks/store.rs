//! Task persistence: SQLite in WAL mode with `synchronous=FULL`, so a creation, cancellation
//! or outcome is on disk before anyone is told about it. The driver applies every effect of
//! one loop iteration in one transaction (group commit). Timestamps come from the caller
//! (the `world` clock), never from SQLite.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::core::{Effect, TaskState};
use super::model::{Kind, RunOutcome, Schedule, TaskSpec, Window, status};

/// The optional parts of a spec, as the `options` column keeps them.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Options {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<Window>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    critical: bool,
}

fn encode_options(spec: &TaskSpec) -> Result<Option<String>, StoreError> {
    if spec.window.is_none() && !spec.critical {
        return Ok(None);
    }
    serde_json::to_string(&Options {
        window: spec.window.clone(),
        critical: spec.critical,
    })
    .map(Some)
    .map_err(err)
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    argv TEXT NOT NULL,
    schedule TEXT NOT NULL,
    timeout_ms INTEGER NOT NULL,
    status INTEGER NOT NULL,
    next_run_ms INTEGER,
    attempt INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    -- JSON of the spec's optional parts (its window, whether it is critical); NULL: none.
    options TEXT
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    queued_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    exit_code INTEGER,
    error TEXT,
    pid INTEGER,
    pid_start_ticks INTEGER,
    output BLOB,
    output_dropped_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_task ON runs(task_id);
-- Tasks whose latest change the control plane has not acknowledged (one row per task, so
-- the outbox never outgrows the task table).
CREATE TABLE IF NOT EXISTS outbox (
    task_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- The host's boot id when the agent last started (runs in flight from an earlier boot died
-- with it).
CREATE TABLE IF NOT EXISTS host (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#;

/// Damaged task stores kept beside the live one.
pub const QUARANTINED_KEPT: usize = 3;

#[derive(Debug, thiserror::Error)]
#[error("task store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A run row as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRow {
    pub run_id: i64,
    pub status: u32,
    pub queued_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub output_bytes: i64,
    pub output_dropped_bytes: i64,
}

/// A run that was in flight when the agent stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interrupted {
    pub run_id: i64,
    pub task_id: String,
    pub pid: Option<i32>,
    pub pid_start_ticks: Option<u64>,
    pub queued_ms: i64,
    pub started_ms: Option<i64>,
}

pub struct Loaded {
    pub tasks: Vec<TaskState>,
    /// Ended tasks still in the history: (id, status).
    pub ended: Vec<(String, u32)>,
    pub interrupted: Vec<Interrupted>,
    pub max_run_id: i64,
    /// The host's boot id when the agent last started.
    pub boot_id: Option<String>,
}

/// Extra persistence the core does not produce: the pool's start report.
#[derive(Clone, Debug)]
pub struct Started {
    pub run_id: i64,
    pub started_ms: i64,
    pub pid: i32,
    pub pid_start_ticks: Option<u64>,
}

pub struct Store {
    conn: Connection,
}

fn encode_schedule(s: &Schedule) -> String {
    match s {
        Schedule::Once { at_ms } => format!("once {at_ms}"),
        Schedule::Every {
            interval_ms,
            first_ms,
        } => format!("every {interval_ms} {first_ms}"),
        Schedule::Cron { expr, tz } => format!("cron {tz} {expr}"),
    }
}

fn decode_schedule(s: &str) -> Option<Schedule> {
    let mut parts = s.splitn(3, ' ');
    match parts.next()? {
        "once" => Some(Schedule::Once {
            at_ms: parts.next()?.parse().ok()?,
        }),
        "every" => Some(Schedule::Every {
            interval_ms: parts.next()?.parse().ok()?,
            first_ms: parts.next()?.parse().ok()?,
        }),
        "cron" => {
            let tz = parts.next()?.to_string();
            Some(Schedule::Cron {
                expr: parts.next()?.to_string(),
                tz,
            })
        }
        _ => None,
    }
}

fn task_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Option<TaskState>> {
    let kind: String = row.get(2)?;
    let params: String = row.get(3)?;
    let argv: String = row.get(4)?;
    let schedule: String = row.get(5)?;
    let options: Option<String> = row.get(12)?;
    let options = match options {
        None => Ok(Options::default()),
        Some(json) => serde_json::from_str::<Options>(&json),
    };
    let (Some(kind), Ok(params), Ok(argv), Some(schedule), Ok(options)) = (
        Kind::parse(&kind),
        serde_json::from_str::<BTreeMap<String, String>>(&params),
        serde_json::from_str::<Vec<String>>(&argv),
        decode_schedule(&schedule),
        options,
    ) else {
        return Ok(None);
    };
    Ok(Some(TaskState {
        id: row.get(0)?,
        spec: TaskSpec {
            kind,
            params,
            argv,
            schedule,
            timeout_ms: row.get(6)?,
            key: row.get(1)?,
            window: options.window,
            critical: options.critical,
        },
        status: row.get(7)?,
        next_run_ms: row.get(8)?,
        attempt: row.get(9)?,
        created_ms: row.get(10)?,
        cancel_requested: row.get::<_, i64>(11)? != 0,
    }))
}

const TASK_COLUMNS: &str = "id, key, kind, params, argv, schedule, timeout_ms, status, next_run_ms, attempt, created_ms, cancel_requested, options";

impl Store {
    /// Open the store at `path` after an integrity check. A file that fails it (or is not a
    /// database at all) is moved aside as `tasks.db.corrupt-<ms>` (the last
    /// [`QUARANTINED_KEPT`] are kept) and an empty store takes its place, so one damaged file
    /// does not keep the agent, and with it metrics and the terminal, from starting. Returns
    /// where the old file went and why, for the error the caller logs.
    pub fn open_checked(
        path: &Path,
        now_ms: i64,
    ) -> Result<(Store, Option<(std::path::PathBuf, String)>), StoreError> {
        let mut moved = None;
        if path.exists()
            && let Err(reason) = crate::sqlite_file::checked(path)
        {
            let to = crate::sqlite_file::quarantine(path, now_ms, QUARANTINED_KEPT)
                .map_err(|e| StoreError(format!("move the damaged task store aside: {e}")))?;
            moved = Some((to, reason));
        }
        Ok((Store::open(path)?, moved))
    }

    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        // Stores from before task options gain the column (NULL: none).
        if conn.prepare("SELECT options FROM tasks LIMIT 0").is_err() {
            conn.execute_batch("ALTER TABLE tasks ADD COLUMN options TEXT")
                .map_err(err)?;
        }
        Ok(Store { conn })
    }

    /// Everything the scheduler needs at start-up: live tasks (terminal ones stay on disk for
    /// history only) and the runs a stop interrupted.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE status & ?1 = 0"
            ))
            .map_err(err)?;
        let tasks = stmt
            .query_map(params![status::TERMINAL], task_from_row)
            .map_err(err)?
            .filter_map(|r| r.ok().flatten())
            .collect();
        let mut stmt = self
            .conn
            .prepare("SELECT run_id, task_id, pid, pid_start_ticks, queued_ms, started_ms FROM runs WHERE status & ?1 != 0 ORDER BY run_id")
            .map_err(err)?;
        let interrupted = stmt
            .query_map(params![status::IN_FLIGHT], |r| {
                Ok(Interrupted {
                    run_id: r.get(0)?,
                    task_id: r.get(1)?,
                    pid: r.get(2)?,
                    pid_start_ticks: r.get::<_, Option<i64>>(3)?.map(|t| t as u64),
                    queued_ms: r.get(4)?,
                    started_ms: r.get(5)?,
                })
            })
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let mut stmt = self
            .conn
            .prepare("SELECT id, status FROM tasks WHERE status & ?1 != 0")
            .map_err(err)?;
        let ended = stmt
            .query_map(params![status::TERMINAL], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let max_run_id: i64 = self
            .conn
            .query_row(
                "SELECT max(COALESCE((SELECT MAX(run_id) FROM runs), 0), \
                 COALESCE((SELECT value FROM counters WHERE name = 'run_id'), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        Ok(Loaded {
            tasks,
            ended,
            interrupted,
            max_run_id,
            boot_id: self.boot_id()?,
        })
    }

    /// Apply effects and start reports in one transaction; returns once it is on disk.
    pub fn apply(
        &mut self,
        now_ms: i64,
        effects: &[Effect],
        started: &[Started],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(err)?;
        // Start reports first: a run that started and ended within one batch keeps both.
        for s in started {
            cached(
                &tx,
                "UPDATE runs SET status = ?1, started_ms = ?2, pid = ?3, pid_start_ticks = ?4 WHERE run_id = ?5 AND status = ?6",
                params![
                    status::DOING,
                    s.started_ms,
                    s.pid,
                    s.pid_start_ticks.map(|t| t as i64),
                    s.run_id,
                    status::QUEUED
                ],
            )?;
        }
        let mut seq: i64 = tx
            .prepare_cached(
                "SELECT COALESCE((SELECT value FROM counters WHERE name = 'outbox'), 0)",
            )
            .map_err(err)?
            .query_row([], |r| r.get(0))
            .map_err(err)?;
        let seq_before = seq;
        for effect in effects {
            let changed = match effect {
                Effect::SaveTask(t) => Some(&t.id),
                Effect::RunEnded { task_id, .. } | Effect::RunWithdrawn { task_id, .. } => {
                    Some(task_id)
                }
                _ => None,
            };
            if let Some(task_id) = changed {
                seq += 1;
                cached(
                    &tx,
                    "INSERT INTO outbox (task_id, seq) VALUES (?1, ?2) ON CONFLICT (task_id) DO UPDATE SET seq = excluded.seq",
                    params![task_id, seq],
                )?;
            }
            write_effect(&tx, effect, now_ms)?;
        }
        if seq != seq_before {
            cached(
                &tx,
                "INSERT INTO counters (name, value) VALUES ('outbox', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![seq],
            )?;
        }
        tx.commit().map_err(err)
    }

    /// Tasks by status and runs by status (status names as in the API).
    #[allow(clippy::type_complexity)]
    pub fn status_counts(
        &self,
    ) -> Result<(BTreeMap<&'static str, i64>, BTreeMap<&'static str, i64>), StoreError> {
        let count = |table: &str| -> Result<BTreeMap<&'static str, i64>, StoreError> {
            let mut stmt = self
                .conn
                .prepare(&format!(
                    "SELECT status, count(*) FROM {table} GROUP BY status"
                ))
                .map_err(err)?;
            let mut out = BTreeMap::new();
            for row in stmt
                .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?)))
                .map_err(err)?
            {
                let (status, n) = row.map_err(err)?;
                *out.entry(super::model::status::name(status)).or_default() += n;
            }
            Ok(out)
        };
        Ok((count("tasks")?, count("runs")?))
    }

    pub fn list(&self, limit: usize) -> Result<Vec<TaskState>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks ORDER BY created_ms DESC, id LIMIT ?1"
            ))
            .map_err(err)?;
        let rows = stmt
            .query_map(params![limit as i64], task_from_row)
            .map_err(err)?
            .filter_map(|r| r.ok().flatten())
            .collect();
        Ok(rows)
    }

    pub fn get(&self, id: &str) -> Result<Option<TaskState>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"),
                params![id],
                task_from_row,
            )
            .optional()
            .map(Option::flatten)
            .map_err(err)
    }

    pub fn runs(&self, task_id: &str) -> Result<Vec<RunRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT run_id, status, queued_ms, started_ms, finished_ms, exit_code, error, COALESCE(length(output), 0), output_dropped_bytes \
                 FROM runs WHERE task_id = ?1 ORDER BY run_id",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![task_id], |r| {
                Ok(RunRow {
                    run_id: r.get(0)?,
                    status: r.get(1)?,
                    queued_ms: r.get(2)?,
                    started_ms: r.get(3)?,
                    finished_ms: r.get(4)?,
                    exit_code: r.get(5)?,
                    error: r.get(6)?,
                    output_bytes: r.get(7)?,
                    output_dropped_bytes: r.get(8)?,
                })
            })
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        Ok(rows)
    }

    /// The newest ended run of each `kind`, per value of its `stanza` parameter: (kind,
    /// stanza, status, finished_ms, error, the output's last 4 KiB). Reads at most the newest
    /// 500 ended runs of those kinds.
    #[allow(clippy::type_complexity)]
    pub fn newest_runs_by_stanza(
        &self,
        kinds: &[&str],
    ) -> Result<Vec<(String, String, u32, i64, Option<String>, Vec<u8>)>, StoreError> {
        let placeholders = vec!["?"; kinds.len()].join(", ");
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT t.kind, COALESCE(json_extract(t.params, '$.stanza'), ''), r.status, r.finished_ms, r.error, \
                 substr(COALESCE(r.output, x''), -4096) \
                 FROM runs r JOIN tasks t ON t.id = r.task_id \
                 WHERE t.kind IN ({placeholders}) AND r.finished_ms IS NOT NULL \
                 ORDER BY r.finished_ms DESC LIMIT 500"
            ))
            .map_err(err)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(kinds.iter()), |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                ))
            })
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let mut seen = std::collections::BTreeSet::new();
        Ok(rows
            .into_iter()
            .filter(|row| seen.insert((row.0.clone(), row.1.clone())))
            .collect())
    }

    /// Captured output of a run, and how many bytes were dropped from it.
    pub fn output(&self, run_id: i64) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        self.conn
            .query_row(
                "SELECT COALESCE(output, x''), output_dropped_bytes FROM runs WHERE run_id = ?1",
                params![run_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)
    }

    /// Oldest unacknowledged task changes: (seq, task id).
    pub fn outbox(&self, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, task_id FROM outbox ORDER BY seq LIMIT ?1")
            .map_err(err)?;
        let rows = stmt
            .query_map(params![limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        Ok(rows)
    }

    /// Forget changes the control plane stored.
    pub fn ack_outbox(&mut self, upto_seq: i64) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM outbox WHERE seq <= ?1", params![upto_seq])
            .map_err(err)?;
        Ok(())
    }

    /// The boot id stored by [`Store::set_boot_id`], if any.
    pub fn boot_id(&self) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM host WHERE name = 'boot_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)
    }

    /// Remember the boot the agent runs in (on disk when this returns).
    pub fn set_boot_id(&mut self, boot_id: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO host (name, value) VALUES ('boot_id', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![boot_id],
            )
            .map(|_| ())
            .map_err(err)
    }

    /// Delete ended tasks last updated before `before_ms`, and their runs. Returns their ids.
    pub fn purge(&mut self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        let tx = self.conn.transaction().map_err(err)?;
        let ids: Vec<String> = {
            let mut stmt = tx
                .prepare("SELECT id FROM tasks WHERE status & ?1 != 0 AND updated_ms < ?2")
                .map_err(err)?;
            stmt.query_map(params![status::TERMINAL, before_ms], |r| r.get(0))
                .map_err(err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?
        };
        tx.execute(
            "DELETE FROM runs WHERE task_id IN (SELECT id FROM tasks WHERE status & ?1 != 0 AND updated_ms < ?2)",
            params![status::TERMINAL, before_ms],
        )
        .map_err(err)?;
        tx.execute(
            "DELETE FROM tasks WHERE status & ?1 != 0 AND updated_ms < ?2",
            params![status::TERMINAL, before_ms],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(ids)
    }
}

/// One effect's rows in the transaction `tx`.
fn write_effect(
    tx: &rusqlite::Transaction<'_>,
    effect: &Effect,
    now_ms: i64,
) -> Result<(), StoreError> {
    match effect {
        Effect::SaveTask(t) => {
            cached(
                tx,
                "INSERT INTO tasks (id, key, kind, params, argv, schedule, timeout_ms, status, next_run_ms, attempt, created_ms, cancel_requested, updated_ms, options) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, next_run_ms = excluded.next_run_ms, schedule = excluded.schedule, \
                 attempt = excluded.attempt, cancel_requested = excluded.cancel_requested, updated_ms = excluded.updated_ms",
                params![
                    t.id,
                    t.spec.key,
                    t.spec.kind.name(),
                    serde_json::to_string(&t.spec.params).map_err(err)?,
                    serde_json::to_string(&t.spec.argv).map_err(err)?,
                    encode_schedule(&t.spec.schedule),
                    t.spec.timeout_ms,
                    t.status,
                    t.next_run_ms,
                    t.attempt,
                    t.created_ms,
                    i64::from(t.cancel_requested),
                    now_ms,
                    encode_options(&t.spec)?,
                ],
            )?;
        }
        Effect::RunQueued {
            task_id,
            run_id,
            queued_ms,
        } => {
            cached(
                tx,
                "INSERT INTO runs (run_id, task_id, status, queued_ms) VALUES (?1, ?2, ?3, ?4)",
                params![run_id, task_id, status::QUEUED, queued_ms],
            )?;
        }
        Effect::RunWithdrawn { run_id, .. } => {
            cached(
                tx,
                "DELETE FROM runs WHERE run_id = ?1 AND status = ?2",
                params![run_id, status::QUEUED],
            )?;
            // Run ids are never given twice, not even a withdrawn run's.
            cached(
                tx,
                "INSERT INTO counters (name, value) VALUES ('run_id', ?1) ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                params![run_id],
            )?;
        }
        Effect::RunEnded {
            run_id,
            finished_ms,
            outcome,
            ..
        } => {
            let RunOutcome {
                status: st,
                exit_code,
                error,
                output,
                output_dropped_bytes,
            } = outcome;
            cached(
                tx,
                "UPDATE runs SET status = ?1, finished_ms = ?2, exit_code = ?3, error = ?4, output = ?5, output_dropped_bytes = ?6 WHERE run_id = ?7",
                params![
                    st,
                    finished_ms,
                    exit_code,
                    error,
                    output,
                    *output_dropped_bytes as i64,
                    run_id
                ],
            )?;
        }
        Effect::Dispatch(_) | Effect::Kill { .. } => {}
    }
    Ok(())
}

/// Run `sql` through the connection's statement cache: the same few statements run for every
/// run, and preparing each afresh was a measurable part of a run's cost.
fn cached(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<usize, StoreError> {
    tx.prepare_cached(sql)
        .map_err(err)?
        .execute(params)
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::{Connection, SCHEMA, Started, Store};
    use crate::tasks::core::{Config, Effect, Scheduler};
    use crate::tasks::model::{Kind, RunOutcome, Schedule, TaskSpec, Window, status};

    fn spec(schedule: Schedule) -> TaskSpec {
        TaskSpec {
            kind: Kind::Command,
            params: [("a".to_string(), "b".to_string())].into(),
            argv: vec!["echo".into(), "hi there".into()],
            schedule,
            timeout_ms: 1000,
            key: "sig".into(),
            window: None,
            critical: false,
        }
    }

    /// A task's window and critical mark survive a reopen, and a store from before the
    /// `options` column gains it, its tasks read as having neither.
    #[test]
    fn options_survive_a_reopen_and_an_older_store_gains_the_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tasks.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(&SCHEMA.replace(",\n    -- JSON of the spec's optional parts (its window, whether it is critical); NULL: none.\n    options TEXT", ""))
                .expect("older schema");
            assert!(
                conn.prepare("SELECT options FROM tasks").is_err(),
                "an older store"
            );
            conn.execute(
                "INSERT INTO tasks (id, key, kind, params, argv, schedule, timeout_ms, status, next_run_ms, attempt, created_ms, cancel_requested, updated_ms) \
                 VALUES ('old', 'k', 'command', '{}', '[\"true\"]', 'once 0', 1000, 1, 0, 0, 0, 0, 0)",
                [],
            )
            .expect("an older task");
        }
        let mut store = Store::open(&path).expect("open migrates");
        let mut windowed = spec(Schedule::Once { at_ms: 0 });
        windowed.critical = true;
        windowed.window = Some(Window {
            name: "nightly".into(),
            cron: "0 1 * * *".into(),
            tz: "Europe/Berlin".into(),
            duration_ms: 3_600_000,
            cutoff_ms: 600_000,
            grace_ms: Some(60_000),
        });
        let mut s = Scheduler::new(Config::default());
        let effects = s.submit(0, "new".into(), windowed.clone()).expect("submit");
        store.apply(1, &effects, &[]).expect("apply");
        drop(store);
        let loaded = Store::open(&path).expect("reopen").load().expect("load");
        let by_id = |id: &str| {
            loaded
                .tasks
                .iter()
                .find(|t| t.id == id)
                .map(|t| t.spec.clone())
                .expect("task")
        };
        assert_eq!(by_id("new"), windowed);
        let old = by_id("old");
        assert!(old.window.is_none() && !old.critical, "{old:?}");
    }

    /// A store at `path` with task `t1` (one-off, due at once) and `more` submitted, and the
    /// first tick's dispatches committed.
    fn submitted_and_dispatched(
        path: &std::path::Path,
        more: Vec<(&str, TaskSpec)>,
    ) -> (Store, Scheduler) {
        let mut store = Store::open(path).expect("open");
        let mut s = Scheduler::new(Config::default());
        let mut effects = s
            .submit(0, "t1".into(), spec(Schedule::Once { at_ms: 0 }))
            .expect("submit");
        for (id, spec) in more {
            effects.extend(s.submit(0, id.into(), spec).expect("submit"));
        }
        effects.extend(s.tick(10));
        store.apply(10, &effects, &[]).expect("apply");
        (store, s)
    }

    #[test]
    fn state_survives_a_reopen_and_recovery_finds_interrupted_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tasks.db");
        {
            let every = spec(Schedule::Every {
                interval_ms: 60_000,
                first_ms: 3_600_000,
            });
            let (mut store, mut s) = submitted_and_dispatched(&path, vec![("t2", every)]);
            store
                .apply(
                    20,
                    &s.started("t1", 1),
                    &[Started {
                        run_id: 1,
                        started_ms: 20,
                        pid: 4242,
                        pid_start_ticks: Some(77),
                    }],
                )
                .expect("started");
        }
        let store = Store::open(&path).expect("reopen");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.tasks.len(), 2);
        assert_eq!(loaded.max_run_id, 1);
        assert_eq!(loaded.interrupted.len(), 1);
        assert_eq!(loaded.interrupted[0].pid, Some(4242));
        assert_eq!(loaded.interrupted[0].pid_start_ticks, Some(77));
        let t2 = loaded.tasks.iter().find(|t| t.id == "t2").expect("t2");
        assert_eq!(
            t2.spec,
            spec(Schedule::Every {
                interval_ms: 60_000,
                first_ms: 3_600_000
            })
        );
        assert_eq!(t2.status, status::SCHEDULED);
    }

    /// A run that never started is withdrawn: its row goes, its task is due again, and its id
    /// is never given to another run.
    #[test]
    fn a_withdrawn_run_leaves_no_row_and_its_id_is_not_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tasks.db");
        submitted_and_dispatched(&path, Vec::new());
        let mut store = Store::open(&path).expect("reopen");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.interrupted.len(), 1);
        let mut s = Scheduler::new(Config::default());
        let effects = s.recover(
            20,
            loaded.tasks,
            vec![(1, "t1".into(), super::super::core::Found::NeverStarted)],
            loaded.max_run_id,
        );
        store.apply(20, &effects, &[]).expect("withdraw");
        assert!(store.runs("t1").expect("runs").is_empty(), "no record");
        let loaded = store.load().expect("load");
        assert!(loaded.interrupted.is_empty());
        assert_eq!(loaded.tasks[0].status, status::SCHEDULED);
        assert_eq!(loaded.max_run_id, 1, "the withdrawn id stays taken");
    }

    #[test]
    fn a_damaged_store_is_moved_aside_and_an_empty_one_takes_its_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tasks.db");
        {
            let mut store = Store::open(&path).expect("open");
            let mut s = Scheduler::new(Config::default());
            let effects = s
                .submit(0, "t1".into(), spec(Schedule::Once { at_ms: 0 }))
                .expect("submit");
            store.apply(0, &effects, &[]).expect("apply");
        }
        // A sound store opens as it is.
        let (store, moved) = Store::open_checked(&path, 1).expect("open sound");
        assert!(moved.is_none());
        assert_eq!(store.load().expect("load").tasks.len(), 1);
        drop(store);
        // Garbage over the header: not a database any more.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[..32].copy_from_slice(b"this is not a sqlite database!!!");
        std::fs::write(&path, bytes).expect("write");
        // A plain open refuses it (before the check, that stopped the agent's start-up).
        assert!(Store::open(&path).is_err());
        let (store, moved) = Store::open_checked(&path, 7).expect("open damaged");
        let (to, reason) = moved.expect("moved aside");
        assert_eq!(to, dir.path().join("tasks.db.corrupt-7"));
        assert!(to.exists(), "the damaged file is kept for the operator");
        assert!(!reason.is_empty());
        assert!(store.load().expect("load").tasks.is_empty());
    }

    #[test]
    fn outcomes_history_and_purge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("tasks.db")).expect("open");
        let mut s = Scheduler::new(Config::default());
        let mut effects = s
            .submit(0, "t".into(), spec(Schedule::Once { at_ms: 0 }))
            .expect("submit");
        effects.extend(s.tick(0));
        store.apply(0, &effects, &[]).expect("apply");
        let outcome = RunOutcome {
            status: status::DONE,
            exit_code: Some(0),
            error: None,
            output: b"hello".to_vec(),
            output_dropped_bytes: 12,
        };
        let effects = s.finished(50, "t", 1, outcome);
        assert!(effects.iter().any(|e| matches!(e, Effect::RunEnded { .. })));
        store.apply(50, &effects, &[]).expect("apply");
        let runs = store.runs("t").expect("runs");
        assert_eq!(runs.len(), 1);
        assert_eq!(
            (
                runs[0].status,
                runs[0].exit_code,
                runs[0].output_bytes,
                runs[0].output_dropped_bytes
            ),
            (status::DONE, Some(0), 5, 12)
        );
        assert_eq!(
            store.output(1).expect("output"),
            Some((b"hello".to_vec(), 12))
        );
        assert_eq!(
            store.get("t").expect("get").expect("t").status,
            status::DONE
        );
        assert!(
            store.load().expect("load").tasks.is_empty(),
            "ended tasks are history, not live state"
        );
        assert!(store.purge(40).expect("purge").is_empty(), "not old enough");
        assert_eq!(store.purge(51).expect("purge"), vec!["t".to_string()]);
        assert!(store.runs("t").expect("runs").is_empty());
    }
}
