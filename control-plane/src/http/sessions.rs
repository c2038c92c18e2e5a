//! `POST /api/v1/sessions`: log in with a user name and password, get an API token (also set
//! as an HttpOnly, SameSite=Strict session cookie).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::audit::action;
use crate::auth::{self, SecretKind};
use crate::edge::{ApiError, session_cookie_name};
use crate::handles::Handles;
use crate::throttle::{BUSY_RETRY, LoginThrottle, Name, Refusal};

#[derive(Deserialize, schemars::JsonSchema)]
pub struct LoginRequest {
    username: String,
    password: String,
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct LoginResponse {
    token: String,
    expires_at: String,
}

const USERNAME_BYTES_MAX: usize = 128;
/// How long a login waits for a password check to be free before it is told to come back.
const CHECK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// An attempt let through by the throttle: abandoned on drop unless it ended as a success or
/// a failure (an error, or a client that left mid-check, must not hold a place forever).
struct Attempt<'a> {
    logins: &'a LoginThrottle,
    name: Name<'a>,
    now_ms: i64,
    ended: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.logins.abandoned(self.name, self.now_ms);
        }
    }
}

pub async fn login(
    State(state): State<Handles>,
    State(logins): State<std::sync::Arc<LoginThrottle>>,
    Json(body): Json<LoginRequest>,
) -> Result<Response, ApiError> {
    let refused = || ApiError::unauthorized("invalid user name or password");
    if body.username.len() > USERNAME_BYTES_MAX || body.password.len() > auth::PASSWORD_BYTES_MAX {
        return Err(refused());
    }
    let now_ms = state.world.now_unix_ms();
    // Anyone can send logins: refusals are audited up to a budget per minute, then counted.
    let audit_refused = |reason: &'static str| {
        let audited = logins.may_audit_refusal(now_ms);
        if !audited {
            crate::observe::add(&state.observed.login_refusals_unaudited_total, 1);
        }
        let record = state.audit.record(
            &body.username,
            action::LOGIN_REFUSED,
            &body.username,
            serde_json::json!({ "reason": reason }),
        );
        async move {
            if audited {
                record.await;
            }
        }
    };
    // Whether the name is a user decides where its failures are kept: junk names share a
    // fixed table and cannot push a real user's lockout out.
    let user = state
        .storage
        .user_by_name(&body.username)
        .await
        .map_err(ApiError::internal)?;
    let name = match &user {
        Some(_) => Name::Known(&body.username),
        None => Name::Unknown(&body.username),
    };
    // Counted before the password check, so parallel guesses get no more checks than a
    // sequence; released when the attempt ends, whichever way (the client may leave).
    if let Err(refusal) = logins.begin(name, now_ms) {
        return Ok(refused_for_now(&state, refusal));
    }
    let mut attempt = Attempt {
        logins: &logins,
        name,
        now_ms,
        ended: false,
    };
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| auth::DUMMY_PASSWORD_HASH.to_string());
    let password = body.password;
    // One check per core at most: a flood of argon2 must not starve storage and heartbeats.
    let Ok(Ok(_permit)) = tokio::time::timeout(CHECK_WAIT_MAX, logins.checks().acquire()).await
    else {
        return Ok(crate::edge::retry_later(
            BUSY_RETRY.as_secs(),
            "too many logins are being checked; try again shortly",
        ));
    };
    let verified = state
        .world
        .blocking(move || auth::verify_password(&hash, &password))
        .await
        .map_err(ApiError::internal)?;
    let Some(user) = user.filter(|_| verified) else {
        tracing::info!(user = ?body.username, "login refused");
        crate::observe::add(&state.observed.login_failures_total, 1);
        attempt.ended = true;
        let lockout = logins.failed(name, now_ms);
        audit_refused("invalid user name or password").await;
        if let Some(lockout) = lockout {
            crate::observe::add(&state.observed.login_lockouts_total, 1);
            tracing::warn!(user = ?body.username, lockout_s = lockout.as_secs(), "repeated failed logins: locked out");
            audit_refused("locked out after repeated failures").await;
        }
        return Err(refused());
    };
    attempt.ended = true;
    logins.succeeded(name, now_ms);
    open_session(&state, &user, now_ms).await
}

/// The 429 for an attempt the throttle did not let through. Not audited one by one (anyone
/// can send these): the lockout was recorded when it began, and refusals are counted.
fn refused_for_now(state: &Handles, refusal: Refusal) -> Response {
    crate::observe::add(&state.observed.login_refused_busy_total, 1);
    let secs = refusal.retry_after().as_secs().max(1);
    crate::edge::retry_later(
        secs,
        match refusal {
            Refusal::Locked(_) => {
                format!("too many failed logins for this user: locked for {secs} s")
            }
            Refusal::Checking => {
                format!("another login for this user is being checked; try again in {secs} s")
            }
        },
    )
}

/// A verified login: a new API token stored (its hash), audited, and answered with the
/// token and the session cookie.
async fn open_session(
    state: &Handles,
    user: &crate::storage::UserRow,
    now_ms: i64,
) -> Result<Response, ApiError> {
    let token = auth::new_secret(&state.world, SecretKind::ApiToken);
    let ttl = state.settings.session_ttl;
    let expires_at_ms = now_ms.saturating_add(crate::time::duration_ms(ttl));
    if let Err(error) = state.storage.purge_expired(now_ms).await {
        tracing::warn!(%error, "purge expired tokens");
    }
    state
        .storage
        .create_api_token(&auth::secret_hash(&token), &user.id, now_ms, expires_at_ms)
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(user = ?user.name, role = user.role.as_str(), "login");
    state
        .audit
        .record(
            &user.name,
            action::LOGIN,
            &user.name,
            serde_json::json!({"role": user.role.as_str()}),
        )
        .await;
    let cookie = session_cookie(state, &token, ttl.as_secs());
    let body = LoginResponse {
        token,
        expires_at: crate::time::rfc3339_ms(expires_at_ms),
    };
    Ok((StatusCode::OK, [(header::SET_COOKIE, cookie)], Json(body)).into_response())
}

/// `DELETE /api/v1/sessions`: the token that authenticated this request stops working at
/// once, on every replica (tokens live in storage); the session cookie is cleared.
pub async fn logout(
    State(state): State<Handles>,
    axum::Extension(crate::edge::AuthUser(user)): axum::Extension<crate::edge::AuthUser>,
    axum::Extension(crate::edge::AuthTokenHash(token_hash)): axum::Extension<
        crate::edge::AuthTokenHash,
    >,
) -> Result<Response, ApiError> {
    state
        .storage
        .revoke_token(&token_hash)
        .await
        .map_err(ApiError::internal)?;
    state
        .audit
        .record(
            &user.name,
            action::LOGOUT,
            &user.name,
            serde_json::json!({}),
        )
        .await;
    let cleared = session_cookie(&state, "", 0);
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, cleared)]).into_response())
}

/// The `Set-Cookie` value carrying `token` for `max_age_s` (0 clears it); `Secure` and named
/// `__Host-…` under HTTPS or behind a TLS proxy.
fn session_cookie(state: &Handles, token: &str, max_age_s: u64) -> String {
    let tls = state.settings.secure_cookies;
    let name = session_cookie_name(tls);
    let secure = if tls { "; Secure" } else { "" };
    format!("{name}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{secure}")
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct TokenView {
    /// Names the token in `DELETE /api/v1/tokens/{id}` (a prefix of its hash, not the secret).
    id: String,
    user: String,
    created_at: String,
    expires_at: String,
    /// The token this request was made with.
    current: bool,
}

/// `GET /api/v1/tokens` (admin): every unexpired login and API token, newest first.
pub async fn tokens(
    State(state): State<Handles>,
    axum::Extension(crate::edge::AuthTokenHash(current)): axum::Extension<
        crate::edge::AuthTokenHash,
    >,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let rows = state
        .storage
        .list_tokens(state.world.now_unix_ms())
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        rows.into_iter()
            .map(|row| TokenView {
                current: current.starts_with(&row.id),
                id: row.id,
                user: row.user,
                created_at: crate::time::rfc3339_ms(row.created_at_ms),
                expires_at: crate::time::rfc3339_ms(row.expires_at_ms),
            })
            .collect(),
    ))
}

/// `DELETE /api/v1/tokens/{id}` (admin): the token stops working at once, on every replica;
/// browser terminal sockets opened with it close within seconds.
pub async fn revoke(
    State(state): State<Handles>,
    axum::Extension(crate::edge::AuthUser(user)): axum::Extension<crate::edge::AuthUser>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let len = crate::storage::TOKEN_ID_LEN;
    if id.len() != len || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("a token id is {len} hex digits, as GET /api/v1/tokens lists them"),
        ));
    }
    let id = id.to_ascii_lowercase();
    if !state
        .storage
        .revoke_token_id(&id)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no unexpired token {id}"),
        ));
    }
    state
        .audit
        .record(
            &user.name,
            action::TOKEN_REVOKED,
            &id,
            serde_json::json!({}),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct Me {
    id: String,
    name: String,
    role: &'static str,
}

/// `GET /api/v1/me`: who the credentials belong to (the UI shows controls by role).
pub async fn me(
    axum::Extension(crate::edge::AuthUser(user)): axum::Extension<crate::edge::AuthUser>,
) -> Json<Me> {
    Json(Me {
        id: user.id,
        name: user.name,
        role: user.role.as_str(),
    })
}
