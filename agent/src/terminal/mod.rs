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
mod pty;
pub mod ring;
mod session;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use world::World;

pub use pty::OsPty;
pub use session::{Debounce, SESSION_ENV};

/// Validated `[terminal]` configuration (defaults live in `config.rs`).
#[derive(Clone, Debug)]
pub struct TerminalConfig {
    /// `[terminal] enabled = false` refuses every open.
    pub enabled: bool,
    pub psql: PathBuf,
    /// Connection string passed to psql; `None` lets psql use its own defaults.
    pub database: Option<String>,
    /// Whose rights psql gets (resolved from `run_as` at start-up).
    pub run_as: crate::run_as::RunAs,
    pub sessions_max: usize,
    /// How long a PTY outlives a lost reverse link, waiting to be reattached.
    pub reconnect_window: Duration,
    /// No input and no output for this long ends a session.
    pub idle_timeout: Duration,
    /// PTY output kept for a link that is down or slow.
    pub output_bytes_max: usize,
    /// Sessions' keystrokes are recorded by the control plane too (it is told at each open).
    pub record_input: bool,
}

/// Where the reverse links go.
#[derive(Clone, Debug)]
pub struct TerminalLink {
    pub control_plane: url::Url,
    pub credential: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

impl PtySize {
    /// Clamp to what a terminal can sensibly be (1..=1000 each way).
    pub fn clamped(cols: u16, rows: u16) -> PtySize {
        PtySize {
            cols: cols.clamp(1, 1000),
            rows: rows.clamp(1, 1000),
        }
    }
}

/// Input for a PTY, applied in order by its writer.
#[derive(Debug)]
pub enum PtyInput {
    Data(Vec<u8>),
    Resize(PtySize),
}

/// PTY output shared between the reader (which appends) and the sender (which reads).
#[derive(Debug)]
pub struct Output {
    ring: Mutex<ring::OutputRing>,
    notify: Notify,
}

impl Output {
    pub fn new(bytes_max: usize) -> Arc<Output> {
        Arc::new(Output {
            ring: Mutex::new(ring::OutputRing::new(bytes_max)),
            notify: Notify::new(),
        })
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut ring::OutputRing) -> T) -> T {
        // The ring stays consistent between calls; a panicking holder cannot leave it torn.
        let mut guard = match self.ring.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Append PTY output and wake the sender. Never waits for it.
    pub fn push(&self, data: &[u8]) {
        self.with(|r| r.push(data));
        self.notify.notify_one();
    }

    pub fn close(&self, reason: String) {
        self.with(|r| r.close(reason));
        self.notify.notify_one();
    }

    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

/// What to run in the PTY.
#[derive(Clone, Debug)]
pub struct PtySpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// The user psql runs as when it is not the agent's: its group is signalled as that user.
    pub run_uid: Option<u32>,
}

/// A running PTY process. Dropping it does not stop the process; [`PtyChild::terminate`] does.
pub trait PtyChild: Send {
    /// SIGINT to the process group: psql cancels the statement it runs on the server (a
    /// killed psql would leave its backend running the query to the end).
    fn interrupt(&mut self);
    /// Hang up and kill the whole process group.
    fn terminate(&mut self);
}

/// How long teardown waits between the interrupt (psql sends the server a cancel) and the
/// kill.
pub const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// End a PTY process: interrupt, give psql the moment it needs to cancel its running
/// statement, then kill the group.
pub async fn stop(child: &mut dyn PtyChild) {
    child.interrupt();
    tokio::time::sleep(CANCEL_GRACE).await;
    child.terminate();
}

/// A spawned PTY: input goes to `input` (bounded; the writer applies data and resizes in
/// order), output appears in the [`Output`] given to [`PtySystem::spawn`], which is closed
/// with the exit reason when the process ends.
pub struct PtyHandle {
    pub input: mpsc::Sender<PtyInput>,
    pub child: Box<dyn PtyChild>,
}

/// Spawns PTY processes: [`OsPty`] in production, a simulated one in `sim`.
pub trait PtySystem: Send + Sync + 'static {
    fn spawn(
        &self,
        world: &World,
        spec: &PtySpec,
        size: PtySize,
        output: Arc<Output>,
    ) -> std::io::Result<PtyHandle>;
}

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
