//! The audit log: logins, terminal sessions, task creation and cancellation, exec runs and
//! enrollments, stored with the rest of the control plane's state and listed by
//! `GET /api/v1/audit`.
//!
//! Recording never fails the action it describes (the action already happened); a record that
//! could not be stored is logged at error level and counted in
//! `outpost_audit_write_failures_total`.

use std::sync::Arc;

use world::World;

use crate::observe::Observed;
use crate::storage::{AuditRow, Storage};

/// Audit actions. Strings, so old records stay readable when new actions appear.
pub mod action {
    pub const LOGIN: &str = "login";
    pub const LOGIN_REFUSED: &str = "login.refused";
    pub const LOGOUT: &str = "logout";
    pub const TOKEN_REVOKED: &str = "token.revoked";
    /// An API token was made (`outpost admin api-token`).
    pub const TOKEN_CREATED: &str = "token.created";
    pub const ENROLL_TOKEN_CREATED: &str = "enroll_token.created";
    pub const ENROLL_TOKEN_REVOKED: &str = "enroll_token.revoked";
    /// A new key for the replicas' Redis entries (`outpost admin rotate-signing-key`).
    pub const SIGNING_KEY_ROTATED: &str = "signing_key.rotated";
    pub const USER_CREATED: &str = "user.created";
    pub const USER_CHANGED: &str = "user.changed";
    pub const USER_DELETED: &str = "user.deleted";
    pub const AGENT_REMOVED: &str = "agent.removed";
    /// A token to rotate an agent's credential was made.
    pub const AGENT_REKEY_TOKEN: &str = "agent.rekey_token";
    pub const AGENT_ENROLLED: &str = "agent.enrolled";
    pub const TERMINAL_OPENED: &str = "terminal.opened";
    pub const TERMINAL_ENDED: &str = "terminal.ended";
    /// A browser attached to a session (its owner, or an admin watching someone else's).
    pub const TERMINAL_ATTACHED: &str = "terminal.attached";
    /// A terminal link dialed with the agent's credential but without the session's link secret.
    pub const TERMINAL_LINK_REFUSED: &str = "terminal.link_refused";
    /// A recording was played back in the UI (or fetched without `download`).
    pub const RECORDING_REPLAYED: &str = "recording.replayed";
    /// A recording was downloaded as a `.cast` file.
    pub const RECORDING_DOWNLOADED: &str = "recording.downloaded";
    /// Recordings were searched for words (target: whose recordings, empty for everyone's).
    pub const RECORDING_SEARCHED: &str = "recording.searched";
    /// A task request was accepted, before it is sent to the agent; `task.created` (the
    /// agent made it) or `task.refused` follows with the same `request` id.
    pub const TASK_REQUESTED: &str = "task.requested";
    pub const TASK_CREATED: &str = "task.created";
    pub const TASK_REFUSED: &str = "task.refused";
    pub const TASK_CANCELED: &str = "task.canceled";
    /// A backup policy was created or deleted (target: its id).
    /// An admin replaced an agent's labels, or the agent's config set some (actor
    /// `agent:NAME`; target: the agent id).
    pub const AGENT_LABELED: &str = "agent.labeled";
    pub const BACKUP_POLICY_CREATED: &str = "backup_policy.created";
    pub const BACKUP_POLICY_DELETED: &str = "backup_policy.deleted";
    /// An alert rule override or a notification channel was created or deleted (target: its
    /// name).
    pub const ALERT_RULE_CHANGED: &str = "alert_rule.created";
    pub const ALERT_RULE_DELETED: &str = "alert_rule.deleted";
    pub const ALERT_CHANNEL_CREATED: &str = "alert_channel.created";
    pub const ALERT_CHANNEL_DELETED: &str = "alert_channel.deleted";
    /// A silence was created (by a user or an agent) or ended early (target: its id).
    pub const SILENCE_CREATED: &str = "silence.created";
    pub const SILENCE_ENDED: &str = "silence.ended";
    /// A maintenance window was created or deleted (target: its name).
    pub const WINDOW_CREATED: &str = "window.created";
    pub const WINDOW_DELETED: &str = "window.deleted";
    /// A rollout was created, paused, resumed, approved, aborted or retried by an operator
    /// (target: its id), or the driver started a wave, halted it or finished it (actor
    /// `rollout-driver`).
    pub const ROLLOUT_CREATED: &str = "rollout.created";
    pub const ROLLOUT_CONTROLLED: &str = "rollout.controlled";
    pub const ROLLOUT_WAVE: &str = "rollout.wave";
    pub const ROLLOUT_HALTED: &str = "rollout.halted";
    pub const ROLLOUT_DONE: &str = "rollout.done";
    pub const EXEC_RUN: &str = "exec.run";
    pub const EXEC_FINISHED: &str = "exec.finished";
}

/// The handle every feature records through.
#[derive(Clone)]
pub struct Audit {
    world: World,
    storage: Storage,
    observed: Arc<Observed>,
}

impl Audit {
    pub fn new(world: World, storage: Storage, observed: Arc<Observed>) -> Audit {
        Audit {
            world,
            storage,
            observed,
        }
    }

    /// Store one record: `actor` did `action` to `target`; `detail` is any JSON object.
    pub async fn record(&self, actor: &str, action: &str, target: &str, detail: serde_json::Value) {
        let row = AuditRow {
            id: 0,
            ts_ms: self.world.now_unix_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail: detail.to_string(),
        };
        if let Err(error) = self.storage.audit_append(row).await {
            crate::observe::add(&self.observed.audit_write_failures_total, 1);
            tracing::error!(%error, actor, action, target, "audit record not stored");
        }
    }
}
