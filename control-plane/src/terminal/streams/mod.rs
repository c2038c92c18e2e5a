//! Where terminal sessions live between the browser handler and the agent handler: session
//! records, the output stream (byte offsets, capped) and the input stream. Two backends behind
//! one interface, [`Streams`], with the same semantics and one test suite
//! (`tests/it/streams.rs`):
//!
//! * [`memory`]: in-process, the embedded default (one replica);
//! * [`redis`]: Redis Streams when `--redis-url` is given, so any replica may hold either side.
//!
//! Output entries are keyed by byte offset ([`OutEntry::id`]): a data chunk `offset..end` is
//! `(end, 0)`, a skipped range `from..to` is `(to, 0)`, the close is `(end, 1)`. Reading "after
//! offset N" takes the entries whose id is above `(N, 0)`; trimming to the cap drops entries
//! that end before `top - cap`; an entry at or below the top is a resend and is ignored.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use world::World;

pub use self::memory::MemoryStreams;
pub use self::redis::RedisStreams;

/// Input events kept per session (a browser typing into a session with no agent attached).
pub const INPUT_ENTRIES_MAX: usize = 4096;
/// Entries returned by one read.
pub const READ_ENTRIES_MAX: usize = 256;
/// Largest entry accepted on write (an output chunk is at most 256 KiB, a browser input frame
/// far less), so one read of [`READ_ENTRIES_MAX`] entries stays bounded.
pub const ENTRY_BYTES_MAX: usize = 1 << 20;

/// An output entry: the terminal protocol's [`proto::terminal::Entry`], stored as it is.
pub use proto::terminal::Entry as OutEntry;

fn out_payload_bytes(entry: &OutEntry) -> usize {
    match entry {
        OutEntry::Data { bytes, .. } => bytes.len(),
        OutEntry::Skipped { .. } => 0,
        OutEntry::Closed { reason, .. } => reason.len(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InEvent {
    Data(Vec<u8>),
    Resize {
        cols: u16,
        rows: u16,
    },
    /// A browser attached (its window size); the first one starts the PTY.
    Attach {
        cols: u16,
        rows: u16,
    },
    Close {
        reason: String,
    },
}

impl InEvent {
    fn payload_bytes(&self) -> usize {
        match self {
            InEvent::Data(d) => d.len(),
            InEvent::Close { reason } => reason.len(),
            InEvent::Resize { .. } | InEvent::Attach { .. } => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// Created; waiting for the agent's link and a browser.
    Pending,
    /// The PTY runs and the agent's link is attached.
    Live,
    /// The agent's link dropped; the PTY waits for the reconnect window.
    Reconnecting,
    Closed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Pending => "pending",
            SessionState::Live => "live",
            SessionState::Reconnecting => "reconnecting",
            SessionState::Closed => "closed",
        }
    }

    fn parse(s: &str) -> SessionState {
        match s {
            "live" => SessionState::Live,
            "reconnecting" => SessionState::Reconnecting,
            "closed" => SessionState::Closed,
            _ => SessionState::Pending,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionMeta {
    pub agent_id: String,
    pub user_id: String,
    pub username: String,
    pub state: SessionState,
    pub created_ms: i64,
    /// When `state` last changed.
    pub changed_ms: i64,
    /// Whether the agent's PTY was started (a reattaching link resumes instead of waiting).
    pub started: bool,
    /// Why it closed.
    pub reason: String,
    /// Id of the last input entry forwarded to the agent.
    pub input_cursor: String,
}

/// The fields of a session record that an update may change; `None` leaves a field as it is.
/// Only the named fields are written, so two writers that change different fields never undo
/// each other, and no update reopens a closed session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaPatch {
    pub state: Option<SessionState>,
    pub started: Option<bool>,
    pub input_cursor: Option<String>,
}

impl MetaPatch {
    pub fn state(state: SessionState) -> MetaPatch {
        MetaPatch {
            state: Some(state),
            ..MetaPatch::default()
        }
    }

    pub fn input_cursor(cursor: impl Into<String>) -> MetaPatch {
        MetaPatch {
            input_cursor: Some(cursor.into()),
            ..MetaPatch::default()
        }
    }

    /// Apply to a record (the in-process store; the Redis store does the same in a script).
    fn apply(self, meta: &mut SessionMeta, now_ms: i64) {
        if let Some(state) = self.state
            && state != meta.state
        {
            meta.state = state;
            meta.changed_ms = now_ms;
        }
        if let Some(started) = self.started {
            meta.started = started;
        }
        if let Some(cursor) = self.input_cursor {
            meta.input_cursor = cursor;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    #[error("terminal stream store unavailable: {0}")]
    Unavailable(String),
    #[error("terminal session limit reached ({0} sessions on this control plane)")]
    LimitReached(usize),
    #[error("terminal stream entry of {bytes} bytes refused (at most {ENTRY_BYTES_MAX})")]
    EntryTooLarge { bytes: usize },
    #[error("redis_url {url:?}: {reason}")]
    Url { url: String, reason: String },
}

pub type Result<T> = std::result::Result<T, StreamsError>;

fn check_size(bytes: usize) -> Result<()> {
    if bytes > ENTRY_BYTES_MAX {
        return Err(StreamsError::EntryTooLarge { bytes });
    }
    Ok(())
}

/// The terminal stream store: a thin dispatch to the backend, nothing implemented here.
#[derive(Clone)]
pub enum Streams {
    Memory(Arc<MemoryStreams>),
    Redis(Arc<RedisStreams>),
}

impl Streams {
    pub fn memory() -> Streams {
        Streams::Memory(Arc::new(MemoryStreams::default()))
    }

    /// A Redis store at `url` (`redis://` or `rediss://`); connects on first use.
    pub fn redis(world: World, url: &str) -> Result<Streams> {
        Ok(Streams::Redis(Arc::new(RedisStreams::new(world, url)?)))
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Streams::Memory(_) => "memory",
            Streams::Redis(_) => "redis",
        }
    }

    /// The Redis store, which replicas share (open requests are relayed through it); `None`
    /// for the in-process store, which only this replica sees.
    pub fn shared(&self) -> Option<&Arc<RedisStreams>> {
        match self {
            Streams::Memory(_) => None,
            Streams::Redis(r) => Some(r),
        }
    }

    /// Record a new session unless `live_max` sessions are live already.
    pub async fn create(&self, id: &str, meta: &SessionMeta, live_max: usize) -> Result<()> {
        match self {
            Streams::Memory(m) => m.create(id, meta, live_max),
            Streams::Redis(r) => r.create(id, meta, live_max).await,
        }
    }

    pub async fn meta(&self, id: &str) -> Result<Option<SessionMeta>> {
        match self {
            Streams::Memory(m) => m.meta(id),
            Streams::Redis(r) => r.meta(id).await,
        }
    }

    /// Write the fields `patch` names into a session's record, unless the session is closed
    /// or unknown. `changed_ms` becomes `now_ms` when the state changes.
    pub async fn update(&self, id: &str, now_ms: i64, patch: MetaPatch) -> Result<()> {
        match self {
            Streams::Memory(m) => m.update(id, now_ms, patch),
            Streams::Redis(r) => r.update(id, now_ms, patch).await,
        }
    }

    /// The offset after the newest output entry (0 when there is none).
    pub async fn output_end(&self, id: &str) -> Result<u64> {
        match self {
            Streams::Memory(m) => m.output_end(id),
            Streams::Redis(r) => r.output_end(id).await,
        }
    }

    /// Append output entries (in order, one round trip) and trim the stream to about
    /// `bytes_max` bytes. Entries at or below the newest one are resends and are ignored.
    pub async fn append_output(&self, id: &str, batch: &[OutEntry], bytes_max: u64) -> Result<()> {
        for entry in batch {
            check_size(out_payload_bytes(entry))?;
        }
        match self {
            Streams::Memory(m) => m.append_output(id, batch, bytes_max),
            Streams::Redis(r) => r.append_output(id, batch, bytes_max).await,
        }
    }

    /// At most [`READ_ENTRIES_MAX`] output entries that end after `after`, waiting up to
    /// `block` for one to appear.
    pub async fn read_output(
        &self,
        id: &str,
        after: u64,
        block: Duration,
    ) -> Result<Vec<OutEntry>> {
        match self {
            Streams::Memory(m) => m.read_output(id, after, block).await,
            Streams::Redis(r) => r.read_output(id, after, block).await,
        }
    }

    pub async fn append_input(&self, id: &str, event: InEvent) -> Result<()> {
        check_size(event.payload_bytes())?;
        match self {
            Streams::Memory(m) => m.append_input(id, event),
            Streams::Redis(r) => r.append_input(id, event).await,
        }
    }

    /// At most [`READ_ENTRIES_MAX`] input entries after `cursor` (`""` = from the start),
    /// waiting up to `block`.
    pub async fn read_input(
        &self,
        id: &str,
        cursor: &str,
        block: Duration,
    ) -> Result<Vec<(String, InEvent)>> {
        match self {
            Streams::Memory(m) => m.read_input(id, cursor, block).await,
            Streams::Redis(r) => r.read_input(id, cursor, block).await,
        }
    }

    /// Mark the session closed, free its slot and let its streams expire after `keep`.
    /// `true` when this call closed it (exactly one caller learns that, across replicas).
    pub async fn finish(
        &self,
        id: &str,
        now_ms: i64,
        reason: &str,
        keep: Duration,
    ) -> Result<bool> {
        match self {
            Streams::Memory(m) => m.finish(id, now_ms, reason, keep),
            Streams::Redis(r) => r.finish(id, now_ms, reason, keep).await,
        }
    }

    /// Ids of sessions not closed, with their agent.
    pub async fn live(&self) -> Result<Vec<(String, String)>> {
        match self {
            Streams::Memory(m) => m.live(),
            Streams::Redis(r) => r.live().await,
        }
    }
}

#[cfg(test)]
mod tests;
