//! Silences: for a while, notices of the alerts they match are held back. Evaluation and
//! history go on, and what still fires when a silence ends is sent then (its transition
//! waited in the alert's unsent list). A silence matches a rule (or every rule) on agents
//! named by patterns, or on one agent (made by that agent: `outpost-agent silence`). It ends
//! by itself, at most 7 days after it starts, and can be ended early.

use serde::{Deserialize, Serialize};

use super::state::Alert;

/// The spec kind silences are stored under (their name is their id).
pub const SPEC_KIND: &str = "silence";
/// The longest a silence may last.
pub const LONGEST_MS: i64 = 7 * 86_400_000;
/// Silences kept at most (ended ones are removed a day after their end).
pub const SILENCES_MAX: usize = 1000;
const COMMENT_BYTES_MAX: usize = 500;

/// A silence as posted.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SilenceRequest {
    /// The rule silenced; every rule when absent.
    #[serde(default)]
    pub rule: Option<String>,
    /// Agent names or patterns (`*` any characters), or labels `KEY=VALUE`; every agent when
    /// absent. Not taken
    /// from an agent, whose silence covers itself only.
    #[serde(default)]
    pub agents: Option<Vec<String>>,
    /// How long, e.g. `1h` (at most 7d).
    #[serde(rename = "for")]
    pub for_: String,
    /// Why: shown with the silence and in the audit log.
    pub comment: String,
}

/// A stored silence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Silence {
    pub id: String,
    pub rule: Option<String>,
    /// Name patterns; empty when `agent_id` names the one agent.
    pub agents: Vec<String>,
    pub agent_id: Option<String>,
    pub starts_ms: i64,
    pub ends_ms: i64,
    pub comment: String,
    /// The user, or `agent:NAME` for a silence an agent made.
    pub created_by: String,
}

impl SilenceRequest {
    /// The silence it asks for, starting at `now_ms`; every refusal names the field.
    /// `agent` is `(id, name)` when an agent asks for itself.
    pub fn into_silence(
        self,
        id: String,
        now_ms: i64,
        created_by: String,
        agent: Option<(String, String)>,
    ) -> Result<Silence, String> {
        if let Some(rule) = &self.rule
            && super::rules::rule(rule).is_none()
        {
            let names: Vec<&str> = super::rules::RULES.iter().map(|r| r.name).collect();
            return Err(format!("rule must be one of {}", names.join(", ")));
        }
        let d = humantime::parse_duration(&self.for_)
            .map_err(|e| format!("for: {e} (e.g. 30m, 2h, 3d)"))?;
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if ms <= 0 || ms > LONGEST_MS {
            return Err("for must be more than 0 and at most 7d".into());
        }
        let comment = self.comment.trim().to_string();
        if comment.is_empty() || comment.len() > COMMENT_BYTES_MAX {
            return Err(format!(
                "comment: 1 to {COMMENT_BYTES_MAX} bytes saying why"
            ));
        }
        let (agents, agent_id) = match (agent, self.agents) {
            (Some(_), Some(_)) => {
                return Err("agents: an agent silences only itself".into());
            }
            (Some((id, _)), None) => (Vec::new(), Some(id)),
            (None, None) => (vec!["*".to_string()], None),
            (None, Some(list)) => {
                crate::labels::selector_ok(&list)?;
                (list, None)
            }
        };
        Ok(Silence {
            id,
            rule: self.rule,
            agents,
            agent_id,
            starts_ms: now_ms,
            ends_ms: now_ms + ms,
            comment,
            created_by,
        })
    }
}

impl Silence {
    pub fn active(&self, now_ms: i64) -> bool {
        self.starts_ms <= now_ms && now_ms < self.ends_ms
    }

    /// Whether it holds back `alert`'s notices at `now_ms` (`labels`: the alert's agent's).
    pub fn mutes(&self, alert: &Alert, now_ms: i64, labels: &crate::labels::Labels) -> bool {
        self.active(now_ms)
            && self.rule.as_ref().is_none_or(|r| *r == alert.rule)
            && match &self.agent_id {
                Some(id) => *id == alert.agent_id,
                None => crate::labels::selects(&self.agents, &alert.agent, labels),
            }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::alerts::rules::Severity;
    use crate::alerts::state::Phase;

    pub(in crate::alerts) fn alert(rule: &str, agent: &str) -> Alert {
        Alert {
            rule: rule.into(),
            agent_id: format!("agt_{agent}"),
            agent: agent.into(),
            phase: Phase::Firing,
            severity: Severity::Warning,
            value: 1.0,
            summary: String::new(),
            since_ms: 0,
            fired_ms: Some(0),
            resolved_ms: None,
            notified_ms: None,
            unsent: vec![],
        }
    }

    fn request(rule: Option<&str>, agents: Option<&[&str]>, for_: &str) -> SilenceRequest {
        SilenceRequest {
            rule: rule.map(str::to_string),
            agents: agents.map(|a| a.iter().map(|s| s.to_string()).collect()),
            for_: for_.into(),
            comment: "nightly dump".into(),
        }
    }

    #[test]
    fn a_silence_mutes_what_it_matches_until_it_ends() {
        let s = request(Some("xid_age"), Some(&["prod-*"]), "1h")
            .into_silence("sil_1".into(), 1_000, "ann".into(), None)
            .expect("valid");
        assert!(s.mutes(&alert("xid_age", "prod-db1"), 1_000, &Default::default()));
        assert!(
            !s.mutes(&alert("xid_age", "dev-db1"), 1_000, &Default::default()),
            "another agent"
        );
        assert!(
            !s.mutes(
                &alert("replication_lag", "prod-db1"),
                1_000,
                &Default::default()
            ),
            "another rule"
        );
        assert!(
            !s.mutes(
                &alert("xid_age", "prod-db1"),
                1_000 + 3_600_000,
                &Default::default()
            ),
            "ended"
        );
        let mine = request(None, None, "30m")
            .into_silence(
                "sil_2".into(),
                0,
                "agent:db9".into(),
                Some(("agt_db9".into(), "db9".into())),
            )
            .expect("valid");
        assert!(mine.mutes(&alert("backup_rpo", "db9"), 10, &Default::default()));
        assert!(
            !mine.mutes(&alert("backup_rpo", "db1"), 10, &Default::default()),
            "an agent silences itself only"
        );
    }

    #[test]
    fn silences_are_bounded_and_explained() {
        let refuse = |r: SilenceRequest, agent| {
            r.into_silence("s".into(), 0, "x".into(), agent)
                .expect_err("refused")
        };
        assert!(refuse(request(None, None, "8d"), None).contains("at most 7d"));
        assert!(refuse(request(None, None, "soon"), None).starts_with("for:"));
        assert!(refuse(request(Some("nope"), None, "1h"), None).starts_with("rule must"));
        let mut r = request(None, None, "1h");
        r.comment = " ".into();
        assert!(refuse(r, None).starts_with("comment:"));
        let a = Some(("agt_1".to_string(), "db1".to_string()));
        assert!(refuse(request(None, Some(&["*"]), "1h"), a).starts_with("agents:"));
    }
}
