//! Terminal session recording: every session's output and sizes (and keystrokes, when the
//! control plane's or the agent's configuration asks) as asciicast v2, stored in the control
//! plane's storage in chained chunks.
//!
//! The replica holding a session's agent link records it: the agent handler hands each batch
//! it stored in the stream store to this session's [`Recorder`] (never waiting on it), and
//! the recorder writes a chunk every [`CHUNK_EVENTS_BYTES`] or [`FLUSH_AFTER`]. Chunks are
//! keyed by output byte offset and appended only where the stored head is, so when the link
//! moves to another replica (or a replica dies with a chunk unwritten) the next recorder
//! starts at the head and reads what is missing back from the stream store: each byte is
//! recorded once. What the store no longer holds is recorded as a marker and makes the
//! recording incomplete. [`cast`] is the sans-IO half.

pub mod api;
pub mod cast;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{InEvent, MetaPatch, OutEntry, SessionMeta, TerminalContext, TerminalCounters};
use crate::settings::RecordingFailure;
use crate::storage::{RecordingRow, StorageError};
use cast::Track;

/// A chunk is written once its events reach this size …
pub const CHUNK_EVENTS_BYTES: usize = 64 * 1024;
/// … and holds at most about this much when output queued up while storage was slow.
pub const CHUNK_EVENTS_BYTES_MAX: usize = 1 << 20;
/// … or this long after its first event.
pub const FLUSH_AFTER: Duration = Duration::from_secs(2);
/// Batches waiting for the recorder, and the output bytes they may hold together; past either
/// the agent handler drops a batch and the recorder reads those bytes back from the stream
/// store (which keeps the newest 4 MiB).
const QUEUE: usize = 256;
const QUEUE_BYTES_MAX: usize = 8 << 20;
/// Under `fail_closed`, storage failing this long closes the session.
const FAIL_CLOSED_AFTER: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long the agent handler waits for the recording to be finished at a session's end.
const FINISH_WAIT: Duration = Duration::from_secs(15);

/// What a recording ended as: the end of the session's audit record.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub chunks: i64,
    pub bytes: i64,
    pub hash: String,
    pub incomplete: Option<String>,
}

impl Summary {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "chunks": self.chunks,
            "bytes": self.bytes,
            "hash": self.hash,
            "incomplete": self.incomplete,
        })
    }
}

enum Note {
    Output { at_ms: i64, entries: Vec<OutEntry> },
    Input { at_ms: i64, event: InEvent },
}

/// One session's recorder on the replica holding its agent link.
pub struct Recorder {
    tx: mpsc::Sender<Note>,
    task: Mutex<Option<JoinHandle<Option<Summary>>>>,
    ctx: TerminalContext,
    /// Output bytes in notes the writer has not taken yet.
    queued: Arc<AtomicUsize>,
}

/// The recording row a new session starts with.
pub fn new_row(
    session_id: &str,
    meta: &SessionMeta,
    agent_name: &str,
    input: bool,
) -> RecordingRow {
    RecordingRow {
        session_id: session_id.to_string(),
        agent_id: meta.agent_id.clone(),
        agent_name: agent_name.to_string(),
        user_id: meta.user_id.clone(),
        username: meta.username.clone(),
        started_ms: meta.created_ms,
        ended_ms: None,
        width: 80,
        height: 24,
        input,
        chunks: 0,
        bytes: 0,
        head_hash: cast::seed_hash(session_id),
        last_ms: meta.created_ms,
        incomplete: None,
    }
}

impl Recorder {
    /// Start recording `session_id` from its stored head; `None` when recording is off.
    pub fn start(ctx: &TerminalContext, session_id: &str) -> Option<Recorder> {
        if !ctx.settings.recording {
            return None;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = Writer::new(ctx.clone(), session_id.to_string());
        let task = tokio::spawn(writer.run(rx, Arc::clone(&queued)));
        Some(Recorder {
            tx,
            task: Mutex::new(Some(task)),
            ctx: ctx.clone(),
            queued,
        })
    }

    /// Output the agent handler stored in the stream store just now. Never waits.
    pub fn output(&self, entries: Vec<OutEntry>) {
        let at_ms = self.ctx.world.now_unix_ms();
        let bytes = output_bytes(&entries);
        let full = self.queued.load(Ordering::Relaxed) + bytes > QUEUE_BYTES_MAX;
        if full || self.tx.try_send(Note::Output { at_ms, entries }).is_err() {
            // The recorder reads these bytes back from the stream store.
            TerminalCounters::add(&self.ctx.terminal.counters.recording_notes_dropped_total, 1);
            return;
        }
        self.queued.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A browser event forwarded to the agent just now. Never waits.
    pub fn input(&self, event: &InEvent) {
        let at_ms = self.ctx.world.now_unix_ms();
        let note = Note::Input {
            at_ms,
            event: event.clone(),
        };
        if self.tx.try_send(note).is_err() {
            TerminalCounters::add(&self.ctx.terminal.counters.recording_notes_dropped_total, 1);
        }
    }

    /// The session's close: record it, store what is pending and mark the recording ended;
    /// what it ended as, unless storage did not answer within [`FINISH_WAIT`].
    pub async fn finish(&self, close: OutEntry) -> Option<Summary> {
        let at_ms = self.ctx.world.now_unix_ms();
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        let handed = self.tx.send(Note::Output {
            at_ms,
            entries: vec![close],
        });
        let done = async {
            handed.await.ok()?;
            task.await.ok().flatten()
        };
        tokio::time::timeout(FINISH_WAIT, done).await.ok().flatten()
    }
}

/// Record what the stream store holds of a session nobody will come back to (its agent link
/// stayed away), and mark the recording ended.
pub async fn close_out(ctx: &TerminalContext, session_id: &str) -> Option<Summary> {
    if !ctx.settings.recording {
        return None;
    }
    let mut writer = Writer::new(ctx.clone(), session_id.to_string());
    let mut track = writer.head().await?;
    writer.catch_up(&mut track, None).await;
    writer.flush(&mut track).await;
    Some(writer.end(&track).await)
}

/// The recorder's task: owns the head it believes is stored and talks to storage.
struct Writer {
    ctx: TerminalContext,
    session_id: String,
    head: RecordingRow,
    /// Storage has been failing since then.
    failing_since: Option<Instant>,
    /// The session was asked to close because the recording failed (`fail_closed`).
    close_asked: bool,
    /// What the user was last told about the recording.
    told: String,
}

impl Writer {
    fn new(ctx: TerminalContext, session_id: String) -> Writer {
        Writer {
            ctx,
            session_id,
            // Loaded by `head` before anything else uses it.
            head: RecordingRow::default(),
            failing_since: None,
            close_asked: false,
            told: String::new(),
        }
    }

    async fn run(mut self, rx: mpsc::Receiver<Note>, queued: Arc<AtomicUsize>) -> Option<Summary> {
        let mut rx = Queue { rx, queued };
        let mut track = self.head().await?;
        // A replica that died (or a queue that overflowed) left bytes in the stream store
        // that no chunk holds: read them back first.
        let from = track.wants();
        self.catch_up(&mut track, None).await;
        if track.wants() > from {
            tracing::info!(
                session_id = %self.session_id,
                from,
                to = track.wants(),
                "recording: read output no chunk held back from the stream store"
            );
        }
        let mut deadline: Option<Instant> = None;
        loop {
            let note = tokio::select! {
                note = rx.recv() => note,
                () = sleep_until(deadline) => {
                    self.flush(&mut track).await;
                    deadline = None;
                    continue;
                }
                () = self.ctx.shutdown.cancelled() => None,
            };
            let Some(note) = note else {
                // The link ended (or this replica is stopping): store what is pending; the
                // next recorder continues from there.
                self.flush(&mut track).await;
                return None;
            };
            self.take(&mut track, note).await;
            // What queued up while the last chunk was stored joins the next chunk: the chunks
            // grow with storage latency instead of the queue.
            while track.pending_bytes() < CHUNK_EVENTS_BYTES_MAX
                && track.closed().is_none()
                && let Ok(note) = rx.try_recv()
            {
                self.take(&mut track, note).await;
            }
            if track.lost_total() > 0 {
                self.tell(&incomplete_reason(&track)).await;
            }
            if track.pending_bytes() >= CHUNK_EVENTS_BYTES || track.closed().is_some() {
                self.flush(&mut track).await;
                deadline = None;
            } else if deadline.is_none() && track.pending_bytes() > 0 {
                deadline = Some(Instant::now() + FLUSH_AFTER);
            }
            if track.closed().is_some() {
                return Some(self.end(&track).await);
            }
        }
    }

    async fn take(&mut self, track: &mut Track, note: Note) {
        match note {
            Note::Output { at_ms, entries } => {
                for entry in entries {
                    let start = entry_start(&entry);
                    if start > track.wants() {
                        self.catch_up(track, Some(start)).await;
                    }
                    track.output(at_ms, entry);
                    // A batch holds up to 64 frames of 256 KiB: chunks stay bounded.
                    if track.pending_bytes() >= CHUNK_EVENTS_BYTES_MAX {
                        self.flush(track).await;
                    }
                }
            }
            Note::Input { at_ms, event } => track.input(at_ms, &event),
        }
    }

    /// The stored head (made from the session's record when opening the session could not
    /// store it), retried until storage answers or shutdown.
    async fn head(&mut self) -> Option<Track> {
        let mut pause = RETRY_MIN;
        loop {
            match self.load().await {
                Ok(Some(row)) => {
                    self.head = row;
                    self.failing_since = None;
                    return Some(Track::new(&self.head));
                }
                Ok(None) => return None,
                Err(e) => self.failed(&e).await,
            }
            tokio::select! {
                () = self.ctx.shutdown.cancelled() => return None,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    async fn load(&self) -> Result<Option<RecordingRow>, StorageError> {
        let storage = &self.ctx.storage;
        if let Some(row) = storage.recording(&self.session_id).await? {
            return Ok(Some(row));
        }
        let Ok(Some(meta)) = self.ctx.terminal.streams.meta(&self.session_id).await else {
            return Ok(None);
        };
        // Output only: whether the agent asked for keystrokes is not known here.
        let row = new_row(
            &self.session_id,
            &meta,
            &meta.agent_id,
            self.ctx.settings.record_input,
        );
        storage.create_recording(row).await?;
        storage.recording(&self.session_id).await
    }

    /// Read what the stream store holds past the track's position: up to `to`, or all of it.
    /// The bytes are stamped with the newest event's time (they were shown by then).
    async fn catch_up(&mut self, track: &mut Track, to: Option<u64>) {
        let streams = self.ctx.terminal.streams.clone();
        let mut failures = 0;
        while to.is_none_or(|to| track.wants() < to) && track.closed().is_none() {
            let entries = match streams
                .read_output(&self.session_id, track.wants(), Duration::from_millis(1))
                .await
            {
                Ok(entries) => entries,
                Err(e) => {
                    failures += 1;
                    if failures >= 5 {
                        tracing::warn!(error = %e, "recording: the stream store did not answer; bytes it holds may be recorded as lost");
                        return;
                    }
                    tokio::time::sleep(RETRY_MIN * failures).await;
                    continue;
                }
            };
            let before = track.wants();
            let at_ms = self.head.last_ms;
            for entry in entries {
                track.output(at_ms, entry);
            }
            if track.wants() == before {
                return; // nothing more stored: a hole stays a hole
            }
            if track.pending_bytes() >= CHUNK_EVENTS_BYTES_MAX {
                self.flush(track).await;
            }
        }
    }

    /// Store the pending events as the next chunk, retrying while storage fails.
    async fn flush(&mut self, track: &mut Track) {
        let mut pause = RETRY_MIN;
        let Some(chunk) = track.take_chunk(&self.head) else {
            return;
        };
        let incomplete = (track.lost_total() > 0).then(|| incomplete_reason(track));
        loop {
            match self
                .ctx
                .storage
                .append_recording_chunk(chunk.clone(), incomplete.clone())
                .await
            {
                Ok(true) => {
                    TerminalCounters::add(&self.ctx.terminal.counters.recording_chunks_total, 1);
                    self.head.chunks = chunk.seq + 1;
                    self.head.bytes = chunk.end_offset;
                    self.head.head_hash = chunk.hash;
                    self.head.last_ms = chunk.last_ms;
                    if incomplete.is_some() {
                        self.head.incomplete = self.head.incomplete.take().or(incomplete);
                    }
                    self.recovered().await;
                    return;
                }
                Ok(false) => {
                    // Another recorder (a replica that still held the link) stored first, or
                    // an earlier try of this chunk landed although its answer was lost.
                    match self.ctx.storage.recording(&self.session_id).await {
                        Ok(Some(row)) => {
                            self.head = row;
                            track.rewind(&self.head);
                            return;
                        }
                        Ok(None) => return,
                        Err(e) => self.failed(&e).await,
                    }
                }
                Err(e) => self.failed(&e).await,
            }
            tokio::select! {
                () = self.ctx.shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    /// Mark the recording ended; what it ended as.
    async fn end(&mut self, track: &Track) -> Summary {
        let incomplete = self
            .head
            .incomplete
            .clone()
            .or_else(|| (track.lost_total() > 0).then(|| incomplete_reason(track)));
        let now_ms = self.ctx.world.now_unix_ms();
        let mut pause = RETRY_MIN;
        for _ in 0..8 {
            match self
                .ctx
                .storage
                .finish_recording(&self.session_id, now_ms, incomplete.clone())
                .await
            {
                Ok(()) => break,
                Err(e) => self.failed(&e).await,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
        Summary {
            chunks: self.head.chunks,
            bytes: self.head.bytes,
            hash: self.head.head_hash.clone(),
            incomplete,
        }
    }

    /// Storage failed: count it, tell the user, and under `fail_closed` close the session
    /// once it has failed for [`FAIL_CLOSED_AFTER`].
    async fn failed(&mut self, e: &StorageError) {
        TerminalCounters::add(&self.ctx.terminal.counters.recording_failures_total, 1);
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() < RETRY_MIN {
            tracing::warn!(session_id = %self.session_id, error = %e, "recording: storage write failed; retrying");
        }
        match self.ctx.settings.recording_failure {
            RecordingFailure::FailOpen => {
                self.tell(&format!(
                    "recording delayed: storage is unavailable ({e}); the session goes on"
                ))
                .await;
            }
            RecordingFailure::FailClosed => {
                if since.elapsed() >= FAIL_CLOSED_AFTER && !self.close_asked {
                    self.close_asked = true;
                    let reason = format!(
                        "recording failed: storage unavailable for {} s ({e}); the session is closed (recording_failure = fail_closed)",
                        FAIL_CLOSED_AFTER.as_secs()
                    );
                    self.tell(&reason).await;
                    tracing::warn!(session_id = %self.session_id, %reason, "closing terminal session");
                    let close = InEvent::Close { reason };
                    let _ = self
                        .ctx
                        .terminal
                        .streams
                        .append_input(&self.session_id, close)
                        .await;
                }
            }
        }
    }

    /// Storage answers again after failing.
    async fn recovered(&mut self) {
        if self.failing_since.take().is_some() && self.head.incomplete.is_none() {
            self.tell("").await;
        }
    }

    /// Put what the user should know about the recording in the session's record (the
    /// browser handler shows it); `""` when the recording is whole.
    async fn tell(&mut self, what: &str) {
        if self.told == what {
            return;
        }
        self.told = what.to_string();
        let patch = MetaPatch {
            recording: Some(what.to_string()),
            ..MetaPatch::default()
        };
        let now_ms = self.ctx.world.now_unix_ms();
        let _ = self
            .ctx
            .terminal
            .streams
            .update(&self.session_id, now_ms, patch)
            .await;
    }
}

/// The writer's end of the queue: taking a note frees its bytes.
struct Queue {
    rx: mpsc::Receiver<Note>,
    queued: Arc<AtomicUsize>,
}

impl Queue {
    fn taken(&self, note: &Note) {
        if let Note::Output { entries, .. } = note {
            self.queued
                .fetch_sub(output_bytes(entries), Ordering::Relaxed);
        }
    }

    async fn recv(&mut self) -> Option<Note> {
        let note = self.rx.recv().await?;
        self.taken(&note);
        Some(note)
    }

    fn try_recv(&mut self) -> Result<Note, mpsc::error::TryRecvError> {
        let note = self.rx.try_recv()?;
        self.taken(&note);
        Ok(note)
    }
}

fn output_bytes(entries: &[OutEntry]) -> usize {
    entries
        .iter()
        .map(|e| match e {
            OutEntry::Data { bytes, .. } => bytes.len(),
            _ => 0,
        })
        .sum()
}

fn incomplete_reason(track: &Track) -> String {
    format!(
        "{} bytes of output were lost before they could be recorded",
        track.lost_total()
    )
}

fn entry_start(entry: &OutEntry) -> u64 {
    match entry {
        OutEntry::Data { offset, .. } => *offset,
        OutEntry::Skipped { from, .. } => *from,
        OutEntry::Closed { end, .. } => *end,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
