//! The types of the terminal stream store: entries, input events, session records and their
//! patches, the error, the limits (a leaf both backends and the interface share).

/// Input events kept per session (a browser typing into a session with no agent attached).
pub const INPUT_ENTRIES_MAX: usize = 4096;
/// Entries returned by one read.
pub const READ_ENTRIES_MAX: usize = 256;
/// Largest entry accepted on write (an output chunk is at most 256 KiB, a browser input frame
/// far less), so one read of [`READ_ENTRIES_MAX`] entries stays bounded.
pub const ENTRY_BYTES_MAX: usize = 1 << 20;

/// An output entry: the terminal protocol's [`proto::terminal::Entry`], stored as it is.
pub use proto::terminal::Entry as OutEntry;

pub(super) fn out_payload_bytes(entry: &OutEntry) -> usize {
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
    pub(super) fn payload_bytes(&self) -> usize {
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

    pub(super) fn parse(s: &str) -> SessionState {
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
    /// Empty while the session's recording is whole; otherwise what it misses, for the user.
    pub recording: String,
}

/// An input entry as read: its stream id (the cursor after it), and its sequence number in
/// the session (inside the entry's MAC, from 1, increasing). The reader forwards an entry only
/// when its sequence is above the last one forwarded, so a copy re-added to Redis, or a cursor
/// set back, replays nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputEntry {
    pub id: String,
    pub seq: u64,
    pub event: InEvent,
}

/// The fields of a session record that an update may change; `None` leaves a field as it is.
/// Only the named fields are written, so two writers that change different fields never undo
/// each other, and no update reopens a closed session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaPatch {
    pub state: Option<SessionState>,
    pub started: Option<bool>,
    pub input_cursor: Option<String>,
    pub recording: Option<String>,
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
    pub(super) fn apply(self, meta: &mut SessionMeta, now_ms: i64) {
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
        if let Some(recording) = self.recording {
            meta.recording = recording;
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

pub(super) fn check_size(bytes: usize) -> Result<()> {
    if bytes > ENTRY_BYTES_MAX {
        return Err(StreamsError::EntryTooLarge { bytes });
    }
    Ok(())
}
