//! The HTTP edge: every route is declared once in [`routes`] with its [`Access`] level, and
//! the router applies authentication from that declaration. A route cannot be added without
//! choosing an access level, and `tests/it/auth.rs` enumerates [`route_specs`] to prove that
//! every non-public route answers 401 without credentials.

mod access;
mod agents;
mod alerts;
pub mod backup_policies;
mod backups;
mod deadlines;
pub(crate) mod metrics;
mod observe;
pub mod openapi;
pub mod rollouts;
mod sessions;
mod tasks;
mod users;
mod web;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use axum::{Json, Router};

pub use self::access::{Access, RouteSpec};
use crate::auth::{Role, secret_hash};
use crate::edge::{ApiError, AuthAgent, AuthUser, session_cookie_name};
use crate::state::AppState;

/// Largest request body any route accepts.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;

/// Every route with who may call it, by area; the router and the OpenAPI document are both
/// made from this one table.
fn routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
    [
        public_routes(),
        account_routes(),
        agent_routes(),
        rollout_routes(),
        alert_routes(),
        terminal_routes(),
        operation_routes(),
    ]
    .concat()
}

fn spec(method: Method, path: &'static str, access: Access) -> RouteSpec {
    RouteSpec {
        method,
        path,
        access,
    }
}

/// What anybody may reach: health, the web UI's files, login and agent enrollment.
fn public_routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
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
    ]
}

/// The caller's own session and tokens, and users (admin).
fn account_routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
    vec![
        (
            spec(
                Method::DELETE,
                "/api/v1/sessions",
                Access::User(Role::Viewer),
            ),
            delete(sessions::logout),
        ),
        (
            spec(Method::GET, "/api/v1/me", Access::User(Role::Viewer)),
            get(sessions::me),
        ),
        (
            spec(Method::GET, "/api/v1/tokens", Access::User(Role::Admin)),
            get(sessions::tokens),
        ),
        (
            spec(
                Method::DELETE,
                "/api/v1/tokens/{id}",
                Access::User(Role::Admin),
            ),
            delete(sessions::revoke),
        ),
        (
            spec(Method::GET, "/api/v1/users", Access::User(Role::Admin)),
            get(users::list),
        ),
        (
            spec(
                Method::PATCH,
                "/api/v1/users/{name}",
                Access::User(Role::Admin),
            ),
            patch(users::change),
        ),
        (
            spec(
                Method::DELETE,
                "/api/v1/users/{name}",
                Access::User(Role::Admin),
            ),
            delete(users::delete),
        ),
    ]
}

/// Alerts: their rules, channels, silences and maintenance windows, and a host silencing
/// itself.
fn alert_routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
    vec![
        (
            spec(Method::GET, "/api/v1/alerts", Access::User(Role::Viewer)),
            get(alerts::list),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/alert-rules",
                Access::User(Role::Viewer),
            ),
            get(alerts::rules),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/alert-rules",
                Access::User(Role::Admin),
            ),
            post(alerts::create_override),
        ),
        (
            spec(
                Method::DELETE,
                "/api/v1/alert-rules/{name}",
                Access::User(Role::Admin),
            ),
            delete(alerts::delete_override),
        ),
        (
            spec(Method::GET, "/api/v1/windows", Access::User(Role::Viewer)),
            get(alerts::list_windows),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/windows",
                Access::User(Role::Operator),
            ),
            post(alerts::create_window),
        ),
        (
            spec(
                Method::DELETE,
                "/api/v1/windows/{name}",
                Access::User(Role::Operator),
            ),
            delete(alerts::delete_window),
        ),
        (
            spec(Method::GET, "/api/v1/silences", Access::User(Role::Viewer)),
            get(alerts::list_silences),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/silences",
                Access::User(Role::Operator),
            ),
            post(alerts::create_silence),
        ),
        (
            spec(
                Method::DELETE,
                "/api/v1/silences/{id}",
                Access::User(Role::Operator),
            ),
            delete(alerts::end_silence),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/alert-channels",
                Access::User(Role::Viewer),
            ),
            get(alerts::channels),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/alert-channels",
                Access::User(Role::Admin),
            ),
            post(alerts::create_channel),
        ),
        (
            spec(
                Method::DELETE,
                "/api/v1/alert-channels/{name}",
                Access::User(Role::Admin),
            ),
            delete(alerts::delete_channel),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/alert-channels/{name}/test",
                Access::User(Role::Admin),
            ),
            post(alerts::test_channel),
        ),
        (
            spec(Method::POST, proto::SILENCES_PATH, Access::Agent),
            post(alerts::agent_silence),
        ),
    ]
}

/// Agents, their tasks and metrics, and the agents' own channel and delivery.
/// Rollouts: the dry run, creation, status and an operator's controls.
fn rollout_routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
    vec![
        (
            spec(
                Method::POST,
                "/api/v1/rollouts/dry-run",
                Access::User(Role::Operator),
            ),
            post(rollouts::dry_run),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/rollouts",
                Access::User(Role::Operator),
            ),
            post(rollouts::create),
        ),
        (
            spec(Method::GET, "/api/v1/rollouts", Access::User(Role::Viewer)),
            get(rollouts::list),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/rollouts/{id}",
                Access::User(Role::Viewer),
            ),
            get(rollouts::show),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/rollouts/{id}/{action}",
                Access::User(Role::Operator),
            ),
            post(rollouts::control),
        ),
    ]
}

fn agent_routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
    vec![
        (
            spec(
                Method::DELETE,
                "/api/v1/agents/{id}",
                Access::User(Role::Admin),
            ),
            delete(users::remove_agent),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/agents/{id}/rekey",
                Access::User(Role::Admin),
            ),
            post(users::rekey_token),
        ),
        (
            spec(Method::GET, "/api/v1/agents", Access::User(Role::Viewer)),
            get(agents::list),
        ),
        (
            spec(
                Method::PUT,
                "/api/v1/agents/{id}/labels",
                Access::User(Role::Admin),
            ),
            put(agents::set_labels),
        ),
        (
            spec(Method::GET, "/api/v1/backups", Access::User(Role::Viewer)),
            get(backups::list),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/backup-policies",
                Access::User(Role::Viewer),
            ),
            get(backup_policies::list),
        ),
        (
            spec(
                Method::POST,
                "/api/v1/backup-policies",
                Access::User(Role::Operator),
            ),
            post(backup_policies::create),
        ),
        (
            spec(
                Method::DELETE,
                "/api/v1/backup-policies/{id}",
                Access::User(Role::Operator),
            ),
            delete(backup_policies::delete),
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
    ]
}

/// Browser terminals and their recordings, and the agents' side of a session.
fn terminal_routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
    vec![
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
                "/api/v1/terminal/sessions",
                Access::User(Role::Operator),
            ),
            get(crate::terminal::browser::list),
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
            spec(
                Method::GET,
                "/api/v1/terminal/recordings",
                Access::User(Role::Viewer),
            ),
            get(crate::terminal::recording::api::list),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/terminal/recordings/{id}",
                Access::User(Role::Viewer),
            ),
            get(crate::terminal::recording::api::show),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/terminal/recordings/{id}/cast",
                Access::User(Role::Viewer),
            ),
            get(crate::terminal::recording::api::download),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/terminal/recordings/{id}/verify",
                Access::User(Role::Viewer),
            ),
            get(crate::terminal::recording::api::check),
        ),
        (
            spec(Method::GET, "/api/v1/agent/terminal/{id}", Access::Agent),
            get(crate::terminal::agent_link::upgrade),
        ),
    ]
}

/// SSH operations, the Prometheus endpoint, the audit log and the API description.
fn operation_routes() -> Vec<(RouteSpec, MethodRouter<AppState>)> {
    vec![
        (
            spec(Method::POST, "/api/v1/exec", Access::User(Role::Operator)),
            post(crate::exec::api::start),
        ),
        (
            spec(
                Method::GET,
                "/api/v1/exec/{op_id}",
                Access::User(Role::Operator),
            ),
            get(crate::exec::api::show),
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
            get(openapi_json),
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
    let hsts = state.settings.secure_cookies;
    router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            deadlines::enforce,
        ))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::map_response(move |response| {
            security_headers(response, hsts)
        }))
        .with_state(state)
}

/// Every refusal is JSON (`{"error": …}`, as the OpenAPI document says), also the plain-text
/// ones axum's extractors write (a body that is not JSON, a wrong content type, a bad path).
async fn json_errors(response: Response) -> Response {
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    let status = response.status();
    if !(plain && (status.is_client_error() || status.is_server_error())) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let json = serde_json::to_vec(&proto::ErrorBody { error: text }).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(json))
}

/// The UI loads its scripts and styles from this origin only (no inline script; xterm.js and
/// uPlot set inline styles), talks only to this origin (HTTP and WebSocket), and may not be
/// framed; every answer says what its type is; under TLS browsers are told to keep using it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'";

async fn security_headers(mut response: Response, hsts: bool) -> Response {
    let headers = response.headers_mut();
    let fixed = [
        (
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            header::HeaderValue::from_static("nosniff"),
        ),
        (
            header::X_FRAME_OPTIONS,
            header::HeaderValue::from_static("DENY"),
        ),
        (
            header::REFERRER_POLICY,
            header::HeaderValue::from_static("no-referrer"),
        ),
    ];
    for (name, value) in fixed {
        headers.insert(name, value);
    }
    if hsts {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            header::HeaderValue::from_static("max-age=31536000"),
        );
    }
    response
}

/// `GET /api/openapi.json`: generated from the route table on every request.
async fn openapi_json() -> Json<serde_json::Value> {
    Json(openapi::document(&route_specs()))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

/// Liveness: 200 whenever the replica serves requests. A terminal stream store that does not
/// answer only disables terminals, so it is reported here, not made a failure.
async fn healthz(
    State(state): State<AppState>,
    State(terminal): State<crate::terminal::Terminal>,
) -> Json<serde_json::Value> {
    let reachable = match terminal.streams.ping().await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "healthz: terminal store unavailable; terminals are refused");
            false
        }
    };
    Json(serde_json::json!({
        "status": "ok",
        "storage": state.storage.backend_name(),
        "terminal_store": { "backend": terminal.streams.backend_name(), "reachable": reachable },
    }))
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

/// The session cookie's value: under TLS only the `__Host-` cookie counts.
fn cookie_token(request: &Request, tls: bool) -> Option<String> {
    let name = session_cookie_name(tls);
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(found, _)| *found == name)
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
            let Some(token) =
                bearer.or_else(|| cookie_token(&request, state.settings.secure_cookies))
            else {
                return ApiError::unauthorized("log in first: POST /api/v1/sessions")
                    .into_response();
            };
            let now_ms = state.world.now_unix_ms();
            let token_hash = secret_hash(&token);
            match state.storage.user_by_token(&token_hash, now_ms).await {
                Ok(Some(user)) if user.role.allows(required) => {
                    request.extensions_mut().insert(AuthUser(user));
                    request
                        .extensions_mut()
                        .insert(crate::edge::AuthTokenHash(token_hash));
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
