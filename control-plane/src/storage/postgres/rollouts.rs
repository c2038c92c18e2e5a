//! PostgreSQL: rollouts and their hosts, each write one statement conditional on the
//! rollout's version.

use super::{PostgresStore, backend};
use crate::storage::model::{RolloutHostRow, RolloutRow, StorageError};

fn rollout_from_row(r: &tokio_postgres::Row) -> RolloutRow {
    RolloutRow {
        id: r.get(0),
        data: r.get(1),
        active: r.get::<_, i64>(2) != 0,
        version: r.get(3),
        created_ms: r.get(4),
        updated_ms: r.get(5),
    }
}

const ROLLOUT_COLUMNS: &str = "id, data, active, version, created_ms, updated_ms";

/// The hosts as three arrays, for `unnest`.
fn columns(hosts: &[RolloutHostRow]) -> (Vec<&str>, Vec<i64>, Vec<&str>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for h in hosts {
        out.0.push(h.agent_id.as_str());
        out.1.push(h.wave);
        out.2.push(h.data.as_str());
    }
    out
}

impl PostgresStore {
    pub async fn rollout_insert(
        &self,
        row: RolloutRow,
        hosts: Vec<RolloutHostRow>,
    ) -> Result<(), StorageError> {
        let (agents, waves, datas) = columns(&hosts);
        self.client()
            .await?
            .execute(
                "WITH r AS (INSERT INTO rollouts (id, data, active, version, created_ms, updated_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id) \
                 INSERT INTO rollout_hosts (rollout_id, agent_id, wave, data) \
                 SELECT r.id, h.a, h.w, h.d FROM r, unnest($7::text[], $8::bigint[], $9::text[]) AS h(a, w, d)",
                &[
                    &row.id,
                    &row.data,
                    &i64::from(row.active),
                    &row.version,
                    &row.created_ms,
                    &row.updated_ms,
                    &agents,
                    &waves,
                    &datas,
                ],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub async fn rollout_write(
        &self,
        row: RolloutRow,
        hosts: Vec<RolloutHostRow>,
    ) -> Result<bool, StorageError> {
        let (agents, waves, datas) = columns(&hosts);
        let written: i64 = self
            .client()
            .await?
            .query_one(
                "WITH r AS (UPDATE rollouts SET data = $1, active = $2, version = version + 1, updated_ms = $3 \
                 WHERE id = $4 AND version = $5 RETURNING id), \
                 h AS (INSERT INTO rollout_hosts (rollout_id, agent_id, wave, data) \
                 SELECT r.id, h.a, h.w, h.d FROM r, unnest($6::text[], $7::bigint[], $8::text[]) AS h(a, w, d) \
                 ON CONFLICT (rollout_id, agent_id) DO UPDATE SET wave = EXCLUDED.wave, data = EXCLUDED.data) \
                 SELECT count(*) FROM r",
                &[
                    &row.data,
                    &i64::from(row.active),
                    &row.updated_ms,
                    &row.id,
                    &row.version,
                    &agents,
                    &waves,
                    &datas,
                ],
            )
            .await
            .map_err(backend)?
            .get(0);
        Ok(written == 1)
    }

    pub async fn rollout(
        &self,
        id: &str,
    ) -> Result<Option<(RolloutRow, Vec<RolloutHostRow>)>, StorageError> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(backend)?
        else {
            return Ok(None);
        };
        let hosts = client
            .query(
                "SELECT agent_id, wave, data FROM rollout_hosts WHERE rollout_id = $1 ORDER BY wave, agent_id",
                &[&id],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| RolloutHostRow {
                agent_id: r.get(0),
                wave: r.get(1),
                data: r.get(2),
            })
            .collect();
        Ok(Some((rollout_from_row(&row), hosts)))
    }

    pub async fn rollouts(
        &self,
        active_only: bool,
        limit: i64,
    ) -> Result<Vec<RolloutRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE active = 1 OR NOT $1 ORDER BY created_ms DESC, id LIMIT $2"
                ),
                &[&active_only, &limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(rollout_from_row).collect())
    }

    pub async fn agent_task(
        &self,
        agent_id: &str,
        task_id: &str,
    ) -> Result<Option<String>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT snapshot FROM agent_tasks WHERE agent_id = $1 AND task_id = $2",
                &[&agent_id, &task_id],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| r.get(0)))
    }
}
