//! SQLite: rollouts and their hosts, each write conditional on the rollout's version.

use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, backend};
use crate::storage::model::{RolloutHostRow, RolloutRow, StorageError};

fn rollout_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.get(0)?,
        data: r.get(1)?,
        active: r.get::<_, i64>(2)? != 0,
        version: r.get(3)?,
        created_ms: r.get(4)?,
        updated_ms: r.get(5)?,
    })
}

const ROLLOUT_COLUMNS: &str = "id, data, active, version, created_ms, updated_ms";

fn put_hosts(
    tx: &rusqlite::Transaction<'_>,
    rollout_id: &str,
    hosts: &[RolloutHostRow],
) -> Result<(), StorageError> {
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO rollout_hosts (rollout_id, agent_id, wave, data) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (rollout_id, agent_id) DO UPDATE SET wave = excluded.wave, data = excluded.data",
        )
        .map_err(backend)?;
    for h in hosts {
        stmt.execute(params![rollout_id, h.agent_id, h.wave, h.data])
            .map_err(backend)?;
    }
    Ok(())
}

impl SqliteStore {
    pub async fn rollout_insert(
        &self,
        row: RolloutRow,
        hosts: Vec<RolloutHostRow>,
    ) -> Result<(), StorageError> {
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            tx.execute(
                "INSERT INTO rollouts (id, data, active, version, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![row.id, row.data, i64::from(row.active), row.version, row.created_ms, row.updated_ms],
            )
            .map_err(backend)?;
            put_hosts(&tx, &row.id, &hosts)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    pub async fn rollout_write(
        &self,
        row: RolloutRow,
        hosts: Vec<RolloutHostRow>,
    ) -> Result<bool, StorageError> {
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let changed = tx
                .execute(
                    "UPDATE rollouts SET data = ?1, active = ?2, version = version + 1, updated_ms = ?3 WHERE id = ?4 AND version = ?5",
                    params![row.data, i64::from(row.active), row.updated_ms, row.id, row.version],
                )
                .map_err(backend)?;
            if changed == 0 {
                return Ok(false);
            }
            put_hosts(&tx, &row.id, &hosts)?;
            tx.commit().map_err(backend)?;
            Ok(true)
        })
        .await
    }

    pub async fn rollout(
        &self,
        id: &str,
    ) -> Result<Option<(RolloutRow, Vec<RolloutHostRow>)>, StorageError> {
        let id = id.to_string();
        self.run(move |conn| {
            let Some(row) = conn
                .query_row(
                    &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"),
                    params![id],
                    rollout_from_row,
                )
                .optional()
                .map_err(backend)?
            else {
                return Ok(None);
            };
            let mut stmt = conn
                .prepare(
                    "SELECT agent_id, wave, data FROM rollout_hosts WHERE rollout_id = ?1 ORDER BY wave, agent_id",
                )
                .map_err(backend)?;
            let hosts = stmt
                .query_map(params![id], |r| {
                    Ok(RolloutHostRow {
                        agent_id: r.get(0)?,
                        wave: r.get(1)?,
                        data: r.get(2)?,
                    })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(Some((row, hosts)))
        })
        .await
    }

    pub async fn rollouts(
        &self,
        active_only: bool,
        limit: i64,
    ) -> Result<Vec<RolloutRow>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE active = 1 OR ?1 = 0 ORDER BY created_ms DESC, id LIMIT ?2"
                ))
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![i64::from(active_only), limit], rollout_from_row)
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn agent_task(
        &self,
        agent_id: &str,
        task_id: &str,
    ) -> Result<Option<String>, StorageError> {
        let (agent_id, task_id) = (agent_id.to_string(), task_id.to_string());
        self.run(move |conn| {
            conn.query_row(
                "SELECT snapshot FROM agent_tasks WHERE agent_id = ?1 AND task_id = ?2",
                params![agent_id, task_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }
}
