//! PostgreSQL backend over `tokio-postgres`, connected through `world` streams. One shared
//! client (queries pipeline over it); a closed client is replaced on the next call.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, Row};
use world::World;

use super::migrations;
use super::model::{
    AgentRow, AuditQuery, AuditRow, BackupPolicyRow, EnrollAttempt, EnrollRefusal, EnrollTokenRow,
    Enrollment, ExecRunRow, MetricQuery, MetricRow, Pruned, RECORDING_SEARCH_WORDS_MAX,
    RecordingChunk, RecordingMatch, RecordingQuery, RecordingRow, SeenRow, SigningKeyRow,
    StorageError, StoredMetric, TOKEN_ID_LEN, TaskRecord, TokenRow, UserApplied, UserInfo, UserRow,
};
use crate::auth::Role;

mod alerts;
mod rollouts;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`PostgresStore::connect`] waits for a database that is not reachable yet.
const START_PATIENCE: Duration = Duration::from_secs(60);
/// The pause between two start-up attempts.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// Arbitrary constant shared by all replicas: serializes concurrent migrations.
const MIGRATION_LOCK_KEY: i64 = 0x006f_7574_706f_7374;

#[derive(Clone)]
pub struct PostgresStore {
    world: World,
    config: Arc<Config>,
    client: Arc<Mutex<Option<Connected>>>,
    /// Daily `metrics` partitions known to exist (day numbers since 1970-01-01, UTC).
    partitions: Arc<std::sync::Mutex<BTreeSet<i64>>>,
}

/// `metrics_pYYYYMMDD` for a day number.
fn partition_name(day: i64) -> String {
    let (y, m, d) = crate::time::civil_from_days(day);
    format!("metrics_p{y:04}{m:02}{d:02}")
}

/// The day number of a partition we named, or `None` for any other table.
fn partition_day(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("metrics_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y = digits[0..4].parse().ok()?;
    let m = digits[4..6].parse().ok()?;
    let d = digits[6..8].parse().ok()?;
    let day = crate::time::days_from_civil(y, m, d);
    (partition_name(day) == name).then_some(day)
}

#[derive(Clone)]
struct Connected {
    client: Arc<Client>,
    _driver: Arc<AbortOnDrop>,
}

/// Owns the connection's driver task: it stops when the last clone of the client goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn backend(e: impl std::error::Error) -> StorageError {
    // tokio-postgres says only "db error"; the server's message is its source.
    match e.source() {
        Some(source) => StorageError::Backend(format!("{e}: {source}")),
        None => StorageError::Backend(e.to_string()),
    }
}

fn conflict_or_backend(e: tokio_postgres::Error, what: &str) -> StorageError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        StorageError::Conflict(what.to_string())
    } else {
        backend(e)
    }
}

const RECORDING_COLUMNS: &str = "r.session_id, r.agent_id, r.agent_name, r.user_id, r.username, \
     r.started_ms, r.ended_ms, r.width, r.height, r.input, r.chunks, r.bytes, r.head_hash, \
     r.last_ms, r.incomplete";
/// Owner, agent and start-time filters on `recordings r`, then the search words on
/// `recording_chunks c` (`$6..`; a word not given is NULL and matches everything).
const RECORDING_FILTER: &str = "($1::text IS NULL OR r.user_id = $1) AND ($2::text IS NULL OR r.agent_id = $2) \
     AND ($3::bigint IS NULL OR r.started_ms >= $3) AND ($4::bigint IS NULL OR r.started_ms < $4)";
const WORD_FILTER: &str = "($6::text IS NULL OR strpos(c.text, $6) > 0) \
     AND ($7::text IS NULL OR strpos(c.text, $7) > 0) AND ($8::text IS NULL OR strpos(c.text, $8) > 0) \
     AND ($9::text IS NULL OR strpos(c.text, $9) > 0) AND ($10::text IS NULL OR strpos(c.text, $10) > 0)";

fn recording_from_row(row: &Row) -> RecordingRow {
    RecordingRow {
        session_id: row.get(0),
        agent_id: row.get(1),
        agent_name: row.get(2),
        user_id: row.get(3),
        username: row.get(4),
        started_ms: row.get(5),
        ended_ms: row.get(6),
        width: row.get(7),
        height: row.get(8),
        input: row.get(9),
        chunks: row.get(10),
        bytes: row.get(11),
        head_hash: row.get(12),
        last_ms: row.get(13),
        incomplete: row.get(14),
    }
}

fn user_from_row(row: &Row) -> UserRow {
    let role: String = row.get(2);
    UserRow {
        id: row.get(0),
        name: row.get(1),
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        password_hash: row.get(3),
        created_at_ms: row.get(4),
    }
}

fn agent_from_row(row: &Row) -> AgentRow {
    AgentRow {
        id: row.get(0),
        name: row.get(1),
        created_at_ms: row.get(2),
        last_seen_ms: row.get(3),
        connected: row.get(4),
        buffer: row.get(5),
        health: row.get(6),
        labels: row.get(7),
    }
}

const AGENT_COLUMNS: &str =
    "id, name, created_at_ms, last_seen_ms, connected, buffer, health, labels";

impl PostgresStore {
    /// Parse `url` and connect once, so a wrong URL fails at start-up with a clear error.
    pub async fn connect(world: &World, url: &str) -> Result<PostgresStore, StorageError> {
        let config: Config = url
            .parse()
            .map_err(|e| StorageError::Backend(format!("invalid database URL: {e}")))?;
        let store = PostgresStore {
            world: world.clone(),
            config: Arc::new(config),
            client: Arc::new(Mutex::new(None)),
            partitions: Arc::default(),
        };
        // A database that is not reachable yet (its container still starting, or a container
        // network's resolver dropping lookups for a few seconds) is waited for; a refusal by
        // the server itself (a wrong password, a missing database) fails at once.
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        let mut attempt = 1;
        loop {
            match store.client().await {
                Ok(_) => return Ok(store),
                Err(StorageError::Backend(why))
                    if why.starts_with("connect to postgres")
                        && tokio::time::Instant::now() + RETRY_EVERY < deadline =>
                {
                    tracing::warn!(attempt, error = %why, "database not reachable yet; trying again");
                    tokio::time::sleep(RETRY_EVERY).await;
                    attempt += 1;
                }
                Err(other) => return Err(other),
            }
        }
    }

    async fn open_client(&self) -> Result<(Client, AbortOnDrop), StorageError> {
        let (client, driver) = world::postgres_connect(&self.world, &self.config, CONNECT_TIMEOUT)
            .await
            .map_err(StorageError::Backend)?;
        Ok((client, AbortOnDrop(driver)))
    }

    async fn client(&self) -> Result<Arc<Client>, StorageError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.client.is_closed()
        {
            return Ok(Arc::clone(&c.client));
        }
        let (client, driver) = self.open_client().await?;
        let connected = Connected {
            client: Arc::new(client),
            _driver: Arc::new(driver),
        };
        let client = Arc::clone(&connected.client);
        *slot = Some(connected);
        Ok(client)
    }

    pub async fn migrate(&self) -> Result<u32, StorageError> {
        // A dedicated connection: a transaction needs exclusive use of its client.
        let (mut client, _driver) = self.open_client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(backend)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
        )
        .await
        .map_err(backend)?;
        let current: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(backend)?
            .get(0);
        let target = i32::try_from(migrations::POSTGRES.len()).map_err(backend)?;
        if current > target {
            return Err(StorageError::Backend(format!(
                "database schema version {current} is newer than this build ({target}); upgrade outpost"
            )));
        }
        let now_ms = self.world.now_unix_ms();
        for (index, step) in migrations::POSTGRES
            .iter()
            .enumerate()
            .skip(current as usize)
        {
            tx.batch_execute(step).await.map_err(backend)?;
            let version = i32::try_from(index + 1).map_err(backend)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
                &[&version, &now_ms],
            )
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        u32::try_from(target).map_err(backend)
    }

    pub async fn create_user(&self, user: UserRow) -> Result<(), StorageError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO users (id, name, role, password_hash, created_at_ms) VALUES ($1, $2, $3, $4, $5)",
                &[&user.id, &user.name, &user.role.as_str(), &user.password_hash, &user.created_at_ms],
            )
            .await
            .map_err(|e| conflict_or_backend(e, &format!("user {}", user.name)))?;
        Ok(())
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<UserRow>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, name, role, password_hash, created_at_ms FROM users WHERE name = $1 AND NOT disabled",
                &[&name],
            )
            .await
            .map_err(backend)?;
        Ok(row.as_ref().map(user_from_row))
    }

    pub async fn list_users(&self) -> Result<Vec<UserInfo>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT name, role, disabled, created_at_ms FROM users ORDER BY name",
                &[],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|row| {
                let role: String = row.get(1);
                UserInfo {
                    name: row.get(0),
                    role: Role::parse(&role).unwrap_or(Role::Viewer),
                    disabled: row.get(2),
                    created_at_ms: row.get(3),
                }
            })
            .collect())
    }

    pub async fn set_user_role(&self, name: &str, role: Role) -> Result<UserApplied, StorageError> {
        self.guarded(
            &format!(
                "{ADMINS_LOCKED}, u AS (UPDATE users SET role = $2 WHERE name = $1 \
                 AND ($2 = 'admin' OR (SELECT ok FROM keeps)) RETURNING id) {APPLIED}"
            ),
            &[&name, &role.as_str()],
        )
        .await
    }

    pub async fn set_user_disabled(
        &self,
        name: &str,
        disabled: bool,
    ) -> Result<UserApplied, StorageError> {
        // One statement, so the flag and the tokens change together.
        self.guarded(
            &format!(
                "{ADMINS_LOCKED}, u AS (UPDATE users SET disabled = $2 WHERE name = $1 \
                 AND (NOT $2 OR (SELECT ok FROM keeps)) RETURNING id), \
                 d AS (DELETE FROM api_tokens WHERE $2 AND user_id IN (SELECT id FROM u)) {APPLIED}"
            ),
            &[&name, &disabled],
        )
        .await
    }

    pub async fn delete_user(&self, name: &str) -> Result<UserApplied, StorageError> {
        self.guarded(
            &format!(
                "{ADMINS_LOCKED}, u AS (DELETE FROM users WHERE name = $1 AND (SELECT ok FROM keeps) \
                 RETURNING id) {APPLIED}"
            ),
            &[&name],
        )
        .await
    }

    /// Run one of the user changes above: a statement that answers (rows changed, whether
    /// the last-admin rule allowed it, whether the user exists).
    async fn guarded(
        &self,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<UserApplied, StorageError> {
        let row = self
            .client()
            .await?
            .query_one(statement, params)
            .await
            .map_err(backend)?;
        Ok(if row.get::<_, i64>(0) > 0 {
            UserApplied::Done
        } else if row.get::<_, bool>(2) && !row.get::<_, bool>(1) {
            UserApplied::LastAdmin
        } else {
            UserApplied::NoSuchUser
        })
    }

    pub async fn create_api_token(
        &self,
        token_hash: &str,
        user_id: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StorageError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO api_tokens (token_hash, user_id, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4)",
                &[&token_hash, &user_id, &now_ms, &expires_at_ms],
            )
            .await
            .map_err(|e| conflict_or_backend(e, "api token"))?;
        Ok(())
    }

    pub async fn user_by_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Option<UserRow>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT u.id, u.name, u.role, u.password_hash, u.created_at_ms FROM api_tokens t \
                 JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1 AND t.expires_at_ms > $2 \
                 AND NOT u.disabled",
                &[&token_hash, &now_ms],
            )
            .await
            .map_err(backend)?;
        Ok(row.as_ref().map(user_from_row))
    }

    pub async fn list_tokens(&self, now_ms: i64) -> Result<Vec<TokenRow>, StorageError> {
        let len = TOKEN_ID_LEN as i32;
        let rows = self
            .client()
            .await?
            .query(
                "SELECT substr(t.token_hash, 1, $1), u.name, t.created_at_ms, t.expires_at_ms \
                 FROM api_tokens t JOIN users u ON u.id = t.user_id \
                 WHERE t.expires_at_ms > $2 ORDER BY t.created_at_ms DESC, t.token_hash",
                &[&len, &now_ms],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|row| TokenRow {
                id: row.get(0),
                user: row.get(1),
                created_at_ms: row.get(2),
                expires_at_ms: row.get(3),
            })
            .collect())
    }

    pub async fn revoke_token_id(&self, id: &str) -> Result<bool, StorageError> {
        let len = TOKEN_ID_LEN as i32;
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM api_tokens WHERE substr(token_hash, 1, $1) = $2",
                &[&len, &id],
            )
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    pub async fn revoke_token(&self, token_hash: &str) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM api_tokens WHERE token_hash = $1",
                &[&token_hash],
            )
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    pub async fn purge_expired(&self, now_ms: i64) -> Result<u64, StorageError> {
        let client = self.client().await?;
        let a = client
            .execute(
                "DELETE FROM api_tokens WHERE expires_at_ms <= $1",
                &[&now_ms],
            )
            .await
            .map_err(backend)?;
        let b = client
            .execute(
                "DELETE FROM enroll_tokens WHERE expires_at_ms <= $1",
                &[&now_ms],
            )
            .await
            .map_err(backend)?;
        Ok(a + b)
    }

    pub async fn create_enroll_token(
        &self,
        token_hash: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StorageError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO enroll_tokens (token_hash, created_at_ms, expires_at_ms) VALUES ($1, $2, $3)",
                &[&token_hash, &now_ms, &expires_at_ms],
            )
            .await
            .map_err(|e| conflict_or_backend(e, "enrollment token"))?;
        Ok(())
    }

    pub async fn create_rekey_token(
        &self,
        token_hash: &str,
        agent_id: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO enroll_tokens (token_hash, created_at_ms, expires_at_ms, agent_id) \
                 SELECT $1, $2, $3, id FROM agents WHERE id = $4",
                &[&token_hash, &now_ms, &expires_at_ms, &agent_id],
            )
            .await
            .map_err(|e| conflict_or_backend(e, "enrollment token"))?;
        Ok(n > 0)
    }

    pub async fn enroll_agent(&self, a: EnrollAttempt) -> Result<Enrollment, StorageError> {
        let client = self.client().await?;
        let claimed = client
            .query_opt(
                "UPDATE enroll_tokens SET used_at_ms = $1, enrollment_id = $2, agent_id = COALESCE(agent_id, $3) \
                 WHERE token_hash = $4 AND used_at_ms IS NULL AND expires_at_ms > $1 RETURNING agent_id",
                &[&a.now_ms, &a.enrollment_id, &a.new_agent_id, &a.token_hash],
            )
            .await
            .map_err(backend)?;
        let agent_id: String = match claimed {
            Some(row) => row.get(0),
            None => {
                let row = client
                    .query_opt(
                        "SELECT t.expires_at_ms, t.enrollment_id, t.agent_id, t.used_at_ms, a.last_seen_ms \
                         FROM enroll_tokens t LEFT JOIN agents a ON a.id = t.agent_id WHERE t.token_hash = $1",
                        &[&a.token_hash],
                    )
                    .await
                    .map_err(backend)?;
                let Some(row) = row else {
                    return Ok(Enrollment::Refused(EnrollRefusal::UnknownToken));
                };
                let expires: i64 = row.get(0);
                let eid: Option<String> = row.get(1);
                let agent_id: Option<String> = row.get(2);
                let used_at: Option<i64> = row.get(3);
                let last_seen: Option<i64> = row.get(4);
                if expires <= a.now_ms {
                    return Ok(Enrollment::Refused(EnrollRefusal::Expired));
                }
                match (eid, agent_id) {
                    (Some(eid), Some(agent_id))
                        if eid == a.enrollment_id
                            && super::model::replay_allowed(used_at, last_seen, a.now_ms) =>
                    {
                        agent_id
                    }
                    _ => return Ok(Enrollment::Refused(EnrollRefusal::AlreadyUsed)),
                }
            }
        };
        client
            .execute(
                "INSERT INTO agents (id, name, credential_hash, created_at_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET credential_hash = EXCLUDED.credential_hash, name = EXCLUDED.name, \
                 connection_id = NULL",
                &[&agent_id, &a.name, &a.credential_hash, &a.now_ms],
            )
            .await
            .map_err(backend)?;
        Ok(Enrollment::Enrolled { agent_id })
    }

    pub async fn agent_by_credential(
        &self,
        credential_hash: &str,
    ) -> Result<Option<AgentRow>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE credential_hash = $1"),
                &[&credential_hash],
            )
            .await
            .map_err(backend)?;
        Ok(row.as_ref().map(agent_from_row))
    }

    pub async fn agent_connected(
        &self,
        agent_id: &str,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        self.client()
            .await?
            .execute(
                "UPDATE agents SET connection_id = $1, connected = TRUE, last_seen_ms = $2 WHERE id = $3",
                &[&connection_id, &now_ms, &agent_id],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub async fn agent_seen(
        &self,
        agent_id: &str,
        connection_id: &str,
        now_ms: i64,
        buffer: Option<String>,
    ) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE agents SET last_seen_ms = $1, buffer = COALESCE($4, buffer) WHERE id = $2 AND connection_id = $3",
                &[&now_ms, &agent_id, &connection_id, &buffer],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    /// Remove the agent and what is stored of it. Its metrics have no foreign key (it cost a
    /// query per stored row), so the one statement deletes them too.
    pub async fn remove_agent(&self, agent_id: &str) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                // Its rekey tokens (and used tokens that could still be replayed) go with it,
                // so none can bring it back.
                "WITH metrics_gone AS (DELETE FROM metrics WHERE agent_id = $1), \
                 tokens_gone AS (DELETE FROM enroll_tokens WHERE agent_id = $1) \
                 DELETE FROM agents WHERE id = $1",
                &[&agent_id],
            )
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    pub async fn agent_disconnected(
        &self,
        agent_id: &str,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        self.client()
            .await?
            .execute(
                "UPDATE agents SET connected = FALSE, last_seen_ms = $1 WHERE id = $2 AND connection_id = $3",
                &[&now_ms, &agent_id, &connection_id],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY name, id"),
                &[],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(agent_from_row).collect())
    }

    pub async fn list_enroll_tokens(
        &self,
        now_ms: i64,
    ) -> Result<Vec<EnrollTokenRow>, StorageError> {
        let len = TOKEN_ID_LEN as i32;
        let rows = self
            .client()
            .await?
            .query(
                "SELECT substr(token_hash, 1, $1), created_at_ms, expires_at_ms, agent_id FROM enroll_tokens \
                 WHERE used_at_ms IS NULL AND expires_at_ms > $2 ORDER BY created_at_ms DESC, token_hash",
                &[&len, &now_ms],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|row| EnrollTokenRow {
                id: row.get(0),
                created_at_ms: row.get(1),
                expires_at_ms: row.get(2),
                agent_id: row.get(3),
            })
            .collect())
    }

    pub async fn revoke_enroll_token_id(&self, id: &str) -> Result<bool, StorageError> {
        let len = TOKEN_ID_LEN as i32;
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM enroll_tokens WHERE substr(token_hash, 1, $1) = $2 AND used_at_ms IS NULL",
                &[&len, &id],
            )
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    pub async fn signing_keys(
        &self,
        candidate_hex: &str,
    ) -> Result<Vec<SigningKeyRow>, StorageError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO signing_keys (id, key_hex, active_from_ms) \
                 SELECT 1, $1, 0 WHERE NOT EXISTS (SELECT 1 FROM signing_keys) \
                 ON CONFLICT (id) DO NOTHING",
                &[&candidate_hex],
            )
            .await
            .map_err(backend)?;
        let rows = client
            .query(
                "SELECT id, key_hex, active_from_ms, retire_at_ms FROM signing_keys ORDER BY id",
                &[],
            )
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|row| {
                Ok(SigningKeyRow {
                    id: u32::try_from(row.get::<_, i32>(0)).map_err(backend)?,
                    key_hex: row.get(1),
                    active_from_ms: row.get(2),
                    retire_at_ms: row.get(3),
                })
            })
            .collect()
    }

    pub async fn rotate_signing_key(
        &self,
        key_hex: &str,
        now_ms: i64,
        active_from_ms: i64,
        retire_old_at_ms: i64,
    ) -> Result<u32, StorageError> {
        // One statement; two rotations at once conflict on the new id and one is refused.
        let row = self
            .client()
            .await?
            .query_one(
                "WITH gone AS (DELETE FROM signing_keys WHERE retire_at_ms < $2), \
                 retired AS (UPDATE signing_keys SET retire_at_ms = $4 \
                     WHERE retire_at_ms IS NULL OR retire_at_ms > $4) \
                 INSERT INTO signing_keys (id, key_hex, active_from_ms) \
                 SELECT COALESCE(MAX(id), 0) + 1, $1, $3 FROM signing_keys RETURNING id",
                &[&key_hex, &now_ms, &active_from_ms, &retire_old_at_ms],
            )
            .await
            .map_err(|e| conflict_or_backend(e, "a signing key rotation at the same time"))?;
        u32::try_from(row.get::<_, i32>(0)).map_err(backend)
    }

    pub async fn cluster_secret(
        &self,
        name: &str,
        candidate: &str,
    ) -> Result<String, StorageError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO cluster_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &candidate],
            )
            .await
            .map_err(backend)?;
        let row = client
            .query_one(
                "SELECT value FROM cluster_secrets WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(backend)?;
        Ok(row.get(0))
    }

    pub async fn create_backup_policy(&self, row: BackupPolicyRow) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO backup_policies (id, name, spec, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
                &[&row.id, &row.name, &row.spec, &row.created_ms],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    pub async fn backup_policies(&self) -> Result<Vec<BackupPolicyRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, name, spec, created_ms FROM backup_policies ORDER BY name",
                &[],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| BackupPolicyRow {
                id: r.get(0),
                name: r.get(1),
                spec: r.get(2),
                created_ms: r.get(3),
            })
            .collect())
    }

    pub async fn delete_backup_policy(&self, id: &str) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute("DELETE FROM backup_policies WHERE id = $1", &[&id])
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    pub async fn agent(&self, agent_id: &str) -> Result<Option<AgentRow>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"),
                &[&agent_id],
            )
            .await
            .map_err(backend)?;
        Ok(row.as_ref().map(agent_from_row))
    }

    pub async fn upsert_agent_tasks(
        &self,
        agent_id: &str,
        tasks: Vec<TaskRecord>,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
        let snapshots: Vec<&str> = tasks.iter().map(|t| t.snapshot.as_str()).collect();
        let failing: Vec<i64> = tasks
            .iter()
            .map(|t| i64::from(t.failing_critical))
            .collect();
        // One statement for the batch: durable as a whole before the ack goes out.
        self.client()
            .await?
            .execute(
                "INSERT INTO agent_tasks (agent_id, task_id, snapshot, updated_ms, failing_critical) \
                 SELECT $1, t.id, t.snapshot, $4, t.failing FROM unnest($2::text[], $3::text[], $5::bigint[]) AS t(id, snapshot, failing) \
                 ON CONFLICT (agent_id, task_id) DO UPDATE SET snapshot = EXCLUDED.snapshot, updated_ms = EXCLUDED.updated_ms, \
                 failing_critical = EXCLUDED.failing_critical",
                &[&agent_id, &ids, &snapshots, &now_ms, &failing],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub async fn exec_write(&self, row: ExecRunRow) -> Result<(), StorageError> {
        let (hosts, views): (Vec<String>, Vec<String>) = row.hosts.into_iter().unzip();
        // One statement, so the run and its hosts land together.
        self.client()
            .await?
            .execute(
                "WITH run AS (INSERT INTO exec_runs (op_id, run, started_ms, updated_ms, finished_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (op_id) DO UPDATE SET \
                 updated_ms = EXCLUDED.updated_ms, finished_ms = EXCLUDED.finished_ms) \
                 INSERT INTO exec_hosts (op_id, host, view) \
                 SELECT $1, h.host, h.view FROM unnest($6::text[], $7::text[]) AS h(host, view) \
                 ON CONFLICT (op_id, host) DO UPDATE SET view = EXCLUDED.view",
                &[
                    &row.op_id,
                    &row.run,
                    &row.started_ms,
                    &row.updated_ms,
                    &row.finished_ms,
                    &hosts,
                    &views,
                ],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub async fn exec_read(&self, op_id: &str) -> Result<Option<ExecRunRow>, StorageError> {
        let client = self.client().await?;
        let Some(run) = client
            .query_opt(
                "SELECT run, started_ms, updated_ms, finished_ms FROM exec_runs WHERE op_id = $1",
                &[&op_id],
            )
            .await
            .map_err(backend)?
        else {
            return Ok(None);
        };
        let hosts = client
            .query(
                "SELECT host, view FROM exec_hosts WHERE op_id = $1 ORDER BY host",
                &[&op_id],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(Some(ExecRunRow {
            op_id: op_id.to_string(),
            run: run.get(0),
            started_ms: run.get(1),
            updated_ms: run.get(2),
            finished_ms: run.get(3),
            hosts,
        }))
    }

    pub async fn prune_exec_runs(&self, before_ms: i64) -> Result<u64, StorageError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM exec_hosts WHERE op_id IN (SELECT op_id FROM exec_runs WHERE started_ms < $1)",
                &[&before_ms],
            )
            .await
            .map_err(backend)?;
        client
            .execute("DELETE FROM exec_runs WHERE started_ms < $1", &[&before_ms])
            .await
            .map_err(backend)
    }

    pub async fn failing_critical_tasks(
        &self,
        limit: i64,
    ) -> Result<Vec<(String, String)>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT agent_id, snapshot FROM agent_tasks WHERE failing_critical = 1 ORDER BY agent_id, task_id LIMIT $1",
                &[&limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn agent_tasks(
        &self,
        agent_id: &str,
        limit: i64,
    ) -> Result<Vec<String>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT snapshot FROM agent_tasks WHERE agent_id = $1 ORDER BY updated_ms DESC, task_id LIMIT $2",
                &[&agent_id, &limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn prune_agent_tasks(
        &self,
        before_ms: i64,
        keep_per_agent: i64,
    ) -> Result<u64, StorageError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM agent_tasks WHERE updated_ms < $1 OR (agent_id, task_id) IN \
                     (SELECT agent_id, task_id FROM (SELECT agent_id, task_id, ROW_NUMBER() OVER \
                     (PARTITION BY agent_id ORDER BY updated_ms DESC, task_id) AS n FROM agent_tasks) r \
                     WHERE n > $2)",
                &[&before_ms, &keep_per_agent],
            )
            .await
            .map_err(backend)
    }

    pub async fn insert_metrics(
        &self,
        agent_id: &str,
        epoch: &str,
        rows: Vec<MetricRow>,
    ) -> Result<u64, StorageError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let days: BTreeSet<i64> = rows
            .iter()
            .map(|r| r.ts_ms.div_euclid(crate::time::DAY_MS))
            .collect();
        self.ensure_partitions(&days).await?;
        let client = self.client().await?;
        // The batch commits (durably) as a whole before the ack. A large one (a backlog
        // draining) goes first as one binary COPY: rows in bulk, one WAL record per page
        // rather than per row. COPY cannot skip rows already stored, so a batch delivered
        // again (its ack was lost, which is rare) fails whole on the unique index and goes
        // again as the INSERT below. A small batch (an agent's regular delivery) goes straight
        // to the INSERT: one round trip, where a COPY takes two and holds the shared
        // connection between them.
        let mut refreshed = false;
        if rows.len() >= COPY_ROWS_MIN {
            match copy_metrics(&client, agent_id, epoch, &rows).await {
                Ok(n) => return Ok(n),
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
                Err(e) if e.code() == Some(&SqlState::CHECK_VIOLATION) => {
                    self.refresh_partitions(&days).await?;
                    refreshed = true;
                }
                Err(e) => return Err(backend(e)),
            }
        }
        let mut seqs = Vec::with_capacity(rows.len());
        let mut ts = Vec::with_capacity(rows.len());
        let mut kinds = Vec::with_capacity(rows.len());
        let mut data = Vec::with_capacity(rows.len());
        for r in rows {
            seqs.push(r.seq);
            ts.push(r.ts_ms);
            kinds.push(r.kind);
            data.push(r.data);
        }
        let insert = "INSERT INTO metrics (agent_id, epoch, seq, ts_ms, kind, data) \
             SELECT $1, $2, t.seq, t.ts, t.kind, t.data FROM unnest($3::bigint[], $4::bigint[], $5::text[], $6::text[]) AS t(seq, ts, kind, data) \
             ON CONFLICT DO NOTHING";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&agent_id, &epoch, &seqs, &ts, &kinds, &data];
        match client.execute(insert, &params).await {
            Err(e) if e.code() == Some(&SqlState::CHECK_VIOLATION) && !refreshed => {
                self.refresh_partitions(&days).await?;
                client.execute(insert, &params).await.map_err(backend)
            }
            other => other.map_err(backend),
        }
    }

    /// After "no partition found" (another replica's retention dropped a partition this one
    /// still had cached): forget the cache and create the partitions `days` need.
    async fn refresh_partitions(&self, days: &BTreeSet<i64>) -> Result<(), StorageError> {
        self.known_partitions()?.clear();
        self.ensure_partitions(days).await
    }

    fn known_partitions(&self) -> Result<std::sync::MutexGuard<'_, BTreeSet<i64>>, StorageError> {
        self.partitions
            .lock()
            .map_err(|_| StorageError::Backend("partition cache poisoned".into()))
    }

    /// Create the daily partitions `days` need, unless known to exist. Safe against other
    /// replicas doing the same at the same moment.
    async fn ensure_partitions(&self, days: &BTreeSet<i64>) -> Result<(), StorageError> {
        let missing: Vec<i64> = {
            let known = self.known_partitions()?;
            days.iter()
                .filter(|d| !known.contains(d))
                .copied()
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        for day in missing {
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF metrics FOR VALUES FROM ({}) TO ({})",
                partition_name(day),
                day * crate::time::DAY_MS,
                (day + 1) * crate::time::DAY_MS
            );
            match client.batch_execute(&sql).await {
                Ok(()) => {}
                // Two creators raced: the table exists, which is all we wanted.
                Err(e)
                    if e.code() == Some(&SqlState::DUPLICATE_TABLE)
                        || e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
                Err(e) => return Err(backend(e)),
            }
            self.known_partitions()?.insert(day);
        }
        Ok(())
    }

    pub async fn prune_metrics(&self, before_ms: i64) -> Result<Pruned, StorageError> {
        let client = self.client().await?;
        let children = client
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'metrics'::regclass",
                &[],
            )
            .await
            .map_err(backend)?;
        let mut pruned = Pruned::default();
        for row in children {
            let name: String = row.get(0);
            let Some(day) = partition_day(&name) else {
                continue;
            };
            if (day + 1) * crate::time::DAY_MS > before_ms {
                continue;
            }
            // The name is one we generated (checked by `partition_day`), so it is safe to splice.
            let rows: i64 = client
                .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                .await
                .map_err(backend)?
                .get(0);
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                .await
                .map_err(backend)?;
            self.known_partitions()?.remove(&day);
            pruned.rows += rows as u64;
            pruned.partitions += 1;
        }
        Ok(pruned)
    }

    pub async fn metrics(&self, q: MetricQuery) -> Result<Vec<StoredMetric>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT epoch, seq, ts_ms, kind, data FROM (SELECT epoch, seq, ts_ms, kind, data, \
                 SUM(octet_length(data)) OVER (ORDER BY ts_ms, epoch, seq) AS upto \
                 FROM metrics WHERE agent_id = $1 AND ($2::text IS NULL OR kind = $2) \
                 AND ts_ms >= $3 AND ts_ms < $4) m WHERE upto <= $6 ORDER BY ts_ms, epoch, seq LIMIT $5",
                &[&q.agent_id, &q.kind, &q.from_ms, &q.to_ms, &q.limit, &q.bytes_max],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| StoredMetric {
                epoch: r.get(0),
                row: MetricRow {
                    seq: r.get(1),
                    ts_ms: r.get(2),
                    kind: r.get(3),
                    data: r.get(4),
                },
            })
            .collect())
    }

    pub async fn audit_append(&self, row: AuditRow) -> Result<(), StorageError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO audit (ts_ms, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
                &[&row.ts_ms, &row.actor, &row.action, &row.target, &row.detail],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub async fn prune_audit(&self, before_ms: i64) -> Result<u64, StorageError> {
        self.client()
            .await?
            .execute("DELETE FROM audit WHERE ts_ms < $1", &[&before_ms])
            .await
            .map_err(backend)
    }

    pub async fn audit_list(&self, q: AuditQuery) -> Result<Vec<AuditRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, ts_ms, actor, action, target, detail FROM audit \
                 WHERE ($1::text IS NULL OR action = $1) AND ($2::bigint IS NULL OR id < $2) \
                 AND ($4::text IS NULL OR target = $4) ORDER BY id DESC LIMIT $3",
                &[&q.action, &q.before_id, &q.limit, &q.target],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| AuditRow {
                id: r.get(0),
                ts_ms: r.get(1),
                actor: r.get(2),
                action: r.get(3),
                target: r.get(4),
                detail: r.get(5),
            })
            .collect())
    }

    pub async fn create_recording(&self, row: RecordingRow) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO recordings (session_id, agent_id, agent_name, user_id, username, \
                 started_ms, ended_ms, width, height, input, chunks, bytes, head_hash, last_ms, \
                 incomplete) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                 ON CONFLICT (session_id) DO NOTHING",
                &[
                    &row.session_id, &row.agent_id, &row.agent_name, &row.user_id, &row.username,
                    &row.started_ms, &row.ended_ms, &row.width, &row.height, &row.input,
                    &row.chunks, &row.bytes, &row.head_hash, &row.last_ms, &row.incomplete,
                ],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    pub async fn recording(&self, session_id: &str) -> Result<Option<RecordingRow>, StorageError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {RECORDING_COLUMNS} FROM recordings r WHERE r.session_id = $1"),
                &[&session_id],
            )
            .await
            .map_err(backend)?;
        Ok(row.as_ref().map(recording_from_row))
    }

    /// One statement: the head moves only if it is where the chunk says it starts, and the
    /// chunk is stored only if the head moved.
    pub async fn append_recording_chunk(
        &self,
        chunk: RecordingChunk,
        incomplete: Option<String>,
    ) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                "WITH head AS (UPDATE recordings SET chunks = $2 + 1, bytes = $4, head_hash = $8, \
                 last_ms = $9, incomplete = COALESCE(incomplete, $10) \
                 WHERE session_id = $1 AND chunks = $2 AND bytes = $3 AND head_hash = $7 \
                 RETURNING session_id) \
                 INSERT INTO recording_chunks (session_id, seq, start_offset, end_offset, events, \
                 text, prev_hash, hash) SELECT session_id, $2, $3, $4, $5, $6, $7, $8 FROM head",
                &[
                    &chunk.session_id,
                    &chunk.seq,
                    &chunk.start_offset,
                    &chunk.end_offset,
                    &chunk.events,
                    &chunk.text,
                    &chunk.prev_hash,
                    &chunk.hash,
                    &chunk.last_ms,
                    &incomplete,
                ],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    pub async fn finish_recording(
        &self,
        session_id: &str,
        ended_ms: i64,
        incomplete: Option<String>,
    ) -> Result<(), StorageError> {
        self.client()
            .await?
            .execute(
                "UPDATE recordings SET ended_ms = COALESCE(ended_ms, $2), \
                 incomplete = COALESCE(incomplete, $3) WHERE session_id = $1",
                &[&session_id, &ended_ms, &incomplete],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub async fn recording_chunks(
        &self,
        session_id: &str,
        from_seq: i64,
        limit: i64,
    ) -> Result<Vec<RecordingChunk>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT c.session_id, c.seq, c.start_offset, c.end_offset, c.events, c.text, \
                 c.prev_hash, c.hash FROM recording_chunks c \
                 WHERE c.session_id = $1 AND c.seq >= $2 ORDER BY c.seq LIMIT $3",
                &[&session_id, &from_seq, &limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| RecordingChunk {
                session_id: r.get(0),
                seq: r.get(1),
                start_offset: r.get(2),
                end_offset: r.get(3),
                events: r.get(4),
                text: r.get(5),
                prev_hash: r.get(6),
                hash: r.get(7),
                last_ms: 0,
            })
            .collect())
    }

    pub async fn list_recordings(
        &self,
        q: RecordingQuery,
    ) -> Result<Vec<RecordingRow>, StorageError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {RECORDING_COLUMNS} FROM recordings r WHERE {RECORDING_FILTER} \
                     ORDER BY r.started_ms DESC LIMIT $5"
                ),
                &[&q.user_id, &q.agent_id, &q.from_ms, &q.to_ms, &q.limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(recording_from_row).collect())
    }

    pub async fn search_recordings(
        &self,
        q: RecordingQuery,
    ) -> Result<Vec<RecordingMatch>, StorageError> {
        let words: [Option<String>; RECORDING_SEARCH_WORDS_MAX] =
            std::array::from_fn(|i| q.words.get(i).cloned());
        let [w1, w2, w3, w4, w5] = &words;
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {RECORDING_COLUMNS}, c.seq FROM recording_chunks c \
                     JOIN recordings r ON r.session_id = c.session_id \
                     WHERE {RECORDING_FILTER} AND {WORD_FILTER} \
                     ORDER BY r.started_ms DESC, c.seq LIMIT $5"
                ),
                &[
                    &q.user_id,
                    &q.agent_id,
                    &q.from_ms,
                    &q.to_ms,
                    &q.limit,
                    w1,
                    w2,
                    w3,
                    w4,
                    w5,
                ],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| RecordingMatch {
                recording: recording_from_row(r),
                seq: r.get(15),
            })
            .collect())
    }

    /// Chunks go with their recording (`ON DELETE CASCADE`).
    pub async fn prune_recordings(&self, before_ms: i64) -> Result<u64, StorageError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM recordings WHERE COALESCE(ended_ms, last_ms) < $1",
                &[&before_ms],
            )
            .await
            .map_err(backend)
    }

    pub async fn set_agent_health(&self, agent_id: &str, health: &str) -> Result<(), StorageError> {
        self.client()
            .await?
            .execute(
                "UPDATE agents SET health = $2 WHERE id = $1",
                &[&agent_id, &health],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    pub async fn set_agent_labels(
        &self,
        agent_id: &str,
        labels: Option<String>,
    ) -> Result<bool, StorageError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE agents SET labels = $2 WHERE id = $1",
                &[&agent_id, &labels],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    /// One statement for the whole batch.
    pub async fn agents_seen(&self, rows: Vec<SeenRow>) -> Result<Vec<bool>, StorageError> {
        let ids: Vec<&str> = rows.iter().map(|r| r.agent_id.as_str()).collect();
        let connections: Vec<&str> = rows.iter().map(|r| r.connection_id.as_str()).collect();
        let times: Vec<i64> = rows.iter().map(|r| r.now_ms).collect();
        let buffers: Vec<Option<&str>> = rows.iter().map(|r| r.buffer.as_deref()).collect();
        let updated = self
            .client()
            .await?
            .query(
                "UPDATE agents a SET last_seen_ms = v.now_ms, buffer = COALESCE(v.buffer, a.buffer) \
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS v(id, connection_id, now_ms, buffer) \
                 WHERE a.id = v.id AND a.connection_id = v.connection_id RETURNING a.id, a.connection_id",
                &[&ids, &connections, &times, &buffers],
            )
            .await
            .map_err(backend)?;
        let held: std::collections::BTreeSet<(String, String)> = updated
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        Ok(rows
            .iter()
            .map(|r| held.contains(&(r.agent_id.clone(), r.connection_id.clone())))
            .collect())
    }
}

/// Batches of at least this many rows go in by COPY (a backlog draining); smaller ones by
/// one INSERT.
const COPY_ROWS_MIN: usize = 256;

/// `COPY … FROM STDIN (FORMAT binary)` of one batch; returns the rows written.
async fn copy_metrics(
    client: &Client,
    agent_id: &str,
    epoch: &str,
    rows: &[MetricRow],
) -> Result<u64, tokio_postgres::Error> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    let sink = client
        .copy_in(
            "COPY metrics (agent_id, epoch, seq, ts_ms, kind, data) FROM STDIN (FORMAT binary)",
        )
        .await?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::TEXT,
            Type::TEXT,
            Type::INT8,
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
        ],
    );
    let mut writer = std::pin::pin!(writer);
    for r in rows {
        writer
            .as_mut()
            .write(&[&agent_id, &epoch, &r.seq, &r.ts_ms, &r.kind, &r.data])
            .await?;
    }
    writer.finish().await
}

/// The start of a change to user `$1` that may end an admin: the enabled admins' rows locked
/// (so a concurrent demotion waits, then sees this one's result), and `keeps.ok`: the user is
/// not an enabled admin, or another enabled admin stays.
const ADMINS_LOCKED: &str = "WITH admins AS (SELECT name FROM users WHERE role = 'admin' AND NOT disabled FOR UPDATE), \
     keeps AS (SELECT NOT EXISTS (SELECT 1 FROM admins WHERE name = $1) \
         OR EXISTS (SELECT 1 FROM admins WHERE name <> $1) AS ok)";

/// The end of those changes: rows changed, `keeps.ok`, whether the user exists.
const APPLIED: &str = "SELECT (SELECT count(*) FROM u), (SELECT ok FROM keeps), \
     EXISTS (SELECT 1 FROM users WHERE name = $1)";
