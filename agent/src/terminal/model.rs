//! The terminal's types that the session driver, the PTY and the simulator share: the
//! validated config, where links go, a PTY's size, input, output and spawn interface. A leaf of
//! `terminal` (it uses only the output ring), so its children need not import their parent.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use world::World;

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
    ring: Mutex<super::ring::OutputRing>,
    notify: Notify,
}

impl Output {
    pub fn new(bytes_max: usize) -> Arc<Output> {
        Arc::new(Output {
            ring: Mutex::new(super::ring::OutputRing::new(bytes_max)),
            notify: Notify::new(),
        })
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut super::ring::OutputRing) -> T) -> T {
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
