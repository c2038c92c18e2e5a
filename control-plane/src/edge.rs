//! The edge types every handler shares: the authenticated caller (a user or an agent) that
//! the auth layer puts into request extensions, and the API error every route answers with.
//! A leaf: it imports nothing of the control plane but storage rows.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::storage::{AgentRow, UserRow};

/// Name of the browser session cookie over plain HTTP.
pub const SESSION_COOKIE: &str = "outpost_session";
/// Its name when the control plane is served over TLS (itself or behind a TLS proxy): the
/// `__Host-` prefix makes browsers accept it only when set `Secure`, by this host, for `/`,
/// so a sibling subdomain or a plain-HTTP page cannot plant a session cookie.
pub const SESSION_COOKIE_TLS: &str = "__Host-outpost_session";

/// The session cookie's name for a control plane served with (`true`) or without TLS.
pub fn session_cookie_name(tls: bool) -> &'static str {
    if tls {
        SESSION_COOKIE_TLS
    } else {
        SESSION_COOKIE
    }
}

/// The authenticated caller, inserted into request extensions by the auth layer.
#[derive(Clone, Debug)]
pub struct AuthUser(pub UserRow);

#[derive(Clone, Debug)]
pub struct AuthAgent(pub AgentRow);

/// The hash of the token (bearer or session cookie) that authenticated the request.
#[derive(Clone, Debug)]
pub struct AuthTokenHash(pub String);

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
