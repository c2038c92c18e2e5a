//! The browser psql terminal on the control plane.
//!
//! ```text
//! browser ⇄ browser handler ⇄ Streams (Redis or in-process) ⇄ agent handler ⇄ reverse WS ⇄ agent PTY
//! ```
//! * [`browser`]: `POST /api/v1/terminal/sessions` (auth, limits, asks the agent) and the
//!   browser WebSocket (auth and user errors; reads output from its own offset, writes input).
//! * [`agent_link`]: the reverse WebSocket the agent dials (PTY lifecycle and infrastructure
//!   errors; writes output with byte offsets, forwards input).
//! * [`streams`]: the store both sides meet in, so they may sit on different replicas.
//! * [`relay`]: carries open requests to the replica holding the agent's control channel,
//!   and closes sessions nobody will come back to.
//!
//! The two handlers never call each other: everything between them goes through the store.

pub mod agent_link;
pub mod browser;
pub mod core;
pub mod keys;
pub mod recording;
pub mod relay;
pub mod streams;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use world::World;

use crate::audit::{Audit, action};
use crate::channel::Channels;
use crate::settings::Settings;
use crate::storage::Storage;

pub use streams::{
    InEvent, InputEntry, MetaPatch, OutEntry, SessionMeta, SessionState, Streams, StreamsError,
};

/// Terminal limits and timeouts (defaults in one place, here).
#[derive(Clone, Debug)]
pub struct TerminalSettings {
    /// Sessions not closed, across the control plane (each agent has its own limit too).
    pub sessions_max: usize,
    /// A session no browser attached to within this is closed.
    pub attach_timeout: Duration,
    /// Output kept per session for replay; older output is trimmed (readers get `skipped`).
    pub stream_bytes_max: u64,
    /// How long a closed session's streams stay readable.
    pub closed_keep: Duration,
    /// How long a session waits for its agent link to come back before it is declared gone
    /// (the agent's own reconnect window plus slack).
    pub reconnect_grace: Duration,
    /// Asking an agent to open a session, relay included.
    pub open_timeout: Duration,
    /// Browser WebSockets one user may hold open on this replica, over all their sessions.
    pub sockets_per_user_max: usize,
}

impl Default for TerminalSettings {
    fn default() -> TerminalSettings {
        TerminalSettings {
            sessions_max: 100,
            attach_timeout: Duration::from_secs(30),
            stream_bytes_max: 4 << 20,
            closed_keep: Duration::from_secs(600),
            reconnect_grace: Duration::from_secs(90),
            open_timeout: Duration::from_secs(10),
            sockets_per_user_max: 16,
        }
    }
}

/// Counters for `/metrics` and logs.
#[derive(Debug, Default)]
pub struct TerminalCounters {
    pub sessions_opened_total: AtomicU64,
    pub sessions_refused_total: AtomicU64,
    pub output_bytes_total: AtomicU64,
    pub store_failures_total: AtomicU64,
    pub input_replays_dropped_total: AtomicU64,
    pub relay_replays_dropped_total: AtomicU64,
    pub recording_chunks_total: AtomicU64,
    pub recording_failures_total: AtomicU64,
    pub recording_notes_dropped_total: AtomicU64,
}

impl TerminalCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The terminal part of the control plane's state.
#[derive(Clone)]
pub struct Terminal {
    pub streams: Streams,
    pub settings: Arc<TerminalSettings>,
    pub counters: Arc<TerminalCounters>,
    /// Open browser WebSockets per user id on this replica.
    pub sockets: Arc<world::KeyedSlots<String>>,
}

impl Terminal {
    pub fn new(streams: Streams, settings: TerminalSettings) -> Terminal {
        Terminal {
            streams,
            settings: Arc::new(settings),
            counters: Arc::new(TerminalCounters::default()),
            sockets: Arc::default(),
        }
    }
}

/// What the terminal's handlers and background work use.
#[derive(Clone)]
pub struct TerminalContext {
    pub world: World,
    pub storage: Storage,
    pub channels: Channels,
    pub settings: Arc<Settings>,
    pub shutdown: CancellationToken,
    pub terminal: Terminal,
    pub audit: Audit,
}

/// A terminal session ended: who had it, on which agent, for how long, why, and what its
/// recording ended as (`recording::Summary::json`: its chain's last hash, so a later change
/// to it shows; null when there is none).
pub async fn audit_ended(
    ctx: &TerminalContext,
    session_id: &str,
    meta: &SessionMeta,
    reason: &str,
    recording: serde_json::Value,
) {
    let duration_s = ctx.world.now_unix_ms().saturating_sub(meta.created_ms) / 1000;
    ctx.audit
        .record(
            &meta.username,
            action::TERMINAL_ENDED,
            session_id,
            serde_json::json!({
                "agent_id": meta.agent_id,
                "reason": reason,
                "duration_s": duration_s,
                "recording": recording,
            }),
        )
        .await;
}

/// Clamp a window size from a client to what a terminal can be.
pub fn clamp_size(cols: u16, rows: u16) -> (u16, u16) {
    (cols.clamp(1, 1000), rows.clamp(1, 1000))
}
