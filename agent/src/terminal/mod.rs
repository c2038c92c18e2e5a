//! The agent half of the browser psql terminal.
//!
//! The control plane asks over the control channel ([`proto::Command::TerminalOpen`]);
//! [`Terminals::open`] checks the session limit and starts a session task that dials the
//! reverse WebSocket ([`proto::TERMINAL_PATH`]). The PTY is spawned only when the control
//! plane sends `start` on that link, i.e. once a browser is attached.
//!
//! Two loops per session, never waiting on each other: input (link → PTY writer) and output
//! (PTY reader → [`ring::OutputRing`] → link). The reader thread only appends to the ring, so
//! a slow or vanished consumer cannot stall psql; the ring overwrites its oldest bytes and the
//! sender announces every overwritten range as `skipped`.

mod gate;
pub mod link;
pub mod model;
mod pty;
pub mod ring;
mod session;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use world::World;

pub use link::Debounce;
pub use pty::OsPty;
pub use session::SESSION_ENV;

pub use model::{
    CANCEL_GRACE, Output, PtyChild, PtyHandle, PtyInput, PtySize, PtySpec, PtySystem,
    TerminalConfig, TerminalLink, stop,
};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the terminal is off on this host (the agent's config says [terminal] enabled = false)"
    )]
    Disabled,
    #[error("terminal session limit reached ({0} sessions on this agent)")]
    LimitReached(usize),
    #[error("session id {0:?} is not valid")]
    BadId(String),
}

struct Inner {
    world: World,
    config: TerminalConfig,
    link: TerminalLink,
    pty: Arc<dyn PtySystem>,
    slots: Arc<Semaphore>,
    active: Mutex<BTreeSet<String>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// The agent's terminal sessions: at most `sessions_max` at once, each a tracked task.
#[derive(Clone)]
pub struct Terminals {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Terminals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminals")
            .field("sessions", &self.count())
            .field("sessions_max", &self.inner.config.sessions_max)
            .finish()
    }
}

impl Terminals {
    pub fn new(
        world: World,
        config: TerminalConfig,
        link: TerminalLink,
        pty: Arc<dyn PtySystem>,
        shutdown: CancellationToken,
    ) -> Terminals {
        let slots = Arc::new(Semaphore::new(config.sessions_max));
        Terminals {
            inner: Arc::new(Inner {
                world,
                config,
                link,
                pty,
                slots,
                active: Mutex::new(BTreeSet::new()),
                tracker: TaskTracker::new(),
                shutdown,
            }),
        }
    }

    fn active(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        match self.inner.active.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sessions running now.
    pub fn count(&self) -> usize {
        self.active().len()
    }

    /// Accept session `session_id` and start dialing its reverse link. Opening a session
    /// that is already running is a no-op (the control plane may retry a lost answer).
    /// Whether this host's configuration asks for keystrokes to be recorded.
    pub fn record_input(&self) -> bool {
        self.inner.config.record_input
    }

    /// `link_secret` is shown when dialing the link (kept in this process only).
    pub fn open(&self, session_id: &str, link_secret: Option<String>) -> Result<(), OpenError> {
        if !self.inner.config.enabled {
            return Err(OpenError::Disabled);
        }
        let valid = !session_id.is_empty()
            && session_id.len() <= 64
            && session_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(OpenError::BadId(session_id.to_string()));
        }
        if self.active().contains(session_id) {
            return Ok(());
        }
        let permit = Arc::clone(&self.inner.slots)
            .try_acquire_owned()
            .map_err(|_| OpenError::LimitReached(self.inner.config.sessions_max))?;
        self.active().insert(session_id.to_string());
        let this = self.clone();
        let id = session_id.to_string();
        let span = tracing::info_span!("terminal", session_id = %id);
        self.inner.tracker.spawn(tracing::Instrument::instrument(
            async move {
                let ctx = session::Ctx {
                    world: this.inner.world.clone(),
                    config: this.inner.config.clone(),
                    link: this.inner.link.clone(),
                    pty: Arc::clone(&this.inner.pty),
                    shutdown: this.inner.shutdown.child_token(),
                    link_secret,
                };
                session::run(ctx, id.clone()).await;
                this.active().remove(&id);
                drop(permit);
            },
            span,
        ));
        Ok(())
    }

    /// Wait for every session to end (after shutdown was cancelled).
    pub async fn wait(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}
