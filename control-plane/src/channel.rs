//! The agent control channel: one WebSocket per agent, dialed by the agent.
//!
//! Per connection: hello → version negotiation → welcome, then heartbeats (each acked),
//! commands out and acks back. Liveness is explicit: a channel that delivers no frame for
//! `dead_after` is closed (TCP alone never notices a half-open link). A newer connection of
//! the same agent replaces an older one, so an agent never has two live channels in this
//! replica, and storage records which connection holds it (`connection_id`), so a late close
//! of the old one cannot mark the agent offline.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use proto::{AgentMessage, Command, CommandResult, ErrorCode, ServerMessage, WireError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use world::World;

use crate::auth;
use crate::edge::AuthAgent;
use crate::heartbeats::{Heartbeats, Held};
use crate::observe::Observed;
use crate::settings::Settings;
use crate::storage::{AgentRow, SeenRow, Storage};

/// The channel socket's read buffer (frames are small: heartbeats, acks, task events).
const CHANNEL_READ_BUFFER_BYTES: usize = 4096;
/// Commands waiting to be written to one channel.
const COMMANDS_QUEUED_MAX: usize = 64;
/// Commands written and not yet acked on one channel.
const COMMANDS_IN_FLIGHT_MAX: usize = 64;
/// Undecodable frames tolerated on one connection before it is closed.
const MALFORMED_FRAMES_MAX: u32 = 16;

type Reply = oneshot::Sender<Result<CommandResult, WireError>>;

struct Outbound {
    command: Command,
    reply: Reply,
}

struct ChannelHandle {
    connection_id: String,
    commands: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
}

/// What a control channel uses.
#[derive(Clone)]
pub struct ChannelContext {
    pub world: World,
    pub storage: Storage,
    pub channels: Channels,
    pub settings: Arc<Settings>,
    pub shutdown: CancellationToken,
    pub observed: Arc<Observed>,
    pub audit: crate::audit::Audit,
}

/// Live agent channels held by this replica.
#[derive(Clone, Default)]
pub struct Channels {
    inner: Arc<Mutex<BTreeMap<String, ChannelHandle>>>,
    next_command_id: Arc<AtomicU64>,
    /// Heartbeats' storage writes, batched for the whole replica.
    heartbeats: Heartbeats,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("agent is not connected to this control plane")]
    NotConnected,
    #[error("agent has too many commands queued")]
    Busy,
    #[error("agent channel closed before the command was answered")]
    Closed,
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("agent refused the command: {}", .0.message)]
    Refused(WireError),
}

impl Channels {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ChannelHandle>> {
        // The map holds no invariant a panicking holder could break halfway.
        match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Install `handle` for `agent_id`, cancelling the connection it replaces.
    fn register(&self, agent_id: &str, handle: ChannelHandle) {
        if let Some(old) = self.lock().insert(agent_id.to_string(), handle) {
            tracing::info!(agent_id, old_connection = %old.connection_id, "channel replaced by a newer connection");
            old.cancel.cancel();
        }
    }

    fn unregister(&self, agent_id: &str, connection_id: &str) {
        let mut map = self.lock();
        if map
            .get(agent_id)
            .is_some_and(|h| h.connection_id == connection_id)
        {
            map.remove(agent_id);
        }
    }

    /// Agent ids with a live channel on this replica, in order.
    pub fn connected(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Whether this replica holds a live channel of `agent_id` (one lookup, no list).
    pub fn holds(&self, agent_id: &str) -> bool {
        self.lock().contains_key(agent_id)
    }

    /// Send `command` to the agent and wait for its ack.
    pub async fn send_command(
        &self,
        agent_id: &str,
        command: Command,
        timeout: Duration,
    ) -> Result<CommandResult, CommandError> {
        let sender = self
            .lock()
            .get(agent_id)
            .map(|h| h.commands.clone())
            .ok_or(CommandError::NotConnected)?;
        let (reply, answer) = oneshot::channel();
        sender
            .try_send(Outbound { command, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => CommandError::Busy,
                mpsc::error::TrySendError::Closed(_) => CommandError::Closed,
            })?;
        match tokio::time::timeout(timeout, answer).await {
            Err(_) => Err(CommandError::Timeout(timeout)),
            Ok(Err(_)) => Err(CommandError::Closed),
            Ok(Ok(Err(wire))) => Err(CommandError::Refused(wire)),
            Ok(Ok(Ok(result))) => Ok(result),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_command_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

pub async fn upgrade(
    State(state): State<ChannelContext>,
    Extension(AuthAgent(agent)): Extension<AuthAgent>,
    ws: WebSocketUpgrade,
) -> Response {
    let span = tracing::info_span!("channel", agent_id = %agent.id);
    // Every agent holds its channel open: a small read buffer (it grows for a large frame)
    // instead of the default 128 KiB each is what lets one replica hold a fleet.
    ws.max_message_size(proto::FRAME_BYTES_MAX)
        .max_frame_size(proto::FRAME_BYTES_MAX)
        .read_buffer_size(CHANNEL_READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .on_upgrade(move |socket| run(state, agent, socket).instrument(span))
}

/// Frames an agent may send per second on average, and in a burst. Beyond it the channel
/// stops reading for a moment (backpressure on the agent's socket), so a flooding agent costs
/// the control plane at most this many storage writes per second.
const FRAMES_PER_S: f64 = 20.0;
const FRAMES_BURST: f64 = 200.0;

/// A token bucket over one channel's incoming frames (sans-IO: the caller passes the time).
struct FrameBudget {
    tokens: f64,
    at: tokio::time::Instant,
}

impl FrameBudget {
    fn new(now: tokio::time::Instant) -> FrameBudget {
        FrameBudget {
            tokens: FRAMES_BURST,
            at: now,
        }
    }

    /// Spend one frame at `now`; how long to wait before handling it.
    fn take(&mut self, now: tokio::time::Instant) -> std::time::Duration {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * FRAMES_PER_S;
        self.tokens = (self.tokens + earned).min(FRAMES_BURST) - 1.0;
        self.at = now;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / FRAMES_PER_S)
        }
    }
}

/// Why a channel ended (logged once, here).
enum End {
    Shutdown,
    Replaced,
    /// An admin removed the agent: its credential is gone.
    Removed,
    Dead,
    ClosedByAgent,
    Transport(String),
    Protocol(String),
    Storage(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Shutdown => f.write_str("control plane shutting down"),
            End::Replaced => f.write_str("replaced by a newer connection"),
            End::Removed => f.write_str("the agent was removed"),
            End::Dead => f.write_str("no frame within the dead deadline"),
            End::ClosedByAgent => f.write_str("closed by the agent"),
            End::Transport(e) => write!(f, "transport error: {e}"),
            End::Protocol(e) => write!(f, "protocol error: {e}"),
            End::Storage(e) => write!(f, "storage error: {e}"),
        }
    }
}

struct Conn {
    socket: WebSocket,
    send_timeout: Duration,
}

impl Conn {
    async fn send(&mut self, msg: &ServerMessage) -> Result<(), End> {
        let text = serde_json::to_string(msg).map_err(|e| End::Protocol(e.to_string()))?;
        match tokio::time::timeout(
            self.send_timeout,
            self.socket.send(Message::Text(text.into())),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Transport(e.to_string())),
            Err(_) => Err(End::Dead),
        }
    }

    async fn close(&mut self, reason: &str) {
        let frame = CloseFrame {
            code: 1000,
            reason: reason.to_string().into(),
        };
        let _ = tokio::time::timeout(
            self.send_timeout,
            self.socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

async fn run(state: ChannelContext, agent: AgentRow, socket: WebSocket) {
    let dead_after = state.settings.dead_after;
    let mut conn = Conn {
        socket,
        send_timeout: dead_after,
    };
    let (version, hostname, labels) = match await_hello(&mut conn, dead_after).await {
        Ok(v) => v,
        Err(end) => {
            tracing::info!(%end, "channel refused before welcome");
            conn.close("handshake failed").await;
            return;
        }
    };
    if !labels.is_empty() {
        config_labels(&state, &agent, labels).await;
    }
    let connection_id = auth::new_id(&state.world, "conn");
    let cancel = state.shutdown.child_token();
    let (commands, mut queue) = mpsc::channel(COMMANDS_QUEUED_MAX);
    state.channels.register(
        &agent.id,
        ChannelHandle {
            connection_id: connection_id.clone(),
            commands,
            cancel: cancel.clone(),
        },
    );
    tracing::info!(connection_id = %connection_id, version, hostname = ?hostname, "agent connected");
    let end = serve_connection(
        &state,
        &agent,
        &connection_id,
        version,
        &cancel,
        &mut conn,
        &mut queue,
    )
    .await;
    match &end {
        End::Replaced => {
            let msg = ServerMessage::Error(WireError::new(
                ErrorCode::Replaced,
                "a newer connection of this agent took over",
            ));
            let _ = conn.send(&msg).await;
            conn.close("replaced").await;
        }
        End::Removed => {
            let msg = ServerMessage::Error(WireError::new(
                ErrorCode::Refused,
                "this agent was removed from the control plane; enroll it again to bring it back",
            ));
            let _ = conn.send(&msg).await;
            conn.close("removed").await;
        }
        End::Shutdown => conn.close("control plane shutting down").await,
        End::Dead | End::ClosedByAgent | End::Transport(_) => {}
        End::Protocol(_) | End::Storage(_) => conn.close("error").await,
    }
    state.channels.unregister(&agent.id, &connection_id);
    let now_ms = state.world.now_unix_ms();
    if let Err(error) = state
        .storage
        .agent_disconnected(&agent.id, &connection_id, now_ms)
        .await
    {
        tracing::warn!(%error, "record agent disconnect");
    }
    tracing::info!(connection_id = %connection_id, %end, "agent disconnected");
}

async fn next_text(conn: &mut Conn) -> Result<String, End> {
    loop {
        match conn.socket.recv().await {
            None => return Err(End::ClosedByAgent),
            Some(Err(e)) => return Err(End::Transport(e.to_string())),
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Close(_))) => return Err(End::ClosedByAgent),
            Some(Ok(_)) => continue,
        }
    }
}

/// What a hello tells: the protocol version agreed, the agent's host name and its config's
/// labels.
type Hello = (u32, String, BTreeMap<String, String>);

async fn await_hello(conn: &mut Conn, deadline: Duration) -> Result<Hello, End> {
    let text = tokio::time::timeout(deadline, next_text(conn))
        .await
        .map_err(|_| End::Dead)??;
    match serde_json::from_str::<AgentMessage>(&text) {
        Ok(AgentMessage::Hello {
            protocol_min,
            protocol_max,
            hostname,
            labels,
            ..
        }) => match proto::negotiate(
            (proto::PROTOCOL_MIN, proto::PROTOCOL_MAX),
            (protocol_min, protocol_max),
        ) {
            Some(version) => Ok((version, hostname, labels)),
            None => {
                let msg = format!(
                    "agent speaks protocol {protocol_min}..={protocol_max}, control plane {}..={}; upgrade the older side",
                    proto::PROTOCOL_MIN,
                    proto::PROTOCOL_MAX
                );
                conn.send(&ServerMessage::Error(WireError::new(
                    ErrorCode::UnsupportedVersion,
                    msg.clone(),
                )))
                .await?;
                Err(End::Protocol(msg))
            }
        },
        _ => {
            let msg = "the first frame must be a hello";
            conn.send(&ServerMessage::Error(WireError::new(
                ErrorCode::ProtocolViolation,
                msg,
            )))
            .await?;
            Err(End::Protocol(msg.into()))
        }
    }
}

/// The agent's config labels win over its stored ones for the keys they name (an admin
/// changes the others); stored when that changes anything. A bad set is logged and ignored
/// (the agent checks its config with the same rule, so only a hand-made client sends one).
async fn config_labels(
    state: &ChannelContext,
    agent: &AgentRow,
    from_config: crate::labels::Labels,
) {
    if let Err(e) = crate::labels::validate(&from_config) {
        tracing::warn!(agent_id = %agent.id, error = %e, "labels in the agent's hello ignored");
        return;
    }
    let stored = crate::labels::of(agent.labels.as_deref());
    let mut merged = stored.clone();
    merged.extend(from_config);
    if merged == stored {
        return;
    }
    if let Err(e) = crate::labels::validate(&merged) {
        tracing::warn!(agent_id = %agent.id, error = %e, "labels in the agent's hello ignored");
        return;
    }
    let json = serde_json::to_string(&merged).unwrap_or_default();
    match state.storage.set_agent_labels(&agent.id, Some(json)).await {
        Ok(_) => {
            state
                .audit
                .record(
                    &format!("agent:{}", agent.name),
                    crate::audit::action::AGENT_LABELED,
                    &agent.id,
                    serde_json::json!({"labels": merged, "from": "agent config"}),
                )
                .await;
        }
        Err(e) => {
            tracing::warn!(agent_id = %agent.id, error = %e, "the agent's config labels were not stored");
        }
    }
}

/// The oldest batched write's answer (pending forever when none is waiting).
async fn oldest(written: &mut VecDeque<oneshot::Receiver<Held>>) -> Option<Held> {
    let answer = match written.front_mut() {
        Some(receiver) => receiver.await.ok(),
        None => std::future::pending().await,
    };
    written.pop_front();
    answer
}

/// This connection no longer holds its agent in storage: another replica's connection took
/// over, or an admin removed the agent.
async fn replaced_or_removed(state: &ChannelContext, agent: &AgentRow) -> End {
    match state.storage.agent(&agent.id).await {
        Ok(None) => End::Removed,
        _ => End::Replaced,
    }
}

/// One connection's state between frames.
#[derive(Default)]
struct Served {
    /// Storage learned of the connection (at the first heartbeat: the agent sends it only
    /// after it has the welcome, so "online" is never shown for a handshake that did not
    /// complete).
    recorded: bool,
    /// Commands sent and not answered yet, by id.
    in_flight: BTreeMap<u64, Reply>,
    malformed: u32,
    /// Answers of batched heartbeat writes, oldest first.
    written: VecDeque<oneshot::Receiver<Held>>,
}

async fn serve_connection(
    state: &ChannelContext,
    agent: &AgentRow,
    connection_id: &str,
    version: u32,
    cancel: &CancellationToken,
    conn: &mut Conn,
    queue: &mut mpsc::Receiver<Outbound>,
) -> End {
    let settings = &state.settings;
    let welcome = ServerMessage::Welcome {
        protocol_version: version,
        agent_id: agent.id.clone(),
        heartbeat_interval_ms: u64::try_from(settings.heartbeat_interval.as_millis())
            .unwrap_or(u64::MAX),
        dead_after_ms: u64::try_from(settings.dead_after.as_millis()).unwrap_or(u64::MAX),
    };
    if let Err(end) = conn.send(&welcome).await {
        return end;
    }
    let mut last_heard = tokio::time::Instant::now();
    let mut served = Served::default();
    let mut budget = FrameBudget::new(tokio::time::Instant::now());
    loop {
        let deadline = last_heard + settings.dead_after;
        tokio::select! {
            Some(held) = oldest(&mut served.written) => match held {
                Ok(true) => {}
                // Another replica's connection took over in storage, or an admin removed the
                // agent.
                Ok(false) => return replaced_or_removed(state, agent).await,
                Err(e) => return End::Storage(e),
            },
            _ = cancel.cancelled() => {
                return if state.shutdown.is_cancelled() { End::Shutdown } else { End::Replaced };
            }
            _ = tokio::time::sleep_until(deadline) => return End::Dead,
            Some(out) = queue.recv() => {
                if served.in_flight.len() >= COMMANDS_IN_FLIGHT_MAX {
                    let _ = out.reply.send(Err(WireError::new(ErrorCode::Other, "too many commands in flight")));
                    continue;
                }
                let id = state.channels.next_id();
                served.in_flight.insert(id, out.reply);
                if let Err(end) = conn.send(&ServerMessage::Command { id, command: out.command }).await {
                    return end;
                }
            }
            frame = conn.socket.recv() => {
                let text = match frame {
                    None => return End::ClosedByAgent,
                    Some(Err(e)) => return End::Transport(e.to_string()),
                    Some(Ok(Message::Close(_))) => return End::ClosedByAgent,
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => { last_heard = tokio::time::Instant::now(); continue; }
                };
                last_heard = tokio::time::Instant::now();
                let wait = budget.take(last_heard);
                if !wait.is_zero() {
                    crate::observe::add(&state.observed.agent_frames_throttled_total, 1);
                    tokio::time::sleep(wait).await;
                }
                let reply = match answer(state, agent, connection_id, &mut served, &text).await {
                    Ok(reply) => reply,
                    Err(end) => return end,
                };
                if let Some(reply) = reply
                    && let Err(end) = conn.send(&reply).await
                {
                    return end;
                }
            }
        }
    }
}

/// What to answer to one text frame from the agent, or why the connection ends.
async fn answer(
    state: &ChannelContext,
    agent: &AgentRow,
    connection_id: &str,
    served: &mut Served,
    text: &str,
) -> Result<Option<ServerMessage>, End> {
    let message = match serde_json::from_str::<AgentMessage>(text) {
        Ok(message) => message,
        Err(e) => {
            served.malformed += 1;
            if served.malformed > MALFORMED_FRAMES_MAX {
                return Err(End::Protocol(format!(
                    "more than {MALFORMED_FRAMES_MAX} malformed frames"
                )));
            }
            return Ok(Some(ServerMessage::Error(WireError::new(
                ErrorCode::Malformed,
                e.to_string(),
            ))));
        }
    };
    match message {
        AgentMessage::Heartbeat { seq, buffer, .. } => {
            let buffer = buffer.and_then(|b| serde_json::to_string(&b).ok());
            heartbeat(state, agent, connection_id, served, seq, buffer)
                .await
                .map(Some)
        }
        AgentMessage::CommandAck {
            id,
            ok,
            result,
            error,
        } => {
            if let Some(reply) = served.in_flight.remove(&id) {
                let answer =
                    match (ok, result) {
                        (true, Some(result)) => Ok(result),
                        _ => Err(error
                            .unwrap_or_else(|| WireError::new(ErrorCode::Other, "command failed"))),
                    };
                let _ = reply.send(answer);
            }
            Ok(None)
        }
        AgentMessage::TaskEvents { events } => task_events(state, agent, events).await,
        AgentMessage::Error(error) => {
            tracing::warn!(code = ?error.code, message = %error.message, "agent reported an error");
            Ok(None)
        }
        AgentMessage::Hello { .. } => Ok(Some(ServerMessage::Error(WireError::new(
            ErrorCode::ProtocolViolation,
            "hello may only be sent once per connection",
        )))),
        AgentMessage::Unknown => Ok(Some(ServerMessage::Error(WireError::new(
            ErrorCode::UnknownMessage,
            "unknown message type; ignored",
        )))),
    }
}

/// A heartbeat: the first claims the agent for this connection before it is acked; later ones
/// join the replica's next batched write.
async fn heartbeat(
    state: &ChannelContext,
    agent: &AgentRow,
    connection_id: &str,
    served: &mut Served,
    seq: u64,
    buffer: Option<String>,
) -> Result<ServerMessage, End> {
    let interval = state.settings.heartbeat_interval;
    let now_ms = state.world.now_unix_ms();
    let row = SeenRow {
        agent_id: agent.id.clone(),
        connection_id: connection_id.to_string(),
        now_ms,
        buffer,
    };
    let queued = match served.recorded {
        true => state
            .channels
            .heartbeats
            .seen(&state.storage, interval, row.clone()),
        false => None,
    };
    let stored = match queued {
        Some(answer) => {
            served.written.push_back(answer);
            Ok(true)
        }
        None if served.recorded => {
            state
                .storage
                .agent_seen(&row.agent_id, connection_id, now_ms, row.buffer)
                .await
        }
        None => {
            let claimed = state
                .storage
                .agent_connected(&agent.id, connection_id, now_ms)
                .await;
            // The claim stores no figures: the first heartbeat's go to the next batch, so the
            // fleet page has them a flush later.
            if claimed.is_ok()
                && row.buffer.is_some()
                && let Some(answer) = state
                    .channels
                    .heartbeats
                    .seen(&state.storage, interval, row)
            {
                served.written.push_back(answer);
            }
            claimed.map(|()| true)
        }
    };
    match stored {
        Ok(true) => {
            served.recorded = true;
            Ok(ServerMessage::HeartbeatAck {
                seq,
                server_time_ms: now_ms,
            })
        }
        Ok(false) => Err(replaced_or_removed(state, agent).await),
        Err(e) => Err(End::Storage(e.to_string())),
    }
}

/// Task events: stored before the ack, since the agent forgets what it sees acked.
async fn task_events(
    state: &ChannelContext,
    agent: &AgentRow,
    events: Vec<proto::TaskEvent>,
) -> Result<Option<ServerMessage>, End> {
    let Some(upto_seq) = events.iter().map(|e| e.seq).max() else {
        return Ok(None);
    };
    let mut rows = Vec::with_capacity(events.len());
    for event in &events {
        state.observed.task_event(&event.task.status);
    }
    for event in &events {
        match crate::storage::TaskRecord::of(&event.task) {
            Ok(record) => rows.push(record),
            Err(e) => return Err(End::Protocol(e.to_string())),
        }
    }
    let now_ms = state.world.now_unix_ms();
    match state
        .storage
        .upsert_agent_tasks(&agent.id, rows, now_ms)
        .await
    {
        Ok(()) => Ok(Some(ServerMessage::TaskEventsAck { upto_seq })),
        Err(e) => Err(End::Storage(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::{FRAMES_BURST, FRAMES_PER_S, FrameBudget};
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_frames_wait_their_turn() {
        let t0 = tokio::time::Instant::now();
        let mut budget = FrameBudget::new(t0);
        for _ in 0..FRAMES_BURST as usize {
            assert_eq!(budget.take(t0), Duration::ZERO);
        }
        let wait = budget.take(t0);
        assert!(
            (wait.as_secs_f64() - 1.0 / FRAMES_PER_S).abs() < 1e-9,
            "{wait:?}"
        );
        // A second later the agent has earned FRAMES_PER_S frames (minus the one it owed).
        let later = t0 + Duration::from_secs(1);
        for _ in 0..(FRAMES_PER_S as usize - 1) {
            assert_eq!(budget.take(later), Duration::ZERO);
        }
        assert!(budget.take(later) > Duration::ZERO);
        // Quiet for long enough refills the burst, never beyond it.
        let rested = later + Duration::from_secs(3600);
        for _ in 0..FRAMES_BURST as usize {
            assert_eq!(budget.take(rested), Duration::ZERO);
        }
        assert!(budget.take(rested) > Duration::ZERO);
    }
}
