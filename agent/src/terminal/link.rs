//! The rules of one reverse link of a terminal session, without I/O: what a frame from the
//! control plane means before `start` and once the link is live, when the link is dead, when
//! the session is idle, when a resize is due, and which input is a replay. The driver
//! (`session::serve_link`) reads frames and the clock, hands them here, and carries out the
//! [`Action`] it gets back; every ordering of frames and deadlines can be tested without a
//! socket, a PTY or a sleep.

use std::time::Duration;

use proto::TerminalToAgent;
use tokio::time::Instant;

use super::gate::SeqGate;
use super::model::PtySize;

/// No frame from the control plane for this long: the link is dead (it pings every 5 s).
pub const LINK_DEAD_AFTER: Duration = Duration::from_secs(20);
/// Resize requests closer together than this collapse into the last one.
pub const RESIZE_DEBOUNCE: Duration = Duration::from_millis(80);

/// How a link ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// The link died; the session lives on (redial).
    Lost(String),
    /// The session is over.
    Over(String),
}

/// A frame from the control plane, as the driver read it off the socket.
#[derive(Debug)]
pub enum Inbound {
    /// The socket ended or sent a close frame.
    Closed,
    /// Reading failed.
    Failed(String),
    Binary(Vec<u8>),
    Text(String),
    /// Ping, pong or another frame without meaning here (it still proves the link lives).
    Other,
}

/// Before `start`: what a frame means.
#[derive(Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Attach: spawn the PTY (if there is none yet) at this size, send output from `from`.
    Start {
        size: PtySize,
        from: u64,
    },
    Pong,
    Ignore,
    End(LinkEnd),
}

/// What a frame means before the link is live.
pub fn before_start(frame: Inbound) -> Waiting {
    let text = match frame {
        Inbound::Closed => return Waiting::End(LinkEnd::Lost("closed before start".into())),
        Inbound::Failed(e) => return Waiting::End(LinkEnd::Lost(format!("receive: {e}"))),
        Inbound::Text(text) => text,
        Inbound::Binary(_) | Inbound::Other => return Waiting::Ignore,
    };
    match serde_json::from_str(&text) {
        Ok(TerminalToAgent::Start { cols, rows, from }) => Waiting::Start {
            size: PtySize::clamped(cols, rows),
            from,
        },
        Ok(TerminalToAgent::Close { reason }) => Waiting::End(LinkEnd::Over(reason)),
        Ok(TerminalToAgent::Ping) => Waiting::Pong,
        _ => Waiting::Ignore,
    }
}

/// What the live link asks of its driver.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Keystrokes for the PTY.
    Write(Vec<u8>),
    /// The PTY's new size (debounced).
    Resize(PtySize),
    /// Answer a ping.
    Pong,
    End(LinkEnd),
}

/// Sans-IO resize debounce: remembers the newest size and says when it is due.
#[derive(Debug, Default)]
pub struct Debounce {
    pending: Option<(PtySize, Instant)>,
}

impl Debounce {
    /// A resize arrived at `now`; it is applied `RESIZE_DEBOUNCE` after the last one.
    pub fn push(&mut self, now: Instant, size: PtySize) {
        self.pending = Some((size, now + RESIZE_DEBOUNCE));
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.pending.map(|(_, at)| at)
    }

    /// The size to apply if its quiet period is over.
    pub fn due(&mut self, now: Instant) -> Option<PtySize> {
        match self.pending {
            Some((size, at)) if at <= now => {
                self.pending = None;
                Some(size)
            }
            _ => None,
        }
    }
}

/// A live link: attached, its PTY running.
#[derive(Debug)]
pub struct Live {
    idle_timeout: Duration,
    last_heard: Instant,
    last_input: Instant,
    debounce: Debounce,
}

impl Live {
    pub fn new(now: Instant, idle_timeout: Duration) -> Live {
        Live {
            idle_timeout,
            last_heard: now,
            last_input: now,
            debounce: Debounce::default(),
        }
    }

    /// A frame at `now`. `gate` is the session's: it outlives the link.
    pub fn on_frame(&mut self, now: Instant, gate: &mut SeqGate, frame: Inbound) -> Action {
        self.last_heard = now;
        let text = match frame {
            Inbound::Closed => {
                return Action::End(LinkEnd::Lost("closed by the control plane".into()));
            }
            Inbound::Failed(e) => return Action::End(LinkEnd::Lost(format!("receive: {e}"))),
            Inbound::Other => return Action::Nothing,
            Inbound::Binary(data) => {
                if !gate.admit() {
                    tracing::warn!("terminal input already applied: dropped (a replay)");
                    return Action::Nothing;
                }
                self.last_input = now;
                return Action::Write(data);
            }
            Inbound::Text(text) => text,
        };
        match serde_json::from_str::<TerminalToAgent>(&text) {
            Ok(TerminalToAgent::Seq { n }) => {
                gate.announce(n);
                Action::Nothing
            }
            Ok(TerminalToAgent::Resize { .. } | TerminalToAgent::Close { .. }) if !gate.admit() => {
                tracing::warn!("terminal input already applied: dropped (a replay)");
                Action::Nothing
            }
            Ok(TerminalToAgent::Resize { cols, rows }) => {
                self.debounce.push(now, PtySize::clamped(cols, rows));
                Action::Nothing
            }
            Ok(TerminalToAgent::Close { reason }) => Action::End(LinkEnd::Over(reason)),
            Ok(TerminalToAgent::Ping) => Action::Pong,
            Ok(_) => Action::Nothing,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable control frame; ignored");
                Action::Nothing
            }
        }
    }

    /// What the clock says at `now`; `last_output` is when output last went to the control
    /// plane (output counts as activity, like input). The session being idle is an ending
    /// and wins over a dead link, which only waits for a redial.
    pub fn on_time(&mut self, now: Instant, last_output: Instant) -> Action {
        if self.idle_since(last_output) + self.idle_timeout <= now {
            return Action::End(LinkEnd::Over(format!(
                "idle for {} s",
                self.idle_timeout.as_secs()
            )));
        }
        if self.last_heard + LINK_DEAD_AFTER <= now {
            return Action::End(LinkEnd::Lost(format!(
                "no frame from the control plane for {} s",
                LINK_DEAD_AFTER.as_secs()
            )));
        }
        match self.debounce.due(now) {
            Some(size) => Action::Resize(size),
            None => Action::Nothing,
        }
    }

    /// When [`Live::on_time`] has something to say next, if nothing arrives before.
    pub fn wake_at(&self, last_output: Instant) -> Instant {
        let idle_at = self.idle_since(last_output) + self.idle_timeout;
        let dead_at = self.last_heard + LINK_DEAD_AFTER;
        let mut at = idle_at.min(dead_at);
        if let Some(resize_at) = self.debounce.deadline() {
            at = at.min(resize_at);
        }
        at
    }

    fn idle_since(&self, last_output: Instant) -> Instant {
        self.last_input.max(last_output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(600);

    fn text(msg: &TerminalToAgent) -> Inbound {
        Inbound::Text(serde_json::to_string(msg).expect("json"))
    }

    #[test]
    fn before_start_a_ping_is_answered_a_close_ends_and_start_attaches() {
        assert_eq!(before_start(text(&TerminalToAgent::Ping)), Waiting::Pong);
        assert_eq!(
            before_start(text(&TerminalToAgent::Close {
                reason: "closed by alice".into()
            })),
            Waiting::End(LinkEnd::Over("closed by alice".into()))
        );
        assert_eq!(
            before_start(text(&TerminalToAgent::Start {
                cols: 100,
                rows: 30,
                from: 7
            })),
            Waiting::Start {
                size: PtySize::clamped(100, 30),
                from: 7
            }
        );
        assert_eq!(
            before_start(Inbound::Binary(b"ls\n".to_vec())),
            Waiting::Ignore
        );
        assert_eq!(before_start(Inbound::Text("{".into())), Waiting::Ignore);
        assert!(matches!(
            before_start(Inbound::Closed),
            Waiting::End(LinkEnd::Lost(_))
        ));
    }

    #[test]
    fn input_is_written_once_and_a_replayed_number_is_dropped() {
        let t0 = Instant::now();
        let mut live = Live::new(t0, IDLE);
        let mut gate = SeqGate::default();
        assert_eq!(
            live.on_frame(t0, &mut gate, text(&TerminalToAgent::Seq { n: 1 })),
            Action::Nothing
        );
        assert_eq!(
            live.on_frame(t0, &mut gate, Inbound::Binary(b"select 1;\n".to_vec())),
            Action::Write(b"select 1;\n".to_vec())
        );
        live.on_frame(t0, &mut gate, text(&TerminalToAgent::Seq { n: 1 }));
        assert_eq!(
            live.on_frame(t0, &mut gate, Inbound::Binary(b"select 1;\n".to_vec())),
            Action::Nothing,
            "the same number again is a replay"
        );
        live.on_frame(t0, &mut gate, text(&TerminalToAgent::Seq { n: 1 }));
        assert_eq!(
            live.on_frame(
                t0,
                &mut gate,
                text(&TerminalToAgent::Close {
                    reason: "replayed close".into()
                })
            ),
            Action::Nothing,
            "a replayed close does not end the session"
        );
    }

    /// The control plane pings every 5 s from `from` to `to` (pings are not activity).
    fn ping_until(live: &mut Live, gate: &mut SeqGate, from: Instant, to: Instant) {
        let mut now = from;
        while now < to {
            now += Duration::from_secs(5);
            assert_eq!(
                live.on_frame(now, gate, text(&TerminalToAgent::Ping)),
                Action::Pong
            );
        }
    }

    #[test]
    fn output_keeps_a_session_from_going_idle_and_silence_both_ways_ends_it() {
        let t0 = Instant::now();
        let mut live = Live::new(t0, IDLE);
        let mut gate = SeqGate::default();
        ping_until(&mut live, &mut gate, t0, t0 + IDLE);
        // Output went out a minute before the deadline: not idle yet.
        let last_output = t0 + IDLE - Duration::from_secs(60);
        assert_eq!(live.on_time(t0 + IDLE, last_output), Action::Nothing);
        // Input counts too.
        let typed = t0 + IDLE;
        assert_eq!(
            live.on_frame(typed, &mut gate, Inbound::Binary(b"\n".to_vec())),
            Action::Write(b"\n".to_vec())
        );
        ping_until(&mut live, &mut gate, typed, typed + IDLE);
        assert_eq!(
            live.on_time(last_output + IDLE, last_output),
            Action::Nothing
        );
        assert_eq!(
            live.on_time(typed + IDLE, last_output),
            Action::End(LinkEnd::Over("idle for 600 s".into()))
        );
    }

    #[test]
    fn no_frame_for_twenty_seconds_loses_the_link_not_the_session() {
        let t0 = Instant::now();
        let mut live = Live::new(t0, IDLE);
        let mut gate = SeqGate::default();
        assert_eq!(live.wake_at(t0), t0 + LINK_DEAD_AFTER);
        assert_eq!(
            live.on_time(t0 + LINK_DEAD_AFTER - Duration::from_millis(1), t0),
            Action::Nothing
        );
        live.on_frame(t0 + Duration::from_secs(19), &mut gate, Inbound::Other);
        assert_eq!(
            live.on_time(t0 + LINK_DEAD_AFTER, t0),
            Action::Nothing,
            "a pong counts"
        );
        assert!(matches!(
            live.on_time(t0 + Duration::from_secs(39), t0),
            Action::End(LinkEnd::Lost(_))
        ));
    }

    #[test]
    fn idle_wins_over_a_dead_link_when_both_are_due() {
        let t0 = Instant::now();
        let mut live = Live::new(t0, Duration::from_secs(10));
        assert_eq!(
            live.on_time(t0 + Duration::from_secs(30), t0),
            Action::End(LinkEnd::Over("idle for 10 s".into()))
        );
    }

    #[test]
    fn resizes_close_together_collapse_into_the_last() {
        let t0 = Instant::now();
        let mut live = Live::new(t0, IDLE);
        let mut gate = SeqGate::default();
        let resize = |cols, rows| text(&TerminalToAgent::Resize { cols, rows });
        assert_eq!(
            live.on_frame(t0, &mut gate, resize(80, 24)),
            Action::Nothing
        );
        let t1 = t0 + Duration::from_millis(30);
        assert_eq!(
            live.on_frame(t1, &mut gate, resize(120, 40)),
            Action::Nothing
        );
        assert_eq!(live.wake_at(t0), t1 + RESIZE_DEBOUNCE);
        assert_eq!(live.on_time(t0 + RESIZE_DEBOUNCE, t0), Action::Nothing);
        assert_eq!(
            live.on_time(t1 + RESIZE_DEBOUNCE, t0),
            Action::Resize(PtySize::clamped(120, 40))
        );
        assert_eq!(live.on_time(t1 + RESIZE_DEBOUNCE * 2, t0), Action::Nothing);
    }

    #[test]
    fn a_close_ends_the_session_and_a_closed_socket_only_the_link() {
        let t0 = Instant::now();
        let mut live = Live::new(t0, IDLE);
        let mut gate = SeqGate::default();
        assert_eq!(
            live.on_frame(
                t0,
                &mut gate,
                text(&TerminalToAgent::Close {
                    reason: "closed by alice".into()
                })
            ),
            Action::End(LinkEnd::Over("closed by alice".into()))
        );
        assert!(matches!(
            live.on_frame(t0, &mut gate, Inbound::Closed),
            Action::End(LinkEnd::Lost(_))
        ));
    }

    #[test]
    fn a_resize_storm_collapses_into_the_last_size() {
        let t0 = Instant::now();
        let mut d = Debounce::default();
        for i in 0..50u16 {
            d.push(
                t0 + RESIZE_DEBOUNCE / 10 * u32::from(i),
                PtySize::clamped(80 + i, 24),
            );
            assert_eq!(d.due(t0 + RESIZE_DEBOUNCE / 10 * u32::from(i)), None);
        }
        let last = t0 + RESIZE_DEBOUNCE / 10 * 49;
        assert_eq!(
            d.due(last + RESIZE_DEBOUNCE),
            Some(PtySize::clamped(129, 24))
        );
        assert_eq!(d.due(last + RESIZE_DEBOUNCE * 2), None);
    }
}
