//! Changing who may act: a user's role, disabling, enabling and deleting users, removing agents.
//! The API (`http/users.rs`, `http/agents.rs`) and `outpost admin` both go through here, so the
//! same rules hold on either path: the last enabled admin cannot be demoted, disabled or deleted.
//! Every change takes effect at once on every replica: tokens carry no role and are checked
//! against storage on each request, a disabled or deleted user's tokens are gone, and a removed
//! agent's channel ends at its next heartbeat.

use crate::auth::Role;
use crate::storage::{Storage, StorageError, UserApplied, UserInfo};

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
    #[error(transparent)]
    Storage(#[from] StorageError),
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
