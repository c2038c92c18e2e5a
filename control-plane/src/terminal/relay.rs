//! Background work of the terminal on every replica: carry open requests to the replica that
//! holds the agent's control channel (shared stores only), and close sessions nobody will
//! come back to (never attached, or their agent link stayed away past the grace).
//!
//! An open request goes into the `requests` stream; every replica's relay reads it, the one
//! holding the agent's channel asks the agent and writes the answer into the session's `reply`
//! stream, where the requester waits for it. The answer is typed ([`OpenRefusal`]), so a
//! refusal means the same on every replica.
//!
//! Any other agent command (task add and cancel from the API) takes the same path with its
//! JSON in the request ([`send_anywhere`]): behind a load balancer, the replica that takes an
//! API request is often not the one holding the agent's channel.

use std::time::Duration;

use proto::{CommandResult, ErrorCode};
use tokio::task::JoinSet;

use super::SessionState;
use super::TerminalContext;
use super::streams::RedisStreams;
use super::streams::redis::{field, fresh_for_id, global_key, key, text};
use crate::channel::CommandError;

/// How long one read of the request stream blocks.
const REQUESTS_BLOCK: Duration = Duration::from_secs(2);
/// How often sessions are checked for abandonment.
const JANITOR_INTERVAL: Duration = Duration::from_secs(5);
/// Open requests handled at once by one replica.
const OPENS_IN_FLIGHT_MAX: usize = 32;
/// Open requests kept in the stream (approximately).
const REQUESTS_KEPT: usize = 1000;
/// Open requests read at once.
const REQUESTS_READ_MAX: usize = 100;
/// How long an answer stays readable.
const REPLY_KEEP_S: u64 = 600;
/// How old a request may be when it is read (its signed time against this replica's clock);
/// a requester waits at most [`COMMAND_TIMEOUT`] plus 2 s for its answer.
const REQUEST_FRESH_MS: i64 = 30_000;
/// How long a request handled once is remembered, here and in Redis: past it, the request is
/// refused as stale anyway.
const REQUEST_ONCE_KEEP_MS: i64 = 4 * REQUEST_FRESH_MS;

/// A request to open a session on an agent whose control channel may be on another replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRequest {
    pub session_id: String,
    pub agent_id: String,
}

/// A relayed request as read from the stream: a terminal open, or another command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Relayed {
    Open(OpenRequest),
    Command {
        request_id: String,
        agent_id: String,
        /// JSON of a [`proto::Command`].
        command: String,
    },
}

/// Why an agent did not open a session: the same answer whether the agent's channel is on
/// this replica or another one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenRefusal {
    /// The agent is at its own session limit.
    #[error("{0}")]
    LimitReached(String),
    /// The agent answered, but not with an opened session.
    #[error("{0}")]
    BadAnswer(String),
    /// The agent could not be asked, or failed.
    #[error("{0}")]
    Failed(String),
}

impl OpenRefusal {
    fn code(&self) -> &'static str {
        match self {
            OpenRefusal::LimitReached(_) => "limit_reached",
            OpenRefusal::BadAnswer(_) => "bad_answer",
            OpenRefusal::Failed(_) => "failed",
        }
    }

    fn from_code(code: &str, message: String) -> OpenRefusal {
        match code {
            "limit_reached" => OpenRefusal::LimitReached(message),
            "bad_answer" => OpenRefusal::BadAnswer(message),
            _ => OpenRefusal::Failed(message),
        }
    }
}

/// What the agent's answer to `TerminalOpen` means: opened, and whether the agent asks for
/// keystrokes to be recorded.
pub fn open_answer(answer: Result<CommandResult, CommandError>) -> Result<bool, OpenRefusal> {
    match answer {
        Ok(CommandResult::TerminalOpened { record_input, .. }) => Ok(record_input),
        Ok(_) => Err(OpenRefusal::BadAnswer(
            "the agent answered with something else".into(),
        )),
        Err(CommandError::Refused(e)) if e.code == ErrorCode::LimitReached => {
            Err(OpenRefusal::LimitReached(e.message))
        }
        Err(e) => Err(OpenRefusal::Failed(e.to_string())),
    }
}

/// Ask whichever replica holds the agent's channel to open the session.
pub async fn request_open(
    redis: &RedisStreams,
    request: &OpenRequest,
) -> super::streams::Result<()> {
    add_request(redis, &request.session_id, &request.agent_id, None).await
}

/// Append a request for `agent_id` to the `requests` stream: a terminal open for session `id`,
/// or, with `command` (JSON), another command whose answer goes to `id`'s reply stream.
async fn add_request(
    redis: &RedisStreams,
    id: &str,
    agent_id: &str,
    command: Option<&str>,
) -> super::streams::Result<()> {
    let stream = global_key("requests");
    // The id is random (a session or request id) and, with the time, inside the MAC: a copy
    // is recognised by its id, and one added later by its time.
    let written_ms = redis.now_unix_ms().to_string();
    let mut fields: Vec<(&str, &[u8])> = vec![
        ("s", id.as_bytes()),
        ("a", agent_id.as_bytes()),
        ("t", written_ms.as_bytes()),
    ];
    if let Some(command) = command {
        fields.push(("c", command.as_bytes()));
    }
    redis.add_signed(&stream, REQUESTS_KEPT, &fields).await
}

/// Where a relay starts reading open requests: after the newest one already stored. (A
/// cursor of `$` would miss requests added between two reads.)
pub async fn requests_tail(redis: &RedisStreams) -> super::streams::Result<String> {
    let newest = redis.newest_id(&global_key("requests")).await?;
    Ok(newest.map_or_else(|| "0-0".to_string(), |id| text(Some(&id))))
}

/// Open requests after `cursor`, waiting up to `block`; returns the new cursor.
pub async fn read_requests(
    redis: &RedisStreams,
    cursor: &str,
    block: Duration,
) -> super::streams::Result<(String, Vec<Relayed>)> {
    let found = redis
        .read_stream(&global_key("requests"), cursor, REQUESTS_READ_MAX, block)
        .await?;
    let next = found
        .last()
        .map(|(id, _)| text(Some(id)))
        .unwrap_or_else(|| cursor.to_string());
    let stream = global_key("requests");
    let now_ms = redis.now_unix_ms();
    let requests = found
        .iter()
        .filter(|(id, fields)| {
            let agent_id = text(field(fields, b"a"));
            if !redis.signer().verify(&stream, fields) {
                tracing::warn!(
                    %agent_id,
                    "relay request without a valid signature dropped (written to Redis by something other than a replica)"
                );
                return false;
            }
            let written_ms: i64 = text(field(fields, b"t")).parse().unwrap_or(0);
            if !fresh_for_id(id, written_ms) || now_ms.saturating_sub(written_ms) > REQUEST_FRESH_MS {
                tracing::warn!(
                    %agent_id,
                    "relay request dropped: stale, or its stream id does not match its signed time (a copy added to Redis later)"
                );
                return false;
            }
            true
        })
        .map(|(_, fields)| match field(fields, b"c") {
            None => Relayed::Open(OpenRequest {
                session_id: text(field(fields, b"s")),
                agent_id: text(field(fields, b"a")),
            }),
            Some(command) => Relayed::Command {
                request_id: text(field(fields, b"s")),
                agent_id: text(field(fields, b"a")),
                command: text(Some(command)),
            },
        })
        .collect();
    Ok((next, requests))
}

/// The answer of the replica that handled an open request.
pub async fn reply_open(
    redis: &RedisStreams,
    session_id: &str,
    answer: &Result<bool, OpenRefusal>,
) -> super::streams::Result<()> {
    let reply_key = key(session_id, "reply");
    let (ok, code, message) = match answer {
        Ok(true) => ("1", "input", String::new()),
        Ok(false) => ("1", "", String::new()),
        Err(refusal) => ("0", refusal.code(), refusal.to_string()),
    };
    add_reply(
        redis,
        &reply_key,
        &[("ok", ok), ("code", code), ("error", &message)],
    )
    .await
}

/// Append an answer with `fields` to the reply stream `reply_key` and let it expire after
/// [`REPLY_KEEP_S`]: one round trip.
async fn add_reply(
    redis: &RedisStreams,
    reply_key: &str,
    fields: &[(&str, &str)],
) -> super::streams::Result<()> {
    let signed: Vec<(&str, &[u8])> = fields.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
    let mac = redis.signer().sign(reply_key, &signed);
    let mut pipe = redis::pipe();
    pipe.cmd("XADD").arg(reply_key).arg("*");
    for (name, value) in fields {
        pipe.arg(*name).arg(*value);
    }
    pipe.arg(super::streams::sign::MAC_FIELD).arg(mac);
    pipe.ignore()
        .cmd("EXPIRE")
        .arg(reply_key)
        .arg(REPLY_KEEP_S)
        .ignore();
    redis.pipeline::<()>(&pipe).await
}

/// The first answer in `reply_key` that a replica signed, waiting up to `timeout`; an entry
/// without a valid MAC (written to Redis by something else) is skipped and logged.
async fn signed_reply(
    redis: &RedisStreams,
    reply_key: &str,
    timeout: Duration,
) -> super::streams::Result<Option<Vec<redis::Value>>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut from = "0-0".to_string();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let found = redis.read_stream(reply_key, &from, 16, left).await?;
        if found.is_empty() {
            return Ok(None);
        }
        for (id, fields) in found {
            if redis.signer().verify(reply_key, &fields) {
                return Ok(Some(fields));
            }
            tracing::warn!(
                stream = reply_key,
                "relay answer without a valid signature dropped (written to Redis by something other than a replica)"
            );
            from = String::from_utf8_lossy(&id).into_owned();
        }
    }
}

/// Wait up to `timeout` for the answer to an open request; `None` when nobody answered.
pub async fn wait_open_reply(
    redis: &RedisStreams,
    session_id: &str,
    timeout: Duration,
) -> super::streams::Result<Option<Result<bool, OpenRefusal>>> {
    let found = signed_reply(redis, &key(session_id, "reply"), timeout).await?;
    Ok(found.map(|fields| {
        if field(&fields, b"ok") == Some(b"1") {
            // An opened session's `code` says whether the agent asks for keystrokes.
            Ok(field(&fields, b"code") == Some(b"input"))
        } else {
            Err(OpenRefusal::from_code(
                &text(field(&fields, b"code")),
                text(field(&fields, b"error")),
            ))
        }
    }))
}

/// How long a relayed command may take at the agent (the requester waits a little longer).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// Send `command` to the agent through this replica's channel, or through the replica that
/// holds it (shared store only). `NotConnected` means no replica answered in time.
pub async fn send_anywhere(
    state: &TerminalContext,
    agent_id: &str,
    command: proto::Command,
) -> Result<CommandResult, CommandError> {
    let redis = match state.terminal.streams.shared() {
        Some(redis) if !state.channels.holds(agent_id) => redis,
        _ => {
            return state
                .channels
                .send_command(agent_id, command, COMMAND_TIMEOUT)
                .await;
        }
    };
    let request_id = format!("cmd_{}", hex::encode(state.world.random_bytes::<12>()));
    let json = serde_json::to_string(&command).map_err(|e| {
        CommandError::Refused(proto::WireError::new(ErrorCode::Malformed, e.to_string()))
    })?;
    let unavailable = |e: super::streams::StreamsError| {
        tracing::warn!(error = %e, "relay: terminal store unavailable");
        CommandError::Closed
    };
    add_request(redis, &request_id, agent_id, Some(&json))
        .await
        .map_err(unavailable)?;
    let wait = COMMAND_TIMEOUT + Duration::from_secs(2);
    let found = signed_reply(redis, &key(&request_id, "reply"), wait)
        .await
        .map_err(unavailable)?;
    let Some(fields) = found else {
        return Err(CommandError::NotConnected);
    };
    let body = text(field(&fields, b"body"));
    match text(field(&fields, b"code")).as_str() {
        "ok" => serde_json::from_str(&body).map_err(|e| {
            CommandError::Refused(proto::WireError::new(
                ErrorCode::Malformed,
                format!("relayed answer: {e}"),
            ))
        }),
        "refused" => Err(CommandError::Refused(
            serde_json::from_str(&body)
                .unwrap_or_else(|_| proto::WireError::new(ErrorCode::Other, body)),
        )),
        "not_connected" => Err(CommandError::NotConnected),
        "busy" => Err(CommandError::Busy),
        "timeout" => Err(CommandError::Timeout(COMMAND_TIMEOUT)),
        _ => Err(CommandError::Closed),
    }
}

/// The answer to a relayed command, for [`send_anywhere`] on the requesting replica.
async fn reply_command(
    redis: &RedisStreams,
    request_id: &str,
    answer: &Result<CommandResult, CommandError>,
) -> super::streams::Result<()> {
    let (code, body) = match answer {
        Ok(result) => ("ok", serde_json::to_string(result).unwrap_or_default()),
        Err(CommandError::Refused(e)) => ("refused", serde_json::to_string(e).unwrap_or_default()),
        Err(CommandError::NotConnected) => ("not_connected", String::new()),
        Err(CommandError::Busy) => ("busy", String::new()),
        Err(CommandError::Timeout(_)) => ("timeout", String::new()),
        Err(CommandError::Closed) => ("closed", String::new()),
    };
    add_reply(
        redis,
        &key(request_id, "reply"),
        &[("code", code), ("body", &body)],
    )
    .await
}

/// Run until shutdown.
pub async fn run(state: TerminalContext) {
    let shutdown = state.shutdown.clone();
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = relay(&state) => {}
        () = janitor(&state) => {}
    }
}

async fn relay(state: &TerminalContext) {
    let Some(redis) = state.terminal.streams.shared() else {
        return std::future::pending().await;
    };
    // A concrete id, not `$`: a request stored between two reads is still read.
    let mut cursor = loop {
        match requests_tail(redis).await {
            Ok(tail) => break tail,
            Err(e) => {
                tracing::warn!(error = %e, "terminal relay: store unavailable");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut opens = JoinSet::new();
    let mut handled = HandledOnce::default();
    loop {
        while opens.try_join_next().is_some() {}
        let (next, requests) = match read_requests(redis, &cursor, REQUESTS_BLOCK).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "terminal relay: store unavailable");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        cursor = next;
        let here = state.channels.connected();
        for relayed in requests {
            let request = match relayed {
                Relayed::Open(request) => request,
                Relayed::Command {
                    request_id,
                    agent_id,
                    command,
                } => {
                    if !here.contains(&agent_id) {
                        continue;
                    }
                    if opens.len() >= OPENS_IN_FLIGHT_MAX {
                        tracing::warn!(request_id, "relay busy; command dropped");
                        continue;
                    }
                    if !handled.first_time(state, redis, &request_id).await {
                        continue;
                    }
                    let state = state.clone();
                    let redis = std::sync::Arc::clone(redis);
                    opens.spawn(async move {
                        let answer = match serde_json::from_str::<proto::Command>(&command) {
                            Ok(command) => {
                                state
                                    .channels
                                    .send_command(&agent_id, command, COMMAND_TIMEOUT)
                                    .await
                            }
                            Err(e) => Err(CommandError::Refused(proto::WireError::new(
                                ErrorCode::Malformed,
                                format!("relayed command: {e}"),
                            ))),
                        };
                        if let Err(e) = reply_command(&redis, &request_id, &answer).await {
                            tracing::warn!(error = %e, request_id, "relay: could not answer");
                        }
                    });
                    continue;
                }
            };
            if !here.contains(&request.agent_id) {
                continue; // another replica holds this agent
            }
            if opens.len() >= OPENS_IN_FLIGHT_MAX {
                // The requester times out and reports it; nothing is left half-open.
                tracing::warn!(session_id = %request.session_id, "terminal relay busy; open request dropped");
                continue;
            }
            if !handled.first_time(state, redis, &request.session_id).await {
                continue;
            }
            let state = state.clone();
            let redis = std::sync::Arc::clone(redis);
            opens.spawn(async move {
                let command = proto::Command::TerminalOpen {
                    session_id: request.session_id.clone(),
                    link_secret: Some(state.terminal.streams.link_secret(&request.session_id)),
                };
                let answer = open_answer(
                    state
                        .channels
                        .send_command(&request.agent_id, command, state.terminal.settings.open_timeout)
                        .await,
                );
                if let Err(e) = reply_open(&redis, &request.session_id, &answer).await {
                    tracing::warn!(error = %e, session_id = %request.session_id, "terminal relay: could not answer");
                }
            });
        }
    }
}

/// The requests this replica handled lately, beside the claim every replica sees in Redis: a
/// request is handled at most once even when its claim in Redis was deleted.
#[derive(Default)]
struct HandledOnce {
    /// Request (or session) id → when it was handled.
    recent: std::collections::BTreeMap<String, i64>,
}

impl HandledOnce {
    /// Whether request `id` is handled for the first time; a repeat is logged and counted.
    async fn first_time(
        &mut self,
        state: &TerminalContext,
        redis: &RedisStreams,
        id: &str,
    ) -> bool {
        let now_ms = state.world.now_unix_ms();
        self.recent
            .retain(|_, at| now_ms.saturating_sub(*at) <= REQUEST_ONCE_KEEP_MS);
        let first = !self.recent.contains_key(id)
            && match redis.claim_once(id, REQUEST_ONCE_KEEP_MS).await {
                Ok(first) => first,
                Err(e) => {
                    // Unclaimed is not handled: the requester times out and says so.
                    tracing::warn!(error = %e, request_id = id, "relay: could not claim a request; dropped");
                    return false;
                }
            };
        if first {
            self.recent.insert(id.to_string(), now_ms);
        } else {
            super::TerminalCounters::add(&state.terminal.counters.relay_replays_dropped_total, 1);
            tracing::warn!(
                request_id = id,
                "relay request already handled: dropped (a copy re-added to Redis)"
            );
        }
        first
    }
}

async fn janitor(state: &TerminalContext) {
    let streams = &state.terminal.streams;
    let settings = &state.terminal.settings;
    let mut tick = tokio::time::interval(JANITOR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(live) = streams.live().await else {
            continue;
        };
        let now_ms = state.world.now_unix_ms();
        for (session_id, _agent) in live {
            let Ok(Some(meta)) = streams.meta(&session_id).await else {
                continue;
            };
            let waited_ms = now_ms.saturating_sub(meta.changed_ms);
            let limit = match meta.state {
                // The agent waits up to 30 s for its link, then the attach timeout applies.
                SessionState::Pending => settings.attach_timeout + Duration::from_secs(45),
                SessionState::Reconnecting => settings.reconnect_grace,
                SessionState::Live | SessionState::Closed => continue,
            };
            if waited_ms > crate::time::duration_ms(limit) {
                let reason = match meta.state {
                    SessionState::Pending => "the agent never attached the session".to_string(),
                    _ => format!("the agent link stayed away for {} s", limit.as_secs()),
                };
                tracing::info!(session_id, %reason, "closing abandoned terminal session");
                if let Ok(true) = streams
                    .finish(&session_id, now_ms, &reason, settings.closed_keep)
                    .await
                {
                    let recording = super::recording::close_out(state, &session_id).await;
                    let recording = recording.map(|r| r.json()).unwrap_or_default();
                    super::audit_ended(state, &session_id, &meta, &reason, recording).await;
                }
            }
        }
    }
}
