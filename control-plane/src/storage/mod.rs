//! Control-plane storage: one interface ([`Storage`]), two real backends.
//!
//! * [`SqliteStore`]: a file in the data dir, the embedded default (single replica).
//! * [`PostgresStore`]: `--database-url postgres://…`, for production and scale-out.
//!
//! Both run the same versioned migrations (`migrations.rs`) and pass the same test suite
//! (`tests/it/storage.rs`). All timestamps are milliseconds since the Unix epoch taken from the
//! `world` clock by the caller; the database's own `now()` is never used.

pub mod migrations;
pub mod model;
mod postgres;
mod sqlite;

use crate::auth::Role;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

pub use model::{
    AgentRow, AlertCommit, AlertEventRow, AlertRow, AuditQuery, AuditRow, BackupPolicyRow,
    ENROLL_REPLAY_WINDOW_MS, EnrollAttempt, EnrollRefusal, EnrollTokenRow, Enrollment, ExecRunRow,
    LeaseRow, MetricQuery, MetricRow, NotificationRow, Pruned, RECORDING_SEARCH_WORDS_MAX,
    RecordingChunk, RecordingMatch, RecordingQuery, RecordingRow, RolloutHostRow, RolloutRow,
    SeenRow, SendOutcome, SigningKeyRow, SpecRow, StorageError, StoredMetric, TOKEN_ID_LEN,
    TaskRecord, TokenRow, UserApplied, UserInfo, UserRow,
};

/// The lease statement both the SQLite and the Postgres backend run (their placeholders
/// differ only in spelling): taken when free, expired or the holder's own; the fence rises
/// when the holder changes.
macro_rules! take_lease_sql {
    ($name:literal, $holder:literal, $expires:literal, $now:literal) => {
        concat!(
            "INSERT INTO leases (name, holder, fence, expires_ms) VALUES (",
            $name,
            ", ",
            $holder,
            ", 1, ",
            $expires,
            ") ON CONFLICT (name) DO UPDATE SET fence = CASE WHEN leases.holder = excluded.holder THEN leases.fence ELSE leases.fence + 1 END, holder = excluded.holder, expires_ms = excluded.expires_ms WHERE leases.holder = excluded.holder OR leases.expires_ms < ",
            $now,
            " RETURNING fence"
        )
    };
}
pub(crate) use take_lease_sql;

/// The storage interface the rest of the control plane uses.
#[derive(Clone)]
pub enum Storage {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Storage::Sqlite(s) => s.$method($($arg),*).await,
            Storage::Postgres(s) => s.$method($($arg),*).await,
        }
    };
}

impl Storage {
    pub fn backend_name(&self) -> &'static str {
        match self {
            Storage::Sqlite(_) => "sqlite",
            Storage::Postgres(_) => "postgres",
        }
    }

    /// Bring the schema to the newest version; returns the version reached.
    pub async fn migrate(&self) -> Result<u32, StorageError> {
        dispatch!(self.migrate())
    }

    /// The secret stored as `name`, storing `candidate` first when there is none: the first
    /// replica to ask decides, every later call (on any replica) returns the same value.
    pub async fn cluster_secret(
        &self,
        name: &str,
        candidate: &str,
    ) -> Result<String, StorageError> {
        dispatch!(self.cluster_secret(name, candidate))
    }

    pub async fn create_user(&self, user: UserRow) -> Result<(), StorageError> {
        dispatch!(self.create_user(user))
    }

    /// The enabled user called `name` (a disabled one is not found: it cannot log in).
    pub async fn user_by_name(&self, name: &str) -> Result<Option<UserRow>, StorageError> {
        dispatch!(self.user_by_name(name))
    }

    /// Every user, by name.
    pub async fn list_users(&self) -> Result<Vec<UserInfo>, StorageError> {
        dispatch!(self.list_users())
    }

    /// Give user `name` the role `role` (effective at once: tokens carry no role), unless it
    /// is the last enabled admin and `role` is not admin.
    pub async fn set_user_role(&self, name: &str, role: Role) -> Result<UserApplied, StorageError> {
        dispatch!(self.set_user_role(name, role))
    }

    /// Disable (and delete every token of) or enable user `name`; the last enabled admin is
    /// not disabled.
    pub async fn set_user_disabled(
        &self,
        name: &str,
        disabled: bool,
    ) -> Result<UserApplied, StorageError> {
        dispatch!(self.set_user_disabled(name, disabled))
    }

    /// Delete user `name` and its tokens, unless it is the last enabled admin.
    pub async fn delete_user(&self, name: &str) -> Result<UserApplied, StorageError> {
        dispatch!(self.delete_user(name))
    }

    /// Enrollment tokens that can still be used, newest first.
    pub async fn list_enroll_tokens(
        &self,
        now_ms: i64,
    ) -> Result<Vec<EnrollTokenRow>, StorageError> {
        dispatch!(self.list_enroll_tokens(now_ms))
    }

    /// Revoke the unused enrollment token with public id `id`; `false` when there is none.
    pub async fn revoke_enroll_token_id(&self, id: &str) -> Result<bool, StorageError> {
        dispatch!(self.revoke_enroll_token_id(id))
    }

    /// The replicas' signing keys, oldest first; when there are none yet, `candidate_hex`
    /// becomes key 1 (the first replica to ask makes it).
    pub async fn signing_keys(
        &self,
        candidate_hex: &str,
    ) -> Result<Vec<SigningKeyRow>, StorageError> {
        dispatch!(self.signing_keys(candidate_hex))
    }

    /// Add `key_hex` as the newest signing key, signing from `active_from_ms`; every older key
    /// is retired at `retire_old_at_ms` at the latest, and keys retired before `now_ms` are
    /// deleted. Returns the new key's id.
    pub async fn rotate_signing_key(
        &self,
        key_hex: &str,
        now_ms: i64,
        active_from_ms: i64,
        retire_old_at_ms: i64,
    ) -> Result<u32, StorageError> {
        dispatch!(self.rotate_signing_key(key_hex, now_ms, active_from_ms, retire_old_at_ms))
    }

    pub async fn create_api_token(
        &self,
        token_hash: &str,
        user_id: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StorageError> {
        dispatch!(self.create_api_token(token_hash, user_id, now_ms, expires_at_ms))
    }

    /// The user an unexpired API token belongs to.
    pub async fn user_by_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Option<UserRow>, StorageError> {
        dispatch!(self.user_by_token(token_hash, now_ms))
    }

    /// Unexpired tokens, newest first.
    pub async fn list_tokens(&self, now_ms: i64) -> Result<Vec<TokenRow>, StorageError> {
        dispatch!(self.list_tokens(now_ms))
    }

    /// Delete the token whose id ([`TokenRow::id`]) is `id`; `false` when there was none.
    pub async fn revoke_token_id(&self, id: &str) -> Result<bool, StorageError> {
        dispatch!(self.revoke_token_id(id))
    }

    /// Delete the API token with this hash (logout); `false` when there was none.
    pub async fn revoke_token(&self, token_hash: &str) -> Result<bool, StorageError> {
        dispatch!(self.revoke_token(token_hash))
    }

    /// Delete expired API tokens and enrollment tokens; returns how many rows went.
    pub async fn purge_expired(&self, now_ms: i64) -> Result<u64, StorageError> {
        dispatch!(self.purge_expired(now_ms))
    }

    pub async fn create_enroll_token(
        &self,
        token_hash: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StorageError> {
        dispatch!(self.create_enroll_token(token_hash, now_ms, expires_at_ms))
    }

    /// A single-use enrollment token bound to agent `agent_id`: enrolling with it gives that
    /// agent a new credential (the old one stops working, its live channel ends at its next
    /// heartbeat) and keeps its id, tasks and metrics. `false` when there is no such agent.
    pub async fn create_rekey_token(
        &self,
        token_hash: &str,
        agent_id: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, StorageError> {
        dispatch!(self.create_rekey_token(token_hash, agent_id, now_ms, expires_at_ms))
    }

    /// Claim a single-use enrollment token and create (or, for a retry of the same
    /// enrollment, re-key) the agent. Crash-safe without a transaction: the claim records the
    /// agent id, and the agent row is an upsert, so a retry completes a half-done enrollment.
    pub async fn enroll_agent(&self, attempt: EnrollAttempt) -> Result<Enrollment, StorageError> {
        dispatch!(self.enroll_agent(attempt))
    }

    pub async fn agent_by_credential(
        &self,
        credential_hash: &str,
    ) -> Result<Option<AgentRow>, StorageError> {
        dispatch!(self.agent_by_credential(credential_hash))
    }

    /// Record that `connection_id` now holds the agent's channel (it replaces any other).
    pub async fn agent_connected(
        &self,
        agent_id: &str,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        dispatch!(self.agent_connected(agent_id, connection_id, now_ms))
    }

    /// Refresh `last_seen` (and the buffer health, when reported) if `connection_id` still
    /// holds the channel; false if it does not.
    pub async fn agent_seen(
        &self,
        agent_id: &str,
        connection_id: &str,
        now_ms: i64,
        buffer: Option<String>,
    ) -> Result<bool, StorageError> {
        dispatch!(self.agent_seen(agent_id, connection_id, now_ms, buffer))
    }

    /// Mark the agent disconnected, unless another connection took over meanwhile.
    pub async fn agent_disconnected(
        &self,
        agent_id: &str,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        dispatch!(self.agent_disconnected(agent_id, connection_id, now_ms))
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentRow>, StorageError> {
        dispatch!(self.list_agents())
    }

    pub async fn agent(&self, agent_id: &str) -> Result<Option<AgentRow>, StorageError> {
        dispatch!(self.agent(agent_id))
    }

    /// Delete agent `agent_id` with its credential, task snapshots and metrics; `false` when
    /// there was none. Its live channel ends at its next heartbeat, on whichever replica.
    pub async fn remove_agent(&self, agent_id: &str) -> Result<bool, StorageError> {
        dispatch!(self.remove_agent(agent_id))
    }

    /// Forget task snapshots not updated since `before_ms`, and all but each agent's newest
    /// `keep_per_agent`; returns how many went.
    pub async fn prune_agent_tasks(
        &self,
        before_ms: i64,
        keep_per_agent: i64,
    ) -> Result<u64, StorageError> {
        dispatch!(self.prune_agent_tasks(before_ms, keep_per_agent))
    }

    /// Store the latest snapshot of each task (idempotent: replaying a batch changes nothing).
    pub async fn upsert_agent_tasks(
        &self,
        agent_id: &str,
        tasks: Vec<TaskRecord>,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        dispatch!(self.upsert_agent_tasks(agent_id, tasks, now_ms))
    }

    /// Write a fleet exec run: inserted on its first write (with `run`), then its times and
    /// the given hosts' views, in one transaction.
    pub async fn exec_write(&self, row: ExecRunRow) -> Result<(), StorageError> {
        dispatch!(self.exec_write(row))
    }

    /// A fleet exec run with every host's view.
    pub async fn exec_read(&self, op_id: &str) -> Result<Option<ExecRunRow>, StorageError> {
        dispatch!(self.exec_read(op_id))
    }

    /// Remove exec runs started before `before_ms`; how many.
    pub async fn prune_exec_runs(&self, before_ms: i64) -> Result<u64, StorageError> {
        dispatch!(self.prune_exec_runs(before_ms))
    }

    /// Tasks marked critical whose latest finished run failed: (agent id, snapshot JSON), at
    /// most `limit`.
    pub async fn failing_critical_tasks(
        &self,
        limit: i64,
    ) -> Result<Vec<(String, String)>, StorageError> {
        dispatch!(self.failing_critical_tasks(limit))
    }

    /// Store metric rows; a row already stored (same agent, epoch, seq) is skipped. Returns how
    /// many were new. Durable when it returns.
    pub async fn insert_metrics(
        &self,
        agent_id: &str,
        epoch: &str,
        rows: Vec<MetricRow>,
    ) -> Result<u64, StorageError> {
        dispatch!(self.insert_metrics(agent_id, epoch, rows))
    }

    /// Remove stored metrics older than `before_ms`. SQLite deletes the rows; Postgres drops
    /// the daily partitions that end at or before it (so up to a day more is kept).
    pub async fn prune_metrics(&self, before_ms: i64) -> Result<Pruned, StorageError> {
        dispatch!(self.prune_metrics(before_ms))
    }

    /// Metric rows of an agent in `[from_ms, to_ms)`, optionally of one kind, oldest first.
    pub async fn metrics(&self, query: MetricQuery) -> Result<Vec<StoredMetric>, StorageError> {
        dispatch!(self.metrics(query))
    }

    /// Task snapshots (JSON) of an agent, most recently changed first.
    pub async fn agent_tasks(
        &self,
        agent_id: &str,
        limit: i64,
    ) -> Result<Vec<String>, StorageError> {
        dispatch!(self.agent_tasks(agent_id, limit))
    }

    /// Append an audit record; durable when it returns.
    pub async fn audit_append(&self, row: AuditRow) -> Result<(), StorageError> {
        dispatch!(self.audit_append(row))
    }

    /// Audit records, newest first.
    /// Remove audit records stamped before `before_ms`; how many went.
    pub async fn prune_audit(&self, before_ms: i64) -> Result<u64, StorageError> {
        dispatch!(self.prune_audit(before_ms))
    }

    pub async fn audit_list(&self, query: AuditQuery) -> Result<Vec<AuditRow>, StorageError> {
        dispatch!(self.audit_list(query))
    }

    /// Store a new recording's row; `false` when it exists already (another replica made it).
    pub async fn create_recording(&self, row: RecordingRow) -> Result<bool, StorageError> {
        dispatch!(self.create_recording(row))
    }

    pub async fn recording(&self, session_id: &str) -> Result<Option<RecordingRow>, StorageError> {
        dispatch!(self.recording(session_id))
    }

    /// Append `chunk` where the recording's head is now (its `seq`, `start_offset` and
    /// `prev_hash` must be the head's), moving the head past it, atomically. `false` when the
    /// head is elsewhere (another writer appended first): nothing was written. `incomplete`
    /// is kept as the reason the recording misses something, unless one is stored already.
    pub async fn append_recording_chunk(
        &self,
        chunk: RecordingChunk,
        incomplete: Option<String>,
    ) -> Result<bool, StorageError> {
        dispatch!(self.append_recording_chunk(chunk, incomplete))
    }

    /// Mark a recording ended (the first end stands) and why it is incomplete, if it is.
    pub async fn finish_recording(
        &self,
        session_id: &str,
        ended_ms: i64,
        incomplete: Option<String>,
    ) -> Result<(), StorageError> {
        dispatch!(self.finish_recording(session_id, ended_ms, incomplete))
    }

    /// At most `limit` chunks of a recording from `from_seq` on, in order.
    pub async fn recording_chunks(
        &self,
        session_id: &str,
        from_seq: i64,
        limit: i64,
    ) -> Result<Vec<RecordingChunk>, StorageError> {
        dispatch!(self.recording_chunks(session_id, from_seq, limit))
    }

    /// Recordings matching the query's owner, agent and time filters (its words ignored),
    /// newest first.
    pub async fn list_recordings(
        &self,
        q: RecordingQuery,
    ) -> Result<Vec<RecordingRow>, StorageError> {
        dispatch!(self.list_recordings(q))
    }

    /// Chunks whose output holds every word of the query (at most
    /// [`RECORDING_SEARCH_WORDS_MAX`]), newest recording first, in order within one.
    pub async fn search_recordings(
        &self,
        q: RecordingQuery,
    ) -> Result<Vec<RecordingMatch>, StorageError> {
        dispatch!(self.search_recordings(q))
    }

    /// Remove recordings whose last event is older than `before_ms`; how many went.
    pub async fn prune_recordings(&self, before_ms: i64) -> Result<u64, StorageError> {
        dispatch!(self.prune_recordings(before_ms))
    }

    /// Add a backup policy; `false` when one with that name exists.
    pub async fn create_backup_policy(&self, row: BackupPolicyRow) -> Result<bool, StorageError> {
        dispatch!(self.create_backup_policy(row))
    }

    /// Every backup policy, by name.
    pub async fn backup_policies(&self) -> Result<Vec<BackupPolicyRow>, StorageError> {
        dispatch!(self.backup_policies())
    }

    /// Remove backup policy `id`; `false` when there is none.
    pub async fn delete_backup_policy(&self, id: &str) -> Result<bool, StorageError> {
        dispatch!(self.delete_backup_policy(id))
    }

    /// Replace an agent's labels (a JSON object; `None` clears them); `false` when there is no
    /// such agent.
    pub async fn set_agent_labels(
        &self,
        agent_id: &str,
        labels: Option<String>,
    ) -> Result<bool, StorageError> {
        dispatch!(self.set_agent_labels(agent_id, labels))
    }

    /// Store what an agent's newest metrics said about its server (JSON).
    pub async fn set_agent_health(&self, agent_id: &str, health: &str) -> Result<(), StorageError> {
        dispatch!(self.set_agent_health(agent_id, health))
    }

    /// Many heartbeats' writes at once (one transaction or statement): each row as
    /// `agent_seen`. Returns, in order, whether each row's connection still holds its agent.
    pub async fn agents_seen(&self, rows: Vec<SeenRow>) -> Result<Vec<bool>, StorageError> {
        dispatch!(self.agents_seen(rows))
    }

    /// Store a new rollout with its hosts.
    pub async fn rollout_insert(
        &self,
        row: RolloutRow,
        hosts: Vec<RolloutHostRow>,
    ) -> Result<(), StorageError> {
        dispatch!(self.rollout_insert(row, hosts))
    }

    /// Write a rollout's state and its changed hosts, if its version is still `row.version`
    /// (then raised by one); `false` when another write came first (nothing was written).
    pub async fn rollout_write(
        &self,
        row: RolloutRow,
        hosts: Vec<RolloutHostRow>,
    ) -> Result<bool, StorageError> {
        dispatch!(self.rollout_write(row, hosts))
    }

    /// A rollout and every host of it.
    pub async fn rollout(
        &self,
        id: &str,
    ) -> Result<Option<(RolloutRow, Vec<RolloutHostRow>)>, StorageError> {
        dispatch!(self.rollout(id))
    }

    /// Rollouts, newest first, at most `limit` (`active_only`: those the driver still works).
    pub async fn rollouts(
        &self,
        active_only: bool,
        limit: i64,
    ) -> Result<Vec<RolloutRow>, StorageError> {
        dispatch!(self.rollouts(active_only, limit))
    }

    /// The stored snapshot of task `task_id` of agent `agent_id`, if any.
    pub async fn agent_task(
        &self,
        agent_id: &str,
        task_id: &str,
    ) -> Result<Option<String>, StorageError> {
        dispatch!(self.agent_task(agent_id, task_id))
    }

    /// Take or renew lease `name` for `holder` until `now_ms + ttl_ms`: granted when it is
    /// free, expired or already `holder`'s. Returns its fence (raised each time the holder
    /// changes), `None` when another holds it.
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<i64>, StorageError> {
        dispatch!(self.take_lease(name, holder, now_ms, ttl_ms))
    }

    /// Who holds lease `name` (perhaps expired), if anyone ever took it.
    pub async fn lease(&self, name: &str) -> Result<Option<LeaseRow>, StorageError> {
        dispatch!(self.lease(name))
    }

    /// Add a spec; `false` when one of that kind and name exists.
    pub async fn create_spec(&self, row: SpecRow) -> Result<bool, StorageError> {
        dispatch!(self.create_spec(row))
    }

    /// Every spec of `kind`, by name (with their secrets: callers keep them in).
    pub async fn specs(&self, kind: &str) -> Result<Vec<SpecRow>, StorageError> {
        dispatch!(self.specs(kind))
    }

    /// Remove the spec of `kind` called `name`; `false` when there is none.
    pub async fn delete_spec(&self, kind: &str, name: &str) -> Result<bool, StorageError> {
        dispatch!(self.delete_spec(kind, name))
    }

    /// Every alert's stored state.
    pub async fn alerts(&self) -> Result<Vec<AlertRow>, StorageError> {
        dispatch!(self.alerts())
    }

    /// Write an evaluation round (see [`AlertCommit`]) atomically; `false` when the lease is no
    /// longer the committer's (nothing was written).
    pub async fn alert_commit(&self, commit: AlertCommit) -> Result<bool, StorageError> {
        dispatch!(self.alert_commit(commit))
    }

    /// Alert transitions, newest first, at most `limit`.
    pub async fn alert_events(&self, limit: i64) -> Result<Vec<AlertEventRow>, StorageError> {
        dispatch!(self.alert_events(limit))
    }

    /// Notifications not delivered yet, oldest first, at most `limit`.
    pub async fn notifications_pending(
        &self,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, StorageError> {
        dispatch!(self.notifications_pending(limit))
    }

    /// Notifications of one channel not delivered yet, oldest first, at most `limit` (so a
    /// channel with a long backlog never keeps the others' rows from being read).
    pub async fn channel_pending(
        &self,
        channel: &str,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, StorageError> {
        dispatch!(self.channel_pending(channel, limit))
    }

    /// Record how a send went.
    pub async fn notification_sent(&self, outcome: SendOutcome) -> Result<(), StorageError> {
        dispatch!(self.notification_sent(outcome))
    }

    /// Remove alert history and delivered notifications older than `before_ms`; how many rows
    /// went.
    pub async fn prune_alerts(&self, before_ms: i64) -> Result<u64, StorageError> {
        dispatch!(self.prune_alerts(before_ms))
    }
}
