//! Backup policies: one schedule of pgBackRest tasks for a set of agents. A policy names its
//! agents (names, or patterns with `*`), a stanza, a cron schedule per backup type and for the
//! check, verify and restore drill, a time zone, the role to run on and a timeout. The tasks
//! it stands for have deterministic keys (`backup-policy:ID:WHAT`), so the agent derives the
//! same task id every time: sending one again changes nothing, and any replica may do it.
//!
//! The spec's rules, the tasks a policy wants on one agent (pure), and creation (the rules the
//! API and `outpost admin backup-policy-create` share). The reconciler that sends the tasks is
//! `http::backup_policies`.

use serde::{Deserialize, Serialize};

/// Every key a policy's task carries starts with this.
pub const KEY_PREFIX: &str = "backup-policy:";
/// Policies kept at most.
pub const POLICIES_MAX: usize = 200;

/// Why a policy was not created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error("a backup policy named {0:?} exists")]
    Exists(String),
    #[error("at most {POLICIES_MAX} backup policies; delete one first")]
    TooMany,
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

/// Check `spec` and store it as a new policy.
pub async fn create(
    world: &world::World,
    storage: &crate::storage::Storage,
    spec: &PolicySpec,
) -> Result<crate::storage::BackupPolicyRow, CreateError> {
    spec.validate().map_err(CreateError::Invalid)?;
    if storage.backup_policies().await?.len() >= POLICIES_MAX {
        return Err(CreateError::TooMany);
    }
    let row = crate::storage::BackupPolicyRow {
        id: crate::auth::new_id(world, "bp"),
        name: spec.name.trim().to_string(),
        spec: serde_json::to_string(spec).map_err(|e| CreateError::Invalid(e.to_string()))?,
        created_ms: world.now_unix_ms(),
    };
    if !storage.create_backup_policy(row.clone()).await? {
        return Err(CreateError::Exists(row.name));
    }
    Ok(row)
}
const NAME_BYTES_MAX: usize = 64;

/// What a policy asks for, as posted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique, 1 to 64 printable characters.
    pub name: String,
    /// Agent names or patterns where `*` stands for any characters (`["*"]`: every agent), or
    /// labels `KEY=VALUE` (the value may be a pattern).
    pub agents: Vec<String>,
    /// The pgBackRest stanza (the agents must grant it in `[backups] stanzas`).
    pub stanza: String,
    /// Five-field cron expressions per backup type; at least one.
    #[serde(default)]
    pub full: Option<String>,
    #[serde(default)]
    pub diff: Option<String>,
    #[serde(default)]
    pub incr: Option<String>,
    /// Cron expressions for `pgbackrest_check`, `pgbackrest_verify` and `restore_drill`.
    #[serde(default)]
    pub check: Option<String>,
    #[serde(default)]
    pub verify: Option<String>,
    #[serde(default)]
    pub drill: Option<String>,
    /// IANA time zone of every schedule (default UTC).
    #[serde(default)]
    pub tz: Option<String>,
    /// `primary` (default), `standby` or `any`: backups and checks on other hosts are
    /// recorded `skipped`.
    #[serde(default)]
    pub run_on: Option<String>,
    /// Timeout of each backup and drill (default 6h).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Recovery point objective of the selected hosts on the Backups page (default 26h).
    #[serde(default)]
    pub rpo: Option<String>,
    /// How long WAL may wait to be archived on them (default 15m).
    #[serde(default)]
    pub max_archive_lag: Option<String>,
}

fn cron_ok(expr: &str) -> bool {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    fields.len() == 5
        && fields.iter().all(|f| {
            f.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"*/,-".contains(&b))
        })
}

impl PolicySpec {
    /// Every refusal names the field. The agents check the rest (the cron expression's
    /// values, the time zone, the stanza's grant) and their refusals are shown per agent.
    pub fn validate(&self) -> Result<(), String> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > NAME_BYTES_MAX || name.chars().any(char::is_control) {
            return Err(format!(
                "name must be 1 to {NAME_BYTES_MAX} printable bytes"
            ));
        }
        crate::labels::selector_ok(&self.agents)?;
        if !proto::stanza_name_ok(&self.stanza) {
            return Err(format!(
                "stanza {:?} is not a stanza name (letters, digits, '-', '_', '.')",
                self.stanza
            ));
        }
        if self.full.is_none() && self.diff.is_none() && self.incr.is_none() {
            return Err("a policy schedules at least one backup type (full, diff or incr)".into());
        }
        for (field, expr) in self.schedules() {
            if !cron_ok(expr) {
                return Err(format!(
                    "{field}: {expr:?} is not a five-field cron expression (e.g. \"0 1 * * 0\")"
                ));
            }
        }
        if let Some(r) = &self.run_on
            && !["primary", "standby", "any"].contains(&r.as_str())
        {
            return Err(format!("run_on {r:?} must be primary, standby or any"));
        }
        for (field, v) in [
            ("timeout", &self.timeout),
            ("rpo", &self.rpo),
            ("max_archive_lag", &self.max_archive_lag),
        ] {
            if let Some(v) = v {
                let d = humantime::parse_duration(v)
                    .map_err(|e| format!("{field} {v:?} is not a duration (e.g. 6h): {e}"))?;
                if d.is_zero() {
                    return Err(format!("{field} must be more than 0"));
                }
            }
        }
        Ok(())
    }

    /// The objectives the policy sets for its hosts, over `defaults`.
    pub fn objectives(&self, defaults: crate::backups::Objectives) -> crate::backups::Objectives {
        let ms = |v: &Option<String>, default: i64| {
            v.as_deref()
                .and_then(|v| humantime::parse_duration(v).ok())
                .map_or(default, crate::time::duration_ms)
        };
        crate::backups::Objectives {
            rpo_ms: ms(&self.rpo, defaults.rpo_ms),
            archive_lag_ms: ms(&self.max_archive_lag, defaults.archive_lag_ms),
            ..defaults
        }
    }

    /// (field, cron) of every schedule set.
    fn schedules(&self) -> Vec<(&'static str, &str)> {
        [
            ("full", &self.full),
            ("diff", &self.diff),
            ("incr", &self.incr),
            ("check", &self.check),
            ("verify", &self.verify),
            ("drill", &self.drill),
        ]
        .into_iter()
        .filter_map(|(f, c)| c.as_deref().map(|c| (f, c)))
        .collect()
    }

    /// Whether the policy selects the agent called `name` with `labels`.
    pub fn selects(&self, name: &str, labels: &crate::labels::Labels) -> bool {
        crate::labels::selects(&self.agents, name, labels)
    }

    /// The tasks policy `id` wants on one agent: (key, request).
    pub fn tasks(&self, id: &str) -> Vec<(String, proto::TaskRequest)> {
        let tz = self.tz.clone().unwrap_or_else(|| "UTC".into());
        let timeout = self.timeout.clone().unwrap_or_else(|| "6h".into());
        self.schedules()
            .into_iter()
            .map(|(what, cron)| {
                let mut params = std::collections::BTreeMap::new();
                params.insert("stanza".to_string(), self.stanza.clone());
                let kind = match what {
                    "full" | "diff" | "incr" => {
                        params.insert("type".into(), what.into());
                        "pgbackrest_backup"
                    }
                    "check" => "pgbackrest_check",
                    "verify" => "pgbackrest_verify",
                    _ => "restore_drill",
                };
                if let Some(run_on) = &self.run_on
                    && matches!(kind, "pgbackrest_backup" | "pgbackrest_check")
                {
                    params.insert("run_on".into(), run_on.clone());
                }
                let key = format!("{KEY_PREFIX}{id}:{what}");
                let request = proto::TaskRequest {
                    kind: kind.into(),
                    params,
                    cron: Some(cron.to_string()),
                    tz: Some(tz.clone()),
                    timeout: matches!(kind, "pgbackrest_backup" | "restore_drill")
                        .then(|| timeout.clone()),
                    key: Some(key.clone()),
                    ..proto::TaskRequest::default()
                };
                (key, request)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PolicySpec {
        PolicySpec {
            name: "nightly".into(),
            agents: vec!["db-*".into(), "reporting".into()],
            stanza: "main".into(),
            full: Some("0 1 * * 0".into()),
            diff: None,
            incr: Some("0 1 * * 1-6".into()),
            check: Some("*/30 * * * *".into()),
            verify: None,
            drill: Some("0 14 * * 6".into()),
            tz: Some("Europe/Berlin".into()),
            run_on: None,
            timeout: None,
            rpo: Some("8h".into()),
            max_archive_lag: None,
        }
    }

    #[test]
    fn patterns_select_agents() {
        use crate::labels::glob as matches;
        assert!(matches("db-*", "db-1"));
        assert!(matches("*", "anything"));
        assert!(matches("*-eu-*", "db-eu-3"));
        assert!(!matches("db-*", "xdb-1"));
        assert!(!matches("a*a", "a"));
        assert!(matches("exact", "exact") && !matches("exact", "exactly"));
        let s = spec();
        let none = crate::labels::Labels::new();
        assert!(
            s.selects("db-7", &none) && s.selects("reporting", &none) && !s.selects("web-1", &none)
        );
    }

    #[test]
    fn a_policy_wants_one_keyed_cron_task_per_schedule() {
        let tasks = spec().tasks("bp_1");
        let keys: Vec<&str> = tasks.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "backup-policy:bp_1:full",
                "backup-policy:bp_1:incr",
                "backup-policy:bp_1:check",
                "backup-policy:bp_1:drill"
            ]
        );
        let (_, full) = &tasks[0];
        assert_eq!(full.kind, "pgbackrest_backup");
        assert_eq!(full.params.get("type").map(String::as_str), Some("full"));
        assert_eq!(full.cron.as_deref(), Some("0 1 * * 0"));
        assert_eq!(full.tz.as_deref(), Some("Europe/Berlin"));
        assert_eq!(full.timeout.as_deref(), Some("6h"));
        assert_eq!(tasks[2].1.kind, "pgbackrest_check");
        assert_eq!(tasks[2].1.timeout, None);
        assert_eq!(tasks[3].1.kind, "restore_drill");
    }

    #[test]
    fn bad_specs_name_their_field() {
        for (change, says) in [
            (
                PolicySpec {
                    name: String::new(),
                    ..spec()
                },
                "name",
            ),
            (
                PolicySpec {
                    agents: vec![],
                    ..spec()
                },
                "agents",
            ),
            (
                PolicySpec {
                    stanza: "--repo=2".into(),
                    ..spec()
                },
                "stanza",
            ),
            (
                PolicySpec {
                    full: None,
                    incr: None,
                    ..spec()
                },
                "at least one backup type",
            ),
            (
                PolicySpec {
                    incr: Some("every day".into()),
                    ..spec()
                },
                "incr",
            ),
            (
                PolicySpec {
                    run_on: Some("leader".into()),
                    ..spec()
                },
                "run_on",
            ),
            (
                PolicySpec {
                    rpo: Some("0s".into()),
                    ..spec()
                },
                "rpo",
            ),
            (
                PolicySpec {
                    timeout: Some("soon".into()),
                    ..spec()
                },
                "timeout",
            ),
        ] {
            let error = change.validate().expect_err("refused");
            assert!(error.contains(says), "{error}");
        }
        assert!(spec().validate().is_ok());
    }
}
