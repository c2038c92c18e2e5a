//! The rules of the control plane's two terminal handlers, sans-IO: what to send, when to
//! ping and when a socket is over, decided from what was read and the time, with no socket,
//! store or clock in here. `browser` and `agent_link` read, call these and carry out the
//! answer; the unit tests below play the orderings that used to need a live link.
//!
//! * [`BrowserView`]: what one browser socket has been told of a session (its output from
//!   an offset, stitched; the session's state and recording status as they change; the close).
//! * [`Waiting`]: a link to an agent whose PTY is not started yet waits for the first attach.
//! * [`Forward`]: store input → agent frames, each input number once per link, pings when
//!   quiet.

use std::time::Duration;

use proto::TerminalToAgent;
use proto::terminal::{Cursor, InputGate};
use serde::Serialize;
use tokio::time::Instant;

use super::{InEvent, InputEntry, OutEntry, SessionMeta, SessionState};

/// Why a session ends when the store no longer knows it.
pub const LOST_REASON: &str = "the session was lost: the terminal store (Redis) no longer has it, e.g. after a restart without persistence; open a new terminal";

/// Text frames to the browser (JSON with a `type`); binary frames are output bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notice {
    /// Output continues at this byte offset (the first frame).
    Offset { offset: u64 },
    /// `from..to` will never be shown; output continues at `to`.
    Skipped { from: u64, to: u64 },
    /// The session ended; nothing follows.
    Closed { reason: String },
    /// What the session is doing: `pending`, `live`, `reconnecting`, `degraded`, `closed`.
    State { state: String },
    /// The session is recorded; `detail` is empty while the recording is whole, otherwise
    /// what it misses or why it is delayed.
    Recording { detail: String },
}

/// One thing to do on a browser socket, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToBrowser {
    /// Output bytes (a binary frame).
    Bytes(Vec<u8>),
    /// A text frame.
    Say(Notice),
    /// A WebSocket ping (browsers answer on their own).
    Ping,
    /// Close the socket with this code and frame reason; nothing follows.
    Close { code: u16, reason: &'static str },
}

/// What one browser socket has been told: its place in the output, the state and recording
/// status it last saw, and whether it is over.
#[derive(Debug)]
pub struct BrowserView {
    cursor: Cursor,
    state: String,
    recording: String,
    last_sent: Instant,
    ping_every: Duration,
    over: bool,
}

impl BrowserView {
    /// A socket that asked for output from `offset`, the store's output ending at
    /// `store_end`: the first frames say where output continues and, when sessions are
    /// recorded, the recording's status.
    pub fn open(
        offset: u64,
        store_end: u64,
        recording: Option<String>,
        ping_every: Duration,
        now: Instant,
    ) -> (BrowserView, Vec<ToBrowser>) {
        let cursor = Cursor::new(offset.min(store_end));
        let mut first = vec![ToBrowser::Say(Notice::Offset {
            offset: cursor.at(),
        })];
        if let Some(detail) = &recording {
            first.push(ToBrowser::Say(Notice::Recording {
                detail: detail.clone(),
            }));
        }
        let view = BrowserView {
            cursor,
            state: String::new(),
            recording: recording.unwrap_or_default(),
            last_sent: now,
            ping_every,
            over: false,
        };
        (view, first)
    }

    /// Where the next output read starts.
    pub fn read_from(&self) -> u64 {
        self.cursor.at()
    }

    /// Whether the browser was told the session is over (nothing more to send).
    pub fn is_over(&self) -> bool {
        self.over
    }

    /// The state the browser last saw (`""` before the first).
    pub fn shown_state(&self) -> &str {
        &self.state
    }

    /// Output entries read from the store: each byte once, in order, gaps as skips; a store
    /// that was failing is live again; a close ends the socket.
    pub fn on_output(&mut self, entries: Vec<OutEntry>, now: Instant) -> Vec<ToBrowser> {
        let mut out = Vec::new();
        if self.over || entries.is_empty() {
            return out;
        }
        self.last_sent = now;
        if self.state == "degraded" {
            out.extend(self.show_state("live"));
        }
        let mut emit = Vec::new();
        for entry in entries {
            self.cursor.take(entry, &mut emit);
        }
        for entry in emit {
            match entry {
                OutEntry::Data { bytes, .. } => out.push(ToBrowser::Bytes(bytes)),
                OutEntry::Skipped { from, to } => {
                    out.push(ToBrowser::Say(Notice::Skipped { from, to }))
                }
                OutEntry::Closed { reason, .. } => {
                    out.extend(self.closed(reason, 1000, "session closed"));
                    break;
                }
            }
        }
        out
    }

    /// An output read failed: the browser is told once that the session is degraded.
    pub fn on_store_error(&mut self) -> Vec<ToBrowser> {
        if self.over || self.state == "degraded" {
            return Vec::new();
        }
        self.show_state("degraded").into_iter().collect()
    }

    /// No output for a while, and the session's record as the store has it (`None`: the
    /// store answers but no longer knows the session). A changed recording status or state
    /// is told; a closed or lost session ends the socket.
    pub fn on_quiet(&mut self, meta: Option<&SessionMeta>) -> Vec<ToBrowser> {
        if self.over {
            return Vec::new();
        }
        let Some(meta) = meta else {
            return self.closed(LOST_REASON.to_string(), 1000, "session lost");
        };
        let mut out = Vec::new();
        if meta.recording != self.recording {
            self.recording = meta.recording.clone();
            out.push(ToBrowser::Say(Notice::Recording {
                detail: meta.recording.clone(),
            }));
        }
        out.extend(self.show_state(meta.state.as_str()));
        if meta.state == SessionState::Closed {
            self.over = true;
            out.push(ToBrowser::Say(Notice::Closed {
                reason: meta.reason.clone(),
            }));
        }
        out
    }

    /// What let the socket open no longer holds: this viewer loses the session (which goes
    /// on), told why.
    pub fn on_access_lost(&mut self, reason: String) -> Vec<ToBrowser> {
        if self.over {
            return Vec::new();
        }
        self.closed(reason, 1008, "access withdrawn")
    }

    /// A ping when nothing was sent for the ping interval.
    pub fn on_time(&mut self, now: Instant) -> Option<ToBrowser> {
        if self.over || now.saturating_duration_since(self.last_sent) < self.ping_every {
            return None;
        }
        self.last_sent = now;
        Some(ToBrowser::Ping)
    }

    fn show_state(&mut self, state: &str) -> Option<ToBrowser> {
        if self.state == state {
            return None;
        }
        self.state = state.to_string();
        Some(ToBrowser::Say(Notice::State {
            state: state.to_string(),
        }))
    }

    fn closed(&mut self, reason: String, code: u16, frame: &'static str) -> Vec<ToBrowser> {
        self.over = true;
        vec![
            ToBrowser::Say(Notice::Closed { reason }),
            ToBrowser::Close {
                code,
                reason: frame,
            },
        ]
    }
}

/// How waiting for the first browser ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Attach {
    /// A browser attached: start the PTY.
    Start(TerminalToAgent),
    /// Closed before any browser attached, or none did in time.
    Over(String),
}

/// What a link says first to an agent whose PTY already runs: resume output after what the
/// store has (the browser's size follows as a resize). `None`: the PTY is not started yet.
pub fn resume(started: bool, written_end: u64) -> Option<TerminalToAgent> {
    started.then_some(TerminalToAgent::Start {
        cols: 80,
        rows: 24,
        from: written_end,
    })
}

/// A link whose PTY is not started yet: the first browser attach starts it; a close, or no
/// attach within the attach timeout, ends the session.
#[derive(Debug)]
pub struct Waiting {
    deadline: Instant,
    timeout: Duration,
}

impl Waiting {
    pub fn new(now: Instant, timeout: Duration) -> Waiting {
        Waiting {
            deadline: now + timeout,
            timeout,
        }
    }

    /// How long the next input read may wait; `None` when the time is up.
    pub fn read_for(&self, now: Instant, block: Duration) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(now);
        (!left.is_zero()).then(|| left.min(block))
    }

    /// Input entries read; `cursor` moves past each, numbers already taken are skipped (and
    /// counted in `repeats`).
    pub fn on_input(
        &self,
        entries: Vec<InputEntry>,
        cursor: &mut String,
        gate: &mut InputGate,
        repeats: &mut Vec<u64>,
    ) -> Option<Attach> {
        for entry in entries {
            *cursor = entry.id;
            if !gate.take(entry.seq) {
                repeats.push(entry.seq);
                continue;
            }
            match entry.event {
                InEvent::Attach { cols, rows } => {
                    return Some(Attach::Start(TerminalToAgent::Start {
                        cols,
                        rows,
                        from: 0,
                    }));
                }
                InEvent::Close { reason } => return Some(Attach::Over(reason)),
                InEvent::Data(_) | InEvent::Resize { .. } => {}
            }
        }
        None
    }

    /// The session's end when no browser attached in time.
    pub fn timed_out(&self) -> Attach {
        Attach::Over(format!(
            "no browser attached within {} s",
            self.timeout.as_secs()
        ))
    }
}

/// One frame to an agent.
#[derive(Debug, PartialEq, Eq)]
pub enum ToAgent {
    Frame(TerminalToAgent),
    /// Keystrokes (a binary frame).
    Bytes(Vec<u8>),
}

/// Input entries in the order the agent gets them: each taken number's `Seq`, then its
/// event (a later attach is only a size hint); a number already taken on this link is not
/// forwarded again (a copy, or a cursor set back). Pings while quiet.
#[derive(Debug)]
pub struct Forward {
    gate: InputGate,
    last_ping: Instant,
    ping_every: Duration,
}

/// A forwarded input entry: its frames, and the event for the recording.
#[derive(Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub event: InEvent,
    pub frames: Vec<ToAgent>,
}

impl Forward {
    pub fn new(gate: InputGate, ping_every: Duration, now: Instant) -> Forward {
        Forward {
            gate,
            last_ping: now,
            ping_every,
        }
    }

    /// The entries of one read, after the stored cursor moved past them; numbers already
    /// taken go to `repeats`.
    pub fn on_input(&mut self, entries: Vec<InputEntry>, repeats: &mut Vec<u64>) -> Vec<Forwarded> {
        let mut out = Vec::new();
        for InputEntry { seq, event, .. } in entries {
            if !self.gate.take(seq) {
                repeats.push(seq);
                continue;
            }
            let frame = match &event {
                InEvent::Data(data) => ToAgent::Bytes(data.clone()),
                InEvent::Resize { cols, rows } | InEvent::Attach { cols, rows } => {
                    ToAgent::Frame(TerminalToAgent::Resize {
                        cols: *cols,
                        rows: *rows,
                    })
                }
                InEvent::Close { reason } => ToAgent::Frame(TerminalToAgent::Close {
                    reason: reason.clone(),
                }),
            };
            out.push(Forwarded {
                event,
                frames: vec![ToAgent::Frame(TerminalToAgent::Seq { n: seq }), frame],
            });
        }
        out
    }

    /// A ping when the last one is the ping interval old.
    pub fn on_time(&mut self, now: Instant) -> Option<ToAgent> {
        if now.saturating_duration_since(self.last_ping) < self.ping_every {
            return None;
        }
        self.last_ping = now;
        Some(ToAgent::Frame(TerminalToAgent::Ping))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: Duration = Duration::from_secs(10);

    fn data(offset: u64, bytes: &[u8]) -> OutEntry {
        OutEntry::Data {
            offset,
            bytes: bytes.to_vec(),
        }
    }

    fn meta(state: SessionState, reason: &str, recording: &str) -> SessionMeta {
        SessionMeta {
            agent_id: "agt".into(),
            user_id: "usr".into(),
            username: "alice".into(),
            state,
            created_ms: 0,
            changed_ms: 0,
            started: true,
            reason: reason.into(),
            input_cursor: String::new(),
            recording: recording.into(),
        }
    }

    fn say(notice: Notice) -> ToBrowser {
        ToBrowser::Say(notice)
    }

    fn state(s: &str) -> ToBrowser {
        say(Notice::State { state: s.into() })
    }

    fn input(seq: u64, event: InEvent) -> InputEntry {
        InputEntry {
            id: format!("{seq}-0"),
            seq,
            event,
        }
    }

    #[test]
    fn a_browser_asking_past_the_stored_end_starts_at_the_end_and_hears_the_recording() {
        let now = Instant::now();
        let (view, first) = BrowserView::open(500, 120, Some(String::new()), PING, now);
        assert_eq!(view.read_from(), 120);
        assert_eq!(
            first,
            vec![
                say(Notice::Offset { offset: 120 }),
                say(Notice::Recording {
                    detail: String::new()
                })
            ]
        );
        let (_, unrecorded) = BrowserView::open(0, 120, None, PING, now);
        assert_eq!(unrecorded, vec![say(Notice::Offset { offset: 0 })]);
    }

    #[test]
    fn output_is_stitched_once_in_order_and_a_gap_is_a_skip() {
        let now = Instant::now();
        let (mut view, _) = BrowserView::open(0, 0, None, PING, now);
        let sent = view.on_output(vec![data(0, b"abc"), data(1, b"bcde"), data(9, b"z")], now);
        assert_eq!(
            sent,
            vec![
                ToBrowser::Bytes(b"abc".to_vec()),
                ToBrowser::Bytes(b"de".to_vec()),
                say(Notice::Skipped { from: 5, to: 9 }),
                ToBrowser::Bytes(b"z".to_vec()),
            ]
        );
        assert_eq!(view.read_from(), 10);
    }

    #[test]
    fn a_failing_store_is_told_once_and_its_recovery_with_the_next_output() {
        let now = Instant::now();
        let (mut view, _) = BrowserView::open(0, 0, None, PING, now);
        assert_eq!(view.on_store_error(), vec![state("degraded")]);
        assert_eq!(view.on_store_error(), vec![], "told once");
        let sent = view.on_output(vec![data(0, b"x")], now);
        assert_eq!(sent, vec![state("live"), ToBrowser::Bytes(b"x".to_vec())]);
        assert_eq!(
            view.on_output(vec![data(1, b"y")], now),
            vec![ToBrowser::Bytes(b"y".to_vec())]
        );
    }

    #[test]
    fn the_close_entry_ends_the_socket_and_nothing_follows_it() {
        let now = Instant::now();
        let (mut view, _) = BrowserView::open(0, 0, None, PING, now);
        let closed = OutEntry::Closed {
            end: 2,
            reason: "psql exited".into(),
        };
        let sent = view.on_output(vec![data(0, b"ok"), closed, data(2, b"late")], now);
        assert_eq!(
            sent,
            vec![
                ToBrowser::Bytes(b"ok".to_vec()),
                say(Notice::Closed {
                    reason: "psql exited".into()
                }),
                ToBrowser::Close {
                    code: 1000,
                    reason: "session closed"
                },
            ]
        );
        assert!(view.is_over());
        assert_eq!(
            view.on_quiet(Some(&meta(SessionState::Live, "", ""))),
            vec![]
        );
        assert_eq!(view.on_time(now + PING * 3), None, "no ping after the end");
        assert_eq!(view.on_access_lost("demoted".into()), vec![]);
    }

    #[test]
    fn a_quiet_session_tells_only_what_changed_and_its_close_by_record() {
        let now = Instant::now();
        let (mut view, _) = BrowserView::open(0, 0, Some(String::new()), PING, now);
        let live = meta(SessionState::Live, "", "");
        assert_eq!(view.on_quiet(Some(&live)), vec![state("live")]);
        assert_eq!(view.on_quiet(Some(&live)), vec![], "nothing changed");
        let lossy = meta(SessionState::Reconnecting, "", "input not recorded");
        assert_eq!(
            view.on_quiet(Some(&lossy)),
            vec![
                say(Notice::Recording {
                    detail: "input not recorded".into()
                }),
                state("reconnecting")
            ]
        );
        let closed = meta(
            SessionState::Closed,
            "no agent link for 90 s",
            "input not recorded",
        );
        assert_eq!(
            view.on_quiet(Some(&closed)),
            vec![
                state("closed"),
                say(Notice::Closed {
                    reason: "no agent link for 90 s".into()
                })
            ]
        );
        assert!(view.is_over());
    }

    #[test]
    fn a_session_the_store_forgot_is_closed_with_the_reason_to_open_a_new_one() {
        let now = Instant::now();
        let (mut view, _) = BrowserView::open(0, 0, None, PING, now);
        assert_eq!(
            view.on_quiet(None),
            vec![
                say(Notice::Closed {
                    reason: LOST_REASON.into()
                }),
                ToBrowser::Close {
                    code: 1000,
                    reason: "session lost"
                }
            ]
        );
        assert!(view.is_over());
    }

    #[test]
    fn lost_access_closes_with_1008_and_the_reason() {
        let now = Instant::now();
        let (mut view, _) = BrowserView::open(0, 0, None, PING, now);
        assert_eq!(
            view.on_access_lost("your role is now viewer".into()),
            vec![
                say(Notice::Closed {
                    reason: "your role is now viewer".into()
                }),
                ToBrowser::Close {
                    code: 1008,
                    reason: "access withdrawn"
                }
            ]
        );
    }

    #[test]
    fn a_browser_is_pinged_only_after_the_interval_without_output() {
        let start = Instant::now();
        let (mut view, _) = BrowserView::open(0, 0, None, PING, start);
        assert_eq!(view.on_time(start + PING / 2), None);
        view.on_output(vec![data(0, b"x")], start + PING / 2);
        assert_eq!(view.on_time(start + PING), None, "output counts as traffic");
        assert_eq!(view.on_time(start + PING * 3 / 2), Some(ToBrowser::Ping));
        assert_eq!(
            view.on_time(start + PING * 3 / 2),
            None,
            "one ping per interval"
        );
    }

    #[test]
    fn a_started_pty_resumes_after_what_the_store_has() {
        assert_eq!(
            resume(true, 4096),
            Some(TerminalToAgent::Start {
                cols: 80,
                rows: 24,
                from: 4096
            })
        );
        assert_eq!(resume(false, 0), None);
    }

    #[test]
    fn the_first_attach_starts_the_pty_at_its_size_and_a_repeat_is_not_taken() {
        let now = Instant::now();
        let waiting = Waiting::new(now, Duration::from_secs(30));
        let (mut cursor, mut gate, mut repeats) = (String::new(), InputGate::default(), vec![]);
        let keys = vec![input(1, InEvent::Data(b"early".to_vec()))];
        assert_eq!(
            waiting.on_input(keys, &mut cursor, &mut gate, &mut repeats),
            None
        );
        let again = vec![
            input(1, InEvent::Attach { cols: 1, rows: 1 }),
            input(
                2,
                InEvent::Attach {
                    cols: 120,
                    rows: 40,
                },
            ),
        ];
        assert_eq!(
            waiting.on_input(again, &mut cursor, &mut gate, &mut repeats),
            Some(Attach::Start(TerminalToAgent::Start {
                cols: 120,
                rows: 40,
                from: 0
            }))
        );
        assert_eq!(repeats, vec![1], "the copy of entry 1 is dropped");
        assert_eq!(cursor, "2-0");
    }

    #[test]
    fn a_close_or_the_attach_timeout_ends_a_session_nobody_attached_to() {
        let now = Instant::now();
        let waiting = Waiting::new(now, Duration::from_secs(30));
        let (mut cursor, mut gate, mut repeats) = (String::new(), InputGate::default(), vec![]);
        let close = vec![input(
            1,
            InEvent::Close {
                reason: "closed in the browser".into(),
            },
        )];
        assert_eq!(
            waiting.on_input(close, &mut cursor, &mut gate, &mut repeats),
            Some(Attach::Over("closed in the browser".into()))
        );
        let block = Duration::from_secs(1);
        assert_eq!(waiting.read_for(now, block), Some(block));
        assert_eq!(
            waiting.read_for(now + Duration::from_millis(29_500), block),
            Some(Duration::from_millis(500))
        );
        assert_eq!(waiting.read_for(now + Duration::from_secs(30), block), None);
        assert_eq!(
            waiting.timed_out(),
            Attach::Over("no browser attached within 30 s".into())
        );
    }

    #[test]
    fn input_goes_to_the_agent_numbered_once_each_and_a_late_attach_is_a_resize() {
        let now = Instant::now();
        let mut forward = Forward::new(InputGate::default(), Duration::from_secs(5), now);
        let mut repeats = vec![];
        let sent = forward.on_input(
            vec![
                input(3, InEvent::Data(b"select 1;\r".to_vec())),
                input(
                    4,
                    InEvent::Attach {
                        cols: 100,
                        rows: 30,
                    },
                ),
                input(3, InEvent::Data(b"select 1;\r".to_vec())),
                input(
                    5,
                    InEvent::Close {
                        reason: "closed in the browser".into(),
                    },
                ),
            ],
            &mut repeats,
        );
        let frames: Vec<ToAgent> = sent.into_iter().flat_map(|f| f.frames).collect();
        assert_eq!(
            frames,
            vec![
                ToAgent::Frame(TerminalToAgent::Seq { n: 3 }),
                ToAgent::Bytes(b"select 1;\r".to_vec()),
                ToAgent::Frame(TerminalToAgent::Seq { n: 4 }),
                ToAgent::Frame(TerminalToAgent::Resize {
                    cols: 100,
                    rows: 30
                }),
                ToAgent::Frame(TerminalToAgent::Seq { n: 5 }),
                ToAgent::Frame(TerminalToAgent::Close {
                    reason: "closed in the browser".into()
                }),
            ]
        );
        assert_eq!(repeats, vec![3], "the copy never reaches psql");
        let rewound = forward.on_input(vec![input(4, InEvent::Data(b"x".to_vec()))], &mut repeats);
        assert!(rewound.is_empty(), "a cursor set back replays nothing");
    }

    #[test]
    fn the_agent_is_pinged_each_interval() {
        let start = Instant::now();
        let every = Duration::from_secs(5);
        let mut forward = Forward::new(InputGate::default(), every, start);
        assert_eq!(forward.on_time(start + every / 2), None);
        assert_eq!(
            forward.on_time(start + every),
            Some(ToAgent::Frame(TerminalToAgent::Ping))
        );
        assert_eq!(forward.on_time(start + every), None);
    }
}
