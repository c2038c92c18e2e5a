//! The collector: every interval it reads Postgres statistics and appends one row per metric
//! type to the buffer (JSON payload, timestamp from the `world` clock). A failed connection or
//! query is reported and retried at the next interval, never fatal. Views a server version
//! lacks are skipped, and said so once.

use std::time::Duration;

use tokio_postgres::{Client, Config};
use tokio_util::sync::CancellationToken;
use world::World;

use super::SharedBuffer;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A statistic: its type name, the oldest server version that has it, and a query returning
/// one JSON text value.
struct Metric {
    kind: &'static str,
    min_version: i32,
    sql: &'static str,
}

const METRICS: &[Metric] = &[
    Metric {
        kind: "pg_stat_database",
        min_version: 0,
        sql: "SELECT coalesce(json_agg(t), '[]')::text FROM (SELECT datname, numbackends, xact_commit, xact_rollback, blks_read, blks_hit, \
              tup_returned, tup_fetched, tup_inserted, tup_updated, tup_deleted, conflicts, deadlocks, temp_bytes \
              FROM pg_stat_database WHERE datname IS NOT NULL) t",
    },
    Metric {
        kind: "bgwriter",
        min_version: 0,
        sql: "SELECT row_to_json(b)::text FROM pg_stat_bgwriter b",
    },
    Metric {
        kind: "checkpointer",
        min_version: 170000,
        sql: "SELECT row_to_json(c)::text FROM pg_stat_checkpointer c",
    },
    Metric {
        kind: "activity",
        min_version: 0,
        sql: "SELECT coalesce(json_object_agg(coalesce(state, 'background'), n), '{}')::text \
              FROM (SELECT state, count(*) AS n FROM pg_stat_activity GROUP BY state) t",
    },
    // How close client connections are to max_connections (the alert rule `connections`).
    Metric {
        kind: "connections",
        min_version: 100000,
        sql: "SELECT json_build_object('used', (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), \
              'max', current_setting('max_connections')::int, \
              'reserved', current_setting('superuser_reserved_connections')::int)::text",
    },
    Metric {
        kind: "replication",
        min_version: 0,
        sql: "SELECT coalesce(json_agg(t), '[]')::text FROM (SELECT application_name, client_addr, state, \
              extract(epoch FROM write_lag) AS write_lag_s, extract(epoch FROM flush_lag) AS flush_lag_s, \
              extract(epoch FROM replay_lag) AS replay_lag_s FROM pg_stat_replication) t",
    },
    Metric {
        kind: "locks",
        min_version: 0,
        sql: "SELECT coalesce(json_object_agg(mode, n), '{}')::text FROM (SELECT mode, count(*) AS n FROM pg_locks GROUP BY mode) t",
    },
    Metric {
        kind: "database_size",
        min_version: 0,
        sql: "SELECT coalesce(json_object_agg(datname, pg_database_size(datname)), '{}')::text FROM pg_database WHERE datallowconn",
    },
    Metric {
        kind: "xid_age",
        min_version: 0,
        sql: "SELECT coalesce(json_object_agg(datname, age(datfrozenxid)), '{}')::text FROM pg_database",
    },
    // WAL archiving: what was archived and what failed last, and the segments waiting
    // (`.ready` files; listing them needs pg_monitor, which the agent's role has).
    Metric {
        kind: "archiver",
        min_version: 120000,
        sql: "SELECT row_to_json(a)::text FROM (SELECT archived_count, last_archived_wal, \
              (extract(epoch FROM last_archived_time) * 1000)::bigint AS last_archived_ms, failed_count, last_failed_wal, \
              (extract(epoch FROM last_failed_time) * 1000)::bigint AS last_failed_ms, \
              (SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready') AS ready_count, \
              current_setting('archive_mode') AS archive_mode FROM pg_stat_archiver) a",
    },
    Metric {
        kind: "dead_tuples",
        min_version: 0,
        sql: "SELECT coalesce(json_agg(t), '[]')::text FROM (SELECT schemaname, relname, n_dead_tup, n_live_tup \
              FROM pg_stat_user_tables ORDER BY n_dead_tup DESC LIMIT 10) t",
    },
];

/// One collection cycle: `(kind, json)` per metric the server has.
async fn collect(client: &Client, version: i32) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for m in METRICS.iter().filter(|m| version >= m.min_version) {
        match tokio::time::timeout(QUERY_TIMEOUT, client.query_one(m.sql, &[])).await {
            Ok(Ok(row)) => match row.try_get::<_, Option<String>>(0) {
                Ok(Some(json)) => rows.push((m.kind.to_string(), json)),
                Ok(None) => {}
                Err(error) => tracing::warn!(kind = m.kind, %error, "unreadable statistic"),
            },
            Ok(Err(error)) => tracing::warn!(kind = m.kind, %error, "statistic query failed"),
            Err(_) => tracing::warn!(kind = m.kind, "statistic query timed out"),
        }
    }
    rows
}

/// Collect every `interval` until `shutdown`.
pub async fn run_collector(
    world: World,
    dsn: String,
    interval: Duration,
    buffer: SharedBuffer,
    shutdown: CancellationToken,
) {
    let config: Config = match dsn.parse() {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "invalid postgres connection string; metrics collection is off");
            shutdown.cancelled().await;
            return;
        }
    };
    let mut session: Option<(Client, tokio::task::JoinHandle<()>, i32)> = None;
    let mut reported_skips = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if session.as_ref().is_some_and(|(c, _, _)| c.is_closed()) {
            session = None;
        }
        if session.is_none() {
            match world::postgres_connect(&world, &config, CONNECT_TIMEOUT).await {
                Ok((client, driver)) => {
                    let version = match client
                        .query_one("SELECT current_setting('server_version_num')::int", &[])
                        .await
                    {
                        Ok(row) => row.try_get::<_, i32>(0).unwrap_or(0),
                        Err(error) => {
                            tracing::warn!(%error, "read the postgres version");
                            0
                        }
                    };
                    if !reported_skips {
                        let skipped: Vec<&str> = METRICS
                            .iter()
                            .filter(|m| version < m.min_version)
                            .map(|m| m.kind)
                            .collect();
                        if !skipped.is_empty() {
                            tracing::info!(version, skipped = ?skipped, "this postgres lacks some statistics; they are skipped");
                        }
                        reported_skips = true;
                    }
                    session = Some((client, driver, version));
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in_s = interval.as_secs(), "metrics collection failed");
                    continue;
                }
            }
        }
        let Some((client, _, version)) = &session else {
            continue;
        };
        let rows = collect(client, *version).await;
        let ts_ms = world.now_unix_ms();
        match buffer.with(&world, move |b| b.append(ts_ms, &rows)).await {
            Ok(n) => tracing::debug!(rows = n, "metrics collected"),
            Err(error) => tracing::error!(%error, "append to the metrics buffer"),
        }
    }
    if let Some((_, driver, _)) = session {
        driver.abort();
    }
}
