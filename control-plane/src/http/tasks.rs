//! Tasks of one agent: history from storage (so it is there while the agent is offline),
//! creation and cancellation through the agent's control channel.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use proto::{Command, CommandResult, ErrorCode, TaskRequest, TaskSnapshot};

use crate::audit::action;
use crate::channel::CommandError;
use crate::edge::{ApiError, AuthUser};
use crate::handles::Handles;
use crate::storage::AgentRow;
use crate::terminal::TerminalContext;
use crate::terminal::relay::send_anywhere;

const LIST_MAX: i64 = 1000;

async fn known_agent(state: &Handles, agent_id: &str) -> Result<AgentRow, ApiError> {
    match state
        .storage
        .agent(agent_id)
        .await
        .map_err(ApiError::internal)?
    {
        Some(agent) => Ok(agent),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no agent {agent_id}"),
        )),
    }
}

pub async fn list(
    State(state): State<Handles>,
    Path(agent_id): Path<String>,
) -> Result<Json<Vec<TaskSnapshot>>, ApiError> {
    let _ = known_agent(&state, &agent_id).await?;
    let rows = state
        .storage
        .agent_tasks(&agent_id, LIST_MAX)
        .await
        .map_err(ApiError::internal)?;
    let tasks = rows
        .iter()
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect();
    Ok(Json(tasks))
}

/// Send `command` to the agent through whichever replica holds its channel.
pub(super) async fn command(
    state: &Handles,
    relay: &TerminalContext,
    agent_id: &str,
    command: Command,
) -> Result<TaskSnapshot, ApiError> {
    let agent = known_agent(state, agent_id).await?;
    let result = if agent.connected {
        send_anywhere(relay, agent_id, command).await
    } else {
        Err(CommandError::NotConnected)
    };
    let task = match result {
        Ok(CommandResult::Task { task }) => task,
        Ok(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "the agent answered with something else",
            ));
        }
        Err(CommandError::NotConnected) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("agent {agent_id} is not connected; try again when it is online"),
            ));
        }
        Err(CommandError::Refused(e)) => {
            let status = match e.code {
                ErrorCode::Refused => StatusCode::BAD_REQUEST,
                ErrorCode::UnknownCommand => StatusCode::NOT_IMPLEMENTED,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            return Err(ApiError::new(status, e.message));
        }
        Err(e @ (CommandError::Busy | CommandError::Closed)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
            ));
        }
        Err(e @ CommandError::Timeout(_)) => {
            return Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()));
        }
    };
    // Shown at once; the agent's task events keep it current from here on.
    let record = crate::storage::TaskRecord::of(&task).map_err(ApiError::internal)?;
    state
        .storage
        .upsert_agent_tasks(agent_id, vec![record], state.world.now_unix_ms())
        .await
        .map_err(ApiError::internal)?;
    Ok(task)
}

pub async fn create(
    State(state): State<Handles>,
    State(relay): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path(agent_id): Path<String>,
    Json(mut task): Json<TaskRequest>,
) -> Result<(StatusCode, Json<TaskSnapshot>), ApiError> {
    if let Some(asked) = &task.window {
        task.window = Some(gating_window(&state, &agent_id, asked).await?);
    }
    // What will run on the host, exactly as asked (the argv of a command, the parameters of
    // the others, a `sql` task's query among them), recorded before it is sent: if this
    // replica dies while the agent creates the task, the request is on record anyway.
    let request = crate::auth::new_id(&state.world, "req");
    let mut asked = serde_json::to_value(&task).unwrap_or_default();
    if let Some(fields) = asked.as_object_mut() {
        fields.insert("request".into(), request.clone().into());
        fields.insert("agent_id".into(), agent_id.clone().into());
    }
    state
        .audit
        .record(&user.name, action::TASK_REQUESTED, &agent_id, asked.clone())
        .await;
    let outcome = command(
        &state,
        &relay,
        &agent_id,
        Command::TaskAdd {
            task: Box::new(task),
        },
    )
    .await;
    let task = match outcome {
        Ok(task) => task,
        Err(error) => {
            state
                .audit
                .record(
                    &user.name,
                    action::TASK_REFUSED,
                    &agent_id,
                    serde_json::json!({"request": request, "status": error.status.as_u16(), "error": error.message}),
                )
                .await;
            return Err(error);
        }
    };
    tracing::info!(agent_id = %agent_id, task_id = %task.id, kind = %task.kind, "task created");
    state
        .audit
        .record(&user.name, action::TASK_CREATED, &task.id, asked)
        .await;
    Ok((StatusCode::CREATED, Json(task)))
}

/// The window a task names, as its agent will keep it: one of the stored windows that gate
/// task runs (effect `allow` or `both`) and select this agent. A task names its window; the
/// schedule itself comes from the window, so what the admin set is what the host enforces.
async fn gating_window(
    state: &Handles,
    agent_id: &str,
    asked: &proto::TaskWindow,
) -> Result<proto::TaskWindow, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    if asked.cron.is_some()
        || asked.duration.is_some()
        || asked.tz.is_some()
        || asked.cutoff.is_some()
        || asked.grace.is_some()
    {
        return Err(bad(
            "window: give only its name; its schedule comes from the window of that name (POST /api/v1/windows)".into(),
        ));
    }
    let agent = known_agent(state, agent_id).await?;
    let windows = crate::alerts::evaluator::windows(state)
        .await
        .map_err(ApiError::internal)?;
    let Some(window) = windows.iter().find(|w| w.spec.name == asked.name) else {
        return Err(bad(format!("window: no window named {:?}", asked.name)));
    };
    if !window.allows() {
        return Err(bad(format!(
            "window {:?} only mutes notices (effect mute); to gate task runs its effect must be allow or both",
            asked.name
        )));
    }
    let labels = crate::labels::of(agent.labels.as_deref());
    if !crate::labels::selects(&window.spec.agents, &agent.name, &labels) {
        return Err(bad(format!(
            "window {:?} does not select agent {} (its agents: {})",
            asked.name,
            agent.name,
            window.spec.agents.join(", ")
        )));
    }
    Ok(window.for_task())
}

pub async fn cancel(
    State(state): State<Handles>,
    State(relay): State<TerminalContext>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    Path((agent_id, task_id)): Path<(String, String)>,
) -> Result<Json<TaskSnapshot>, ApiError> {
    let task = command(&state, &relay, &agent_id, Command::TaskCancel { task_id }).await?;
    tracing::info!(agent_id = %agent_id, task_id = %task.id, "task canceled");
    state
        .audit
        .record(
            &user.name,
            action::TASK_CANCELED,
            &task.id,
            serde_json::json!({"agent_id": agent_id, "status": task.status}),
        )
        .await;
    Ok(Json(task))
}
