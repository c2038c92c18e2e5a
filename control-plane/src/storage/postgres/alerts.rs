//! PostgreSQL: the alert evaluator's lease, named specs, alert state and history, and the
//! notification outbox. A round's writes go in one transaction, a statement per table.

use super::{PostgresStore, backend};
use crate::storage::model::{
    AlertCommit, AlertEventRow, AlertRow, LeaseRow, NOTIFICATION_COLUMNS, NotificationRow,
    SendOutcome, SpecRow, StorageError,
};
use crate::storage::take_lease_sql;

fn notification_from_row(r: &tokio_postgres::Row) -> NotificationRow {
    NotificationRow {
        id: r.get(0),
        key: r.get(1),
        channel: r.get(2),
        body: r.get(3),
        created_ms: r.get(4),
        attempts: r.get(5),
        next_ms: r.get(6),
        delivered_ms: r.get(7),
        last_error: r.get(8),
    }
}

impl PostgresStore {
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<i64>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                take_lease_sql!("$1", "$2", "$3", "$4"),
                &[&name, &holder, &(now_ms + ttl_ms), &now_ms],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn lease(&self, name: &str) -> Result<Option<LeaseRow>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT holder, fence, expires_ms FROM leases WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| LeaseRow {
            holder: r.get(0),
            fence: r.get(1),
            expires_ms: r.get(2),
        }))
    }

    pub async fn create_spec(&self, row: SpecRow) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO specs (kind, id, name, spec, secret, created_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[&row.kind, &row.id, &row.name, &row.spec, &row.secret, &row.created_ms],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    pub async fn specs(&self, kind: &str) -> Result<Vec<SpecRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT kind, id, name, spec, secret, created_ms FROM specs WHERE kind = $1 ORDER BY name",
                &[&kind],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| SpecRow {
                kind: r.get(0),
                id: r.get(1),
                name: r.get(2),
                spec: r.get(3),
                secret: r.get(4),
                created_ms: r.get(5),
            })
            .collect())
    }

    pub async fn delete_spec(&self, kind: &str, name: &str) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM specs WHERE kind = $1 AND name = $2",
                &[&kind, &name],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    pub async fn alerts(&self) -> Result<Vec<AlertRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query("SELECT key, data, updated_ms FROM alerts ORDER BY key", &[])
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| AlertRow {
                key: r.get(0),
                data: r.get(1),
                updated_ms: r.get(2),
            })
            .collect())
    }

    pub async fn alert_commit(&self, c: AlertCommit) -> Result<bool, StorageError> {
        // A dedicated connection: a transaction needs exclusive use of its client.
        let (mut client, _driver) = self.open_client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        let fence: Option<i64> = tx
            .query_opt(
                "SELECT fence FROM leases WHERE name = $1 AND holder = $2 FOR UPDATE",
                &[&c.lease, &c.holder],
            )
            .await
            .map_err(backend)?
            .map(|r| r.get(0));
        if fence != Some(c.fence) {
            return Ok(false);
        }
        let (keys, datas): (Vec<&str>, Vec<&str>) = c
            .alerts
            .iter()
            .map(|a| (a.key.as_str(), a.data.as_str()))
            .unzip();
        let updated: Vec<i64> = c.alerts.iter().map(|a| a.updated_ms).collect();
        tx.execute(
            "INSERT INTO alerts (key, data, updated_ms) SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) ON CONFLICT (key) DO UPDATE SET data = excluded.data, updated_ms = excluded.updated_ms",
            &[&keys, &datas, &updated],
        )
        .await
        .map_err(backend)?;
        tx.execute("DELETE FROM alerts WHERE key = ANY($1)", &[&c.removed])
            .await
            .map_err(backend)?;
        let (keys, datas): (Vec<&str>, Vec<&str>) = c
            .events
            .iter()
            .map(|(k, d)| (k.as_str(), d.as_str()))
            .unzip();
        // WITH ORDINALITY keeps the round's order in the ids.
        tx.execute(
            "INSERT INTO alert_events (key, ts_ms, data) SELECT k, $3, d FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(k, d, n) ORDER BY n",
            &[&keys, &datas, &c.now_ms],
        )
        .await
        .map_err(backend)?;
        let mut keys = Vec::new();
        let mut channels = Vec::new();
        let mut bodies = Vec::new();
        for (k, ch, b) in &c.notifications {
            keys.push(k.as_str());
            channels.push(ch.as_str());
            bodies.push(b.as_str());
        }
        tx.execute(
            "INSERT INTO notifications (key, channel, body, created_ms, next_ms) SELECT k, c, b, $4, $4 FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS t(k, c, b, n) ORDER BY n ON CONFLICT (key, channel) DO NOTHING",
            &[&keys, &channels, &bodies, &c.now_ms],
        )
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(true)
    }

    pub async fn alert_events(&self, limit: i64) -> Result<Vec<AlertEventRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, key, ts_ms, data FROM alert_events ORDER BY id DESC LIMIT $1",
                &[&limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| AlertEventRow {
                id: r.get(0),
                key: r.get(1),
                ts_ms: r.get(2),
                data: r.get(3),
            })
            .collect())
    }

    pub async fn notifications_pending(
        &self,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE delivered_ms IS NULL ORDER BY id LIMIT $1"),
                &[&limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(notification_from_row).collect())
    }

    pub async fn channel_pending(
        &self,
        channel: &str,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE delivered_ms IS NULL AND channel = $1 ORDER BY id LIMIT $2"),
                &[&channel, &limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(notification_from_row).collect())
    }

    pub async fn notification_sent(&self, o: SendOutcome) -> Result<(), StorageError> {
        self.client()
            .await?
            .execute(
                "UPDATE notifications SET attempts = $2, delivered_ms = $3, next_ms = $4, last_error = $5 WHERE id = $1",
                &[&o.id, &o.attempts, &o.delivered_ms, &o.next_ms, &o.error],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub async fn prune_alerts(&self, before_ms: i64) -> Result<u64, StorageError> {
        let client = self.client().await?;
        let events = client
            .execute("DELETE FROM alert_events WHERE ts_ms < $1", &[&before_ms])
            .await
            .map_err(backend)?;
        let sent = client
            .execute(
                "DELETE FROM notifications WHERE delivered_ms IS NOT NULL AND delivered_ms < $1",
                &[&before_ms],
            )
            .await
            .map_err(backend)?;
        Ok(events + sent)
    }
}
