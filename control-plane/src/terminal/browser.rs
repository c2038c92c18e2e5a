//! The browser side: creating a session and the browser WebSocket. Auth and user errors live
//! here; the PTY lifecycle does not (see `agent_link`).

use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use proto::Command;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::TerminalContext;
use super::core::{BrowserView, Notice, ToBrowser};
use super::recording;
use super::relay::{self, OpenRefusal, OpenRequest};
use super::{
    InEvent, MetaPatch, SessionMeta, SessionState, StreamsError, TerminalCounters, clamp_size,
};
use crate::audit::action;
use crate::auth::Role;
use crate::channel::CommandError;
use crate::edge::{ApiError, AuthUser};
use crate::settings::RecordingFailure;

/// Largest frame a browser may send (a paste is split by xterm.js well below this).
const BROWSER_FRAME_BYTES_MAX: usize = 64 * 1024;
/// A browser that takes longer than this to accept one frame is dropped (it may reconnect).
const BROWSER_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one store read waits for new output before checking the session state.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// A WebSocket ping goes to a quiet browser this often (browsers answer on their own), so a
/// dead browser connection is noticed and proxies keep the socket open.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// Pause before retrying a failed store call.
const STORE_RETRY: Duration = Duration::from_millis(500);
/// How often an open browser socket checks that what let it open still holds: the login (not
/// logged out, revoked or expired), the user's role (still allowed terminals), and the owner
/// rule (the session is theirs, or they are still an admin). At most this long after any of
/// them changes, the socket is closed with the reason.
const CREDENTIAL_CHECK: Duration = Duration::from_secs(5);

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub agent_id: String,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct CreateResponse {
    pub session_id: String,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct SessionView {
    pub session_id: String,
    pub agent_id: String,
    pub user: String,
    pub state: &'static str,
    pub reason: String,
    pub created_ms: i64,
    pub changed_ms: i64,
}

impl SessionView {
    fn of(session_id: String, meta: SessionMeta) -> SessionView {
        SessionView {
            session_id,
            agent_id: meta.agent_id,
            user: meta.username,
            state: meta.state.as_str(),
            reason: meta.reason,
            created_ms: meta.created_ms,
            changed_ms: meta.changed_ms,
        }
    }
}

/// A session is its owner's; an admin may see and act on any.
fn visible_to(meta: &SessionMeta, user: &crate::storage::UserRow) -> bool {
    meta.user_id == user.id || user.role.allows(Role::Admin)
}

fn store_error(e: StreamsError) -> ApiError {
    match e {
        StreamsError::LimitReached(_) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
        }
        StreamsError::EntryTooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        StreamsError::Unavailable(_) | StreamsError::Url { .. } => {
            tracing::warn!(error = %e, "terminal store");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the terminal stream store (Redis) is unavailable; try again shortly",
            )
        }
    }
}

/// `POST /api/v1/terminal/sessions`: a logical session; the agent is asked to dial back.
pub async fn create(
    State(state): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Json(request): Json<CreateRequest>,
) -> Result<(StatusCode, Json<CreateResponse>), ApiError> {
    let terminal = &state.terminal;
    let refuse = |e: ApiError| {
        TerminalCounters::add(&terminal.counters.sessions_refused_total, 1);
        e
    };
    let agent = state
        .storage
        .agent(&request.agent_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            refuse(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no agent {}", request.agent_id),
            ))
        })?;
    let now_ms = state.world.now_unix_ms();
    if !state.settings.is_online(&agent, now_ms) {
        return Err(refuse(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "agent {} is offline; a terminal needs it online",
                agent.name
            ),
        )));
    }
    let session_id = hex::encode(state.world.random_bytes::<16>());
    let meta = SessionMeta {
        agent_id: agent.id.clone(),
        user_id: user.id.clone(),
        username: user.name.clone(),
        state: SessionState::Pending,
        created_ms: now_ms,
        changed_ms: now_ms,
        started: false,
        reason: String::new(),
        input_cursor: String::new(),
        recording: String::new(),
    };
    terminal
        .streams
        .create(&session_id, &meta, terminal.settings.sessions_max)
        .await
        .map_err(|e| refuse(store_error(e)))?;
    let refused = |e: ApiError| async {
        // The agent may have a link waiting for an attach: the close reaches it there.
        let reason = format!("refused: {}", e.message);
        let close = InEvent::Close {
            reason: reason.clone(),
        };
        let _ = terminal.streams.append_input(&session_id, close).await;
        let now_ms = state.world.now_unix_ms();
        let keep = terminal.settings.closed_keep;
        let _ = terminal
            .streams
            .finish(&session_id, now_ms, &reason, keep)
            .await;
        refuse(e)
    };
    let agent_input = match open_on_agent(&state, &agent.id, &session_id).await {
        Ok(agent_input) => agent_input,
        Err(e) => return Err(refused(e).await),
    };
    // The recording exists before any output does.
    let input = state.settings.record_input || agent_input;
    let row = recording::new_row(&session_id, &meta, &agent.name, input);
    let created = match state.settings.recording {
        true => state.storage.create_recording(row).await.map(|_| ()),
        false => Ok(()),
    };
    if let Err(e) = created {
        tracing::warn!(session_id, error = %e, "terminal recording could not be started");
        match state.settings.recording_failure {
            RecordingFailure::FailClosed => {
                return Err(refused(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the session's recording could not be started ({e}); with recording_failure = fail_closed no session opens unrecorded"
                    ),
                ))
                .await);
            }
            RecordingFailure::FailOpen => {
                let patch = MetaPatch {
                    recording: Some(format!(
                        "recording delayed: it could not be started ({e}); it starts when storage answers"
                    )),
                    ..MetaPatch::default()
                };
                let _ = terminal.streams.update(&session_id, now_ms, patch).await;
            }
        }
    }
    TerminalCounters::add(&terminal.counters.sessions_opened_total, 1);
    tracing::info!(session_id, agent_id = %agent.id, user = ?user.name, input, "terminal session created");
    state
        .audit
        .record(
            &user.name,
            action::TERMINAL_OPENED,
            &session_id,
            serde_json::json!({
                "agent_id": agent.id,
                "agent": agent.name,
                "recording": state.settings.recording.then(|| serde_json::json!({"input": input})),
            }),
        )
        .await;
    Ok((StatusCode::CREATED, Json(CreateResponse { session_id })))
}

/// Ask the agent (here, or through the relay on whichever replica holds its channel).
async fn open_on_agent(
    state: &TerminalContext,
    agent_id: &str,
    session_id: &str,
) -> Result<bool, ApiError> {
    let timeout = state.terminal.settings.open_timeout;
    let command = Command::TerminalOpen {
        session_id: session_id.to_string(),
        link_secret: Some(state.terminal.streams.link_secret(session_id)),
    };
    let answer = state
        .channels
        .send_command(agent_id, command, timeout)
        .await;
    if !matches!(answer, Err(CommandError::NotConnected)) {
        return relay::open_answer(answer).map_err(refusal);
    }
    let Some(redis) = state.terminal.streams.shared() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("agent {agent_id} is not connected to this control plane"),
        ));
    };
    let request = OpenRequest {
        session_id: session_id.to_string(),
        agent_id: agent_id.to_string(),
    };
    relay::request_open(redis, &request)
        .await
        .map_err(store_error)?;
    match relay::wait_open_reply(redis, session_id, timeout)
        .await
        .map_err(store_error)?
    {
        Some(answer) => answer.map_err(refusal),
        None => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no control plane replica answered for agent {agent_id} within {} s; is it online?",
                timeout.as_secs()
            ),
        )),
    }
}

/// An agent's refusal, asked here or through another replica.
fn refusal(refusal: OpenRefusal) -> ApiError {
    let status = match &refusal {
        OpenRefusal::LimitReached(_) => StatusCode::TOO_MANY_REQUESTS,
        OpenRefusal::BadAnswer(_) => StatusCode::BAD_GATEWAY,
        OpenRefusal::Failed(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError::new(status, refusal.to_string())
}

async fn owned_session(
    state: &TerminalContext,
    user: &crate::storage::UserRow,
    session_id: &str,
) -> Result<SessionMeta, ApiError> {
    let meta = state
        .terminal
        .streams
        .meta(session_id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no terminal session {session_id}"),
            )
        })?;
    if !visible_to(&meta, user) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this terminal session belongs to another user",
        ));
    }
    Ok(meta)
}

/// How many live sessions one listing returns at most (the control plane allows 100).
const LIVE_LISTED_MAX: usize = 1000;

/// `GET /api/v1/terminal/sessions`: the sessions open now, oldest first; an admin sees every
/// user's, others their own.
pub async fn list(
    State(state): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    let live = state.terminal.streams.live().await.map_err(store_error)?;
    let mut out = Vec::new();
    for (session_id, _agent) in live.into_iter().take(LIVE_LISTED_MAX) {
        let Some(meta) = state
            .terminal
            .streams
            .meta(&session_id)
            .await
            .map_err(store_error)?
        else {
            continue;
        };
        if meta.state == SessionState::Closed || !visible_to(&meta, &user) {
            continue;
        }
        out.push(SessionView::of(session_id, meta));
    }
    out.sort_by(|a, b| (a.created_ms, &a.session_id).cmp(&(b.created_ms, &b.session_id)));
    Ok(Json(out))
}

/// `GET /api/v1/terminal/sessions/{id}`.
pub async fn show(
    State(state): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(session_id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let meta = owned_session(&state, &user, &session_id).await?;
    Ok(Json(SessionView::of(session_id, meta)))
}

/// `DELETE /api/v1/terminal/sessions/{id}`: ask the agent to end psql.
pub async fn close(
    State(state): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(session_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let meta = owned_session(&state, &user, &session_id).await?;
    if meta.state != SessionState::Closed {
        state
            .terminal
            .streams
            .append_input(
                &session_id,
                InEvent::Close {
                    reason: format!("closed by {}", user.name),
                },
            )
            .await
            .map_err(store_error)?;
    }
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize, schemars::JsonSchema)]
pub struct WsQuery {
    #[serde(default)]
    pub offset: u64,
}

/// `GET /api/v1/terminal/sessions/{id}/ws?offset=N`.
pub async fn ws(
    State(state): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Extension(crate::edge::AuthTokenHash(token_hash)): Extension<crate::edge::AuthTokenHash>,
    Path(session_id): Path<String>,
    Query(query): Query<WsQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let meta = match owned_session(&state, &user, &session_id).await {
        Ok(meta) => meta,
        Err(e) => return e.into_response(),
    };
    let max = state.terminal.settings.sockets_per_user_max;
    let Some(slot) = state.terminal.sockets.acquire(&user.id, max) else {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("you have {max} terminal connections open on this replica (the limit per user); close one first"),
        )
        .into_response();
    };
    // Who can see and type into the session: every attach is recorded, an admin's attach to
    // another user's session included.
    state
        .audit
        .record(
            &user.name,
            crate::audit::action::TERMINAL_ATTACHED,
            &session_id,
            serde_json::json!({
                "agent_id": meta.agent_id,
                "owner": meta.username,
                "by_owner": meta.user_id == user.id,
            }),
        )
        .await;
    let span = tracing::info_span!("terminal_browser", session_id = %session_id, user = ?user.name);
    upgrade
        .max_message_size(BROWSER_FRAME_BYTES_MAX)
        .max_frame_size(BROWSER_FRAME_BYTES_MAX)
        .on_upgrade(move |socket| {
            async move {
                let access = Access {
                    token_hash,
                    owner_id: meta.user_id,
                };
                serve(state, session_id, query.offset, socket, access).await;
                drop(slot);
            }
            .instrument(span)
        })
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum FromBrowser {
    Resize {
        cols: u16,
        rows: u16,
    },
    Close,
    #[serde(other)]
    Unknown,
}

type Sink = SplitSink<WebSocket, Message>;

async fn send(sink: &mut Sink, message: Message) -> Result<(), String> {
    match tokio::time::timeout(BROWSER_SEND_TIMEOUT, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("send: {e}")),
        Err(_) => Err("the browser did not take output for 30 s".into()),
    }
}

/// Carry out what the view decided, in order. Output bytes are counted as they go.
async fn carry_out(
    state: &TerminalContext,
    sink: &mut Sink,
    actions: Vec<ToBrowser>,
) -> Result<(), String> {
    for action in actions {
        match action {
            ToBrowser::Bytes(bytes) => {
                TerminalCounters::add(
                    &state.terminal.counters.output_bytes_total,
                    bytes.len() as u64,
                );
                send(sink, Message::Binary(bytes.into())).await?;
            }
            ToBrowser::Say(notice) => {
                let text = serde_json::to_string(&notice).map_err(|e| e.to_string())?;
                send(sink, Message::Text(text.into())).await?;
            }
            ToBrowser::Ping => send(sink, Message::Ping(Vec::new().into())).await?,
            ToBrowser::Close { code, reason } => {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
            }
        }
    }
    Ok(())
}

/// The role a browser terminal socket needs (the terminal routes' access level).
const TERMINAL_ROLE: Role = Role::Operator;

/// Returns, with the reason to show, when what let the socket open no longer holds: the
/// login behind `token_hash` stands, its user's role still allows terminals, and the session
/// is theirs or they are an admin. A storage error is not taken for a change.
async fn access_lost(state: &TerminalContext, token_hash: &str, owner_id: &str) -> String {
    loop {
        tokio::time::sleep(CREDENTIAL_CHECK).await;
        let now_ms = state.world.now_unix_ms();
        match state.storage.user_by_token(token_hash, now_ms).await {
            Ok(None) => return "your login was revoked or has expired: log in again".into(),
            Ok(Some(user)) if !user.role.allows(TERMINAL_ROLE) => {
                return format!(
                    "your role is now {}: terminals need {}",
                    user.role.as_str(),
                    TERMINAL_ROLE.as_str()
                );
            }
            Ok(Some(user)) if user.id != owner_id && !user.role.allows(Role::Admin) => {
                return format!(
                    "your role is now {}: only the session's owner and admins may see it",
                    user.role.as_str()
                );
            }
            Ok(Some(_)) | Err(_) => {}
        }
    }
}

/// What let a browser socket open, checked again every [`CREDENTIAL_CHECK`].
struct Access {
    token_hash: String,
    owner_id: String,
}

async fn serve(
    state: TerminalContext,
    session_id: String,
    offset: u64,
    socket: WebSocket,
    access: Access,
) {
    let streams = &state.terminal.streams;
    let (mut sink, mut stream) = socket.split();
    // The first attach starts the PTY (at 80×24 until the browser's resize arrives).
    if let Err(e) = streams
        .append_input(&session_id, InEvent::Attach { cols: 80, rows: 24 })
        .await
    {
        let degraded = Notice::State {
            state: "degraded".into(),
        };
        let _ = carry_out(&state, &mut sink, vec![ToBrowser::Say(degraded)]).await;
        tracing::warn!(error = %e, "attach: store unavailable");
    }
    let mut view = None;
    let revoked = tokio::select! {
        ended = send_to_browser(&state, &session_id, offset, &mut sink, &mut view) => {
            if let Err(e) = ended {
                tracing::info!(reason = %e, "browser detached");
            }
            None
        }
        () = take_input(&state, &session_id, &mut stream) => {
            tracing::debug!("browser closed its socket");
            None
        }
        reason = access_lost(&state, &access.token_hash, &access.owner_id) => Some(reason),
        () = state.shutdown.cancelled() => None,
    };
    if let Some(reason) = revoked {
        // The session goes on (psql keeps running); only this viewer loses it.
        tracing::info!(%reason, "access withdrawn; browser socket closed");
        let told = match view.as_mut() {
            Some(view) => view.on_access_lost(reason),
            None => vec![
                ToBrowser::Say(Notice::Closed { reason }),
                ToBrowser::Close {
                    code: 1008,
                    reason: "access withdrawn",
                },
            ],
        };
        let _ = carry_out(&state, &mut sink, told).await;
    }
}

/// Send the session's output from `offset` on, with its state and recording status as they
/// change, until the session closes or the browser fails to take it. What to send is the
/// view's decision ([`BrowserView`]); this reads the store and the clock and sends. `view` is
/// left for the caller (an access check that ends the socket tells it).
async fn send_to_browser(
    state: &TerminalContext,
    session_id: &str,
    offset: u64,
    sink: &mut Sink,
    view: &mut Option<BrowserView>,
) -> Result<(), String> {
    let streams = &state.terminal.streams;
    let store_end = loop {
        match streams.output_end(session_id).await {
            Ok(end) => break end,
            Err(_) => tokio::time::sleep(STORE_RETRY).await,
        }
    };
    let recording = match state.settings.recording {
        true => Some(match streams.meta(session_id).await {
            Ok(Some(meta)) => meta.recording,
            _ => String::new(),
        }),
        false => None,
    };
    let now = tokio::time::Instant::now();
    let (opened, first) = BrowserView::open(offset, store_end, recording, PING_INTERVAL, now);
    let view = view.insert(opened);
    carry_out(state, sink, first).await?;
    while !view.is_over() {
        if let Some(ping) = view.on_time(tokio::time::Instant::now()) {
            carry_out(state, sink, vec![ping]).await?;
        }
        let told = match streams
            .read_output(session_id, view.read_from(), READ_BLOCK)
            .await
        {
            Ok(entries) if entries.is_empty() => match streams.meta(session_id).await {
                Ok(meta) => {
                    if meta.is_none() {
                        tracing::warn!(
                            "the terminal store no longer knows this session; closing it"
                        );
                    }
                    view.on_quiet(meta.as_ref())
                }
                Err(_) => Vec::new(),
            },
            Ok(entries) => view.on_output(entries, tokio::time::Instant::now()),
            Err(e) => {
                if view.shown_state() != "degraded" {
                    tracing::warn!(error = %e, "terminal output unavailable; retrying");
                }
                let told = view.on_store_error();
                carry_out(state, sink, told).await?;
                tokio::time::sleep(STORE_RETRY).await;
                continue;
            }
        };
        carry_out(state, sink, told).await?;
    }
    Ok(())
}

/// Forward the browser's keystrokes, resizes and close to the session until its socket ends.
async fn take_input(
    state: &TerminalContext,
    session_id: &str,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
) {
    while let Some(frame) = stream.next().await {
        let event = match frame {
            Ok(Message::Binary(data)) => InEvent::Data(data.to_vec()),
            Ok(Message::Text(text)) => match serde_json::from_str::<FromBrowser>(&text) {
                Ok(FromBrowser::Resize { cols, rows }) => {
                    let (cols, rows) = clamp_size(cols, rows);
                    InEvent::Resize { cols, rows }
                }
                Ok(FromBrowser::Close) => InEvent::Close {
                    reason: "closed in the browser".into(),
                },
                Ok(FromBrowser::Unknown) | Err(_) => continue,
            },
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        if let Err(e) = state.terminal.streams.append_input(session_id, event).await {
            // Keystrokes cannot reach the agent while the store is down; the output side has
            // told the browser the session is degraded.
            tracing::warn!(error = %e, "terminal input dropped: store unavailable");
            TerminalCounters::add(&state.terminal.counters.store_failures_total, 1);
        }
    }
}
