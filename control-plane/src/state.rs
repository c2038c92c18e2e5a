//! Shared state of one control-plane process.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use world::World;

use crate::channel::Channels;
use crate::storage::{AgentRow, Storage};

/// Run-time settings derived from the validated configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often agents send a heartbeat (told to them in `welcome`).
    pub heartbeat_interval: Duration,
    /// Silence after which either side declares the channel dead.
    pub dead_after: Duration,
    /// Lifetime of a login session / API token.
    pub session_ttl: Duration,
    /// Stored metrics older than this are removed (whole days in Postgres) and not accepted.
    pub metrics_retention: Duration,
    /// Inventory for fleet exec through the API; `None` turns the exec routes into refusals.
    pub inventory: Option<std::path::PathBuf>,
    /// Mark the session cookie `Secure` (the control plane serves HTTPS).
    pub secure_cookies: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            heartbeat_interval: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            session_ttl: Duration::from_secs(12 * 3600),
            metrics_retention: Duration::from_secs(30 * 86_400),
            inventory: None,
            secure_cookies: false,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub world: World,
    pub storage: Storage,
    pub channels: Channels,
    pub settings: Arc<Settings>,
    pub shutdown: CancellationToken,
    /// Metrics batches being stored at once; beyond it ingest answers 429 (load shedding).
    pub ingest: Arc<tokio::sync::Semaphore>,
    /// Terminal sessions and the stream store they meet in.
    pub terminal: crate::terminal::Terminal,
    /// Counters and latency histograms for `/metrics`.
    pub observed: Arc<crate::observe::Observed>,
    /// Fleet exec runs started through the API on this replica.
    pub exec_runs: crate::http::exec::Runs,
    /// Failed logins by user name (lockouts).
    pub logins: Arc<crate::throttle::LoginThrottle>,
}

/// Metrics batches stored concurrently before ingest sheds load.
pub const INGEST_CONCURRENCY_MAX: usize = 8;

impl AppState {
    pub fn new(
        world: World,
        storage: Storage,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> AppState {
        AppState {
            world,
            storage,
            channels: Channels::default(),
            settings: Arc::new(settings),
            shutdown,
            ingest: Arc::new(tokio::sync::Semaphore::new(INGEST_CONCURRENCY_MAX)),
            terminal: crate::terminal::Terminal::new(
                crate::terminal::Streams::memory(),
                crate::terminal::TerminalSettings::default(),
            ),
            observed: Arc::default(),
            exec_runs: crate::http::exec::Runs::default(),
            logins: Arc::default(),
        }
    }

    /// Use `terminal` (a Redis store, other limits) instead of the in-process default.
    pub fn with_terminal(mut self, terminal: crate::terminal::Terminal) -> AppState {
        self.terminal = terminal;
        self
    }

    /// Online = some replica holds the agent's channel *and* heard from it within the dead
    /// deadline. The second half covers a replica that died without clearing `connected`.
    pub fn is_online(&self, row: &AgentRow, now_ms: i64) -> bool {
        let dead_after_ms = crate::time::duration_ms(self.settings.dead_after);
        row.connected
            && row
                .last_seen_ms
                .is_some_and(|seen| now_ms.saturating_sub(seen) <= dead_after_ms)
    }
}
