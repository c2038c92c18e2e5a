//! The local task API: HTTP/JSON on a Unix socket (`<data_dir>/agent.sock`, mode 0660).
//! Peers are checked by their credentials: root, the agent's own user or its group.
//! `curl --unix-socket` works; `outpost-agent tasks …` uses it.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use world::{PeerAddr, World};

use super::bridge::{Bridge, BridgeError, snapshot};
use super::core::TaskState;
use super::driver::{Reader, Request as SchedulerRequest};
use super::policy::TaskPolicy;

use super::bridge::{AddRequest, TaskView};

pub const REQUEST_BYTES_MAX: usize = 256 * 1024;
const LIST_MAX: usize = 1000;

#[derive(Clone)]
struct Api {
    reader: Reader,
    requests: mpsc::Sender<SchedulerRequest>,
    /// Uid and gid allowed besides root.
    owner: (u32, u32),
    has_postgres: bool,
    policy: Arc<TaskPolicy>,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "task API request failed");
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the agent log".into(),
    )
}

async fn view(reader: &Reader, task: TaskState) -> Result<TaskView, ApiError> {
    snapshot(reader, task).await.map_err(internal)
}

async fn add(
    State(api): State<Api>,
    Json(req): Json<AddRequest>,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    match api.bridge().add(req).await {
        Ok(task) => Ok((StatusCode::CREATED, Json(task))),
        Err(e) => Err(refusal(e)),
    }
}

async fn cancel(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<TaskView>, ApiError> {
    api.bridge().cancel(id).await.map(Json).map_err(refusal)
}

/// `POST /v1/tasks/{id}/reschedule` with a body of schedule fields (`at`, `in`, `every`,
/// `cron`, `tz`), as `tasks add` takes them.
async fn reschedule(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
    Json(req): Json<RescheduleRequest>,
) -> Result<Json<TaskView>, ApiError> {
    let req = AddRequest {
        at: req.at,
        in_: req.in_,
        every: req.every,
        cron: req.cron,
        tz: req.tz,
        ..AddRequest::default()
    };
    api.bridge()
        .reschedule(id, req)
        .await
        .map(Json)
        .map_err(refusal)
}

/// The schedule fields of `tasks add`.
#[derive(serde::Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RescheduleRequest {
    pub at: Option<String>,
    #[serde(rename = "in")]
    pub in_: Option<String>,
    pub every: Option<String>,
    pub cron: Option<String>,
    pub tz: Option<String>,
}

fn refusal(e: BridgeError) -> ApiError {
    let code = match e {
        BridgeError::Invalid(_) => StatusCode::BAD_REQUEST,
        BridgeError::Duplicate(_) | BridgeError::Finished(_) => StatusCode::CONFLICT,
        BridgeError::Unknown(_) => StatusCode::NOT_FOUND,
        BridgeError::Refused(_) => StatusCode::FORBIDDEN,
        BridgeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        BridgeError::Internal(ref m) => return internal(m),
    };
    ApiError(code, e.to_string())
}

async fn list(State(api): State<Api>) -> Result<Json<Vec<TaskView>>, ApiError> {
    let tasks = api
        .reader
        .with(move |store| store.list(LIST_MAX))
        .await
        .map_err(internal)?;
    let mut views = Vec::with_capacity(tasks.len());
    for t in tasks {
        views.push(view(&api.reader, t).await?);
    }
    Ok(Json(views))
}

async fn load(api: &Api, id: String) -> Result<TaskState, ApiError> {
    let shown = id.clone();
    api.reader
        .with(move |store| store.get(&id))
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no task {shown}")))
}

async fn show(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<TaskView>, ApiError> {
    let task = load(&api, id).await?;
    Ok(Json(view(&api.reader, task).await?))
}

/// Captured output of the latest run, with a trailer saying how much was dropped.
async fn logs(State(api): State<Api>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let task = load(&api, id.clone()).await?;
    let view = view(&api.reader, task).await?;
    let Some(run) = view.runs.last() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("task {id} has not run yet"),
        ));
    };
    let run_id = run.run_id;
    let (mut output, dropped) = api
        .reader
        .with(move |store| store.output(run_id))
        .await
        .map_err(internal)?
        .unwrap_or_default();
    if dropped > 0 {
        output.extend_from_slice(
            format!("\n[outpost: {dropped} more bytes of output were dropped (per-run limit)]\n")
                .as_bytes(),
        );
    }
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        output,
    )
        .into_response())
}

async fn check_peer(
    State(api): State<Api>,
    ConnectInfo(peer): ConnectInfo<PeerAddr>,
    request: Request,
    next: Next,
) -> Response {
    let allowed = match peer {
        PeerAddr::Unix {
            uid: Some(uid),
            gid,
        } => uid == 0 || uid == api.owner.0 || gid == Some(api.owner.1),
        _ => false,
    };
    if !allowed {
        return ApiError(
            StatusCode::FORBIDDEN,
            format!("peer {peer} may not use the agent API (root, the agent's user or group only)"),
        )
        .into_response();
    }
    next.run(request).await
}

pub fn router(bridge: Bridge, owner: (u32, u32)) -> Router {
    let api = Api {
        reader: bridge.reader,
        requests: bridge.requests,
        owner,
        has_postgres: bridge.has_postgres,
        policy: bridge.policy,
    };
    Router::new()
        .route("/v1/tasks", post(add).get(list))
        .route("/v1/tasks/{id}", get(show))
        .route("/v1/tasks/{id}/cancel", post(cancel))
        .route("/v1/tasks/{id}/reschedule", post(reschedule))
        .route("/v1/tasks/{id}/logs", get(logs))
        .layer(middleware::from_fn_with_state(api.clone(), check_peer))
        .layer(axum::extract::DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .with_state(api)
}

/// This process's effective uid and gid (owner of the data dir's files).
pub fn own_ids(data_dir: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self") {
        Ok(m) => (m.uid(), m.gid()),
        Err(_) => std::fs::metadata(data_dir)
            .map(|m| (m.uid(), m.gid()))
            .unwrap_or((0, 0)),
    }
}

/// Serve the API on `socket` (mode 0660) until `shutdown`.
pub async fn serve(
    world: &World,
    socket: &Path,
    app: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if socket.exists() {
        // A live agent answers on it; a stale file from a killed one does not.
        if world.net().connect_unix(socket).await.is_ok() {
            anyhow::bail!(
                "{} is in use: is another agent running on this data dir?",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("remove stale socket {}", socket.display()))?;
    }
    let listener = world
        .net()
        .bind_unix(socket)
        .await
        .with_context(|| format!("listen on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "task API listening");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<PeerAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
    .context("serve the task API")?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}

impl Api {
    fn bridge(&self) -> Bridge {
        Bridge {
            reader: self.reader.clone(),
            requests: self.requests.clone(),
            has_postgres: self.has_postgres,
            policy: Arc::clone(&self.policy),
        }
    }
}
