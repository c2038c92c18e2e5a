//! SQLite: the alert evaluator's lease, named specs, alert state and history, and the
//! notification outbox.

use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, backend};
use crate::storage::model::{
    AlertCommit, AlertEventRow, AlertRow, LeaseRow, NOTIFICATION_COLUMNS, NotificationRow,
    SendOutcome, SpecRow, StorageError,
};
use crate::storage::take_lease_sql;

fn notification_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NotificationRow> {
    Ok(NotificationRow {
        id: r.get(0)?,
        key: r.get(1)?,
        channel: r.get(2)?,
        body: r.get(3)?,
        created_ms: r.get(4)?,
        attempts: r.get(5)?,
        next_ms: r.get(6)?,
        delivered_ms: r.get(7)?,
        last_error: r.get(8)?,
    })
}

impl SqliteStore {
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<i64>, StorageError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.run(move |conn| {
            conn.query_row(
                take_lease_sql!("?1", "?2", "?3", "?4"),
                params![name, holder, now_ms + ttl_ms, now_ms],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    pub async fn lease(&self, name: &str) -> Result<Option<LeaseRow>, StorageError> {
        let name = name.to_string();
        self.run(move |conn| {
            conn.query_row(
                "SELECT holder, fence, expires_ms FROM leases WHERE name = ?1",
                params![name],
                |r| {
                    Ok(LeaseRow {
                        holder: r.get(0)?,
                        fence: r.get(1)?,
                        expires_ms: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    pub async fn create_spec(&self, row: SpecRow) -> Result<bool, StorageError> {
        self.run(move |conn| {
            let n = conn
                .execute(
                    "INSERT INTO specs (kind, id, name, spec, secret, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                    params![row.kind, row.id, row.name, row.spec, row.secret, row.created_ms],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn specs(&self, kind: &str) -> Result<Vec<SpecRow>, StorageError> {
        let kind = kind.to_string();
        self.run(move |conn| {
            let mut stmt = conn
                .prepare("SELECT kind, id, name, spec, secret, created_ms FROM specs WHERE kind = ?1 ORDER BY name")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![kind], |r| {
                    Ok(SpecRow {
                        kind: r.get(0)?,
                        id: r.get(1)?,
                        name: r.get(2)?,
                        spec: r.get(3)?,
                        secret: r.get(4)?,
                        created_ms: r.get(5)?,
                    })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn delete_spec(&self, kind: &str, name: &str) -> Result<bool, StorageError> {
        let (kind, name) = (kind.to_string(), name.to_string());
        self.run(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM specs WHERE kind = ?1 AND name = ?2",
                    params![kind, name],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn alerts(&self) -> Result<Vec<AlertRow>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare("SELECT key, data, updated_ms FROM alerts ORDER BY key")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(AlertRow {
                        key: r.get(0)?,
                        data: r.get(1)?,
                        updated_ms: r.get(2)?,
                    })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn alert_commit(&self, c: AlertCommit) -> Result<bool, StorageError> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let fence: Option<i64> = tx
                .query_row(
                    "SELECT fence FROM leases WHERE name = ?1 AND holder = ?2",
                    params![c.lease, c.holder],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            if fence != Some(c.fence) {
                return Ok(false);
            }
            for a in &c.alerts {
                tx.execute(
                    "INSERT INTO alerts (key, data, updated_ms) VALUES (?1, ?2, ?3) ON CONFLICT (key) DO UPDATE SET data = excluded.data, updated_ms = excluded.updated_ms",
                    params![a.key, a.data, a.updated_ms],
                )
                .map_err(backend)?;
            }
            for key in &c.removed {
                tx.execute("DELETE FROM alerts WHERE key = ?1", params![key])
                    .map_err(backend)?;
            }
            for (key, data) in &c.events {
                tx.execute(
                    "INSERT INTO alert_events (key, ts_ms, data) VALUES (?1, ?2, ?3)",
                    params![key, c.now_ms, data],
                )
                .map_err(backend)?;
            }
            for (key, channel, body) in &c.notifications {
                tx.execute(
                    "INSERT INTO notifications (key, channel, body, created_ms, next_ms) VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (key, channel) DO NOTHING",
                    params![key, channel, body, c.now_ms],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)?;
            Ok(true)
        })
        .await
    }

    pub async fn alert_events(&self, limit: i64) -> Result<Vec<AlertEventRow>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare("SELECT id, key, ts_ms, data FROM alert_events ORDER BY id DESC LIMIT ?1")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![limit], |r| {
                    Ok(AlertEventRow {
                        id: r.get(0)?,
                        key: r.get(1)?,
                        ts_ms: r.get(2)?,
                        data: r.get(3)?,
                    })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn notifications_pending(
        &self,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(&format!("SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE delivered_ms IS NULL ORDER BY id LIMIT ?1"))
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![limit], notification_from_row)
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn channel_pending(
        &self,
        channel: &str,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, StorageError> {
        let channel = channel.to_string();
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(&format!("SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE delivered_ms IS NULL AND channel = ?1 ORDER BY id LIMIT ?2"))
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![channel, limit], notification_from_row)
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn notification_sent(&self, o: SendOutcome) -> Result<(), StorageError> {
        self.run(move |conn| {
            conn.execute(
                "UPDATE notifications SET attempts = ?2, delivered_ms = ?3, next_ms = ?4, last_error = ?5 WHERE id = ?1",
                params![o.id, o.attempts, o.delivered_ms, o.next_ms, o.error],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    pub async fn prune_alerts(&self, before_ms: i64) -> Result<u64, StorageError> {
        self.run(move |conn| {
            let events = conn
                .execute(
                    "DELETE FROM alert_events WHERE ts_ms < ?1",
                    params![before_ms],
                )
                .map_err(backend)?;
            let sent = conn
                .execute(
                    "DELETE FROM notifications WHERE delivered_ms IS NOT NULL AND delivered_ms < ?1",
                    params![before_ms],
                )
                .map_err(backend)?;
            Ok((events + sent) as u64)
        })
        .await
    }
}
