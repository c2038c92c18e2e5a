//! Keeps the control channel up: dial, hello, heartbeats with an ack deadline, commands,
//! reconnect with backoff. Never returns before shutdown, whatever the network does.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use proto::{AgentMessage, Command, CommandResult, ErrorCode, ServerMessage, WireError};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use world::{World, WsStream};

use crate::backoff::Backoff;
use crate::tasks::bridge::{Bridge, BridgeError};

/// Task events per frame.
const TASK_EVENTS_PER_FRAME: usize = 100;

#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Base URL of the control plane, e.g. `http://cp.example:8080`.
    pub control_plane: url::Url,
    pub credential: String,
    pub hostname: String,
    /// `[labels]` from the agent's config, sent with every hello.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Deadline for TCP connect plus WebSocket handshake.
    pub connect_timeout: Duration,
    /// Deadline for the welcome after hello (the control plane states the steady-state
    /// deadlines in its welcome).
    pub welcome_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The task runtime, for task commands and task events; `None` where it does not run.
    pub tasks: Option<Bridge>,
    /// The metrics buffer whose figures every heartbeat carries.
    pub buffer: Option<crate::buffer::SharedBuffer>,
    /// Terminal sessions, opened on the control plane's request.
    pub terminals: Option<crate::terminal::Terminals>,
}

impl LinkConfig {
    pub fn new(control_plane: url::Url, credential: String, hostname: String) -> LinkConfig {
        LinkConfig {
            control_plane,
            credential,
            hostname,
            labels: Default::default(),
            connect_timeout: Duration::from_secs(10),
            welcome_timeout: Duration::from_secs(15),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(5),
            tasks: None,
            buffer: None,
            terminals: None,
        }
    }
}

/// What the link is doing now (published on a `watch` channel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkStatus {
    Connecting {
        attempt: u64,
    },
    Online {
        agent_id: String,
        protocol_version: u32,
    },
    Waiting {
        retry_in_ms: u64,
        last_error: String,
    },
    Stopped,
}

/// Why one connection ended.
enum End {
    Shutdown,
    Failed(String),
}

/// Run the link until `shutdown` fires.
pub async fn run_link(
    world: World,
    config: LinkConfig,
    status: watch::Sender<LinkStatus>,
    shutdown: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::new(config.backoff_base, config.backoff_max);
    let mut attempt = 0u64;
    let channel_url = match config.control_plane.join(proto::CHANNEL_PATH) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, url = %config.control_plane, "invalid control plane URL; link disabled");
            status.send_replace(LinkStatus::Stopped);
            shutdown.cancelled().await;
            return;
        }
    };
    loop {
        attempt += 1;
        status.send_replace(LinkStatus::Connecting { attempt });
        // The session watches `shutdown` itself, so it can say goodbye with a close frame.
        let end = connect_and_serve(
            &world,
            &config,
            &channel_url,
            &status,
            &mut backoff,
            started,
            &shutdown,
        )
        .await;
        let error = match end {
            End::Shutdown => break,
            End::Failed(error) => error,
        };
        let delay = backoff.next_delay(world.random_u64());
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        tracing::warn!(%error, retry_in_ms, failures = backoff.failures(), "control channel down");
        status.send_replace(LinkStatus::Waiting {
            retry_in_ms,
            last_error: error,
        });
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    status.send_replace(LinkStatus::Stopped);
}

struct Session {
    ws: WsStream,
    send_timeout: Duration,
}

impl Session {
    async fn send(&mut self, msg: &AgentMessage) -> Result<(), String> {
        let text = serde_json::to_string(msg).map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.send_timeout, self.ws.send(Message::Text(text.into())))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("send: {e}")),
            Err(_) => Err("send did not complete: link is dead".into()),
        }
    }

    /// Next text frame; `Ok(None)` when the peer closed.
    async fn recv(&mut self) -> Result<Option<String>, String> {
        loop {
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Err(e)) => return Err(format!("receive: {e}")),
                Some(Ok(Message::Text(t))) => return Ok(Some(t.to_string())),
                Some(Ok(_)) => continue,
            }
        }
    }
}

async fn connect_and_serve(
    world: &World,
    config: &LinkConfig,
    url: &url::Url,
    status: &watch::Sender<LinkStatus>,
    backoff: &mut Backoff,
    started: Instant,
    shutdown: &CancellationToken,
) -> End {
    let established = tokio::select! {
        _ = shutdown.cancelled() => return End::Shutdown,
        established = establish(world, config, url) => established,
    };
    let (session, agent_id, version, heartbeat_interval, dead_after) = match established {
        Ok(e) => e,
        Err(end) => return end,
    };
    backoff.reset();
    tracing::info!(agent_id = %agent_id, protocol_version = version, "control channel online");
    status.send_replace(LinkStatus::Online {
        agent_id,
        protocol_version: version,
    });
    serve(
        world,
        config,
        session,
        version,
        heartbeat_interval,
        dead_after,
        started,
        shutdown,
    )
    .await
}

type Established = (Session, String, u32, Duration, Duration);

/// Dial, hello, welcome.
async fn establish(world: &World, config: &LinkConfig, url: &url::Url) -> Result<Established, End> {
    let ws = match world::ws_connect(
        world,
        url,
        Some(&config.credential),
        config.connect_timeout,
        proto::FRAME_BYTES_MAX,
    )
    .await
    {
        Ok(ws) => ws,
        Err(e) if e.http_status() == Some(401) => {
            return Err(End::Failed(
                "the control plane rejected this agent's credential; run `outpost-agent enroll` again".into(),
            ));
        }
        Err(e) => return Err(End::Failed(e.to_string())),
    };
    let mut session = Session {
        ws,
        send_timeout: config.welcome_timeout,
    };
    let hello = AgentMessage::Hello {
        protocol_min: proto::PROTOCOL_MIN,
        protocol_max: proto::PROTOCOL_MAX,
        agent_version: crate::AGENT_VERSION.to_string(),
        hostname: config.hostname.clone(),
        labels: config.labels.clone(),
    };
    session.send(&hello).await.map_err(End::Failed)?;
    let welcome = match tokio::time::timeout(config.welcome_timeout, session.recv()).await {
        Err(_) => return Err(End::Failed("no welcome from the control plane".into())),
        Ok(Err(e)) => return Err(End::Failed(e)),
        Ok(Ok(None)) => return Err(End::Failed("closed before welcome".into())),
        Ok(Ok(Some(text))) => serde_json::from_str::<ServerMessage>(&text),
    };
    let (agent_id, version, heartbeat_interval, dead_after) = match welcome {
        Ok(ServerMessage::Welcome {
            protocol_version,
            agent_id,
            heartbeat_interval_ms,
            dead_after_ms,
        }) => (
            agent_id,
            protocol_version,
            Duration::from_millis(heartbeat_interval_ms.max(100)),
            Duration::from_millis(dead_after_ms.max(300)),
        ),
        Ok(ServerMessage::Error(e)) => return Err(End::Failed(format!("refused: {}", e.message))),
        Ok(other) => return Err(End::Failed(format!("expected welcome, got {other:?}"))),
        Err(e) => return Err(End::Failed(format!("unreadable welcome: {e}"))),
    };
    session.send_timeout = dead_after;
    Ok((session, agent_id, version, heartbeat_interval, dead_after))
}

/// Steady state: heartbeats out, acks and commands in, until the link dies or shutdown.
#[allow(clippy::too_many_arguments)]
async fn serve(
    world: &World,
    config: &LinkConfig,
    mut session: Session,
    version: u32,
    heartbeat_interval: Duration,
    dead_after: Duration,
    started: Instant,
    shutdown: &CancellationToken,
) -> End {
    let mut heartbeat = tokio::time::interval(heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_heard = tokio::time::Instant::now();
    let mut events_in_flight: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), session.ws.close(None)).await;
                return End::Shutdown;
            }
            _ = tokio::time::sleep_until(last_heard + dead_after) => {
                return End::Failed(format!("no frame from the control plane for {} ms: link is dead", dead_after.as_millis()));
            }
            _ = heartbeat.tick() => {
                seq += 1;
                let buffer = match &config.buffer {
                    Some(b) => b.wire_stats(world).await,
                    None => None,
                };
                let msg = AgentMessage::Heartbeat { seq, sent_at_ms: world.now_unix_ms(), buffer };
                if let Err(e) = session.send(&msg).await {
                    return End::Failed(e);
                }
                // An unacknowledged batch is resent after the dead deadline.
                if events_in_flight.is_some_and(|since: Instant| since.elapsed() > dead_after) {
                    events_in_flight = None;
                }
                if let Some(msg) = next_task_events(config, &mut events_in_flight).await
                    && let Err(e) = session.send(&msg).await
                {
                    return End::Failed(e);
                }
            }
            frame = session.recv() => {
                let text = match frame {
                    Ok(Some(text)) => text,
                    Ok(None) => return End::Failed("control plane closed the channel".into()),
                    Err(e) => return End::Failed(e),
                };
                last_heard = tokio::time::Instant::now();
                let reply = match serde_json::from_str::<ServerMessage>(&text) {
                    Err(e) => Some(AgentMessage::Error(WireError::new(ErrorCode::Malformed, e.to_string()))),
                    Ok(ServerMessage::HeartbeatAck { .. }) => None,
                    Ok(ServerMessage::Command { id, command }) => Some(answer(id, command, config, version, started).await),
                    Ok(ServerMessage::TaskEventsAck { upto_seq }) => {
                        if let Some(bridge) = &config.tasks
                            && let Err(error) = bridge.ack(upto_seq).await
                        {
                            tracing::warn!(%error, "forget acknowledged task events");
                        }
                        events_in_flight = None;
                        next_task_events(config, &mut events_in_flight).await
                    }
                    Ok(ServerMessage::Error(e)) if e.code == ErrorCode::Replaced => {
                        return End::Failed("replaced by a newer connection of this agent".into());
                    }
                    Ok(ServerMessage::Error(e)) => {
                        tracing::warn!(code = ?e.code, message = %e.message, "control plane reported an error");
                        None
                    }
                    Ok(ServerMessage::Welcome { .. }) => Some(AgentMessage::Error(WireError::new(
                        ErrorCode::ProtocolViolation,
                        "welcome may only be sent once",
                    ))),
                    Ok(ServerMessage::Unknown) => Some(AgentMessage::Error(WireError::new(
                        ErrorCode::UnknownMessage,
                        "unknown message type; ignored",
                    ))),
                };
                if let Some(reply) = reply
                    && let Err(e) = session.send(&reply).await
                {
                    return End::Failed(e);
                }
            }
        }
    }
}

async fn answer(
    id: u64,
    command: Command,
    config: &LinkConfig,
    version: u32,
    started: Instant,
) -> AgentMessage {
    let refused = |code, message: String| AgentMessage::CommandAck {
        id,
        ok: false,
        result: None,
        error: Some(WireError::new(code, message)),
    };
    let task_result = |r: Result<proto::TaskSnapshot, BridgeError>| match r {
        Ok(task) => AgentMessage::CommandAck {
            id,
            ok: true,
            result: Some(CommandResult::Task { task }),
            error: None,
        },
        Err(e @ (BridgeError::Unavailable(_) | BridgeError::Internal(_))) => {
            refused(ErrorCode::Unavailable, e.to_string())
        }
        Err(e) => refused(ErrorCode::Refused, e.to_string()),
    };
    match command {
        Command::Describe => AgentMessage::CommandAck {
            id,
            ok: true,
            result: Some(CommandResult::Describe {
                agent_version: crate::AGENT_VERSION.to_string(),
                hostname: config.hostname.clone(),
                protocol_version: version,
                uptime_s: started.elapsed().as_secs(),
            }),
            error: None,
        },
        Command::TaskAdd { task } => match &config.tasks {
            Some(bridge) => task_result(bridge.add_remote(*task).await),
            None => refused(
                ErrorCode::Unavailable,
                "this agent runs no task runtime".into(),
            ),
        },
        Command::TaskCancel { task_id } => match &config.tasks {
            Some(bridge) => task_result(bridge.cancel(task_id).await),
            None => refused(
                ErrorCode::Unavailable,
                "this agent runs no task runtime".into(),
            ),
        },
        Command::TerminalOpen {
            session_id,
            link_secret,
        } => match &config.terminals {
            Some(terminals) => match terminals.open(&session_id, link_secret) {
                Ok(()) => AgentMessage::CommandAck {
                    id,
                    ok: true,
                    result: Some(CommandResult::TerminalOpened {
                        session_id,
                        record_input: terminals.record_input(),
                    }),
                    error: None,
                },
                Err(e @ crate::terminal::OpenError::LimitReached(_)) => {
                    refused(ErrorCode::LimitReached, e.to_string())
                }
                Err(e) => refused(ErrorCode::Refused, e.to_string()),
            },
            None => refused(ErrorCode::Unavailable, "this agent runs no terminal".into()),
        },
        Command::Unknown => refused(
            ErrorCode::UnknownCommand,
            "this agent does not know that command".into(),
        ),
    }
}

/// The next batch of task events, if the outbox has any and no batch is in flight.
async fn next_task_events(
    config: &LinkConfig,
    in_flight: &mut Option<Instant>,
) -> Option<AgentMessage> {
    let bridge = config.tasks.as_ref()?;
    if in_flight.is_some() {
        return None;
    }
    match bridge.pending_events(TASK_EVENTS_PER_FRAME).await {
        Ok(events) if !events.is_empty() => {
            *in_flight = Some(tokio::time::Instant::now());
            Some(AgentMessage::TaskEvents { events })
        }
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(%error, "read pending task events");
            None
        }
    }
}
