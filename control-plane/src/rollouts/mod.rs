//! Rollouts: one change carried over a set of agents in waves, so a bad change stops at a
//! canary instead of reaching the fleet. This module is the plan, and pure: the spec as an
//! operator writes it (`rollout.toml`, or the JSON body of the API), its checks, and the waves
//! it makes of the agents it selects, with the number of failures that halts each wave and the
//! whole rollout. `outpost rollout plan` and `POST /api/v1/rollouts/dry-run` print it.
//!
//! The rollout itself, durable and driven under a lease, is [`driver`].
//!
//! Waves are sizes in order, each a count (`1`) or a share of the targets (`"10%"`, rounded
//! up, at least one host); each takes that many of the hosts not yet in a wave, and the last
//! takes all that are left. Error budgets use the exec rule: `N` failures tolerated, or `P%`
//! of the wave's hosts rounded down; the failure after the budget halts the rollout.

use remote_exec::fleet::ErrorBudget;
use serde::{Deserialize, Serialize};

use crate::labels::Labels;

pub mod driver;

/// Waves one rollout has at most.
const WAVES_MAX: usize = 20;
const NAME_BYTES_MAX: usize = 64;

/// A number of hosts: a count, or a share of them (`"P%"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Amount {
    Count(u64),
    Share(String),
}

/// A wave's size: a count of hosts or a share of the targets (1 % to 100 %).
pub type WaveSize = Amount;

/// A rollout as an operator writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// 1 to 64 printable characters.
    pub name: String,
    /// The agents it targets: names or patterns (`*`), or labels `KEY=VALUE`.
    pub agents: Vec<String>,
    /// What each agent runs, once, now: a task (kind, params, argv, timeout) for its task
    /// runtime. Its key is the rollout's, so a host never runs it twice.
    pub task: proto::TaskRequest,
    /// Wave sizes in order (default: a canary of one host, then 10 %, then the rest).
    #[serde(default = "default_waves")]
    pub waves: Vec<WaveSize>,
    /// Hosts running the action at once, at most (default 10).
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// Failures tolerated per wave: `N` or `"P%"` of the wave (default 0).
    #[serde(default)]
    pub max_errors: Option<Amount>,
    /// Failures tolerated over the whole rollout: `N` or `"P%"` of the targets (default: the
    /// per-wave budget only).
    #[serde(default)]
    pub max_errors_total: Option<Amount>,
    /// How long to watch a finished wave before the next starts, e.g. `10m` (default 0).
    #[serde(default)]
    pub soak: Option<String>,
    /// Hosts labelled `role=replica` or `role=standby` go first and `role=primary` last.
    #[serde(default)]
    pub replicas_first: bool,
    /// Wait for an operator's approval after the first wave.
    #[serde(default)]
    pub approve_after_canary: bool,
    /// What to do with a host that is offline when its wave starts: `wait` (until
    /// `offline_deadline`, then it is reported offline) or `skip` (default `wait`).
    #[serde(default)]
    pub offline: Option<String>,
    /// How long `wait` waits for an offline host, e.g. `1h` (default 1h).
    #[serde(default)]
    pub offline_deadline: Option<String>,
    /// How long the health gate after a wave waits for its hosts to pass (back online, no
    /// new task failure) before it halts the rollout, e.g. `5m` (default 5m; `0s` halts at
    /// the first check).
    #[serde(default)]
    pub gate_wait: Option<String>,
    /// The gate also requires each host the wave changed to report (in its metrics) a
    /// largest streaming-replication lag of at most this, e.g. `30s` (default: not checked).
    #[serde(default)]
    pub max_replication_lag: Option<String>,
}

/// The health gate's wait when the spec gives none.
const GATE_WAIT_S: u64 = 300;

fn default_gate_wait_s() -> u64 {
    GATE_WAIT_S
}

fn default_waves() -> Vec<WaveSize> {
    vec![
        WaveSize::Count(1),
        WaveSize::Share("10%".into()),
        WaveSize::Share("100%".into()),
    ]
}

/// One agent as the plan sees it.
#[derive(Clone, Debug)]
pub struct Target {
    pub id: String,
    pub name: String,
    pub labels: Labels,
    pub online: bool,
}

impl Target {
    /// Every stored agent as the plan sees it, online as `settings` judge at `now_ms`.
    pub fn all(
        rows: &[crate::storage::AgentRow],
        settings: &crate::settings::Settings,
        now_ms: i64,
    ) -> Vec<Target> {
        rows.iter()
            .map(|row| Target {
                id: row.id.clone(),
                name: row.name.clone(),
                labels: crate::labels::of(row.labels.as_deref()),
                online: settings.is_online(row, now_ms),
            })
            .collect()
    }
}

/// One planned host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlannedHost {
    pub agent: String,
    pub agent_id: String,
    /// Its `role` label, if any.
    pub role: Option<String>,
    /// Its `cluster` label: at most one host of a cluster runs at a time.
    pub cluster: Option<String>,
    pub online: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlannedWave {
    pub wave: usize,
    pub hosts: Vec<PlannedHost>,
    /// Failures tolerated in this wave; one more halts the rollout.
    pub errors_tolerated: usize,
}

/// What a rollout would do, as the dry run prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Plan {
    pub name: String,
    pub targets: usize,
    pub waves: Vec<PlannedWave>,
    /// Failures tolerated over the whole rollout (`null`: only the per-wave budgets).
    pub errors_tolerated_total: Option<usize>,
    pub max_in_flight: usize,
    pub soak_s: u64,
    pub approve_after_canary: bool,
    /// `wait` or `skip`.
    pub offline: String,
    pub offline_deadline_s: u64,
    /// How long the gate after a wave waits for its hosts to pass before halting.
    #[serde(default = "default_gate_wait_s")]
    pub gate_wait_s: u64,
    /// The gate's bound on each changed host's replication lag (`null`: not checked).
    #[serde(default)]
    pub max_replication_lag_s: Option<u64>,
    /// Targets offline now.
    pub offline_now: usize,
}

fn duration_s(field: &str, v: &Option<String>, default_s: u64) -> Result<u64, String> {
    match v {
        None => Ok(default_s),
        Some(v) => humantime::parse_duration(v)
            .map(|d| d.as_secs())
            .map_err(|e| format!("{field}: {e} (e.g. 10m, 1h)")),
    }
}

/// `None` tolerates nothing here (the per-wave default) or is unlimited (the total's).
fn budget(field: &str, v: &Option<Amount>, none: ErrorBudget) -> Result<ErrorBudget, String> {
    match v {
        None => Ok(none),
        Some(Amount::Count(n)) => Ok(ErrorBudget::Count(
            usize::try_from(*n).unwrap_or(usize::MAX),
        )),
        Some(Amount::Share(s)) => ErrorBudget::parse(s).map_err(|e| format!("{field}: {e}")),
    }
}

impl WaveSize {
    /// Hosts of `targets` this wave takes (before capping at what is left).
    fn hosts(&self, targets: usize) -> Result<usize, String> {
        match self {
            WaveSize::Count(0) => Err("waves: a count is at least 1".into()),
            WaveSize::Count(n) => Ok(usize::try_from(*n).unwrap_or(usize::MAX)),
            WaveSize::Share(s) => {
                let p: u64 = s
                    .trim()
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse().ok())
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| format!("waves: {s:?} is neither a count nor 1% to 100%"))?;
                Ok(((targets as u64 * p).div_ceil(100)).max(1) as usize)
            }
        }
    }
}

impl RolloutSpec {
    /// Why the spec cannot run, naming the field; the task itself is checked by each agent
    /// (its kinds, parameters and policy are the host's to judge).
    pub fn check(&self) -> Result<(), String> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > NAME_BYTES_MAX || name.chars().any(char::is_control) {
            return Err(format!(
                "name must be 1 to {NAME_BYTES_MAX} printable bytes"
            ));
        }
        crate::labels::selector_ok(&self.agents)?;
        if self.task.kind.trim().is_empty() {
            return Err("task: kind is required (e.g. command, vacuum)".into());
        }
        let t = &self.task;
        if t.at.is_some()
            || t.in_.is_some()
            || t.every.is_some()
            || t.cron.is_some()
            || t.key.is_some()
            || t.window.is_some()
        {
            return Err(
                "task: a rollout runs its task once per host when the host's wave comes; leave out at, in, every, cron, key and window".into(),
            );
        }
        if self.waves.is_empty() || self.waves.len() > WAVES_MAX {
            return Err(format!("waves: 1 to {WAVES_MAX} sizes"));
        }
        for w in &self.waves {
            w.hosts(100)?;
        }
        if self
            .max_in_flight
            .is_some_and(|n| !(1..=10_000).contains(&n))
        {
            return Err("max_in_flight: 1 to 10000".into());
        }
        budget("max_errors", &self.max_errors, ErrorBudget::Count(0))?;
        budget(
            "max_errors_total",
            &self.max_errors_total,
            ErrorBudget::Unlimited,
        )?;
        duration_s("soak", &self.soak, 0)?;
        match self.offline.as_deref() {
            None | Some("wait") => {}
            Some("skip") if self.offline_deadline.is_some() => {
                return Err("offline_deadline goes with offline = \"wait\"".into());
            }
            Some("skip") => {}
            Some(other) => {
                return Err(format!("offline: {other:?}; use wait or skip"));
            }
        }
        duration_s("offline_deadline", &self.offline_deadline, 3600)?;
        duration_s("gate_wait", &self.gate_wait, GATE_WAIT_S)?;
        duration_s("max_replication_lag", &self.max_replication_lag, 0)?;
        Ok(())
    }

    /// The waves this spec makes of `agents` (every agent; the selector picks the targets).
    pub fn plan(&self, agents: &[Target]) -> Result<Plan, String> {
        self.check()?;
        let mut targets: Vec<&Target> = agents
            .iter()
            .filter(|a| crate::labels::selects(&self.agents, &a.name, &a.labels))
            .collect();
        if targets.is_empty() {
            return Err(format!(
                "agents: {} selects no agent",
                self.agents.join(", ")
            ));
        }
        let rank = |t: &Target| match t.labels.get("role").map(String::as_str) {
            Some("replica" | "standby") if self.replicas_first => 0,
            Some("primary") if self.replicas_first => 2,
            _ => 1,
        };
        targets.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.name.cmp(&b.name)));
        let n = targets.len();
        let per_wave = budget("max_errors", &self.max_errors, ErrorBudget::Count(0))?;
        let mut waves = Vec::new();
        let mut left = targets.as_slice();
        for (i, size) in self.waves.iter().enumerate() {
            if left.is_empty() {
                break;
            }
            let take = if i + 1 == self.waves.len() {
                left.len()
            } else {
                size.hosts(n)?.min(left.len())
            };
            let (wave, rest) = left.split_at(take);
            left = rest;
            waves.push(PlannedWave {
                wave: i + 1,
                errors_tolerated: per_wave.allowed(wave.len()).unwrap_or(0),
                hosts: wave
                    .iter()
                    .map(|t| PlannedHost {
                        agent: t.name.clone(),
                        agent_id: t.id.clone(),
                        role: t.labels.get("role").cloned(),
                        cluster: t.labels.get("cluster").cloned(),
                        online: t.online,
                    })
                    .collect(),
            });
        }
        Ok(Plan {
            name: self.name.trim().to_string(),
            targets: n,
            waves,
            errors_tolerated_total: budget(
                "max_errors_total",
                &self.max_errors_total,
                ErrorBudget::Unlimited,
            )?
            .allowed(n),
            max_in_flight: self.max_in_flight.unwrap_or(10),
            soak_s: duration_s("soak", &self.soak, 0)?,
            approve_after_canary: self.approve_after_canary,
            offline: self.offline.clone().unwrap_or_else(|| "wait".into()),
            offline_deadline_s: duration_s("offline_deadline", &self.offline_deadline, 3600)?,
            gate_wait_s: duration_s("gate_wait", &self.gate_wait, GATE_WAIT_S)?,
            max_replication_lag_s: match &self.max_replication_lag {
                None => None,
                lag => Some(duration_s("max_replication_lag", lag, 0)?),
            },
            offline_now: targets.iter().filter(|t| !t.online).count(),
        })
    }
}

impl Plan {
    /// The dry run as text: one line per wave, its hosts, and what halts it.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "rollout {}: {} agents in {} waves, at most {} at once",
            self.name,
            self.targets,
            self.waves.len(),
            self.max_in_flight
        );
        if self.soak_s > 0 {
            out.push_str(&format!(", {} s soak after each wave", self.soak_s));
        }
        out.push('\n');
        for w in &self.waves {
            let hosts: Vec<String> = w
                .hosts
                .iter()
                .map(|h| {
                    let mut s = h.agent.clone();
                    if let Some(role) = &h.role {
                        s.push_str(&format!(" [{role}]"));
                    }
                    if !h.online {
                        s.push_str(" (offline now)");
                    }
                    s
                })
                .collect();
            out.push_str(&format!(
                "wave {}: {} hosts; halts at failure {}: {}\n",
                w.wave,
                w.hosts.len(),
                w.errors_tolerated + 1,
                hosts.join(", ")
            ));
            if w.wave == 1 && self.approve_after_canary && self.waves.len() > 1 {
                out.push_str("  then waits for an operator's approval\n");
            }
        }
        if let Some(total) = self.errors_tolerated_total {
            out.push_str(&format!(
                "the whole rollout halts at failure {}\n",
                total + 1
            ));
        }
        if self.offline_now > 0 {
            out.push_str(&format!(
                "{} targets are offline now: {}\n",
                self.offline_now,
                if self.offline == "skip" {
                    "they will be skipped and reported offline".to_string()
                } else {
                    format!(
                        "each is waited for up to {} s when its wave comes, then reported offline",
                        self.offline_deadline_s
                    )
                }
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                id: format!("a{i:03}"),
                name: format!("db{i:03}"),
                labels: [
                    (
                        "role".to_string(),
                        if i % 2 == 0 { "primary" } else { "replica" }.to_string(),
                    ),
                    ("cluster".to_string(), format!("c{}", i / 2)),
                ]
                .into(),
                online: i != 7,
            })
            .collect()
    }

    fn spec(body: &str) -> RolloutSpec {
        toml::from_str(body).expect("spec")
    }

    const BASE: &str = r#"
name = "minor-upgrade"
agents = ["db*"]
waves = [1, "1%", "10%", "100%"]
max_errors = "2%"
max_errors_total = 5
[task]
kind = "command"
argv = ["/usr/local/bin/upgrade-minor"]
"#;

    #[test]
    fn waves_take_counts_and_shares_of_the_targets_and_the_last_takes_the_rest() {
        let plan = spec(BASE).plan(&fleet(200)).expect("plan");
        let sizes: Vec<usize> = plan.waves.iter().map(|w| w.hosts.len()).collect();
        assert_eq!(sizes, [1, 2, 20, 177]);
        // 2 % of a wave, rounded down: the 177-host wave tolerates 3 and halts at the 4th.
        let tolerated: Vec<usize> = plan.waves.iter().map(|w| w.errors_tolerated).collect();
        assert_eq!(tolerated, [0, 0, 0, 3]);
        assert_eq!(plan.errors_tolerated_total, Some(5));
        assert_eq!(plan.offline_now, 1);
        let text = plan.describe();
        assert!(
            text.starts_with("rollout minor-upgrade: 200 agents in 4 waves, at most 10 at once\n"),
            "{text}"
        );
        assert!(
            text.contains("wave 4: 177 hosts; halts at failure 4: "),
            "{text}"
        );
        assert!(
            text.contains("the whole rollout halts at failure 6"),
            "{text}"
        );
        assert!(text.contains("db007 [replica] (offline now)"), "{text}");
        // A small fleet runs out of hosts before it runs out of waves.
        let small = spec(BASE).plan(&fleet(2)).expect("plan");
        assert_eq!(small.waves.len(), 2);
    }

    #[test]
    fn replicas_go_first_and_primaries_last_when_asked() {
        let mut s = spec(BASE);
        s.replicas_first = true;
        let plan = s.plan(&fleet(10)).expect("plan");
        let order: Vec<&str> = plan
            .waves
            .iter()
            .flat_map(|w| w.hosts.iter().map(|h| h.role.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(order, [["replica"; 5], ["primary"; 5]].concat());
        assert_eq!(plan.waves[0].hosts[0].cluster.as_deref(), Some("c0"));
    }

    #[test]
    fn bad_specs_are_refused_with_the_field_named() {
        let bad = |f: &dyn Fn(&mut RolloutSpec)| {
            let mut s = spec(BASE);
            f(&mut s);
            s.plan(&fleet(10)).expect_err("refused")
        };
        assert!(bad(&|s| s.waves = vec![WaveSize::Share("150%".into())]).starts_with("waves:"));
        assert!(bad(&|s| s.waves = vec![WaveSize::Count(0)]).starts_with("waves:"));
        assert!(bad(&|s| s.waves.clear()).starts_with("waves:"));
        assert!(
            bad(&|s| s.max_errors = Some(Amount::Share("lots".into()))).starts_with("max_errors:")
        );
        assert!(bad(&|s| s.max_in_flight = Some(0)).starts_with("max_in_flight:"));
        assert!(bad(&|s| s.task.every = Some("1h".into())).starts_with("task:"));
        assert!(bad(&|s| s.offline = Some("ignore".into())).starts_with("offline:"));
        assert!(bad(&|s| s.agents = vec!["web*".into()]).contains("selects no agent"));
        assert!(
            toml::from_str::<RolloutSpec>(&format!("{BASE}\nspeed = 3"))
                .is_err_and(|e| e.to_string().contains("speed")),
            "unknown fields are refused"
        );
    }
}
