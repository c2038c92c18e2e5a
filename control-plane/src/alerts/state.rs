//! One alert's life (pending → firing → resolved) and the notices an evaluation round sends,
//! grouped so a fleet-wide outage is one digest. Pure: the caller brings the stored alerts,
//! what each rule measured now and the time, and stores what comes back in one transaction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::rules::Severity;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The condition holds, not yet for the rule's `for` duration.
    Pending,
    Firing,
    Resolved,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Firing,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

/// A transition whose notice waits for its group (the group wait, or a mute).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unsent {
    pub status: Status,
    pub at_ms: i64,
    /// The idempotency key of the transition.
    pub key: String,
}

/// One alert: a rule on an agent. Stored as JSON under [`Alert::key`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub rule: String,
    pub agent_id: String,
    pub agent: String,
    pub phase: Phase,
    pub severity: Severity,
    pub value: f64,
    pub summary: String,
    /// When the condition began to hold.
    pub since_ms: i64,
    #[serde(default)]
    pub fired_ms: Option<i64>,
    #[serde(default)]
    pub resolved_ms: Option<i64>,
    /// When a firing notice last went into the outbox.
    #[serde(default)]
    pub notified_ms: Option<i64>,
    #[serde(default)]
    pub unsent: Vec<Unsent>,
}

impl Alert {
    pub fn key(&self) -> String {
        alert_key(&self.rule, &self.agent_id)
    }
}

pub fn alert_key(rule: &str, agent_id: &str) -> String {
    format!("{rule}/{agent_id}")
}

/// What a rule measured on an agent this round.
pub struct Observation {
    pub rule: String,
    pub agent_id: String,
    pub agent: String,
    /// `Some` while the condition holds.
    pub holds: Option<(Severity, f64, String)>,
    pub for_ms: i64,
}

/// How notices are grouped and repeated.
#[derive(Clone, Copy, Debug)]
pub struct Grouping {
    /// How long a transition waits for others of its rule before its notice goes.
    pub group_wait_ms: i64,
    /// More agents than this in one notice's group make one digest instead.
    pub digest_over: usize,
    /// A firing alert is notified again after this long.
    pub repeat_ms: i64,
    /// A resolved alert is forgotten after this long (its history stays).
    pub keep_resolved_ms: i64,
}

impl Default for Grouping {
    fn default() -> Grouping {
        Grouping {
            group_wait_ms: 30_000,
            digest_over: 20,
            repeat_ms: 4 * 3_600_000,
            keep_resolved_ms: 3_600_000,
        }
    }
}

/// One agent's part of a notice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Brief {
    pub key: String,
    pub agent_id: String,
    pub agent: String,
    pub severity: Severity,
    pub value: f64,
    pub summary: String,
    pub starts_ms: i64,
    #[serde(default)]
    pub ends_ms: Option<i64>,
}

/// A message for every channel: one transition, or a digest of many of one rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// The idempotency key: the same transition always makes the same key.
    pub key: String,
    pub rule: String,
    pub status: Status,
    pub severity: Severity,
    pub digest: bool,
    #[serde(default)]
    pub test: bool,
    pub alerts: Vec<Brief>,
}

/// What a round changes.
#[derive(Debug, Default)]
pub struct Round {
    /// Alerts whose stored state changed.
    pub changed: Vec<Alert>,
    /// Keys of alerts to forget.
    pub removed: Vec<String>,
    /// Transitions for the history: (alert key, the alert after it).
    pub events: Vec<(String, Alert)>,
    pub notices: Vec<Notice>,
}

/// Advance every alert by what was measured at `now_ms`. An alert with no observation (its
/// agent was removed, its rule disabled) resolves. `muted` holds back an alert's notices (a
/// maintenance window or silence); they go once it is no longer muted.
pub fn advance(
    stored: BTreeMap<String, Alert>,
    observed: Vec<Observation>,
    now_ms: i64,
    grouping: Grouping,
    muted: &dyn Fn(&Alert) -> bool,
) -> Round {
    let mut round = Round::default();
    let mut all: BTreeMap<String, Alert> = BTreeMap::new();
    let mut stored = stored;
    for o in observed {
        let key = alert_key(&o.rule, &o.agent_id);
        let before = stored.remove(&key);
        if let Some(a) = step(before.clone(), &o, now_ms, grouping) {
            note(&mut round, before.as_ref(), &a);
            all.insert(key, a);
        } else if before.is_some() {
            round.removed.push(key);
        }
    }
    // Alerts nothing measured: resolved (and in time forgotten).
    for (key, a) in stored {
        let gone = Observation {
            rule: a.rule.clone(),
            agent_id: a.agent_id.clone(),
            agent: a.agent.clone(),
            holds: None,
            for_ms: 0,
        };
        match step(Some(a.clone()), &gone, now_ms, grouping) {
            Some(next) => {
                note(&mut round, Some(&a), &next);
                all.insert(key, next);
            }
            None => round.removed.push(key),
        }
    }
    flush(&mut all, &mut round, now_ms, grouping, muted);
    round
}

/// Record `after` as changed (and a transition when its phase or severity moved).
fn note(round: &mut Round, before: Option<&Alert>, after: &Alert) {
    if before == Some(after) {
        return;
    }
    let moved = before.is_none_or(|b| b.phase != after.phase || b.severity != after.severity);
    if moved {
        round.events.push((after.key(), after.clone()));
    }
    round.changed.push(after.clone());
}

/// One alert's next state; `None` when there is nothing to keep.
fn step(before: Option<Alert>, o: &Observation, now_ms: i64, g: Grouping) -> Option<Alert> {
    match (before, &o.holds) {
        (None, None) => None,
        (Some(a), None) => match a.phase {
            // Never fired: nothing to tell.
            Phase::Pending => None,
            Phase::Firing => {
                let mut a = a;
                let fired = a.fired_ms.unwrap_or(a.since_ms);
                a.phase = Phase::Resolved;
                a.resolved_ms = Some(now_ms);
                a.unsent.push(Unsent {
                    status: Status::Resolved,
                    at_ms: now_ms,
                    key: format!("{}:{fired}:resolved", a.key()),
                });
                Some(a)
            }
            Phase::Resolved => {
                let old =
                    now_ms.saturating_sub(a.resolved_ms.unwrap_or(now_ms)) > g.keep_resolved_ms;
                (!(old && a.unsent.is_empty())).then_some(a)
            }
        },
        (before, Some((severity, value, summary))) => {
            let mut a = match before {
                Some(a) if a.phase != Phase::Resolved => a,
                // New, or back after resolving: a new alert.
                _ => Alert {
                    rule: o.rule.clone(),
                    agent_id: o.agent_id.clone(),
                    agent: o.agent.clone(),
                    phase: Phase::Pending,
                    severity: *severity,
                    value: *value,
                    summary: summary.clone(),
                    since_ms: now_ms,
                    fired_ms: None,
                    resolved_ms: None,
                    notified_ms: None,
                    unsent: Vec::new(),
                },
            };
            let escalated = a.phase == Phase::Firing && *severity > a.severity;
            a.severity = *severity;
            a.value = *value;
            a.summary = summary.clone();
            a.agent = o.agent.clone();
            if a.phase == Phase::Pending && now_ms.saturating_sub(a.since_ms) >= o.for_ms {
                a.phase = Phase::Firing;
                a.fired_ms = Some(now_ms);
                fire(&mut a, now_ms, "firing");
            } else if escalated {
                fire(&mut a, now_ms, "escalated");
            } else if a.phase == Phase::Firing
                && a.unsent.is_empty()
                && a.notified_ms
                    .is_some_and(|n| now_ms.saturating_sub(n) >= g.repeat_ms)
            {
                fire(&mut a, now_ms, "repeat");
            }
            Some(a)
        }
    }
}

fn fire(a: &mut Alert, now_ms: i64, why: &str) {
    let fired = a.fired_ms.unwrap_or(now_ms);
    let key = match why {
        "firing" => format!("{}:{fired}:firing", a.key()),
        _ => format!("{}:{fired}:{why}:{now_ms}", a.key()),
    };
    a.unsent.push(Unsent {
        status: Status::Firing,
        at_ms: now_ms,
        key,
    });
}

/// Turn the unsent transitions whose group has waited long enough into notices: per rule and
/// status, one notice per alert, or one digest when more than `digest_over` agents are in it.
fn flush(
    all: &mut BTreeMap<String, Alert>,
    round: &mut Round,
    now_ms: i64,
    g: Grouping,
    muted: &dyn Fn(&Alert) -> bool,
) {
    // (rule, status) → alerts with an unsent transition of that status, not muted.
    let mut groups: BTreeMap<(String, Status), Vec<String>> = BTreeMap::new();
    for (key, a) in all.iter_mut() {
        if muted(a) {
            // Held back. An alert that fired and resolved unheard has nothing to tell.
            if a.phase == Phase::Resolved && a.notified_ms.is_none() && !a.unsent.is_empty() {
                a.unsent.clear();
                mark_changed(round, a);
            }
            continue;
        }
        for u in &a.unsent {
            groups
                .entry((a.rule.clone(), u.status))
                .or_default()
                .push(key.clone());
        }
    }
    for ((rule, status), keys) in groups {
        let oldest = keys
            .iter()
            .filter_map(|k| all[k].unsent.iter().find(|u| u.status == status))
            .map(|u| u.at_ms)
            .min()
            .unwrap_or(now_ms);
        if now_ms.saturating_sub(oldest) < g.group_wait_ms {
            continue;
        }
        let mut briefs = Vec::new();
        for k in &keys {
            let a = all.get_mut(k).expect("grouped from the map");
            // An alert may carry two of one status (a repeat and an escalation): each goes.
            let (mine, rest): (Vec<Unsent>, Vec<Unsent>) =
                a.unsent.drain(..).partition(|u| u.status == status);
            a.unsent = rest;
            if status == Status::Firing {
                a.notified_ms = Some(now_ms);
            }
            for u in mine {
                briefs.push((u.key, brief(a)));
            }
            mark_changed(round, a);
        }
        if briefs.len() > g.digest_over {
            let severity = briefs
                .iter()
                .map(|b| b.1.severity)
                .max()
                .unwrap_or(Severity::Warning);
            round.notices.push(Notice {
                key: format!("digest:{rule}:{}:{oldest}", status.as_str()),
                rule: rule.clone(),
                status,
                severity,
                digest: true,
                test: false,
                alerts: briefs.into_iter().map(|b| b.1).collect(),
            });
        } else {
            for (key, b) in briefs {
                round.notices.push(Notice {
                    key,
                    rule: rule.clone(),
                    status,
                    severity: b.severity,
                    digest: false,
                    test: false,
                    alerts: vec![b],
                });
            }
        }
    }
}

fn brief(a: &Alert) -> Brief {
    Brief {
        key: a.key(),
        agent_id: a.agent_id.clone(),
        agent: a.agent.clone(),
        severity: a.severity,
        value: a.value,
        summary: a.summary.clone(),
        starts_ms: a.fired_ms.unwrap_or(a.since_ms),
        ends_ms: a.resolved_ms,
    }
}

fn mark_changed(round: &mut Round, a: &Alert) {
    match round.changed.iter_mut().find(|c| c.key() == a.key()) {
        Some(c) => *c = a.clone(),
        None => round.changed.push(a.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(agent: &str, holds: Option<Severity>, for_ms: i64) -> Observation {
        Observation {
            rule: "xid_age".into(),
            agent_id: format!("agt_{agent}"),
            agent: agent.into(),
            holds: holds.map(|s| (s, 1.2e9, "old".to_string())),
            for_ms,
        }
    }

    fn quick() -> Grouping {
        Grouping {
            group_wait_ms: 0,
            digest_over: 3,
            repeat_ms: 60_000,
            keep_resolved_ms: 10_000,
        }
    }

    fn stored(round: &Round, before: BTreeMap<String, Alert>) -> BTreeMap<String, Alert> {
        let mut m = before;
        for k in &round.removed {
            m.remove(k);
        }
        for a in &round.changed {
            m.insert(a.key(), a.clone());
        }
        m
    }

    #[test]
    fn an_alert_fires_after_its_for_duration_and_resolves_once() {
        let none = |_: &Alert| false;
        let w = Some(Severity::Warning);
        let r = advance(BTreeMap::new(), vec![obs("a", w, 5_000)], 0, quick(), &none);
        assert!(r.notices.is_empty(), "pending first");
        let s = stored(&r, BTreeMap::new());
        let r = advance(s.clone(), vec![obs("a", w, 5_000)], 4_999, quick(), &none);
        assert!(r.notices.is_empty());
        let s = stored(&r, s);
        let r = advance(s.clone(), vec![obs("a", w, 5_000)], 5_000, quick(), &none);
        assert_eq!(r.notices.len(), 1);
        assert_eq!(r.notices[0].key, "xid_age/agt_a:5000:firing");
        let s = stored(&r, s);
        let r = advance(
            s.clone(),
            vec![obs("a", None, 5_000)],
            6_000,
            quick(),
            &none,
        );
        assert_eq!(r.notices.len(), 1);
        assert_eq!(r.notices[0].status, Status::Resolved);
        assert_eq!(r.notices[0].key, "xid_age/agt_a:5000:resolved");
        let s = stored(&r, s);
        let r = advance(
            s.clone(),
            vec![obs("a", None, 5_000)],
            7_000,
            quick(),
            &none,
        );
        assert!(r.notices.is_empty(), "resolved once");
        let s = stored(&r, s);
        let r = advance(s, vec![], 17_001, quick(), &none);
        assert_eq!(
            r.removed,
            vec!["xid_age/agt_a".to_string()],
            "forgotten later"
        );
    }

    #[test]
    fn many_agents_at_once_make_one_digest_and_a_mute_holds_notices_back() {
        let w = Some(Severity::Critical);
        let many: Vec<Observation> = (0..10).map(|i| obs(&format!("h{i}"), w, 0)).collect();
        let muted = |_: &Alert| true;
        let r = advance(BTreeMap::new(), many, 0, quick(), &muted);
        assert!(r.notices.is_empty(), "muted");
        let s = stored(&r, BTreeMap::new());
        let many: Vec<Observation> = (0..10).map(|i| obs(&format!("h{i}"), w, 0)).collect();
        let r = advance(s, many, 1_000, quick(), &|_: &Alert| false);
        assert_eq!(r.notices.len(), 1, "{:?}", r.notices);
        assert!(r.notices[0].digest);
        assert_eq!(r.notices[0].alerts.len(), 10);
        assert_eq!(r.notices[0].key, "digest:xid_age:firing:0");
    }

    #[test]
    fn what_fired_and_resolved_while_muted_is_never_told_and_what_still_fires_is_told_after() {
        let c = Some(Severity::Critical);
        let muted = |_: &Alert| true;
        let r = advance(
            BTreeMap::new(),
            vec![obs("a", c, 0), obs("b", c, 0)],
            0,
            quick(),
            &muted,
        );
        let s = stored(&r, BTreeMap::new());
        let r = advance(
            s.clone(),
            vec![obs("a", None, 0), obs("b", c, 0)],
            1_000,
            quick(),
            &muted,
        );
        assert!(r.notices.is_empty());
        let s = stored(&r, s);
        assert!(
            s["xid_age/agt_a"].unsent.is_empty(),
            "a fired and resolved unheard"
        );
        let r = advance(
            s,
            vec![obs("a", None, 0), obs("b", c, 0)],
            2_000,
            quick(),
            &|_: &Alert| false,
        );
        let keys: Vec<&str> = r.notices.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(
            keys,
            ["xid_age/agt_b:0:firing"],
            "b still fires when the mute ends"
        );
    }

    #[test]
    fn a_group_waits_then_repeats_and_escalations_notify() {
        let none = |_: &Alert| false;
        let g = Grouping {
            group_wait_ms: 2_000,
            ..quick()
        };
        let w = Some(Severity::Warning);
        let r = advance(BTreeMap::new(), vec![obs("a", w, 0)], 0, g, &none);
        assert!(r.notices.is_empty(), "waits for its group");
        let s = stored(&r, BTreeMap::new());
        let both = |a, b| vec![obs("a", a, 0), obs("b", b, 0)];
        let keys = |r: &Round| -> Vec<String> { r.notices.iter().map(|n| n.key.clone()).collect() };
        let r = advance(s.clone(), both(w, w), 2_000, g, &none);
        assert_eq!(
            keys(&r),
            ["xid_age/agt_a:0:firing", "xid_age/agt_b:2000:firing"],
            "a's group waited long enough, and b joined it"
        );
        let s = stored(&r, s);
        let c = Some(Severity::Critical);
        let r = advance(s.clone(), both(c, w), 4_000, g, &none);
        assert!(r.notices.is_empty(), "the escalation waits for its group");
        let s = stored(&r, s);
        let r = advance(s.clone(), both(c, w), 6_000, g, &none);
        assert_eq!(keys(&r), ["xid_age/agt_a:0:escalated:4000"]);
        let s = stored(&r, s);
        let r = advance(s.clone(), both(c, w), 62_000, g, &none);
        assert!(
            r.notices.is_empty(),
            "b's repeat is due, and waits for its group"
        );
        let s = stored(&r, s);
        let r = advance(s, both(c, w), 64_000, g, &none);
        assert_eq!(
            keys(&r),
            ["xid_age/agt_b:2000:repeat:62000"],
            "a's comes later"
        );
    }
}
