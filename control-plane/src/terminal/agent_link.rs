//! The agent side: the reverse WebSocket an agent dials for one session. PTY lifecycle and
//! infrastructure errors live here; users and browsers do not (see `browser`).
//!
//! Output frames are appended to the session's output stream at the agent's byte offsets. A
//! store write that fails is retried and no further frame is read meanwhile: the agent's
//! output ring absorbs the backlog (overwriting and announcing `skipped`), so the PTY keeps
//! running and this process holds at most one batch ([`BATCH_ENTRIES_MAX`] frames) per
//! session.

use std::time::Duration;

use axum::Extension;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::stream::SplitSink;
use futures_util::{FutureExt, SinkExt, StreamExt};
use proto::terminal::{Cursor, Entry, Frame, InputGate};
use proto::{TerminalFromAgent, TerminalToAgent};
use tokio::time::Instant;
use tracing::Instrument;

use super::TerminalContext;
use super::core::{self, Attach, Forward, Forwarded, ToAgent, Waiting};
use super::recording::{Recorder, Summary};
use super::{MetaPatch, OutEntry, SessionState, Streams, TerminalCounters};
use crate::edge::{ApiError, AuthAgent};

/// Largest frame accepted from an agent (a chunk plus its offset header).
const AGENT_FRAME_BYTES_MAX: usize = proto::TERMINAL_CHUNK_BYTES_MAX + 1024;
/// Ping the agent this often; it answers with `pong`.
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// No frame from the agent for this long: the link is dead.
const DEAD_AFTER: Duration = Duration::from_secs(20);
/// A send to the agent that takes longer than this ends the link.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an input read waits (it also paces pings).
const INPUT_BLOCK: Duration = Duration::from_millis(1000);
/// Output frames written to the store in one round trip at most.
const BATCH_ENTRIES_MAX: usize = 64;
/// Retry pause for store writes; doubles up to the max.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// `GET /api/v1/agent/terminal/{id}` (agent credential).
pub async fn upgrade(
    State(state): State<TerminalContext>,
    Extension(AuthAgent(agent)): Extension<AuthAgent>,
    Path(session_id): Path<String>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // The agent's credential proves the host; the link secret (sent to the agent process over
    // its control channel, never to psql) proves the process. Another process on the host
    // that read the credential and the session id is refused, and the attempt is audited.
    let shown = headers
        .get(proto::LINK_SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !state
        .terminal
        .streams
        .link_secret_matches(&session_id, shown)
    {
        tracing::warn!(%session_id, agent_id = %agent.id, "terminal link dialed without the session's link secret: refused");
        state
            .audit
            .record(
                &format!("agent:{}", agent.name),
                crate::audit::action::TERMINAL_LINK_REFUSED,
                &session_id,
                serde_json::json!({
                    "agent_id": agent.id,
                    "reason": if shown.is_empty() { "no link secret" } else { "wrong link secret" },
                }),
            )
            .await;
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "this terminal link needs the session's link secret, which only the agent process that opened it holds",
        )
        .into_response();
    }
    let meta = match state.terminal.streams.meta(&session_id).await {
        Ok(Some(meta)) if meta.agent_id == agent.id => meta,
        Ok(_) => {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "no such terminal session for this agent",
            )
            .into_response();
        }
        Err(e) => {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
        }
    };
    if meta.state == SessionState::Closed {
        return ApiError::new(StatusCode::GONE, format!("session closed: {}", meta.reason))
            .into_response();
    }
    let span =
        tracing::info_span!("terminal_agent", session_id = %session_id, agent_id = %agent.id);
    ws.max_message_size(AGENT_FRAME_BYTES_MAX)
        .max_frame_size(AGENT_FRAME_BYTES_MAX)
        .on_upgrade(move |socket| {
            async move { run(state, session_id, socket).await }.instrument(span)
        })
}

type Sink = SplitSink<WebSocket, Message>;

async fn send(sink: &mut Sink, msg: &TerminalToAgent) -> Result<(), String> {
    let text = serde_json::to_string(msg).map_err(|e| e.to_string())?;
    send_message(sink, Message::Text(text.into())).await
}

async fn send_message(sink: &mut Sink, message: Message) -> Result<(), String> {
    match tokio::time::timeout(SEND_TIMEOUT, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("send: {e}")),
        Err(_) => Err("the agent did not take a frame in time".into()),
    }
}

/// Retry a store write until it lands (its result) or shutdown (`None`).
async fn until_stored<T, F, Fut>(state: &TerminalContext, mut write: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, super::StreamsError>>,
{
    let mut pause = RETRY_MIN;
    let mut failures = 0u64;
    loop {
        match write().await {
            Ok(written) => {
                if failures > 0 {
                    tracing::info!(
                        failures,
                        "terminal store is back; session no longer degraded"
                    );
                }
                return Some(written);
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(error = %e, "terminal store write failed; session degraded, PTY keeps running");
                }
                failures += 1;
                TerminalCounters::add(&state.terminal.counters.store_failures_total, 1);
            }
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return None,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// What ended a link.
enum End {
    /// The link died; the agent keeps the PTY for its reconnect window.
    Lost(String),
    /// psql ended: everything before the close is stored; the close itself is stored once
    /// the session is finished (outside the loops, so the input side ending the link in the
    /// meantime cannot cut that short).
    Closed {
        reason: String,
        close: Option<OutEntry>,
    },
}

async fn run(state: TerminalContext, session_id: String, socket: WebSocket) {
    let streams = state.terminal.streams.clone();
    let (mut sink, mut stream) = socket.split();
    let Some((meta, written_end)) = resume_point(&state, &session_id).await else {
        return;
    };
    let mut input_cursor = meta.input_cursor.clone();
    // Input numbers taken on this link: a copy or a re-read (a cursor set back) is not
    // forwarded twice.
    let mut gate = InputGate::default();
    tracing::info!(
        started = meta.started,
        output_end = written_end,
        "agent terminal link connected"
    );
    let start = if let Some(resume) = core::resume(meta.started, written_end) {
        resume
    } else {
        match wait_for_attach(&state, &session_id, &mut input_cursor, &mut gate, &mut sink).await {
            Attached::Core(Attach::Start(start)) => start,
            Attached::LinkGone => return,
            Attached::Core(Attach::Over(reason)) => {
                let close = TerminalToAgent::Close {
                    reason: reason.clone(),
                };
                let _ = send(&mut sink, &close).await;
                let recording = super::recording::close_out(&state, &session_id).await;
                finish(&state, &session_id, &reason, recording.as_ref()).await;
                return;
            }
        }
    };
    if let Err(e) = send(&mut sink, &start).await {
        tracing::info!(error = %e, "terminal link lost before start");
        return;
    }
    let now_ms = state.world.now_unix_ms();
    let cursor_now = input_cursor.clone();
    let _ = streams
        .update(
            &session_id,
            now_ms,
            MetaPatch {
                state: Some(SessionState::Live),
                started: Some(true),
                input_cursor: Some(cursor_now),
                recording: None,
            },
        )
        .await;
    tracing::info!(from = written_end, "terminal link attached");
    let recorder = Recorder::start(&state, &session_id);
    let recorder = recorder.as_ref();

    let end = tokio::select! {
        end = output_loop(&state, &streams, &session_id, written_end, &mut stream, recorder) => end,
        end = input_loop(&state, &streams, &session_id, (input_cursor, gate), &mut sink, recorder) => end,
        () = state.shutdown.cancelled() => End::Lost("control plane shutting down".into()),
    };
    link_ended(&state, &session_id, end, recorder).await;
}

/// The session's state and where its stored output ends: what a link resumes from. `None`
/// when the session is unknown (or the control plane stops while the store does not answer).
async fn resume_point(
    state: &TerminalContext,
    session_id: &str,
) -> Option<(super::SessionMeta, u64)> {
    let streams = &state.terminal.streams;
    loop {
        let meta = streams.meta(session_id).await;
        let end = streams.output_end(session_id).await;
        match (meta, end) {
            (Ok(Some(meta)), Ok(end)) => return Some((meta, end)),
            (Ok(None), _) => return None,
            _ => {
                if state.shutdown.is_cancelled() {
                    return None;
                }
                tokio::time::sleep(RETRY_MIN).await;
            }
        }
    }
}

/// How waiting for the first browser ended, for the link.
enum Attached {
    Core(Attach),
    /// The agent's link went away meanwhile.
    LinkGone,
}

/// No PTY exists before a browser attached: wait for its attach in the input stream (the
/// rules are [`Waiting`]'s), keeping the agent's link alive meanwhile.
async fn wait_for_attach(
    state: &TerminalContext,
    session_id: &str,
    input_cursor: &mut String,
    gate: &mut InputGate,
    sink: &mut Sink,
) -> Attached {
    let waiting = Waiting::new(Instant::now(), state.terminal.settings.attach_timeout);
    loop {
        let Some(read_for) = waiting.read_for(Instant::now(), INPUT_BLOCK) else {
            return Attached::Core(waiting.timed_out());
        };
        match state
            .terminal
            .streams
            .read_input(session_id, input_cursor, read_for)
            .await
        {
            Ok(events) => {
                let mut repeats = Vec::new();
                let attach = waiting.on_input(events, input_cursor, gate, &mut repeats);
                count_repeats(state, &repeats);
                if let Some(attach) = attach {
                    return Attached::Core(attach);
                }
            }
            Err(_) => tokio::time::sleep(RETRY_MIN).await,
        }
        if send(sink, &TerminalToAgent::Ping).await.is_err() {
            return Attached::LinkGone;
        }
    }
}

/// Record how the link ended: a finished session (its recording first, so the end record
/// carries its hash; then the close entry), or a lost link the agent may come back to.
async fn link_ended(
    state: &TerminalContext,
    session_id: &str,
    end: End,
    recorder: Option<&Recorder>,
) {
    let streams = &state.terminal.streams;
    match end {
        End::Closed { reason, close } => {
            let recording = match (&close, recorder) {
                (Some(close), Some(recorder)) => recorder.finish(close.clone()).await,
                _ => None,
            };
            finish(state, session_id, &reason, recording.as_ref()).await;
            if let Some(close) = close {
                let close = [close];
                let cap = state.terminal.settings.stream_bytes_max;
                let _ =
                    until_stored(state, || streams.append_output(session_id, &close, cap)).await;
            }
            tracing::info!(%reason, "terminal session over");
        }
        End::Lost(reason) => {
            tracing::info!(%reason, "terminal link lost; the agent may reattach");
            let now_ms = state.world.now_unix_ms();
            let _ = streams
                .update(
                    session_id,
                    now_ms,
                    MetaPatch::state(SessionState::Reconnecting),
                )
                .await;
        }
    }
}

async fn finish(
    state: &TerminalContext,
    session_id: &str,
    reason: &str,
    recording: Option<&Summary>,
) {
    let streams = &state.terminal.streams;
    let keep = state.terminal.settings.closed_keep;
    let meta = streams.meta(session_id).await.ok().flatten();
    let closed_now = until_stored(state, || {
        streams.finish(session_id, state.world.now_unix_ms(), reason, keep)
    })
    .await;
    // Only the caller that closed it records the end (the janitor may race this handler).
    if let Some(meta) = meta.filter(|_| closed_now == Some(true)) {
        let recording = recording.map(Summary::json).unwrap_or_default();
        super::audit_ended(state, session_id, &meta, reason, recording).await;
    }
}

/// Turn one agent frame into store entries, stitched at the store's end (resends cut, holes
/// announced); `Some(reason)` when the agent closed the session.
fn frame_entries(
    frame: Message,
    written: &mut Cursor,
    entries: &mut Vec<OutEntry>,
) -> Option<String> {
    let frame = match frame {
        Message::Binary(data) => Frame::Binary(data.into()),
        Message::Text(text) => Frame::Text(serde_json::from_str::<TerminalFromAgent>(&text).ok()?),
        _ => return None,
    };
    let entry = Entry::from_frame(frame)?;
    let reason = match &entry {
        Entry::Closed { reason, .. } => Some(reason.clone()),
        _ => None,
    };
    written.take(entry, entries);
    reason
}

/// Agent → store: output chunks at their offsets, skipped ranges, the close. Frames that
/// are already here when one arrives join its batch: one store round trip for all of them,
/// and never a wait for more (that would delay keystroke echo).
async fn output_loop(
    state: &TerminalContext,
    streams: &Streams,
    session_id: &str,
    written_end: u64,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    recorder: Option<&Recorder>,
) -> End {
    let cap = state.terminal.settings.stream_bytes_max;
    let mut entries: Vec<OutEntry> = Vec::new();
    let mut written = Cursor::new(written_end);
    loop {
        let frame = match tokio::time::timeout(DEAD_AFTER, stream.next()).await {
            Err(_) => {
                return End::Lost(format!(
                    "no frame from the agent for {} s",
                    DEAD_AFTER.as_secs()
                ));
            }
            Ok(None) | Ok(Some(Ok(Message::Close(_)))) => {
                return End::Lost("closed by the agent".into());
            }
            Ok(Some(Err(e))) => return End::Lost(format!("receive: {e}")),
            Ok(Some(Ok(frame))) => frame,
        };
        let mut closed = frame_entries(frame, &mut written, &mut entries);
        while closed.is_none() && entries.len() < BATCH_ENTRIES_MAX {
            match stream.next().now_or_never() {
                Some(Some(Ok(frame))) if !matches!(frame, Message::Close(_)) => {
                    closed = frame_entries(frame, &mut written, &mut entries);
                }
                // Nothing ready, or the link ended: store what we have; the next read says.
                _ => break,
            }
        }
        // The close is the last entry; it is stored after the record says closed, so whoever
        // reads the close and then asks for the session finds it closed.
        let close = match closed {
            Some(_) => entries.pop(),
            None => None,
        };
        if !entries.is_empty() {
            if until_stored(state, || streams.append_output(session_id, &entries, cap))
                .await
                .is_none()
            {
                return End::Lost("control plane shutting down".into());
            }
            match recorder {
                Some(recorder) => recorder.output(std::mem::take(&mut entries)),
                None => entries.clear(),
            }
        }
        if let Some(reason) = closed {
            return End::Closed { reason, close };
        }
    }
}

/// Input numbers already taken on this link (a copy, or a cursor set back): dropped, each
/// logged and counted.
fn count_repeats(state: &TerminalContext, repeats: &[u64]) {
    for &seq in repeats {
        TerminalCounters::add(&state.terminal.counters.input_replays_dropped_total, 1);
        tracing::warn!(
            seq,
            "terminal input entry already forwarded: dropped (a copy, or a cursor set back)"
        );
    }
}

/// Store → agent: keystrokes, resizes, close; pings while quiet (the rules are
/// [`Forward`]'s).
async fn input_loop(
    state: &TerminalContext,
    streams: &Streams,
    session_id: &str,
    (mut cursor, gate): (String, InputGate),
    sink: &mut Sink,
    recorder: Option<&Recorder>,
) -> End {
    let mut forward = Forward::new(gate, PING_INTERVAL, Instant::now());
    loop {
        match streams.read_input(session_id, &cursor, INPUT_BLOCK).await {
            Ok(events) if !events.is_empty() => {
                // At most once: a keystroke must never reach psql twice (a statement would run
                // twice), so the stored cursor moves past the batch before any of it is sent.
                // A link or replica lost mid-batch loses the rest of the batch instead.
                let last = events.last().map(|e| e.id.clone()).unwrap_or_default();
                if streams
                    .update(
                        session_id,
                        state.world.now_unix_ms(),
                        MetaPatch::input_cursor(last.clone()),
                    )
                    .await
                    .is_err()
                {
                    TerminalCounters::add(&state.terminal.counters.store_failures_total, 1);
                    tokio::time::sleep(RETRY_MIN).await;
                    continue;
                }
                cursor = last;
                let mut repeats = Vec::new();
                let forwarded = forward.on_input(events, &mut repeats);
                count_repeats(state, &repeats);
                for Forwarded { event, frames } in forwarded {
                    // Recorded once its number reached the agent, as the agent applies it.
                    for (i, frame) in frames.into_iter().enumerate() {
                        if let Err(e) = send_to_agent(sink, frame).await {
                            return End::Lost(e);
                        }
                        if let (0, Some(recorder)) = (i, recorder) {
                            recorder.input(&event);
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(_) => {
                TerminalCounters::add(&state.terminal.counters.store_failures_total, 1);
                tokio::time::sleep(RETRY_MIN).await;
            }
        }
        if let Some(ping) = forward.on_time(Instant::now())
            && let Err(e) = send_to_agent(sink, ping).await
        {
            return End::Lost(e);
        }
    }
}

async fn send_to_agent(sink: &mut Sink, frame: ToAgent) -> Result<(), String> {
    match frame {
        ToAgent::Frame(frame) => send(sink, &frame).await,
        ToAgent::Bytes(data) => send_message(sink, Message::Binary(data.into())).await,
    }
}
