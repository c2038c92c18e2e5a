//! The buffer file. One writer (this struct); `synchronous=NORMAL` in WAL mode: a kill -9 loses
//! nothing, a power loss may lose the last unsynced seconds of collection (the accepted
//! trade-off: collection is never worth an fsync per row; what leaves the
//! host is synced first, see `make_durable_through`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
DROP INDEX IF EXISTS records_ts;
"#;

/// Reasons a record is dropped instead of delivered.
/// `write_failed`: the append itself failed (a full disk); counted in memory and written with
/// the next write that succeeds.
pub const DROP_REASONS: [&str; 5] = ["age", "size", "quarantine", "too_large", "write_failed"];

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// New records are dropped (counted as `size`) while the file is this large.
    pub bytes_max: u64,
    /// Records older than this are discarded (counted as `age`): an outage shows as a gap.
    pub age_max_ms: i64,
    /// Quarantined files kept beside the buffer; older ones are deleted.
    pub quarantined_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            bytes_max: 128 << 20,
            age_max_ms: 6 * 3600 * 1000,
            quarantined_max: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: i64,
    pub ts_ms: i64,
    pub kind: String,
    /// JSON payload.
    pub data: String,
}

/// `outpost-agent buffer stats` and every heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub epoch: String,
    pub rows: i64,
    pub size_bytes: u64,
    pub oldest_record_age_s: i64,
    pub utilization: f64,
    pub delivery_failures: i64,
    pub dropped_total: BTreeMap<String, i64>,
}

/// What happened when the buffer was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenReport {
    Opened,
    Created,
    /// The old file failed its check and was moved aside; a new epoch began.
    Quarantined {
        moved_to: PathBuf,
        reason: String,
        rows_lost: i64,
    },
}

/// Why a buffer operation failed; callers branch on it (a poisoned lock or a lost blocking
/// task is the process's problem, SQLite and I/O errors the file's).
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("metrics buffer: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("metrics buffer: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics buffer: the lock was poisoned by a panic")]
    Poisoned,
    #[error("metrics buffer: the blocking task did not finish: {0}")]
    Blocking(String),
}

pub struct Buffer {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    epoch: String,
    next_seq: i64,
    /// Records through this `seq` are known to be synced to disk.
    durable_through: i64,
    /// Records dropped because their append failed, not yet written to the counters.
    unrecorded_failed: i64,
}

fn file_size(path: &Path) -> u64 {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

/// Integrity check of an existing file without changing it: `Ok(rows)` or the reason it failed.
pub fn check(path: &Path) -> Result<i64, String> {
    let conn = crate::sqlite_file::checked(path)?;
    let epoch: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get(0)
        })
        .map_err(|e| format!("no buffer metadata: {e}"))?;
    if epoch.is_none_or(|e| e.is_empty()) {
        return Err("no epoch recorded".into());
    }
    conn.query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .map_err(|e| e.to_string())
}

impl Buffer {
    /// Open the buffer at `path`, creating it (with `new_epoch`) if missing and quarantining it
    /// if it fails its integrity check. `now_ms` names the quarantined file.
    pub fn open(
        path: &Path,
        limits: Limits,
        new_epoch: &str,
        now_ms: i64,
    ) -> Result<(Buffer, OpenReport), BufferError> {
        Buffer::open_with_vfs(path, limits, new_epoch, now_ms, None)
    }

    /// [`Buffer::open`] through the SQLite VFS named `vfs` (the simulator's crash-injecting
    /// one); `None` is the default.
    pub fn open_with_vfs(
        path: &Path,
        limits: Limits,
        new_epoch: &str,
        now_ms: i64,
        vfs: Option<&str>,
    ) -> Result<(Buffer, OpenReport), BufferError> {
        let mut report = if path.exists() {
            OpenReport::Opened
        } else {
            OpenReport::Created
        };
        if path.exists()
            && let Err(reason) = check(path)
        {
            let rows_lost = rows_if_readable(path);
            let moved_to = crate::sqlite_file::quarantine(path, now_ms, limits.quarantined_max)?;
            report = OpenReport::Quarantined {
                moved_to,
                reason,
                rows_lost,
            };
        }
        let conn = match vfs {
            Some(vfs) => Connection::open_with_flags_and_vfs(path, OpenFlags::default(), vfs),
            None => Connection::open(path),
        }?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)",
            params![new_epoch],
        )?;
        // The size limit in force, so `buffer stats` (another process) reports utilization
        // against the agent's configuration rather than a default.
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('bytes_max', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![limits.bytes_max.to_string()],
        )
        ?;
        let epoch: String =
            conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })?;
        let stored_next: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })
            .ok();
        let max_seq: i64 =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
                r.get(0)
            })?;
        // `next_seq` is persisted with every append, so seq never repeats even after deletes.
        let next_seq = stored_next
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(1)
            .max(max_seq + 1);
        let mut buffer = Buffer {
            conn,
            path: path.to_path_buf(),
            limits,
            epoch,
            next_seq,
            // Nothing is assumed synced after an open: a killed process leaves its last
            // commits in the page cache only.
            durable_through: 0,
            unrecorded_failed: 0,
        };
        if let OpenReport::Quarantined { rows_lost, .. } = &report {
            buffer.count_drop("quarantine", (*rows_lost).max(0))?;
        }
        Ok((buffer, report))
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn size_bytes(&self) -> u64 {
        file_size(&self.path)
    }

    /// Whether the size limit is reached (collection pauses until delivery drains it).
    pub fn is_full(&self) -> bool {
        self.size_bytes() >= self.limits.bytes_max
    }

    fn count_drop(&mut self, reason: &str, n: i64) -> Result<(), BufferError> {
        if n == 0 {
            return Ok(());
        }
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + ?2",
                params![format!("dropped_{reason}"), n],
            )
            ?;
        Ok(())
    }

    /// Append records stamped `ts_ms`; while the buffer is full they are dropped and counted.
    /// Returns how many were stored.
    pub fn append(
        &mut self,
        ts_ms: i64,
        records: &[(String, String)],
    ) -> Result<usize, BufferError> {
        if records.is_empty() {
            return Ok(0);
        }
        if self.is_full() {
            self.count_drop("size", records.len() as i64)?;
            return Ok(0);
        }
        // A record the control plane would refuse would block delivery forever.
        let too_large = records
            .iter()
            .filter(|(_, data)| data.len() > proto::METRIC_RECORD_BYTES_MAX)
            .count();
        if too_large > 0 {
            self.count_drop("too_large", too_large as i64)?;
        }
        let records: Vec<&(String, String)> = records
            .iter()
            .filter(|(_, data)| data.len() <= proto::METRIC_RECORD_BYTES_MAX)
            .collect();
        let pending_failed = self.unrecorded_failed;
        match self.insert(ts_ms, &records, pending_failed) {
            Ok(seq) => {
                self.next_seq = seq;
                self.unrecorded_failed = 0;
                Ok(records.len())
            }
            Err(e) => {
                // Nothing of the transaction is on disk: these records are lost, and say so.
                self.unrecorded_failed += records.len() as i64;
                Err(e)
            }
        }
    }

    /// One transaction: the records, the next `seq`, and drops of failed appends not yet
    /// counted on disk. Returns the next `seq`.
    fn insert(
        &mut self,
        ts_ms: i64,
        records: &[&(String, String)],
        pending_failed: i64,
    ) -> Result<i64, BufferError> {
        let tx = self.conn.transaction()?;
        let mut seq = self.next_seq;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO records (seq, ts_ms, kind, data) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (kind, data) in records {
                stmt.execute(params![seq, ts_ms, kind, data])?;
                seq += 1;
            }
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('next_seq', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![seq.to_string()],
        )
        ?;
        if pending_failed > 0 {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('dropped_write_failed', ?1) ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + ?1",
                params![pending_failed],
            )?;
        }
        tx.commit()?;
        Ok(seq)
    }

    /// Discard records older than the age limit; returns how many went. Records are appended
    /// in time order, so the stale ones are a prefix by `seq`: the cut is found by walking from
    /// the oldest row (no index on time, which would cost every append a second B-tree insert).
    /// A row stamped earlier than its predecessor (the clock stepped back) goes with the rows
    /// after it, never sooner.
    pub fn expire(&mut self, now_ms: i64) -> Result<i64, BufferError> {
        let cutoff = now_ms - self.limits.age_max_ms;
        let first_fresh: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM records WHERE ts_ms >= ?1 ORDER BY seq LIMIT 1",
                params![cutoff],
                |r| r.get(0),
            )
            .ok();
        let n = match first_fresh {
            Some(seq) => self
                .conn
                .execute("DELETE FROM records WHERE seq < ?1", params![seq]),
            None => self.conn.execute("DELETE FROM records", []),
        }? as i64;
        self.count_drop("age", n)?;
        Ok(n)
    }

    /// The oldest `limit` records.
    pub fn oldest(&self, limit: usize) -> Result<Vec<Record>, BufferError> {
        self.after(i64::MIN, limit)
    }

    /// The oldest `limit` records with a `seq` above `seq`.
    pub fn after(&self, seq: i64, limit: usize) -> Result<Vec<Record>, BufferError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, ts_ms, kind, data FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![seq, limit as i64], |r| {
                Ok(Record {
                    seq: r.get(0)?,
                    ts_ms: r.get(1)?,
                    kind: r.get(2)?,
                    data: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Make every record through `seq` durable before it leaves the host. Appends commit
    /// under `synchronous=NORMAL`, so a power loss may roll back the last of them; if such a
    /// record had been delivered, its `seq` would be handed out again after the restart and
    /// the control plane would discard the new record as a duplicate. One commit under
    /// `synchronous=FULL` syncs the whole WAL, so this costs one fsync per batch.
    pub fn make_durable_through(&mut self, seq: i64) -> Result<(), BufferError> {
        if seq <= self.durable_through {
            return Ok(());
        }
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let synced = self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('durable_through', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![seq.to_string()],
        );
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        synced?;
        self.durable_through = seq;
        Ok(())
    }

    /// The control plane stored everything through `seq`: forget it.
    pub fn delete_through(&mut self, seq: i64) -> Result<usize, BufferError> {
        Ok(self
            .conn
            .execute("DELETE FROM records WHERE seq <= ?1", params![seq])?)
    }

    /// Record the outcome of a delivery attempt (consecutive failures are reported).
    pub fn delivery_result(&mut self, ok: bool) -> Result<(), BufferError> {
        let sql = if ok {
            "INSERT INTO meta (key, value) VALUES ('delivery_failures', 0) ON CONFLICT (key) DO UPDATE SET value = 0"
        } else {
            "INSERT INTO meta (key, value) VALUES ('delivery_failures', 1) ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        };
        self.conn.execute(sql, [])?;
        Ok(())
    }

    pub fn stats(&self, now_ms: i64) -> Result<Stats, BufferError> {
        let mut stats = stats_of(&self.conn, &self.path, now_ms)?;
        if self.unrecorded_failed > 0 {
            *stats
                .dropped_total
                .entry("write_failed".to_string())
                .or_default() += self.unrecorded_failed;
        }
        Ok(stats)
    }
}

fn stats_of(conn: &Connection, path: &Path, now_ms: i64) -> Result<Stats, BufferError> {
    let meta = |key: &str| -> Option<String> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
            r.get(0)
        })
        .ok()
    };
    let (rows, oldest): (i64, Option<i64>) =
        conn.query_row("SELECT count(*), MIN(ts_ms) FROM records", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let size_bytes = file_size(path);
    let dropped_total = DROP_REASONS
        .iter()
        .map(|r| {
            (
                r.to_string(),
                meta(&format!("dropped_{r}"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )
        })
        .collect();
    Ok(Stats {
        epoch: meta("epoch").unwrap_or_default(),
        rows,
        size_bytes,
        oldest_record_age_s: oldest.map(|t| (now_ms - t).max(0) / 1000).unwrap_or(0),
        utilization: size_bytes as f64
            / meta("bytes_max")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(Limits::default().bytes_max)
                .max(1) as f64,
        delivery_failures: meta("delivery_failures")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        dropped_total,
    })
}

/// Stats of the buffer file at `path` without taking it over (for `buffer stats` while the
/// agent runs).
pub fn stats_at(path: &Path, now_ms: i64) -> Result<Stats, BufferError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    stats_of(&conn, path, now_ms)
}

fn rows_if_readable(path: &Path) -> i64 {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row("SELECT count(*) FROM records", [], |r| r.get(0)))
        .unwrap_or(0)
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
