//! One terminal session on the agent: dial the reverse link, spawn the PTY on `start`, run
//! the input and output loops, survive link loss for the reconnect window, tear down.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use proto::TerminalFromAgent;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use world::{World, WsStream};

use super::link::{Action, Inbound, LinkEnd, Live, Waiting};
use super::model::{
    Output, PtyHandle, PtyInput, PtySize, PtySpec, PtySystem, TerminalConfig, TerminalLink,
};
use crate::backoff::Backoff;
use crate::run_as::RunAs;
use proto::terminal::{Entry, Frame};

/// TCP connect plus WebSocket handshake of one reverse link.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A session whose first link never comes up ends after this (no PTY exists yet).
const FIRST_LINK_DEADLINE: Duration = Duration::from_secs(30);
/// Waiting for `start` on a link (the control plane sends it once a browser attached; it
/// enforces its own, shorter attach timeout).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Control frames queued for the output loop.
const CONTROL_QUEUED_MAX: usize = 16;
/// Largest frame accepted from the control plane.
const FRAME_BYTES_MAX: usize = 1024 * 1024;

pub struct Ctx {
    pub world: World,
    pub config: TerminalConfig,
    pub link: TerminalLink,
    pub pty: Arc<dyn PtySystem>,
    pub shutdown: CancellationToken,
    /// Shown when dialing the link: proves this process, not just this host's credential.
    pub link_secret: Option<String>,
}

/// The whole session; returns when it is over and its PTY is gone.
pub async fn run(ctx: Ctx, session_id: String) {
    let url = match ctx
        .link
        .control_plane
        .join(&format!("{}/{session_id}", proto::TERMINAL_PATH))
    {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "terminal link URL");
            return;
        }
    };
    let output = Output::new(ctx.config.output_bytes_max);
    let mut pty: Option<PtyHandle> = None;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
    let opened = Instant::now();
    let mut lost_at: Option<Instant> = None;
    // Which input was applied, for the session's whole life (every link and replica).
    let mut gate = super::gate::SeqGate::default();
    let reason = loop {
        let deadline = match (&pty, lost_at) {
            (None, _) => opened + FIRST_LINK_DEADLINE,
            (Some(_), Some(at)) => at + ctx.config.reconnect_window,
            (Some(_), None) => Instant::now() + ctx.config.reconnect_window,
        };
        let now = Instant::now();
        if now >= deadline {
            break match pty {
                None => "the reverse link never came up".to_string(),
                Some(_) => format!(
                    "the reverse link stayed down for the reconnect window ({} s)",
                    ctx.config.reconnect_window.as_secs()
                ),
            };
        }
        let secret = ctx
            .link_secret
            .as_deref()
            .map(|s| (proto::LINK_SECRET_HEADER, s));
        let dial = world::ws_connect_with(
            &ctx.world,
            &url,
            Some(&ctx.link.credential),
            secret.as_slice(),
            CONNECT_TIMEOUT.min(deadline - now),
            FRAME_BYTES_MAX,
        );
        let ws = tokio::select! {
            _ = ctx.shutdown.cancelled() => break "agent shutting down".to_string(),
            dialed = dial => dialed,
        };
        let ws = match ws {
            Ok(ws) => ws,
            Err(e) if matches!(e.http_status(), Some(401 | 403 | 404 | 410)) => {
                break format!("the control plane refused the link: {e}");
            }
            Err(e) => {
                let delay = backoff.next_delay(ctx.world.random_u64());
                if backoff.failures() <= 1 {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "terminal link dial failed; retrying");
                }
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break "agent shutting down".to_string(),
                    _ = tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))) => {}
                }
                continue;
            }
        };
        backoff.reset();
        match serve_link(
            &ctx,
            &session_id,
            ws,
            &output,
            &mut pty,
            &mut lost_at,
            &mut gate,
        )
        .await
        {
            LinkEnd::Lost(error) => {
                tracing::info!(%error, pty = pty.is_some(), "terminal link lost; redialing");
                if pty.is_some() {
                    lost_at.get_or_insert_with(Instant::now);
                }
            }
            LinkEnd::Over(reason) => break reason,
        }
    };
    if let Some(mut handle) = pty {
        super::model::stop(handle.child.as_mut()).await;
    }
    let lost = output.with(|r| r.overwritten_total());
    tracing::info!(%reason, output_overwritten_bytes = lost, "terminal session ended");
}

/// Names the session in psql's environment (`\\! echo $OUTPOST_TERMINAL_SESSION`), and lets a
/// simulated PTY tell sessions apart.
pub const SESSION_ENV: &str = "OUTPOST_TERMINAL_SESSION";

fn psql_spec(config: &TerminalConfig, session_id: &str) -> Result<PtySpec, String> {
    let mut argv: Vec<String> = Vec::new();
    let mut env = vec![
        (SESSION_ENV.to_string(), session_id.to_string()),
        ("TERM".to_string(), "xterm-256color".to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("PGAPPNAME".to_string(), "outpost-terminal".to_string()),
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin:/usr/lib/postgresql/bin".to_string(),
        ),
    ];
    let mut cwd = None;
    match &config.run_as {
        RunAs::User { name, home, .. } => {
            argv.extend(config.run_as.setpriv(&[]));
            env.push(("HOME".into(), home.display().to_string()));
            env.push(("USER".into(), name.clone()));
            env.push(("LOGNAME".into(), name.clone()));
            // psql starts in the home when the agent can enter it (the directory is changed
            // before setpriv switches user): not when it does not exist (`nobody`'s is
            // /nonexistent), nor when it is private to the run user (the packages' 0700
            // /var/lib/outpost-run, entered by a non-root agent). Then in `/`.
            let enterable =
                nix::unistd::access(home.as_path(), nix::unistd::AccessFlags::X_OK).is_ok();
            cwd = Some(if enterable && home.is_dir() {
                home.clone()
            } else {
                std::path::PathBuf::from("/")
            });
        }
        RunAs::RefuseRoot => {
            return Err(
                "the agent runs as root (or holds CAP_SETUID) and [terminal] run_as is not set: \
                 psql never gets those rights unless the config says so. Set [terminal] run_as \
                 to the user psql should run as (the packages make outpost-run; \"root\" allows \
                 root when the agent is root), or run the agent as its own user"
                    .into(),
            );
        }
        RunAs::Agent => {
            if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::geteuid()) {
                env.push(("HOME".into(), user.dir.display().to_string()));
                env.push(("USER".into(), user.name));
            }
        }
    }
    argv.push(config.psql.display().to_string());
    if let Some(db) = &config.database {
        // The password in psql's environment, not in its argv that `ps` shows every user.
        let (dsn, password) = crate::dsn::split_password(db);
        argv.push(dsn);
        if let Some(password) = password {
            env.push(("PGPASSWORD".into(), password));
        }
    }
    Ok(PtySpec {
        argv,
        env,
        cwd,
        run_uid: config.run_as.other_uid(),
    })
}

async fn send_text(
    sink: &mut SplitSink<WsStream, Message>,
    msg: &TerminalFromAgent,
) -> Result<(), String> {
    let text = serde_json::to_string(msg).map_err(|e| e.to_string())?;
    sink.send(Message::Text(text.into()))
        .await
        .map_err(|e| format!("send: {e}"))
}

/// Spawn psql for the session at `size`, its output going to `output`; the reason when it
/// cannot start.
fn start_pty(
    ctx: &Ctx,
    session_id: &str,
    size: PtySize,
    output: &Arc<Output>,
) -> Result<PtyHandle, String> {
    let spec = psql_spec(&ctx.config, session_id)?;
    let handle = ctx
        .pty
        .spawn(&ctx.world, &spec, size, Arc::clone(output))
        .map_err(|e| format!("could not start psql: {e}"))?;
    tracing::info!(cols = size.cols, rows = size.rows, "PTY started");
    Ok(handle)
}

/// Send the output from `cursor` on, and the control frames queued, until the output's
/// closing entry went out (its reason) or the link failed. Output data sent is activity.
async fn send_output(
    sink: &mut SplitSink<WsStream, Message>,
    output: &Output,
    mut cursor: u64,
    control_rx: &mut mpsc::Receiver<TerminalFromAgent>,
    activity: &std::sync::Mutex<Instant>,
) -> Result<String, String> {
    loop {
        while let Ok(msg) = control_rx.try_recv() {
            send_text(sink, &msg).await?;
        }
        let next = output.with(|r| r.next(cursor, proto::TERMINAL_CHUNK_BYTES_MAX));
        let Some(entry) = next else {
            tokio::select! {
                _ = output.changed() => {}
                msg = control_rx.recv() => match msg {
                    Some(msg) => send_text(sink, &msg).await?,
                    None => return Err("control queue closed".into()),
                },
            }
            continue;
        };
        cursor = entry.end();
        if matches!(entry, Entry::Data { .. })
            && let Ok(mut at) = activity.lock()
        {
            *at = Instant::now();
        }
        match entry.to_frame() {
            Frame::Binary(chunk) => sink
                .send(Message::Binary(chunk.into()))
                .await
                .map_err(|e| format!("send: {e}"))?,
            Frame::Text(msg) => send_text(sink, &msg).await?,
        }
        if let Entry::Closed { reason, .. } = entry {
            let _ = sink.flush().await;
            return Ok(reason);
        }
    }
}

/// A frame off the socket, for the link's rules.
fn inbound(frame: Result<Message, tokio_tungstenite::tungstenite::Error>) -> Inbound {
    match frame {
        Ok(Message::Close(_)) => Inbound::Closed,
        Ok(Message::Binary(data)) => Inbound::Binary(data.to_vec()),
        Ok(Message::Text(text)) => Inbound::Text(text.to_string()),
        Ok(_) => Inbound::Other,
        Err(e) => Inbound::Failed(e.to_string()),
    }
}

/// Wait for `start`, spawn the PTY if needed, then run both loops until the link ends.
async fn serve_link(
    ctx: &Ctx,
    session_id: &str,
    ws: WsStream,
    output: &Arc<Output>,
    pty: &mut Option<PtyHandle>,
    lost_at: &mut Option<Instant>,
    gate: &mut super::gate::SeqGate,
) -> LinkEnd {
    let (mut sink, mut stream) = ws.split();
    let start = loop {
        let frame = tokio::select! {
            _ = ctx.shutdown.cancelled() => return LinkEnd::Over("agent shutting down".into()),
            f = tokio::time::timeout(START_TIMEOUT, stream.next()) => f,
        };
        let Ok(frame) = frame else {
            return LinkEnd::Over("no browser attached in time".into());
        };
        let frame = frame.map_or(Inbound::Closed, inbound);
        match super::link::before_start(frame) {
            Waiting::Start { size, from } => break (size, from),
            Waiting::End(end) => return end,
            Waiting::Pong => {
                if let Err(e) = send_text(&mut sink, &TerminalFromAgent::Pong).await {
                    return LinkEnd::Lost(e);
                }
            }
            Waiting::Ignore => {}
        }
    };
    let (size, from) = start;
    // The control plane never has more than the agent produced; a `from` past the end
    // (it cannot happen today) starts at the live end.
    let cursor = from.min(output.with(|r| r.end()));
    if pty.is_none() {
        match start_pty(ctx, session_id, size, output) {
            Ok(handle) => *pty = Some(handle),
            Err(reason) => {
                let closed = TerminalFromAgent::Closed {
                    reason: reason.clone(),
                    end: 0,
                };
                let _ = send_text(&mut sink, &closed).await;
                return LinkEnd::Over(reason);
            }
        }
    }
    // On a reattached link the PTY keeps its size; browsers send their own resizes.
    let Some(handle) = pty.as_mut() else {
        return LinkEnd::Over("PTY missing after start".into());
    };
    // Reattached: the reconnect window starts afresh at the next loss.
    *lost_at = None;

    let (control_tx, mut control_rx) = mpsc::channel::<TerminalFromAgent>(CONTROL_QUEUED_MAX);
    let activity = std::sync::Mutex::new(Instant::now());
    let outbound = send_output(&mut sink, output, cursor, &mut control_rx, &activity);
    let input = handle.input.clone();
    let idle_timeout = ctx.config.idle_timeout;
    let inbound = async {
        let mut live = Live::new(Instant::now(), idle_timeout);
        loop {
            let last_output = || {
                activity
                    .lock()
                    .map(|at| *at)
                    .unwrap_or_else(|_| Instant::now())
            };
            let action = tokio::select! {
                _ = tokio::time::sleep_until(live.wake_at(last_output())) => {
                    live.on_time(Instant::now(), last_output())
                }
                frame = stream.next() => {
                    live.on_frame(Instant::now(), gate, frame.map_or(Inbound::Closed, inbound))
                }
            };
            match action {
                Action::Nothing => {}
                Action::Write(data) => {
                    if input.send(PtyInput::Data(data)).await.is_err() {
                        // The writer ends with the process; the output loop reports it.
                        std::future::pending::<()>().await;
                    }
                }
                Action::Resize(size) => {
                    if input.send(PtyInput::Resize(size)).await.is_err() {
                        return LinkEnd::Lost("PTY writer gone".into());
                    }
                }
                Action::Pong => {
                    let _ = control_tx.try_send(TerminalFromAgent::Pong);
                }
                Action::End(end) => return end,
            }
        }
    };
    tokio::pin!(outbound);
    let ended = tokio::select! {
        _ = ctx.shutdown.cancelled() => LinkEnd::Over("agent shutting down".into()),
        end = inbound => end,
        sent = &mut outbound => return match sent {
            Ok(reason) => LinkEnd::Over(reason),
            Err(e) => LinkEnd::Lost(e),
        },
    };
    if let LinkEnd::Over(reason) = &ended {
        // Ending on our side (closed, idle, shutdown): stop psql, then let the output loop
        // deliver what is left and the closing frame, briefly. The reason is set first: the
        // PTY reader closes the output with the exit status as soon as psql is gone.
        output.with(|r| r.ending(reason.clone()));
        super::model::stop(handle.child.as_mut()).await;
        output.close(reason.clone());
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut outbound).await;
    }
    ended
}

#[cfg(test)]
mod tests {

    #[test]
    fn psql_gets_the_password_in_its_environment_not_its_argv() {
        let config = super::TerminalConfig {
            enabled: true,
            psql: "psql".into(),
            database: Some("postgres://outpost:hidden%21pw@db:5432/app".into()),
            run_as: crate::run_as::RunAs::Agent,
            sessions_max: 1,
            reconnect_window: std::time::Duration::from_secs(60),
            idle_timeout: std::time::Duration::from_secs(60),
            output_bytes_max: 1 << 20,
            record_input: false,
        };
        let spec = super::psql_spec(&config, "ses_1").expect("spec");
        assert_eq!(
            spec.argv,
            vec!["psql".to_string(), "postgres://outpost@db:5432/app".into()]
        );
        assert!(
            spec.env
                .iter()
                .any(|(k, v)| k == "PGPASSWORD" && v == "hidden!pw"),
            "{:?}",
            spec.env
        );
    }
}
