//! Changing who may act: creating users (the name and password rules), a user's role,
//! disabling, enabling and deleting users, removing agents.
//! The API (`http/users.rs`, `http/agents.rs`) and `outpost admin` both go through here, so the
//! same rules hold on either path: the last enabled admin cannot be demoted, disabled or deleted.
//! Every change takes effect at once on every replica: tokens carry no role and are checked
//! against storage on each request, a disabled or deleted user's tokens are gone, and a removed
//! agent's channel ends at its next heartbeat.

use world::World;

use crate::auth::{self, Role};
use crate::storage::{Storage, StorageError, UserApplied, UserInfo, UserRow};

/// A change to one user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserChange {
    Role(Role),
    Disable,
    Enable,
    Delete,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("no user {0:?}")]
    NoSuchUser(String),
    #[error("{0:?} is the last enabled admin: make another user admin first")]
    LastAdmin(String),
    #[error("no agent {0:?}")]
    NoSuchAgent(String),
    #[error("user name {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error(
        "password must be {} to {} bytes long",
        auth::PASSWORD_CHARS_MIN,
        auth::PASSWORD_BYTES_MAX
    )]
    BadPassword,
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("hash the password: {0}")]
    Hash(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Whether `name` may be a login name: 1-64 characters of A-Z a-z 0-9 . _ -
pub fn valid_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Whether `password` has an allowed length (checked before anything is stored).
pub fn valid_password(password: &str) -> bool {
    password.chars().count() >= auth::PASSWORD_CHARS_MIN
        && password.len() <= auth::PASSWORD_BYTES_MAX
}

/// Create user `name` with `role` and `password` (hashed here, on a blocking thread).
pub async fn create_user(
    world: &World,
    storage: &Storage,
    name: &str,
    role: Role,
    password: String,
) -> Result<(), AccountError> {
    if !valid_user_name(name) {
        return Err(AccountError::BadName(name.to_string()));
    }
    if !valid_password(&password) {
        return Err(AccountError::BadPassword);
    }
    let salt = world.random_bytes::<16>();
    let hash = world
        .blocking(move || auth::hash_password(salt, &password))
        .await
        .map_err(|e| AccountError::Hash(e.to_string()))?
        .map_err(|e| AccountError::Hash(e.to_string()))?;
    let user = UserRow {
        id: auth::new_id(world, "usr"),
        name: name.to_string(),
        role,
        password_hash: hash,
        created_at_ms: world.now_unix_ms(),
    };
    match storage.create_user(user).await {
        Ok(()) => Ok(()),
        Err(StorageError::Conflict(_)) => Err(AccountError::UserExists(name.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Apply `change` to user `name`; returns the user as it was before. The last-admin rule is
/// checked by storage in the statement that makes the change, so concurrent demotions (on any
/// replica, or from `outpost admin`) cannot together remove every admin.
pub async fn change_user(
    storage: &Storage,
    name: &str,
    change: UserChange,
) -> Result<UserInfo, AccountError> {
    let before = storage
        .list_users()
        .await?
        .into_iter()
        .find(|u| u.name == name)
        .ok_or_else(|| AccountError::NoSuchUser(name.to_string()))?;
    let applied = match change {
        UserChange::Role(role) => storage.set_user_role(name, role).await?,
        UserChange::Disable => storage.set_user_disabled(name, true).await?,
        UserChange::Enable => storage.set_user_disabled(name, false).await?,
        UserChange::Delete => storage.delete_user(name).await?,
    };
    match applied {
        UserApplied::Done => Ok(before),
        UserApplied::NoSuchUser => Err(AccountError::NoSuchUser(name.to_string())),
        UserApplied::LastAdmin => Err(AccountError::LastAdmin(name.to_string())),
    }
}

/// Remove agent `agent_id`: its credential stops working, its stored tasks and metrics go.
pub async fn remove_agent(storage: &Storage, agent_id: &str) -> Result<(), AccountError> {
    if storage.remove_agent(agent_id).await? {
        Ok(())
    } else {
        Err(AccountError::NoSuchAgent(agent_id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::valid_user_name;

    #[test]
    fn user_names_are_short_and_plain() {
        for good in ["admin", "a", "ops.team_2-eu", &"x".repeat(64)] {
            assert!(valid_user_name(good), "{good:?}");
        }
        for bad in ["", "two words", "émile", "a/b", "a:b", &"x".repeat(65)] {
            assert!(!valid_user_name(bad), "{bad:?}");
        }
    }
}
