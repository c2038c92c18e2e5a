//! The in-process store (the embedded default; one replica): bounded like the Redis one
//! (capped output, capped input), closed sessions expire after their keep time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::model::{
    INPUT_ENTRIES_MAX, InEvent, InputEntry, MetaPatch, OutEntry, READ_ENTRIES_MAX, Result,
    SessionMeta, SessionState, StreamsError,
};

struct MemSession {
    meta: SessionMeta,
    out: VecDeque<OutEntry>,
    input: VecDeque<(u64, InEvent)>,
    next_input: u64,
    out_changed: Arc<Notify>,
    in_changed: Arc<Notify>,
    expires_at: Option<Instant>,
}

#[derive(Default)]
struct MemState {
    sessions: BTreeMap<String, MemSession>,
    /// Set by the simulator to model a store outage: every call fails while it is set.
    outage: bool,
}

pub struct MemoryStreams {
    state: Mutex<MemState>,
    link_signer: super::sign::Signer,
}

impl MemoryStreams {
    pub fn new(link_key: [u8; 32]) -> MemoryStreams {
        MemoryStreams {
            state: Mutex::default(),
            link_signer: super::sign::Signer::new(link_key),
        }
    }

    pub(super) fn link_signer(&self) -> &super::sign::Signer {
        &self.link_signer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemState) -> Result<T>) -> Result<T> {
        let mut guard = self.lock();
        if guard.outage {
            return Err(StreamsError::Unavailable("store outage".into()));
        }
        let now = Instant::now();
        guard
            .sessions
            .retain(|_, s| s.expires_at.is_none_or(|at| at > now));
        f(&mut guard)
    }

    /// Fault injection for the simulator: while `down`, every operation fails.
    pub fn set_outage(&self, down: bool) {
        let mut guard = self.lock();
        guard.outage = down;
        for s in guard.sessions.values() {
            s.out_changed.notify_waiters();
            s.in_changed.notify_waiters();
        }
    }

    pub(super) fn create(&self, id: &str, meta: &SessionMeta, live_max: usize) -> Result<()> {
        self.with(|s| {
            let live = s
                .sessions
                .values()
                .filter(|x| x.meta.state != SessionState::Closed)
                .count();
            if live >= live_max {
                return Err(StreamsError::LimitReached(live_max));
            }
            s.sessions.insert(
                id.to_string(),
                MemSession {
                    meta: meta.clone(),
                    out: VecDeque::new(),
                    input: VecDeque::new(),
                    next_input: 1,
                    out_changed: Arc::new(Notify::new()),
                    in_changed: Arc::new(Notify::new()),
                    expires_at: None,
                },
            );
            Ok(())
        })
    }

    pub(super) fn meta(&self, id: &str) -> Result<Option<SessionMeta>> {
        self.with(|s| Ok(s.sessions.get(id).map(|x| x.meta.clone())))
    }

    pub(super) fn update(&self, id: &str, now_ms: i64, patch: MetaPatch) -> Result<()> {
        self.with(|s| {
            if let Some(x) = s.sessions.get_mut(id)
                && x.meta.state != SessionState::Closed
            {
                patch.apply(&mut x.meta, now_ms);
            }
            Ok(())
        })
    }

    pub(super) fn output_end(&self, id: &str) -> Result<u64> {
        self.with(|s| {
            Ok(s.sessions
                .get(id)
                .and_then(|x| x.out.back())
                .map_or(0, OutEntry::end))
        })
    }

    pub(super) fn append_output(&self, id: &str, batch: &[OutEntry], bytes_max: u64) -> Result<()> {
        self.with(|s| {
            let Some(x) = s.sessions.get_mut(id) else {
                return Ok(());
            };
            for entry in batch {
                if x.out.back().is_some_and(|last| last.id() >= entry.id()) {
                    continue; // a resend
                }
                let min_end = entry.end().saturating_sub(bytes_max);
                x.out.push_back(entry.clone());
                while x.out.front().is_some_and(|e| e.end() < min_end) {
                    x.out.pop_front();
                }
            }
            x.out_changed.notify_waiters();
            Ok(())
        })
    }

    /// Wait up to `block` for `read` to find something in session `id`, woken by the
    /// session's `notify_of` notifier.
    async fn read_blocking<T>(
        &self,
        id: &str,
        block: Duration,
        notify_of: fn(&MemSession) -> &Arc<Notify>,
        read: impl Fn(&MemSession) -> Vec<T>,
    ) -> Result<Vec<T>> {
        let deadline = Instant::now() + block;
        loop {
            let notify = self.with(|s| Ok(s.sessions.get(id).map(|x| Arc::clone(notify_of(x)))))?;
            let Some(notify) = notify else {
                return Ok(Vec::new());
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            // Registered before reading, so an append in between still wakes us.
            notified.as_mut().enable();
            let found = self.with(|s| Ok(s.sessions.get(id).map(&read).unwrap_or_default()))?;
            if !found.is_empty() || Instant::now() >= deadline {
                return Ok(found);
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    pub(super) async fn read_output(
        &self,
        id: &str,
        after: u64,
        block: Duration,
    ) -> Result<Vec<OutEntry>> {
        self.read_blocking(
            id,
            block,
            |x| &x.out_changed,
            |x| {
                x.out
                    .iter()
                    .filter(|e| e.id() > (after, 0))
                    .take(READ_ENTRIES_MAX)
                    .cloned()
                    .collect()
            },
        )
        .await
    }

    pub(super) fn append_input(&self, id: &str, event: InEvent) -> Result<()> {
        self.with(|s| {
            let Some(x) = s.sessions.get_mut(id) else {
                return Ok(());
            };
            let n = x.next_input;
            x.next_input += 1;
            x.input.push_back((n, event));
            while x.input.len() > INPUT_ENTRIES_MAX {
                x.input.pop_front();
            }
            x.in_changed.notify_waiters();
            Ok(())
        })
    }

    pub(super) async fn read_input(
        &self,
        id: &str,
        cursor: &str,
        block: Duration,
    ) -> Result<Vec<InputEntry>> {
        let after: u64 = cursor.parse().unwrap_or(0);
        self.read_blocking(
            id,
            block,
            |x| &x.in_changed,
            |x| {
                x.input
                    .iter()
                    .filter(|(n, _)| *n > after)
                    .take(READ_ENTRIES_MAX)
                    .map(|(n, e)| InputEntry {
                        id: n.to_string(),
                        seq: *n,
                        event: e.clone(),
                    })
                    .collect()
            },
        )
        .await
    }

    pub(super) fn finish(
        &self,
        id: &str,
        now_ms: i64,
        reason: &str,
        keep: Duration,
    ) -> Result<bool> {
        self.with(|s| {
            let mut closed_now = false;
            if let Some(x) = s.sessions.get_mut(id) {
                if x.meta.state != SessionState::Closed {
                    x.meta.state = SessionState::Closed;
                    x.meta.changed_ms = now_ms;
                    x.meta.reason = reason.to_string();
                    closed_now = true;
                }
                x.expires_at = Some(Instant::now() + keep);
                x.out_changed.notify_waiters();
                x.in_changed.notify_waiters();
            }
            Ok(closed_now)
        })
    }

    pub(super) fn ping(&self) -> Result<()> {
        self.with(|_| Ok(()))
    }

    pub(super) fn live(&self) -> Result<Vec<(String, String)>> {
        self.with(|s| {
            Ok(s.sessions
                .iter()
                .filter(|(_, x)| x.meta.state != SessionState::Closed)
                .map(|(id, x)| (id.clone(), x.meta.agent_id.clone()))
                .collect())
        })
    }
}
