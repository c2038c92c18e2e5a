//! Users and agents as admins manage them: list users, change a role, disable, enable or
//! delete a user, remove an agent. The rules live in [`crate::accounts`].

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::accounts::{self, AccountError, UserChange};
use crate::audit::action;
use crate::auth::Role;
use crate::edge::{ApiError, AuthUser};
use crate::handles::Handles;

#[derive(Serialize, schemars::JsonSchema)]
pub struct UserView {
    name: String,
    role: &'static str,
    /// A disabled user cannot log in and holds no token.
    disabled: bool,
    created_at: String,
}

/// `GET /api/v1/users` (admin): every user, by name.
pub async fn list(State(state): State<Handles>) -> Result<Json<Vec<UserView>>, ApiError> {
    let users = state
        .storage
        .list_users()
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        users
            .into_iter()
            .map(|u| UserView {
                name: u.name,
                role: u.role.as_str(),
                disabled: u.disabled,
                created_at: crate::time::rfc3339_ms(u.created_at_ms),
            })
            .collect(),
    ))
}

/// The body of `PATCH /api/v1/users/{name}`: any of the two.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// viewer, operator or admin.
    role: Option<String>,
    /// true disables the user and deletes its tokens; false enables it again.
    disabled: Option<bool>,
}

fn refusal(error: AccountError) -> ApiError {
    match error {
        AccountError::NoSuchUser(_) | AccountError::NoSuchAgent(_) => {
            ApiError::new(StatusCode::NOT_FOUND, error.to_string())
        }
        AccountError::LastAdmin(_) | AccountError::UserExists(_) => {
            ApiError::new(StatusCode::CONFLICT, error.to_string())
        }
        AccountError::BadName(_) | AccountError::BadPassword => {
            ApiError::new(StatusCode::BAD_REQUEST, error.to_string())
        }
        AccountError::Storage(e) => ApiError::internal(e),
        AccountError::Hash(_) => ApiError::internal(error),
    }
}

/// `PATCH /api/v1/users/{name}` (admin): change a role, disable or enable; effective at once.
pub async fn change(
    State(state): State<Handles>,
    axum::Extension(AuthUser(admin)): axum::Extension<AuthUser>,
    Path(name): Path<String>,
    Json(patch): Json<UserPatch>,
) -> Result<StatusCode, ApiError> {
    let mut changes = Vec::new();
    if let Some(role) = &patch.role {
        let role = Role::parse(role).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "role must be viewer, operator or admin",
            )
        })?;
        changes.push(UserChange::Role(role));
    }
    match patch.disabled {
        Some(true) => changes.push(UserChange::Disable),
        Some(false) => changes.push(UserChange::Enable),
        None => {}
    }
    if changes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "give role, disabled or both",
        ));
    }
    for change in changes {
        accounts::change_user(&state.storage, &name, change)
            .await
            .map_err(refusal)?;
    }
    state
        .audit
        .record(
            &admin.name,
            action::USER_CHANGED,
            &name,
            serde_json::json!({"role": patch.role, "disabled": patch.disabled}),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/v1/users/{name}` (admin): the user and its tokens are gone.
pub async fn delete(
    State(state): State<Handles>,
    axum::Extension(AuthUser(admin)): axum::Extension<AuthUser>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let was = accounts::change_user(&state.storage, &name, UserChange::Delete)
        .await
        .map_err(refusal)?;
    state
        .audit
        .record(
            &admin.name,
            action::USER_DELETED,
            &name,
            serde_json::json!({"role": was.role.as_str()}),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/v1/agents/{id}` (admin): its credential stops working and its channel ends at
/// its next heartbeat; its stored tasks and metrics go. The host keeps running the agent,
/// which is refused until it is enrolled again.
pub async fn remove_agent(
    State(state): State<Handles>,
    axum::Extension(AuthUser(admin)): axum::Extension<AuthUser>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name = state
        .storage
        .agent(&id)
        .await
        .map_err(ApiError::internal)?
        .map(|a| a.name);
    accounts::remove_agent(&state.storage, &id)
        .await
        .map_err(refusal)?;
    state
        .audit
        .record(
            &admin.name,
            action::AGENT_REMOVED,
            &id,
            serde_json::json!({"name": name}),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// How long a credential-rotation token stays valid.
const REKEY_TOKEN_TTL_MS: i64 = 3_600_000;

#[derive(Serialize, schemars::JsonSchema)]
pub struct RekeyToken {
    /// Single use: `outpost-agent enroll --force --token TOKEN` on the agent's host.
    token: String,
    expires_at: String,
}

/// `POST /api/v1/agents/{id}/rekey` (admin): a single-use token that gives this agent a new
/// credential when its host enrolls with it; the old credential stops working then, and the
/// agent keeps its id, tasks and metrics.
pub async fn rekey_token(
    State(state): State<Handles>,
    axum::Extension(AuthUser(admin)): axum::Extension<AuthUser>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RekeyToken>), ApiError> {
    let token = crate::auth::new_secret(&state.world, crate::auth::SecretKind::EnrollToken);
    let now_ms = state.world.now_unix_ms();
    let expires_at_ms = now_ms + REKEY_TOKEN_TTL_MS;
    if !state
        .storage
        .create_rekey_token(
            &crate::auth::secret_hash(&token),
            &id,
            now_ms,
            expires_at_ms,
        )
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no agent {id:?}"),
        ));
    }
    state
        .audit
        .record(
            &admin.name,
            action::AGENT_REKEY_TOKEN,
            &id,
            serde_json::json!({}),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(RekeyToken {
            token,
            expires_at: crate::time::rfc3339_ms(expires_at_ms),
        }),
    ))
}
