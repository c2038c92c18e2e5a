//! Background work of the terminal on every replica: carry open requests to the replica that
//! holds the agent's control channel (shared stores only), and close sessions nobody will
//! come back to (never attached, or their agent link stayed away past the grace).

use std::time::Duration;

use proto::{Command, CommandResult};
use tokio::task::JoinSet;

use super::SessionState;
use crate::state::AppState;

/// How long one read of the request stream blocks.
const REQUESTS_BLOCK: Duration = Duration::from_secs(2);
/// How often sessions are checked for abandonment.
const JANITOR_INTERVAL: Duration = Duration::from_secs(5);
/// Open requests handled at once by one replica.
const OPENS_IN_FLIGHT_MAX: usize = 32;

/// Run until shutdown.
pub async fn run(state: AppState) {
    let shutdown = state.shutdown.clone();
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = relay(&state) => {}
        () = janitor(&state) => {}
    }
}

async fn relay(state: &AppState) {
    let streams = &state.terminal.streams;
    if !streams.is_shared() {
        return std::future::pending().await;
    }
    // A concrete id, not `$`: a request stored between two reads is still read.
    let mut cursor = loop {
        match streams.requests_tail().await {
            Ok(tail) => break tail,
            Err(e) => {
                tracing::warn!(error = %e, "terminal relay: store unavailable");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut opens = JoinSet::new();
    loop {
        while opens.try_join_next().is_some() {}
        let (next, requests) = match streams.read_requests(&cursor, REQUESTS_BLOCK).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "terminal relay: store unavailable");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        cursor = next;
        let here = state.channels.connected();
        for request in requests {
            if !here.contains(&request.agent_id) {
                continue; // another replica holds this agent
            }
            if opens.len() >= OPENS_IN_FLIGHT_MAX {
                // The requester times out and reports it; nothing is left half-open.
                tracing::warn!(session_id = %request.session_id, "terminal relay busy; open request dropped");
                continue;
            }
            let state = state.clone();
            opens.spawn(async move {
                let streams = &state.terminal.streams;
                let command = Command::TerminalOpen {
                    session_id: request.session_id.clone(),
                };
                let answer = match state
                    .channels
                    .send_command(&request.agent_id, command, state.terminal.settings.open_timeout)
                    .await
                {
                    Ok(CommandResult::TerminalOpened { .. }) => Ok(()),
                    Ok(_) => Err("the agent answered with something else".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = streams.reply_open(&request.session_id, answer).await {
                    tracing::warn!(error = %e, session_id = %request.session_id, "terminal relay: could not answer");
                }
            });
        }
    }
}

async fn janitor(state: &AppState) {
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
                    crate::audit::terminal_ended(state, &session_id, &meta, &reason).await;
                }
            }
        }
    }
}
