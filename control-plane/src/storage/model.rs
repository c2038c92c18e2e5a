//! The rows and errors of storage: what both backends take and return (a leaf, so the
//! interface in `mod.rs` and the backends share it without depending on each other).

use crate::auth::Role;

/// How long after a token was used its enrollment may be replayed with the same enrollment id
/// (the agent's answer was lost), and only while the agent has never connected. After that
/// the token is spent: a replay would hand a live agent's identity to whoever holds the token.
pub const ENROLL_REPLAY_WINDOW_MS: i64 = 10 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0} already exists")]
    Conflict(String),
    #[error("storage backend: {0}")]
    Backend(String),
}

/// An unexpired login or API token, by its public id (never the secret).
/// A stored backup policy: its id, unique name, spec (JSON) and creation time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupPolicyRow {
    pub id: String,
    pub name: String,
    pub spec: String,
    pub created_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    /// The first [`TOKEN_ID_LEN`] hex digits of the token's hash.
    pub id: String,
    pub user: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// An enrollment token not used yet and not expired, by its public id (never the secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollTokenRow {
    /// The first [`TOKEN_ID_LEN`] hex digits of the token's hash.
    pub id: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// The agent it gives a new credential to; `None` enrolls a new agent.
    pub agent_id: Option<String>,
}

/// What became of a change to a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserApplied {
    Done,
    NoSuchUser,
    /// Refused: it would leave no enabled admin. Checked in the same statement as the change
    /// (with the admins' rows locked on PostgreSQL), so two demotions at once cannot both pass.
    LastAdmin,
}

/// One key the replicas sign Redis entries with (`terminal::keys` makes them into a ring).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigningKeyRow {
    pub id: u32,
    pub key_hex: String,
    /// Replicas sign with the newest key whose time has come; before it, they only accept it.
    pub active_from_ms: i64,
    /// From this time the key is no longer accepted (`None`: the newest key).
    pub retire_at_ms: Option<i64>,
}

/// Hex digits of a token's hash that name it in lists and revocations.
pub const TOKEN_ID_LEN: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub password_hash: String,
    pub created_at_ms: i64,
}

/// A user as listed to admins (never the password hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub role: Role,
    /// A disabled user cannot log in and holds no token.
    pub disabled: bool,
    pub created_at_ms: i64,
}

/// The columns of a notification row, in the order both backends read them.
pub(crate) const NOTIFICATION_COLUMNS: &str =
    "id, key, channel, body, created_ms, attempts, next_ms, delivered_ms, last_error";

/// A fleet exec run as stored: its request (JSON), times, and each host's view (JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRunRow {
    pub op_id: String,
    /// Kept from the first write; later writes update the times and hosts.
    pub run: String,
    pub started_ms: i64,
    /// When the replica running it last wrote (its heartbeat while it runs).
    pub updated_ms: i64,
    pub finished_ms: Option<i64>,
    /// (host, view): all of them when read, the changed ones when written.
    pub hosts: Vec<(String, String)>,
}

/// A rollout as stored: its state as JSON ([`crate::rollouts::Rollout`]), whether the driver
/// still has work in it, and the version its last write made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutRow {
    pub id: String,
    pub data: String,
    pub active: bool,
    /// Read: the stored version. Written: the version the write read (it fails otherwise).
    pub version: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// One target host of a rollout: its wave and its state as JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutHostRow {
    pub agent_id: String,
    pub wave: i64,
    pub data: String,
}

/// The latest snapshot of one of an agent's tasks, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRecord {
    pub task_id: String,
    /// `proto::TaskSnapshot` as JSON.
    pub snapshot: String,
    /// Marked critical, and its latest finished run failed.
    pub failing_critical: bool,
}

impl TaskRecord {
    pub fn of(task: &proto::TaskSnapshot) -> Result<TaskRecord, serde_json::Error> {
        Ok(TaskRecord {
            task_id: task.id.clone(),
            snapshot: serde_json::to_string(task)?,
            failing_critical: failing_critical(task),
        })
    }
}

/// A task marked critical whose latest finished run failed, timed out or was aborted; a
/// cancelled task no longer counts.
pub fn failing_critical(task: &proto::TaskSnapshot) -> bool {
    task.critical
        && task.status != "canceled"
        && task
            .runs
            .iter()
            .filter(|r| r.finished_at.is_some())
            .max_by_key(|r| r.run_id)
            .is_some_and(|r| matches!(r.status.as_str(), "failed" | "aborted"))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRow {
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
    pub last_seen_ms: Option<i64>,
    /// Set while some replica holds a control channel for this agent (cleared on close).
    pub connected: bool,
    /// The agent's last reported metrics-buffer health (JSON), if any.
    pub buffer: Option<String>,
    /// What its newest metrics said about its server (JSON, see `health`), if any.
    pub health: Option<String>,
    /// Its labels (a JSON object of strings, see `labels`), if any were set.
    pub labels: Option<String>,
}

/// A new enrollment, as decided by the HTTP edge (ids and secrets already generated).
#[derive(Clone, Debug)]
pub struct EnrollAttempt {
    pub token_hash: String,
    pub enrollment_id: String,
    pub name: String,
    /// Used when this attempt claims the token; a retry keeps the id it got the first time.
    pub new_agent_id: String,
    pub credential_hash: String,
    pub now_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrollRefusal {
    UnknownToken,
    Expired,
    AlreadyUsed,
}

/// Outcome of [`Storage::enroll_agent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enrollment {
    Enrolled { agent_id: String },
    Refused(EnrollRefusal),
}

/// A metric row as an agent delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricRow {
    pub seq: i64,
    pub ts_ms: i64,
    pub kind: String,
    pub data: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMetric {
    pub epoch: String,
    pub row: MetricRow,
}

/// What a retention pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub rows: u64,
    /// Daily partitions dropped (Postgres only).
    pub partitions: u64,
}

#[derive(Clone, Debug)]
pub struct MetricQuery {
    pub agent_id: String,
    pub kind: Option<String>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: i64,
    /// Stop before the returned data passes this many bytes (oldest rows first).
    pub bytes_max: i64,
}

/// One audit record: who did what to which object, and when. `detail` is a JSON object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    /// Assigned by the store, increasing; 0 on a row not yet stored.
    pub id: i64,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// Which audit records to list: newest first, ids below `before_id` when given.
#[derive(Clone, Debug)]
pub struct AuditQuery {
    pub action: Option<String>,
    /// Only records about this target (a user, agent, session or task id).
    pub target: Option<String>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// Whether a replayed enrollment (same token, same enrollment id) may re-key its agent: only
/// within [`ENROLL_REPLAY_WINDOW_MS`] of the first use, and only while the agent was never seen.
pub(super) fn replay_allowed(
    used_at_ms: Option<i64>,
    last_seen_ms: Option<i64>,
    now_ms: i64,
) -> bool {
    last_seen_ms.is_none()
        && used_at_ms.is_some_and(|used| now_ms.saturating_sub(used) <= ENROLL_REPLAY_WINDOW_MS)
}

/// A terminal session's recording: who, where, when, and the head of its chunk chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordingRow {
    pub session_id: String,
    pub agent_id: String,
    /// The agent's name when the session opened (a removed agent keeps its recordings).
    pub agent_name: String,
    pub user_id: String,
    pub username: String,
    pub started_ms: i64,
    /// When the session ended; `None` while it runs (or when it ended without a close).
    pub ended_ms: Option<i64>,
    /// The terminal size when it started (the asciicast header's width and height).
    pub width: i64,
    pub height: i64,
    /// Keystrokes are recorded too.
    pub input: bool,
    /// Chunks stored: the next chunk's `seq`.
    pub chunks: i64,
    /// Output bytes recorded: the next chunk's `start_offset`.
    pub bytes: i64,
    /// The newest chunk's hash (a fixed seed before the first chunk).
    pub head_hash: String,
    /// The newest event's time (ms since the Unix epoch).
    pub last_ms: i64,
    /// Why the recording misses something, when it does.
    pub incomplete: Option<String>,
}

/// One stored piece of a recording: asciicast v2 event lines covering output bytes
/// `start_offset..end_offset`, chained to the chunk before by its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordingChunk {
    pub session_id: String,
    pub seq: i64,
    pub start_offset: i64,
    pub end_offset: i64,
    /// Newline-terminated asciicast v2 event lines.
    pub events: String,
    /// Lower-cased printable output (with the tail of the chunk before), for search only.
    pub text: String,
    pub prev_hash: String,
    pub hash: String,
    /// The newest event's time, which becomes the recording's `last_ms`.
    pub last_ms: i64,
}

/// Words one recording search may combine.
pub const RECORDING_SEARCH_WORDS_MAX: usize = 5;

/// Which recordings to list: newest first, narrowed by owner, agent, start time and words
/// (each word must appear in one chunk's output).
#[derive(Clone, Debug, Default)]
pub struct RecordingQuery {
    pub user_id: Option<String>,
    pub agent_id: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Lower-cased.
    pub words: Vec<String>,
    pub limit: i64,
}

/// A chunk that matched a search (by its `seq`), with its recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordingMatch {
    pub recording: RecordingRow,
    pub seq: i64,
}

/// One heartbeat's write: the agent was heard on `connection_id` at `now_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRow {
    pub agent_id: String,
    pub connection_id: String,
    pub now_ms: i64,
    /// Buffer figures (JSON), when the heartbeat carried them.
    pub buffer: Option<String>,
}

/// A named spec of some `kind` (an alert channel, a rule override): JSON, plus a secret the
/// API never returns (a channel's signing key or URL with its token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecRow {
    pub kind: String,
    pub id: String,
    pub name: String,
    pub spec: String,
    pub secret: Option<String>,
    pub created_ms: i64,
}

/// One alert's state (JSON, see `alerts::state`) under its key (`RULE/AGENT_ID`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRow {
    pub key: String,
    pub data: String,
    pub updated_ms: i64,
}

/// One transition in an alert's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertEventRow {
    pub id: i64,
    pub key: String,
    pub ts_ms: i64,
    pub data: String,
}

/// A notification for one channel, in the outbox until a send of it succeeded. `key` is the
/// idempotency key of the transition (or digest) it carries: one row per key and channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotificationRow {
    pub id: i64,
    pub key: String,
    pub channel: String,
    pub body: String,
    pub created_ms: i64,
    pub attempts: i64,
    pub next_ms: i64,
    pub delivered_ms: Option<i64>,
    pub last_error: Option<String>,
}

/// What one evaluation round writes, in one transaction, only while `holder` still holds
/// lease `lease` with fence `fence` (a replica that lost it writes nothing).
#[derive(Clone, Debug, Default)]
pub struct AlertCommit {
    pub lease: String,
    pub holder: String,
    pub fence: i64,
    pub now_ms: i64,
    pub alerts: Vec<AlertRow>,
    /// Alert keys to forget (resolved long ago, or their agent is gone).
    pub removed: Vec<String>,
    /// `(key, data)` of each transition, stamped `now_ms`.
    pub events: Vec<(String, String)>,
    /// `(key, channel, body)` of each new notification; a key already queued for a channel
    /// is skipped.
    pub notifications: Vec<(String, String, String)>,
}

/// How a send of a notification went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendOutcome {
    pub id: i64,
    pub attempts: i64,
    /// Set when the receiver took it.
    pub delivered_ms: Option<i64>,
    /// When to try again otherwise.
    pub next_ms: i64,
    pub error: Option<String>,
}

/// Who holds a lease, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub holder: String,
    pub fence: i64,
    pub expires_ms: i64,
}
