//! Maintenance windows: recurring periods (a cron start in a time zone, and a duration). A
//! `mute` window holds back the notices of the agents it names, like a silence that comes
//! back: evaluation and history go on; what still fires when the window ends is sent then. An
//! `allow` window gates task runs: a task created with the window's name carries the window to
//! its agent, which starts its runs only inside it (even while the control plane is away).
//! `both` does both. Starts follow the cron rules for daylight saving (a skipped start moves
//! to the end of the gap, a repeated one counts once); the duration is elapsed time.

use serde::{Deserialize, Serialize};

use super::state::Alert;

/// The spec kind windows are stored under.
pub const SPEC_KIND: &str = "window";
/// Windows kept at most.
pub const WINDOWS_MAX: usize = 200;
const LONGEST_MS: i64 = 24 * 3_600_000;
const NAME_BYTES_MAX: usize = 64;
const COMMENT_BYTES_MAX: usize = 500;

/// A window as posted and stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Unique, 1 to 64 printable characters.
    pub name: String,
    /// When it starts: five-field cron, e.g. `0 1 * * *` (01:00 every night).
    pub cron: String,
    /// IANA time zone of the cron expression (default UTC).
    #[serde(default)]
    pub tz: Option<String>,
    /// How long it lasts, e.g. `2h` (at most 24h), in elapsed time.
    pub duration: String,
    /// Agent names or patterns (`*` any characters), or labels `KEY=VALUE`.
    pub agents: Vec<String>,
    /// The rules it mutes; every rule when absent.
    #[serde(default)]
    pub rules: Option<Vec<String>>,
    /// `mute`: notices are held back while it lasts; `allow`: tasks created with this
    /// window's name start runs only inside it; `both`.
    #[serde(default = "mute")]
    pub effect: String,
    /// `allow`: no run starts this long before the window ends, e.g. `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutoff: Option<String>,
    /// `allow`: a run still going this long after the window ended is stopped, e.g. `15m`
    /// (absent: it finishes, and its record says by how much it overran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// The effects a window may have.
pub const EFFECTS: [&str; 3] = ["mute", "allow", "both"];

fn mute() -> String {
    "mute".to_string()
}

/// A stored window, ready to ask.
#[derive(Clone, Debug)]
pub struct Window {
    pub spec: WindowSpec,
    cron: proto::cron::Cron,
    duration_ms: i64,
}

impl WindowSpec {
    /// The window, or why not; every refusal names the field.
    pub fn check(&self) -> Result<Window, String> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > NAME_BYTES_MAX || name.chars().any(char::is_control) {
            return Err(format!(
                "name must be 1 to {NAME_BYTES_MAX} printable bytes"
            ));
        }
        let tz = self.tz.as_deref().unwrap_or("UTC");
        let cron = proto::cron::Cron::parse(&self.cron, tz).map_err(|e| format!("cron: {e}"))?;
        let d = humantime::parse_duration(&self.duration)
            .map_err(|e| format!("duration: {e} (e.g. 30m, 2h)"))?;
        let duration_ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if !(60_000..=LONGEST_MS).contains(&duration_ms) {
            return Err("duration must be between 1m and 24h".into());
        }
        crate::labels::selector_ok(&self.agents)?;
        if let Some(rules) = &self.rules
            && let Some(bad) = rules.iter().find(|r| super::rules::rule(r).is_none())
        {
            return Err(format!("rules: no rule named {bad:?}"));
        }
        if !EFFECTS.contains(&self.effect.as_str()) {
            return Err(format!(
                "effect {:?}: use mute (notices held back), allow (task runs gated) or both",
                self.effect
            ));
        }
        let ms_of = |field: &str, v: &Option<String>| -> Result<i64, String> {
            match v {
                None => Ok(0),
                Some(v) => humantime::parse_duration(v)
                    .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                    .map_err(|e| format!("{field}: {e} (e.g. 30m)")),
            }
        };
        let cutoff_ms = ms_of("cutoff", &self.cutoff)?;
        if cutoff_ms >= duration_ms {
            return Err("cutoff must be shorter than the duration".into());
        }
        if ms_of("grace", &self.grace)? > LONGEST_MS {
            return Err("grace must be at most 24h".into());
        }
        if (self.cutoff.is_some() || self.grace.is_some()) && self.effect == "mute" {
            return Err(
                "cutoff and grace are for windows that gate task runs (effect allow or both)"
                    .into(),
            );
        }
        if self
            .comment
            .as_ref()
            .is_some_and(|c| c.len() > COMMENT_BYTES_MAX)
        {
            return Err(format!("comment: at most {COMMENT_BYTES_MAX} bytes"));
        }
        Ok(Window {
            spec: WindowSpec {
                name: name.to_string(),
                ..self.clone()
            },
            cron,
            duration_ms,
        })
    }
}

impl Window {
    /// The occurrence `(start, end)` in force at `now_ms`, if any.
    pub fn open_at(&self, now_ms: i64) -> Option<(i64, i64)> {
        // The first start after (now − duration): open when it is not after now.
        let start = self.cron.next_after_ms(now_ms - self.duration_ms)?;
        (start <= now_ms).then_some((start, start + self.duration_ms))
    }

    /// The next `n` occurrences that end after `now_ms` (the one in force first).
    pub fn next(&self, now_ms: i64, n: usize) -> Vec<(i64, i64)> {
        let mut out = Vec::with_capacity(n);
        let mut after = now_ms - self.duration_ms;
        while out.len() < n {
            let Some(start) = self.cron.next_after_ms(after) else {
                break;
            };
            out.push((start, start + self.duration_ms));
            after = start;
        }
        out
    }

    /// Whether tasks may be gated by it.
    pub fn allows(&self) -> bool {
        self.spec.effect != "mute"
    }

    /// The window as a task carries it to its agent.
    pub fn for_task(&self) -> proto::TaskWindow {
        proto::TaskWindow {
            name: self.spec.name.clone(),
            cron: Some(self.spec.cron.clone()),
            tz: Some(self.spec.tz.clone().unwrap_or_else(|| "UTC".into())),
            duration: Some(self.spec.duration.clone()),
            cutoff: self.spec.cutoff.clone(),
            grace: self.spec.grace.clone(),
        }
    }

    /// Whether it holds back `alert`'s notices at `now_ms` (`labels`: the alert's agent's).
    pub fn mutes(&self, alert: &Alert, now_ms: i64, labels: &crate::labels::Labels) -> bool {
        self.spec.effect != "allow"
            && self.open_at(now_ms).is_some()
            && self
                .spec
                .rules
                .as_ref()
                .is_none_or(|rules| rules.contains(&alert.rule))
            && crate::labels::selects(&self.spec.agents, &alert.agent, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        crate::time::parse_ms("t", s).expect("ts")
    }

    fn nightly(cron: &str, duration: &str) -> Window {
        WindowSpec {
            name: "nightly-dump".into(),
            cron: cron.into(),
            tz: Some("Europe/Berlin".into()),
            duration: duration.into(),
            agents: vec!["db-*".into()],
            rules: None,
            effect: "mute".into(),
            cutoff: None,
            grace: None,
            comment: None,
        }
        .check()
        .expect("valid")
    }

    #[test]
    fn a_window_is_open_from_its_start_for_its_duration_in_elapsed_time() {
        let w = nightly("30 2 * * *", "2h");
        // A winter night: 02:30 CET = 01:30 UTC.
        assert_eq!(w.open_at(ms("2027-01-10T01:29:59Z")), None);
        assert_eq!(
            w.open_at(ms("2027-01-10T01:30:00Z")),
            Some((ms("2027-01-10T01:30:00Z"), ms("2027-01-10T03:30:00Z")))
        );
        assert_eq!(
            w.open_at(ms("2027-01-10T03:30:00Z")),
            None,
            "ends at start + 2h"
        );
        // The spring night: 02:30 does not exist; the window opens at 03:00 CEST, two hours.
        assert_eq!(
            w.open_at(ms("2027-03-28T01:10:00Z")),
            Some((ms("2027-03-28T01:00:00Z"), ms("2027-03-28T03:00:00Z")))
        );
        // The autumn night: the first 02:30 (CEST) only.
        let next = w.next(ms("2027-10-30T12:00:00Z"), 2);
        assert_eq!(
            next,
            [
                (ms("2027-10-31T00:30:00Z"), ms("2027-10-31T02:30:00Z")),
                (ms("2027-11-01T01:30:00Z"), ms("2027-11-01T03:30:00Z")),
            ]
        );
    }

    #[test]
    fn bad_windows_are_refused_with_the_field_named() {
        let bad = |f: &dyn Fn(&mut WindowSpec)| {
            let mut s = nightly("0 1 * * *", "1h").spec;
            f(&mut s);
            s.check().expect_err("refused")
        };
        assert!(bad(&|s| s.cron = "61 * * * *".into()).starts_with("cron:"));
        assert!(bad(&|s| s.tz = Some("Mars/Olympus".into())).starts_with("cron:"));
        assert!(bad(&|s| s.duration = "2d".into()).contains("between 1m and 24h"));
        assert!(bad(&|s| s.rules = Some(vec!["nope".into()])).starts_with("rules:"));
        assert!(bad(&|s| s.effect = "open".into()).contains("use mute"));
        assert!(bad(&|s| s.cutoff = Some("10m".into())).contains("effect allow or both"));
        assert!(
            bad(&|s| {
                s.effect = "allow".into();
                s.cutoff = Some("1h".into());
            })
            .contains("shorter than the duration")
        );
        let mut allow = nightly("0 1 * * *", "1h").spec;
        allow.effect = "allow".into();
        allow.cutoff = Some("10m".into());
        let allow = allow.check().expect("an allow window with a cutoff");
        assert!(allow.allows());
        assert!(
            !allow.mutes(
                &super::super::silences::tests::alert("xid_age", "db-1"),
                ms("2027-01-10T00:30:00Z"),
                &Default::default()
            ),
            "an allow window mutes nothing"
        );
    }
}
