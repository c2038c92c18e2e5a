//! SQLite backend: one file in the data dir, WAL mode, `synchronous=FULL` (a write is
//! acknowledged only once it is on disk). Every call runs on `world`'s blocking executor.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use world::World;

use super::migrations;
use super::model::{
    AgentRow, AuditQuery, AuditRow, BackupPolicyRow, EnrollAttempt, EnrollRefusal, EnrollTokenRow,
    Enrollment, ExecRunRow, MetricQuery, MetricRow, Pruned, RECORDING_SEARCH_WORDS_MAX,
    RecordingChunk, RecordingMatch, RecordingQuery, RecordingRow, SeenRow, SigningKeyRow,
    StorageError, StoredMetric, TOKEN_ID_LEN, TaskRecord, TokenRow, UserApplied, UserInfo, UserRow,
    replay_allowed,
};
use crate::auth::Role;

mod alerts;
mod rollouts;

#[derive(Clone)]
pub struct SqliteStore {
    world: World,
    conn: Arc<Mutex<Connection>>,
}

fn backend(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

fn conflict_or_backend(e: rusqlite::Error, what: &str) -> StorageError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StorageError::Conflict(what.to_string())
        }
        _ => backend(e),
    }
}

const USER_COLUMNS: &str = "id, name, role, password_hash, created_at_ms";
const AGENT_COLUMNS: &str =
    "id, name, created_at_ms, last_seen_ms, connected, buffer, health, labels";

const RECORDING_COLUMNS: &str = "r.session_id, r.agent_id, r.agent_name, r.user_id, r.username, \
     r.started_ms, r.ended_ms, r.width, r.height, r.input, r.chunks, r.bytes, r.head_hash, \
     r.last_ms, r.incomplete";
/// Owner, agent and start-time filters on `recordings r`, then the search words on
/// `recording_chunks c` (`?6..`; a word not given is NULL and matches everything).
const RECORDING_FILTER: &str = "(?1 IS NULL OR r.user_id = ?1) AND (?2 IS NULL OR r.agent_id = ?2) \
     AND (?3 IS NULL OR r.started_ms >= ?3) AND (?4 IS NULL OR r.started_ms < ?4)";
const WORD_FILTER: &str = "(?6 IS NULL OR instr(c.text, ?6) > 0) AND (?7 IS NULL OR instr(c.text, ?7) > 0) \
     AND (?8 IS NULL OR instr(c.text, ?8) > 0) AND (?9 IS NULL OR instr(c.text, ?9) > 0) \
     AND (?10 IS NULL OR instr(c.text, ?10) > 0)";

fn recording_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RecordingRow> {
    Ok(RecordingRow {
        session_id: row.get(0)?,
        agent_id: row.get(1)?,
        agent_name: row.get(2)?,
        user_id: row.get(3)?,
        username: row.get(4)?,
        started_ms: row.get(5)?,
        ended_ms: row.get(6)?,
        width: row.get(7)?,
        height: row.get(8)?,
        input: row.get(9)?,
        chunks: row.get(10)?,
        bytes: row.get(11)?,
        head_hash: row.get(12)?,
        last_ms: row.get(13)?,
        incomplete: row.get(14)?,
    })
}

/// The words of a search as five parameters, `None` past the last.
fn word_params(q: &RecordingQuery) -> [Option<String>; RECORDING_SEARCH_WORDS_MAX] {
    std::array::from_fn(|i| q.words.get(i).cloned())
}

fn user_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
    let role: String = row.get(2)?;
    Ok(UserRow {
        id: row.get(0)?,
        name: row.get(1)?,
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        password_hash: row.get(3)?,
        created_at_ms: row.get(4)?,
    })
}

fn agent_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRow> {
    Ok(AgentRow {
        id: row.get(0)?,
        name: row.get(1)?,
        created_at_ms: row.get(2)?,
        last_seen_ms: row.get(3)?,
        connected: row.get::<_, i64>(4)? != 0,
        buffer: row.get(5)?,
        health: row.get(6)?,
        labels: row.get(7)?,
    })
}

impl SqliteStore {
    /// Open (creating if needed) the database file at `path`.
    pub async fn open(world: &World, path: &Path) -> Result<SqliteStore, StorageError> {
        let path = path.to_path_buf();
        let conn = world
            .blocking(move || -> Result<Connection, rusqlite::Error> {
                let conn = Connection::open(&path)?;
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "FULL")?;
                conn.pragma_update(None, "foreign_keys", "ON")?;
                Ok(conn)
            })
            .await
            .map_err(backend)?
            .map_err(backend)?;
        Ok(SqliteStore {
            world: world.clone(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&mut Connection) -> Result<T, StorageError> + Send + 'static,
        T: Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        self.world
            .blocking(move || {
                let mut guard = conn
                    .lock()
                    .map_err(|_| StorageError::Backend("sqlite connection lock poisoned".into()))?;
                f(&mut guard)
            })
            .await
            .map_err(backend)?
    }

    /// Bring the schema to this build's version. An up-to-date database is only read: a
    /// control plane and `outpost admin` open the same live file, and a write here would wait
    /// for (or, upgrading a read, fail against) the running replica's writes.
    pub async fn migrate(&self) -> Result<u32, StorageError> {
        self.run(|conn| {
            let target = u32::try_from(migrations::SQLITE.len()).map_err(backend)?;
            let version = |conn: &Connection| -> Result<u32, StorageError> {
                let current: u32 = conn
                    .pragma_query_value(None, "user_version", |r| r.get(0))
                    .map_err(backend)?;
                if current > target {
                    return Err(StorageError::Backend(format!(
                        "database schema version {current} is newer than this build ({target}); upgrade outpost"
                    )));
                }
                Ok(current)
            };
            if version(conn)? == target {
                return Ok(target);
            }
            // Writing: take the write lock first (the busy timeout applies), then look again.
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let current = version(&tx)?;
            for step in &migrations::SQLITE[current as usize..] {
                tx.execute_batch(step).map_err(backend)?;
            }
            tx.pragma_update(None, "user_version", target)
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(target)
        })
        .await
    }

    pub async fn create_user(&self, user: UserRow) -> Result<(), StorageError> {
        self.run(move |conn| {
            conn.execute(
                "INSERT INTO users (id, name, role, password_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![user.id, user.name, user.role.as_str(), user.password_hash, user.created_at_ms],
            )
            .map_err(|e| conflict_or_backend(e, &format!("user {}", user.name)))?;
            Ok(())
        })
        .await
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<UserRow>, StorageError> {
        let name = name.to_string();
        self.run(move |conn| {
            conn.query_row(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1 AND disabled = 0"),
                params![name],
                user_from_row,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    pub async fn list_users(&self) -> Result<Vec<UserInfo>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare("SELECT name, role, disabled, created_at_ms FROM users ORDER BY name")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |row| {
                    let role: String = row.get(1)?;
                    Ok(UserInfo {
                        name: row.get(0)?,
                        role: Role::parse(&role).unwrap_or(Role::Viewer),
                        disabled: row.get::<_, i64>(2)? != 0,
                        created_at_ms: row.get(3)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    pub async fn set_user_role(&self, name: &str, role: Role) -> Result<UserApplied, StorageError> {
        let name = name.to_string();
        self.run(move |conn| {
            let tx = immediate(conn)?;
            let n = tx
                .execute(
                    &format!(
                        "UPDATE users SET role = ?2 WHERE name = ?1 AND (?2 = 'admin' OR {KEEPS_AN_ADMIN})"
                    ),
                    params![name, role.as_str()],
                )
                .map_err(backend)?;
            applied(tx, &name, n)
        })
        .await
    }

    pub async fn set_user_disabled(
        &self,
        name: &str,
        disabled: bool,
    ) -> Result<UserApplied, StorageError> {
        let name = name.to_string();
        self.run(move |conn| {
            let tx = immediate(conn)?;
            let n = tx
                .execute(
                    &format!(
                        "UPDATE users SET disabled = ?2 WHERE name = ?1 AND (?2 = 0 OR {KEEPS_AN_ADMIN})"
                    ),
                    params![name, i64::from(disabled)],
                )
                .map_err(backend)?;
            if disabled && n > 0 {
                tx.execute(
                    "DELETE FROM api_tokens WHERE user_id IN (SELECT id FROM users WHERE name = ?1)",
                    params![name],
                )
                .map_err(backend)?;
            }
            applied(tx, &name, n)
        })
        .await
    }

    pub async fn delete_user(&self, name: &str) -> Result<UserApplied, StorageError> {
        let name = name.to_string();
        self.run(move |conn| {
            let tx = immediate(conn)?;
            let n = tx
                .execute(
                    &format!("DELETE FROM users WHERE name = ?1 AND {KEEPS_AN_ADMIN}"),
                    params![name],
                )
                .map_err(backend)?;
            applied(tx, &name, n)
        })
        .await
    }

    pub async fn create_api_token(
        &self,
        token_hash: &str,
        user_id: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StorageError> {
        let (token_hash, user_id) = (token_hash.to_string(), user_id.to_string());
        self.run(move |conn| {
            conn.execute(
                "INSERT INTO api_tokens (token_hash, user_id, created_at_ms, expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![token_hash, user_id, now_ms, expires_at_ms],
            )
            .map_err(|e| conflict_or_backend(e, "api token"))?;
            Ok(())
        })
        .await
    }

    pub async fn user_by_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Option<UserRow>, StorageError> {
        let token_hash = token_hash.to_string();
        self.run(move |conn| {
            conn.query_row(
                "SELECT u.id, u.name, u.role, u.password_hash, u.created_at_ms FROM api_tokens t \
                 JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?1 AND t.expires_at_ms > ?2 \
                 AND u.disabled = 0",
                params![token_hash, now_ms],
                user_from_row,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    pub async fn list_tokens(&self, now_ms: i64) -> Result<Vec<TokenRow>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT substr(t.token_hash, 1, ?1), u.name, t.created_at_ms, t.expires_at_ms \
                     FROM api_tokens t JOIN users u ON u.id = t.user_id \
                     WHERE t.expires_at_ms > ?2 ORDER BY t.created_at_ms DESC, t.token_hash",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![TOKEN_ID_LEN as i64, now_ms], |row| {
                    Ok(TokenRow {
                        id: row.get(0)?,
                        user: row.get(1)?,
                        created_at_ms: row.get(2)?,
                        expires_at_ms: row.get(3)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    pub async fn revoke_token_id(&self, id: &str) -> Result<bool, StorageError> {
        let id = id.to_string();
        self.run(move |conn| {
            conn.execute(
                "DELETE FROM api_tokens WHERE substr(token_hash, 1, ?1) = ?2",
                params![TOKEN_ID_LEN as i64, id],
            )
            .map(|n| n > 0)
            .map_err(backend)
        })
        .await
    }

    pub async fn revoke_token(&self, token_hash: &str) -> Result<bool, StorageError> {
        let token_hash = token_hash.to_string();
        self.run(move |conn| {
            conn.execute(
                "DELETE FROM api_tokens WHERE token_hash = ?1",
                params![token_hash],
            )
            .map(|n| n > 0)
            .map_err(backend)
        })
        .await
    }

    pub async fn purge_expired(&self, now_ms: i64) -> Result<u64, StorageError> {
        self.run(move |conn| {
            let a = conn
                .execute(
                    "DELETE FROM api_tokens WHERE expires_at_ms <= ?1",
                    params![now_ms],
                )
                .map_err(backend)?;
            let b = conn
                .execute(
                    "DELETE FROM enroll_tokens WHERE expires_at_ms <= ?1",
                    params![now_ms],
                )
                .map_err(backend)?;
            Ok((a + b) as u64)
        })
        .await
    }

    pub async fn create_enroll_token(
        &self,
        token_hash: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StorageError> {
        let token_hash = token_hash.to_string();
        self.run(move |conn| {
            conn.execute(
                "INSERT INTO enroll_tokens (token_hash, created_at_ms, expires_at_ms) VALUES (?1, ?2, ?3)",
                params![token_hash, now_ms, expires_at_ms],
            )
            .map_err(|e| conflict_or_backend(e, "enrollment token"))?;
            Ok(())
        })
        .await
    }

    pub async fn create_rekey_token(
        &self,
        token_hash: &str,
        agent_id: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, StorageError> {
        let (token_hash, agent_id) = (token_hash.to_string(), agent_id.to_string());
        self.run(move |conn| {
            let n = conn
                .execute(
                    "INSERT INTO enroll_tokens (token_hash, created_at_ms, expires_at_ms, agent_id) \
                     SELECT ?1, ?2, ?3, id FROM agents WHERE id = ?4",
                    params![token_hash, now_ms, expires_at_ms, agent_id],
                )
                .map_err(|e| conflict_or_backend(e, "enrollment token"))?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn enroll_agent(&self, a: EnrollAttempt) -> Result<Enrollment, StorageError> {
        self.run(move |conn| {
            let claimed: Option<String> = conn
                .query_row(
                    "UPDATE enroll_tokens SET used_at_ms = ?1, enrollment_id = ?2, agent_id = COALESCE(agent_id, ?3) \
                     WHERE token_hash = ?4 AND used_at_ms IS NULL AND expires_at_ms > ?1 RETURNING agent_id",
                    params![a.now_ms, a.enrollment_id, a.new_agent_id, a.token_hash],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            let agent_id = match claimed {
                Some(id) => id,
                None => {
                    type Used = (i64, Option<String>, Option<String>, Option<i64>, Option<i64>);
                    let row: Option<Used> = conn
                        .query_row(
                            "SELECT t.expires_at_ms, t.enrollment_id, t.agent_id, t.used_at_ms, a.last_seen_ms \
                             FROM enroll_tokens t LEFT JOIN agents a ON a.id = t.agent_id WHERE t.token_hash = ?1",
                            params![a.token_hash],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                        )
                        .optional()
                        .map_err(backend)?;
                    match row {
                        None => return Ok(Enrollment::Refused(EnrollRefusal::UnknownToken)),
                        Some((expires, ..)) if expires <= a.now_ms => {
                            return Ok(Enrollment::Refused(EnrollRefusal::Expired));
                        }
                        Some((_, Some(eid), Some(agent_id), used_at, last_seen))
                            if eid == a.enrollment_id
                                && replay_allowed(used_at, last_seen, a.now_ms) =>
                        {
                            agent_id
                        }
                        Some(_) => return Ok(Enrollment::Refused(EnrollRefusal::AlreadyUsed)),
                    }
                }
            };
            conn.execute(
                "INSERT INTO agents (id, name, credential_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (id) DO UPDATE SET credential_hash = excluded.credential_hash, name = excluded.name, \
                 connection_id = NULL",
                params![agent_id, a.name, a.credential_hash, a.now_ms],
            )
            .map_err(backend)?;
            Ok(Enrollment::Enrolled { agent_id })
        })
        .await
    }

    pub async fn agent_by_credential(
        &self,
        credential_hash: &str,
    ) -> Result<Option<AgentRow>, StorageError> {
        let credential_hash = credential_hash.to_string();
        self.run(move |conn| {
            conn.query_row(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE credential_hash = ?1"),
                params![credential_hash],
                agent_from_row,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    pub async fn agent_connected(
        &self,
        agent_id: &str,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        let (agent_id, connection_id) = (agent_id.to_string(), connection_id.to_string());
        self.run(move |conn| {
            conn.execute(
                "UPDATE agents SET connection_id = ?1, connected = 1, last_seen_ms = ?2 WHERE id = ?3",
                params![connection_id, now_ms, agent_id],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    pub async fn agent_seen(
        &self,
        agent_id: &str,
        connection_id: &str,
        now_ms: i64,
        buffer: Option<String>,
    ) -> Result<bool, StorageError> {
        let (agent_id, connection_id) = (agent_id.to_string(), connection_id.to_string());
        self.run(move |conn| {
            let n = conn
                .execute(
                    "UPDATE agents SET last_seen_ms = ?1, buffer = COALESCE(?4, buffer) WHERE id = ?2 AND connection_id = ?3",
                    params![now_ms, agent_id, connection_id, buffer],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn remove_agent(&self, agent_id: &str) -> Result<bool, StorageError> {
        let agent_id = agent_id.to_string();
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            // Its rekey tokens (and used tokens that could still be replayed) go with it, so
            // none can bring it back.
            tx.execute(
                "DELETE FROM enroll_tokens WHERE agent_id = ?1",
                params![agent_id],
            )
            .map_err(backend)?;
            let n = tx
                .execute("DELETE FROM agents WHERE id = ?1", params![agent_id])
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn agent_disconnected(
        &self,
        agent_id: &str,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        let (agent_id, connection_id) = (agent_id.to_string(), connection_id.to_string());
        self.run(move |conn| {
            conn.execute(
                "UPDATE agents SET connected = 0, last_seen_ms = ?1 WHERE id = ?2 AND connection_id = ?3",
                params![now_ms, agent_id, connection_id],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentRow>, StorageError> {
        self.run(|conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {AGENT_COLUMNS} FROM agents ORDER BY name, id"
                ))
                .map_err(backend)?;
            let rows = stmt
                .query_map([], agent_from_row)
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn list_enroll_tokens(
        &self,
        now_ms: i64,
    ) -> Result<Vec<EnrollTokenRow>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT substr(token_hash, 1, ?1), created_at_ms, expires_at_ms, agent_id FROM enroll_tokens \
                     WHERE used_at_ms IS NULL AND expires_at_ms > ?2 ORDER BY created_at_ms DESC, token_hash",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![TOKEN_ID_LEN, now_ms], |row| {
                    Ok(EnrollTokenRow {
                        id: row.get(0)?,
                        created_at_ms: row.get(1)?,
                        expires_at_ms: row.get(2)?,
                        agent_id: row.get(3)?,
                    })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn revoke_enroll_token_id(&self, id: &str) -> Result<bool, StorageError> {
        let id = id.to_string();
        self.run(move |conn| {
            conn.execute(
                "DELETE FROM enroll_tokens WHERE substr(token_hash, 1, ?1) = ?2 AND used_at_ms IS NULL",
                params![TOKEN_ID_LEN, id],
            )
            .map(|n| n > 0)
            .map_err(backend)
        })
        .await
    }

    pub async fn signing_keys(
        &self,
        candidate_hex: &str,
    ) -> Result<Vec<SigningKeyRow>, StorageError> {
        let candidate = candidate_hex.to_string();
        self.run(move |conn| {
            conn.execute(
                "INSERT INTO signing_keys (id, key_hex, active_from_ms) \
                 SELECT 1, ?1, 0 WHERE NOT EXISTS (SELECT 1 FROM signing_keys)",
                params![candidate],
            )
            .map_err(backend)?;
            let mut stmt = conn
                .prepare("SELECT id, key_hex, active_from_ms, retire_at_ms FROM signing_keys ORDER BY id")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok(SigningKeyRow {
                        id: row.get(0)?,
                        key_hex: row.get(1)?,
                        active_from_ms: row.get(2)?,
                        retire_at_ms: row.get(3)?,
                    })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn rotate_signing_key(
        &self,
        key_hex: &str,
        now_ms: i64,
        active_from_ms: i64,
        retire_old_at_ms: i64,
    ) -> Result<u32, StorageError> {
        let key_hex = key_hex.to_string();
        self.run(move |conn| {
            let tx = immediate(conn)?;
            tx.execute(
                "DELETE FROM signing_keys WHERE retire_at_ms < ?1",
                params![now_ms],
            )
            .map_err(backend)?;
            tx.execute(
                "UPDATE signing_keys SET retire_at_ms = ?1 WHERE retire_at_ms IS NULL OR retire_at_ms > ?1",
                params![retire_old_at_ms],
            )
            .map_err(backend)?;
            let id: u32 = tx
                .query_row(
                    "INSERT INTO signing_keys (id, key_hex, active_from_ms) \
                     SELECT COALESCE(MAX(id), 0) + 1, ?1, ?2 FROM signing_keys RETURNING id",
                    params![key_hex, active_from_ms],
                    |row| row.get(0),
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(id)
        })
        .await
    }

    pub async fn cluster_secret(
        &self,
        name: &str,
        candidate: &str,
    ) -> Result<String, StorageError> {
        let (name, candidate) = (name.to_string(), candidate.to_string());
        self.run(move |conn| {
            conn.execute(
                "INSERT INTO cluster_secrets (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                params![name, candidate],
            )
            .map_err(backend)?;
            conn.query_row(
                "SELECT value FROM cluster_secrets WHERE name = ?1",
                params![name],
                |row| row.get(0),
            )
            .map_err(backend)
        })
        .await
    }

    pub async fn create_backup_policy(&self, row: BackupPolicyRow) -> Result<bool, StorageError> {
        self.run(move |conn| {
            let n = conn
                .execute(
                    "INSERT INTO backup_policies (id, name, spec, created_ms) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name) DO NOTHING",
                    params![row.id, row.name, row.spec, row.created_ms],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn backup_policies(&self) -> Result<Vec<BackupPolicyRow>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare("SELECT id, name, spec, created_ms FROM backup_policies ORDER BY name")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(BackupPolicyRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        spec: r.get(2)?,
                        created_ms: r.get(3)?,
                    })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn delete_backup_policy(&self, id: &str) -> Result<bool, StorageError> {
        let id = id.to_string();
        self.run(move |conn| {
            let n = conn
                .execute("DELETE FROM backup_policies WHERE id = ?1", params![id])
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn agent(&self, agent_id: &str) -> Result<Option<AgentRow>, StorageError> {
        let agent_id = agent_id.to_string();
        self.run(move |conn| {
            conn.query_row(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?1"),
                params![agent_id],
                agent_from_row,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    pub async fn upsert_agent_tasks(
        &self,
        agent_id: &str,
        tasks: Vec<TaskRecord>,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        let agent_id = agent_id.to_string();
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            for t in tasks {
                tx.execute(
                    "INSERT INTO agent_tasks (agent_id, task_id, snapshot, updated_ms, failing_critical) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (agent_id, task_id) DO UPDATE SET snapshot = excluded.snapshot, updated_ms = excluded.updated_ms, \
                     failing_critical = excluded.failing_critical",
                    params![agent_id, t.task_id, t.snapshot, now_ms, i64::from(t.failing_critical)],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    pub async fn exec_write(&self, row: ExecRunRow) -> Result<(), StorageError> {
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            tx.execute(
                "INSERT INTO exec_runs (op_id, run, started_ms, updated_ms, finished_ms) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (op_id) DO UPDATE SET updated_ms = excluded.updated_ms, finished_ms = excluded.finished_ms",
                params![row.op_id, row.run, row.started_ms, row.updated_ms, row.finished_ms],
            )
            .map_err(backend)?;
            for (host, view) in &row.hosts {
                tx.execute(
                    "INSERT INTO exec_hosts (op_id, host, view) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (op_id, host) DO UPDATE SET view = excluded.view",
                    params![row.op_id, host, view],
                )
                .map_err(backend)?;
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    pub async fn exec_read(&self, op_id: &str) -> Result<Option<ExecRunRow>, StorageError> {
        let op_id = op_id.to_string();
        self.run(move |conn| {
            let run = conn
                .query_row(
                    "SELECT run, started_ms, updated_ms, finished_ms FROM exec_runs WHERE op_id = ?1",
                    params![op_id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()
                .map_err(backend)?;
            let Some((run, started_ms, updated_ms, finished_ms)) = run else {
                return Ok(None);
            };
            let mut stmt = conn
                .prepare("SELECT host, view FROM exec_hosts WHERE op_id = ?1 ORDER BY host")
                .map_err(backend)?;
            let hosts = stmt
                .query_map(params![op_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(backend)?
                .collect::<Result<Vec<(String, String)>, _>>()
                .map_err(backend)?;
            Ok(Some(ExecRunRow {
                op_id,
                run,
                started_ms,
                updated_ms,
                finished_ms,
                hosts,
            }))
        })
        .await
    }

    pub async fn prune_exec_runs(&self, before_ms: i64) -> Result<u64, StorageError> {
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            tx.execute(
                "DELETE FROM exec_hosts WHERE op_id IN (SELECT op_id FROM exec_runs WHERE started_ms < ?1)",
                params![before_ms],
            )
            .map_err(backend)?;
            let n = tx
                .execute("DELETE FROM exec_runs WHERE started_ms < ?1", params![before_ms])
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    pub async fn failing_critical_tasks(
        &self,
        limit: i64,
    ) -> Result<Vec<(String, String)>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare("SELECT agent_id, snapshot FROM agent_tasks WHERE failing_critical = 1 ORDER BY agent_id, task_id LIMIT ?1")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![limit], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(backend)?
                .collect::<Result<Vec<(String, String)>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn agent_tasks(
        &self,
        agent_id: &str,
        limit: i64,
    ) -> Result<Vec<String>, StorageError> {
        let agent_id = agent_id.to_string();
        self.run(move |conn| {
            let mut stmt = conn
                .prepare("SELECT snapshot FROM agent_tasks WHERE agent_id = ?1 ORDER BY updated_ms DESC, task_id LIMIT ?2")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![agent_id, limit], |r| r.get(0))
                .map_err(backend)?
                .collect::<Result<Vec<String>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn prune_agent_tasks(
        &self,
        before_ms: i64,
        keep_per_agent: i64,
    ) -> Result<u64, StorageError> {
        self.run(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM agent_tasks WHERE updated_ms < ?1 OR (agent_id, task_id) IN \
                     (SELECT agent_id, task_id FROM (SELECT agent_id, task_id, ROW_NUMBER() OVER \
                     (PARTITION BY agent_id ORDER BY updated_ms DESC, task_id) AS n FROM agent_tasks) \
                     WHERE n > ?2)",
                    params![before_ms, keep_per_agent],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    pub async fn insert_metrics(
        &self,
        agent_id: &str,
        epoch: &str,
        rows: Vec<MetricRow>,
    ) -> Result<u64, StorageError> {
        let (agent_id, epoch) = (agent_id.to_string(), epoch.to_string());
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let mut new = 0u64;
            {
                let mut stmt = tx
                    .prepare_cached("INSERT INTO metrics (agent_id, epoch, seq, ts_ms, kind, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING")
                    .map_err(backend)?;
                for r in rows {
                    new += stmt.execute(params![agent_id, epoch, r.seq, r.ts_ms, r.kind, r.data]).map_err(backend)? as u64;
                }
            }
            tx.commit().map_err(backend)?;
            Ok(new)
        })
        .await
    }

    pub async fn prune_metrics(&self, before_ms: i64) -> Result<Pruned, StorageError> {
        // In chunks, so ingest is not locked out for the whole pass. Old rows sit early in
        // rowid order, so each chunk's scan stops soon; only the last one reads the table.
        const CHUNK: i64 = 5_000;
        let mut rows = 0u64;
        loop {
            let deleted = self
                .run(move |conn| {
                    conn.execute(
                        "DELETE FROM metrics WHERE rowid IN (SELECT rowid FROM metrics WHERE ts_ms < ?1 LIMIT ?2)",
                        params![before_ms, CHUNK],
                    )
                    .map_err(backend)
                })
                .await?;
            rows += deleted as u64;
            if (deleted as i64) < CHUNK {
                return Ok(Pruned {
                    rows,
                    partitions: 0,
                });
            }
        }
    }

    pub async fn metrics(&self, q: MetricQuery) -> Result<Vec<StoredMetric>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT epoch, seq, ts_ms, kind, data FROM (SELECT epoch, seq, ts_ms, kind, data, \
                     SUM(length(CAST(data AS BLOB))) OVER (ORDER BY ts_ms, epoch, seq) AS upto \
                     FROM metrics WHERE agent_id = ?1 AND (?2 IS NULL OR kind = ?2) \
                     AND ts_ms >= ?3 AND ts_ms < ?4) WHERE upto <= ?6 ORDER BY ts_ms, epoch, seq LIMIT ?5",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![q.agent_id, q.kind, q.from_ms, q.to_ms, q.limit, q.bytes_max], |r| {
                    Ok(StoredMetric { epoch: r.get(0)?, row: MetricRow { seq: r.get(1)?, ts_ms: r.get(2)?, kind: r.get(3)?, data: r.get(4)? } })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn audit_append(&self, row: AuditRow) -> Result<(), StorageError> {
        self.run(move |conn| {
            conn.execute(
                "INSERT INTO audit (ts_ms, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![row.ts_ms, row.actor, row.action, row.target, row.detail],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    pub async fn prune_audit(&self, before_ms: i64) -> Result<u64, StorageError> {
        self.run(move |conn| {
            let n = conn
                .execute("DELETE FROM audit WHERE ts_ms < ?1", params![before_ms])
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    pub async fn audit_list(&self, q: AuditQuery) -> Result<Vec<AuditRow>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, ts_ms, actor, action, target, detail FROM audit \
                     WHERE (?1 IS NULL OR action = ?1) AND (?2 IS NULL OR id < ?2) \
                     AND (?4 IS NULL OR target = ?4) ORDER BY id DESC LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![q.action, q.before_id, q.limit, q.target], |r| {
                    Ok(AuditRow {
                        id: r.get(0)?,
                        ts_ms: r.get(1)?,
                        actor: r.get(2)?,
                        action: r.get(3)?,
                        target: r.get(4)?,
                        detail: r.get(5)?,
                    })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn create_recording(&self, row: RecordingRow) -> Result<bool, StorageError> {
        self.run(move |conn| {
            let n = conn
                .execute(
                    "INSERT INTO recordings (session_id, agent_id, agent_name, user_id, username, \
                     started_ms, ended_ms, width, height, input, chunks, bytes, head_hash, last_ms, \
                     incomplete) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
                     ON CONFLICT (session_id) DO NOTHING",
                    params![
                        row.session_id, row.agent_id, row.agent_name, row.user_id, row.username,
                        row.started_ms, row.ended_ms, row.width, row.height, row.input, row.chunks,
                        row.bytes, row.head_hash, row.last_ms, row.incomplete
                    ],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn recording(&self, session_id: &str) -> Result<Option<RecordingRow>, StorageError> {
        let session_id = session_id.to_string();
        self.run(move |conn| {
            conn.query_row(
                &format!("SELECT {RECORDING_COLUMNS} FROM recordings r WHERE r.session_id = ?1"),
                params![session_id],
                recording_from_row,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    pub async fn append_recording_chunk(
        &self,
        chunk: RecordingChunk,
        incomplete: Option<String>,
    ) -> Result<bool, StorageError> {
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let moved = tx
                .execute(
                    "UPDATE recordings SET chunks = ?2 + 1, bytes = ?3, head_hash = ?4, last_ms = ?5, \
                     incomplete = COALESCE(incomplete, ?6) \
                     WHERE session_id = ?1 AND chunks = ?2 AND bytes = ?7 AND head_hash = ?8",
                    params![
                        chunk.session_id, chunk.seq, chunk.end_offset, chunk.hash, chunk.last_ms,
                        incomplete, chunk.start_offset, chunk.prev_hash
                    ],
                )
                .map_err(backend)?;
            if moved == 0 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO recording_chunks (session_id, seq, start_offset, end_offset, events, \
                 text, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    chunk.session_id, chunk.seq, chunk.start_offset, chunk.end_offset,
                    chunk.events, chunk.text, chunk.prev_hash, chunk.hash
                ],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(true)
        })
        .await
    }

    pub async fn finish_recording(
        &self,
        session_id: &str,
        ended_ms: i64,
        incomplete: Option<String>,
    ) -> Result<(), StorageError> {
        let session_id = session_id.to_string();
        self.run(move |conn| {
            conn.execute(
                "UPDATE recordings SET ended_ms = COALESCE(ended_ms, ?2), \
                 incomplete = COALESCE(incomplete, ?3) WHERE session_id = ?1",
                params![session_id, ended_ms, incomplete],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    pub async fn recording_chunks(
        &self,
        session_id: &str,
        from_seq: i64,
        limit: i64,
    ) -> Result<Vec<RecordingChunk>, StorageError> {
        let session_id = session_id.to_string();
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT c.session_id, c.seq, c.start_offset, c.end_offset, c.events, c.text, \
                     c.prev_hash, c.hash FROM recording_chunks c \
                     WHERE c.session_id = ?1 AND c.seq >= ?2 ORDER BY c.seq LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![session_id, from_seq, limit], |r| {
                    Ok(RecordingChunk {
                        session_id: r.get(0)?,
                        seq: r.get(1)?,
                        start_offset: r.get(2)?,
                        end_offset: r.get(3)?,
                        events: r.get(4)?,
                        text: r.get(5)?,
                        prev_hash: r.get(6)?,
                        hash: r.get(7)?,
                        last_ms: 0,
                    })
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn list_recordings(
        &self,
        q: RecordingQuery,
    ) -> Result<Vec<RecordingRow>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {RECORDING_COLUMNS} FROM recordings r WHERE {RECORDING_FILTER} \
                     ORDER BY r.started_ms DESC LIMIT ?5"
                ))
                .map_err(backend)?;
            let rows = stmt
                .query_map(
                    params![q.user_id, q.agent_id, q.from_ms, q.to_ms, q.limit],
                    recording_from_row,
                )
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn search_recordings(
        &self,
        q: RecordingQuery,
    ) -> Result<Vec<RecordingMatch>, StorageError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {RECORDING_COLUMNS}, c.seq FROM recording_chunks c \
                     JOIN recordings r ON r.session_id = c.session_id \
                     WHERE {RECORDING_FILTER} AND {WORD_FILTER} \
                     ORDER BY r.started_ms DESC, c.seq LIMIT ?5"
                ))
                .map_err(backend)?;
            let [w1, w2, w3, w4, w5] = word_params(&q);
            let rows = stmt
                .query_map(
                    params![
                        q.user_id, q.agent_id, q.from_ms, q.to_ms, q.limit, w1, w2, w3, w4, w5
                    ],
                    |r| {
                        Ok(RecordingMatch {
                            recording: recording_from_row(r)?,
                            seq: r.get(15)?,
                        })
                    },
                )
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    pub async fn prune_recordings(&self, before_ms: i64) -> Result<u64, StorageError> {
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            tx.execute(
                "DELETE FROM recording_chunks WHERE session_id IN \
                 (SELECT session_id FROM recordings WHERE COALESCE(ended_ms, last_ms) < ?1)",
                params![before_ms],
            )
            .map_err(backend)?;
            let n = tx
                .execute(
                    "DELETE FROM recordings WHERE COALESCE(ended_ms, last_ms) < ?1",
                    params![before_ms],
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    pub async fn set_agent_health(&self, agent_id: &str, health: &str) -> Result<(), StorageError> {
        let (agent_id, health) = (agent_id.to_string(), health.to_string());
        self.run(move |conn| {
            conn.execute(
                "UPDATE agents SET health = ?2 WHERE id = ?1",
                params![agent_id, health],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    pub async fn set_agent_labels(
        &self,
        agent_id: &str,
        labels: Option<String>,
    ) -> Result<bool, StorageError> {
        let agent_id = agent_id.to_string();
        self.run(move |conn| {
            let n = conn
                .execute(
                    "UPDATE agents SET labels = ?2 WHERE id = ?1",
                    params![agent_id, labels],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn agents_seen(&self, rows: Vec<SeenRow>) -> Result<Vec<bool>, StorageError> {
        self.run(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let mut held = Vec::with_capacity(rows.len());
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE agents SET last_seen_ms = ?1, buffer = COALESCE(?4, buffer) WHERE id = ?2 AND connection_id = ?3",
                    )
                    .map_err(backend)?;
                for row in &rows {
                    let n = stmt
                        .execute(params![row.now_ms, row.agent_id, row.connection_id, row.buffer])
                        .map_err(backend)?;
                    held.push(n == 1);
                }
            }
            tx.commit().map_err(backend)?;
            Ok(held)
        })
        .await
    }
}

/// The condition on `users` (user name `?1`) that a change which ends an admin must meet: the
/// user is not an enabled admin, or another enabled admin stays.
const KEEPS_AN_ADMIN: &str = "(NOT EXISTS (SELECT 1 FROM users WHERE name = ?1 AND role = 'admin' AND disabled = 0) \
     OR EXISTS (SELECT 1 FROM users WHERE name <> ?1 AND role = 'admin' AND disabled = 0))";

/// A write transaction taken at its start, so a check and the change it guards see one state
/// even when `outpost admin` writes the same file.
fn immediate(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, StorageError> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(backend)
}

/// Commit a guarded change to user `name` that touched `changed` rows, and say what it did.
fn applied(
    tx: rusqlite::Transaction<'_>,
    name: &str,
    changed: usize,
) -> Result<UserApplied, StorageError> {
    let outcome = if changed > 0 {
        UserApplied::Done
    } else if tx
        .query_row("SELECT 1 FROM users WHERE name = ?1", params![name], |_| {
            Ok(())
        })
        .optional()
        .map_err(backend)?
        .is_some()
    {
        UserApplied::LastAdmin
    } else {
        UserApplied::NoSuchUser
    };
    tx.commit().map_err(backend)?;
    Ok(outcome)
}
