//! The HTTP edge: every route is declared once in [`routes`] with its [`Access`] level, and
//! the router applies authentication from that declaration. A route cannot be added without
//! choosing an access level, and `tests/it/auth.rs` enumerates [`route_specs`] to prove that
//! every non-public route answers 401 without credentials.

mod agents;
pub mod exec;
mod metrics;
mod observe;
pub mod openapi;
mod sessions;
mod tasks;
mod web;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use axum::{Json, Router};

use crate::auth::{Role, secret_hash};
use crate::state::AppState;
use crate::storage::{AgentRow, UserRow};

/// Largest request body any route accepts.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;
/// Name of the browser session cookie.
pub const SESSION_COOKIE: &str = "outpost_session";

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No credentials (login, health, enrollment: it carries its own token).
    Public,
    /// A logged-in user with at least this role (cookie or `Authorization: Bearer`).
    User(Role),
    /// An enrolled agent presenting its credential as a bearer token.
    Agent,
}

#[derive(Clone, Debug)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}

/// The authenticated caller, inserted into request extensions by the auth layer.
#[derive(Clone, Debug)]
pub struct AuthUser(pub UserRow);

#[derive(Clone, Debug)]
pub struct AuthAgent(pub AgentRow);

fn routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
    let spec = |method, path, access| RouteSpec {
        method,
        path,
        access,
    };
    vec![
        (spec(Method::GET, "/healthz", Access::Public), get(healthz)),
        (spec(Method::GET, "/", Access::Public), get(web::index)),
        (
            spec(Method::GET, "/assets/{*path}", Access::Public),
            get(web::file),
        ),
        (
            spec(Method::POST, "/api/v1/sessions", Access::Public),
            post(sessions::login),
        ),
        (
            spec(Method::POST, proto::ENROLL_PATH, Access::Public),
            post(agents::enroll),
        ),
        (
            spec(Method::GET, "/api/v1/me", Access::User(Role::Viewer)),
            get(sessions::me),
        ),
        (
            spec(Method::GET, "/api/v1/agents", Access::User(Role::Viewer)),
            get(agents::list),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/agents/{id}/tasks",
                Access::User(Role::Viewer),
            ),
            get(tasks::list),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/agents/{id}/tasks",
                Access::User(Role::Operator),
            ),
            post(tasks::create),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/agents/{id}/tasks/{task_id}/cancel",
                Access::User(Role::Operator),
            ),
            post(tasks::cancel),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/agents/{id}/metrics",
                Access::User(Role::Viewer),
            ),
            get(metrics::read),
        ),
        (
            spec(Method::POST, proto::METRICS_PATH, Access::Agent),
            post(metrics::ingest).layer(DefaultBodyLimit::max(metrics::BATCH_BYTES_MAX)),
        ),
        (
            spec(Method::GET, proto::CHANNEL_PATH, Access::Agent),
            get(crate::channel::upgrade),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/terminal/sessions",
                Access::User(Role::Operator),
            ),
            post(crate::terminal::browser::create),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/terminal/sessions/{id}",
                Access::User(Role::Operator),
            ),
            get(crate::terminal::browser::show),
        ),
        (
            spec(
                Method::DELETE,
                "/api/v1/terminal/sessions/{id}",
                Access::User(Role::Operator),
            ),
            delete(crate::terminal::browser::close),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/terminal/sessions/{id}/ws",
                Access::User(Role::Operator),
            ),
            get(crate::terminal::browser::ws),
        ),
        (
            spec(Method::GET, "/api/v1/agent/terminal/{id}", Access::Agent),
            get(crate::terminal::agent_link::upgrade),
        ),
        (
            spec(Method::POST, "/api/v1/exec", Access::User(Role::Operator)),
            post(exec::start),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/exec/{op_id}",
                Access::User(Role::Operator),
            ),
            get(exec::show),
        ),
        (
            spec(Method::GET, "/metrics", Access::User(Role::Viewer)),
            get(observe::metrics),
        ),
        (
            spec(Method::GET, "/api/v1/audit", Access::User(Role::Admin)),
            get(observe::audit),
        ),
        (
            spec(Method::GET, "/api/openapi.json", Access::User(Role::Viewer)),
            get(openapi::serve),
        ),
    ]
}

/// Every route the control plane serves, with its access level.
pub fn route_specs() -> Vec<RouteSpec> {
    routes().into_iter().map(|(spec, _)| spec).collect()
}

pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for (spec, method_router) in routes() {
        let access = spec.access;
        let path = spec.path;
        let guarded = method_router.layer(middleware::from_fn_with_state(
            state.clone(),
            move |state: State<AppState>, request: Request, next: Next| async move {
                let started = tokio::time::Instant::now();
                let method = request.method().clone();
                let observed = state.observed.clone();
                let response = authenticate(state, access, request, next).await;
                observed.request(
                    method.as_str(),
                    path,
                    response.status().as_u16(),
                    started.elapsed(),
                );
                response
            },
        ));
        router = router.route(spec.path, guarded);
    }
    router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .with_state(state)
}

/// An API error: a status and a one-line reason, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn internal(error: impl std::fmt::Display) -> ApiError {
        // Logged here, where it is handled; the caller gets no internals.
        tracing::error!(%error, "request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the server log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(proto::ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// 429 with `Retry-After` (seconds) and a JSON `{"error"}`: come back later, not never.
pub fn retry_later(after_s: u64, message: impl Into<String>) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, after_s.to_string())],
        Json(proto::ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "storage": state.storage.backend_name() }))
}

fn bearer_token(request: &Request) -> Option<String> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// No `Origin` header (not a browser, or a same-origin GET), or one naming this host.
fn same_origin(request: &Request) -> bool {
    let Some(origin) = request.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin_host = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

fn cookie_token(request: &Request) -> Option<String> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_string())
}

async fn authenticate(
    State(state): State<AppState>,
    access: Access,
    mut request: Request,
    next: Next,
) -> Response {
    match access {
        Access::Public => {}
        Access::User(required) => {
            let bearer = bearer_token(&request);
            if bearer.is_none() && !same_origin(&request) {
                // The cookie is an ambient credential: another site's page must not use it
                // (cross-site WebSockets and form posts carry the cookie but name their origin).
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "cross-origin request refused: the session cookie only works from this control plane's own pages",
                )
                .into_response();
            }
            let Some(token) = bearer.or_else(|| cookie_token(&request)) else {
                return ApiError::unauthorized("log in first: POST /api/v1/sessions")
                    .into_response();
            };
            let now_ms = state.world.now_unix_ms();
            match state
                .storage
                .user_by_token(&secret_hash(&token), now_ms)
                .await
            {
                Ok(Some(user)) if user.role.allows(required) => {
                    request.extensions_mut().insert(AuthUser(user));
                }
                Ok(Some(user)) => {
                    return ApiError::new(
                        StatusCode::FORBIDDEN,
                        format!(
                            "role {} may not do this; {} required",
                            user.role.as_str(),
                            required.as_str()
                        ),
                    )
                    .into_response();
                }
                Ok(None) => {
                    return ApiError::unauthorized("session expired or unknown; log in again")
                        .into_response();
                }
                Err(e) => return ApiError::internal(e).into_response(),
            }
        }
        Access::Agent => {
            let Some(token) = bearer_token(&request) else {
                return ApiError::unauthorized("agent credential required").into_response();
            };
            match state
                .storage
                .agent_by_credential(&secret_hash(&token))
                .await
            {
                Ok(Some(agent)) => {
                    request.extensions_mut().insert(AuthAgent(agent));
                }
                Ok(None) => {
                    return ApiError::unauthorized(
                        "unknown agent credential; enroll the agent again",
                    )
                    .into_response();
                }
                Err(e) => return ApiError::internal(e).into_response(),
            }
        }
    }
    next.run(request).await
}
