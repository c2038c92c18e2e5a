//! Shared state of one control-plane process: the handles, nothing else. State sits on top:
//! it knows every feature's handle, and no feature knows it. Each feature declares the narrow
//! context it needs (`ChannelContext`, `TerminalContext`, `ExecContext`) and handlers extract
//! that or single handles (`State<Storage>`, `State<Audit>`, …) through the `FromRef`
//! implementations here.

use std::sync::Arc;

use axum::extract::FromRef;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use world::World;

use crate::audit::Audit;
use crate::channel::{ChannelContext, Channels};
use crate::exec::api::{ExecContext, Runs};
use crate::handles::{Handles, IngestPermits};
use crate::observe::Observed;
use crate::settings::Settings;
use crate::storage::Storage;
use crate::terminal::{Terminal, TerminalContext};
use crate::throttle::LoginThrottle;

/// Metrics batches stored concurrently before ingest sheds load.
pub const INGEST_CONCURRENCY_MAX: usize = 8;

#[derive(Clone)]
pub struct AppState {
    pub world: World,
    pub storage: Storage,
    pub channels: Channels,
    pub settings: Arc<Settings>,
    pub shutdown: CancellationToken,
    /// Background work (terminal relay and janitor, exec runs, retention): `serve` waits for
    /// all of it after shutdown.
    pub background: TaskTracker,
    /// Metrics batches being stored at once; beyond it ingest answers 429 (load shedding).
    pub ingest: IngestPermits,
    /// Terminal sessions and the stream store they meet in.
    pub terminal: Terminal,
    /// Counters and latency histograms for `/metrics`.
    pub observed: Arc<Observed>,
    /// The audit log.
    pub audit: Audit,
    /// Fleet exec runs started through the API on this replica.
    pub exec_runs: Runs,
    /// Failed logins by user name (lockouts).
    pub logins: Arc<LoginThrottle>,
    /// What this replica's last backup-policy rounds did per policy and agent.
    pub backup_policies: crate::http::backup_policies::Outcomes,
}

impl AppState {
    pub fn new(
        world: World,
        storage: Storage,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> AppState {
        let observed: Arc<Observed> = Arc::default();
        let logins = Arc::new(LoginThrottle::new(settings.login_lockout));
        let streams = crate::terminal::Streams::memory(&world);
        AppState {
            audit: Audit::new(world.clone(), storage.clone(), Arc::clone(&observed)),
            world,
            storage,
            channels: Channels::default(),
            settings: Arc::new(settings),
            shutdown,
            background: TaskTracker::new(),
            ingest: IngestPermits::new(INGEST_CONCURRENCY_MAX),
            terminal: Terminal::new(streams, crate::terminal::TerminalSettings::default()),
            observed,
            exec_runs: Runs::default(),
            logins,
            backup_policies: Default::default(),
        }
    }

    /// Use `terminal` (a Redis store, other limits) instead of the in-process default.
    pub fn with_terminal(mut self, terminal: Terminal) -> AppState {
        self.terminal = terminal;
        self
    }
}

impl FromRef<AppState> for Handles {
    fn from_ref(s: &AppState) -> Handles {
        Handles {
            world: s.world.clone(),
            storage: s.storage.clone(),
            settings: Arc::clone(&s.settings),
            observed: Arc::clone(&s.observed),
            audit: s.audit.clone(),
        }
    }
}

impl FromRef<AppState> for crate::http::backup_policies::Outcomes {
    fn from_ref(s: &AppState) -> crate::http::backup_policies::Outcomes {
        s.backup_policies.clone()
    }
}

impl FromRef<AppState> for Channels {
    fn from_ref(s: &AppState) -> Channels {
        s.channels.clone()
    }
}

impl FromRef<AppState> for Terminal {
    fn from_ref(s: &AppState) -> Terminal {
        s.terminal.clone()
    }
}

impl FromRef<AppState> for Arc<LoginThrottle> {
    fn from_ref(s: &AppState) -> Arc<LoginThrottle> {
        Arc::clone(&s.logins)
    }
}

impl FromRef<AppState> for IngestPermits {
    fn from_ref(s: &AppState) -> IngestPermits {
        s.ingest.clone()
    }
}

impl FromRef<AppState> for ChannelContext {
    fn from_ref(s: &AppState) -> ChannelContext {
        ChannelContext {
            world: s.world.clone(),
            storage: s.storage.clone(),
            channels: s.channels.clone(),
            settings: Arc::clone(&s.settings),
            shutdown: s.shutdown.clone(),
            observed: Arc::clone(&s.observed),
            audit: s.audit.clone(),
        }
    }
}

impl FromRef<AppState> for TerminalContext {
    fn from_ref(s: &AppState) -> TerminalContext {
        TerminalContext {
            world: s.world.clone(),
            storage: s.storage.clone(),
            channels: s.channels.clone(),
            settings: Arc::clone(&s.settings),
            shutdown: s.shutdown.clone(),
            terminal: s.terminal.clone(),
            audit: s.audit.clone(),
        }
    }
}

impl FromRef<AppState> for ExecContext {
    fn from_ref(s: &AppState) -> ExecContext {
        ExecContext {
            world: s.world.clone(),
            settings: Arc::clone(&s.settings),
            shutdown: s.shutdown.clone(),
            background: s.background.clone(),
            runs: s.exec_runs.clone(),
            audit: s.audit.clone(),
            storage: s.storage.clone(),
        }
    }
}
