//! The report: the seed and schedule, faults by kind, a verdict per invariant with its
//! evidence, the recovery bound, and a timeline picture (SVG) of faults against each agent's
//! status and the rows waiting in the buffers (delivery lag).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::faults::Done;
use crate::verdict::{Outcome, Verdict};

/// One second of the run as the API showed it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub t_ms: u64,
    /// Per agent: online, and rows in its buffer (from its last heartbeat); `None` when
    /// the API did not answer (storage or both replicas down).
    pub agents: Option<Vec<(bool, Option<i64>)>>,
}

pub struct Report<'a> {
    pub seed: u64,
    pub duration_s: u64,
    pub faults: &'a [(usize, Done)],
    pub verdicts: &'a [Verdict],
    pub samples: &'a [Sample],
    pub recovery: &'a [(String, Option<u64>)],
    pub resources: &'a [String],
    pub agents: &'a [String],
}

impl Report<'_> {
    pub fn valid(&self) -> bool {
        self.verdicts.iter().all(|v| v.outcome == Outcome::Valid)
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let injected = self.faults.iter().filter(|(_, f)| f.injected).count();
        let _ = writeln!(s, "chaos run: seed {} for {} s", self.seed, self.duration_s);
        let _ = writeln!(
            s,
            "\nfaults injected: {injected} of {} planned",
            self.faults.len()
        );
        let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (_, f) in self.faults {
            let e = by_kind.entry(f.planned.kind.name()).or_default();
            e.0 += 1;
            if f.injected {
                e.1 += 1;
            }
        }
        for (kind, (planned, done)) in &by_kind {
            let _ = writeln!(s, "  {kind:<18} {done:>4} injected of {planned}");
        }
        let _ = writeln!(s, "\ninvariants:");
        for v in self.verdicts {
            let _ = writeln!(s, "  [{}] {}", v.outcome.name(), v.invariant);
            let _ = writeln!(s, "      checked: {}", v.checked);
            for e in v.evidence.iter().take(20) {
                let _ = writeln!(s, "      - {e}");
            }
            if v.evidence.len() > 20 {
                let _ = writeln!(s, "      … and {} more", v.evidence.len() - 20);
            }
        }
        let _ = writeln!(s, "\nrecovery after the last fault healed:");
        for (what, ms) in self.recovery {
            match ms {
                Some(ms) => {
                    let _ = writeln!(s, "  {what}: {:.1} s", *ms as f64 / 1000.0);
                }
                None => {
                    let _ = writeln!(s, "  {what}: not reached");
                }
            }
        }
        let _ = writeln!(s, "\ncontrol plane resources:");
        for r in self.resources {
            let _ = writeln!(s, "  {r}");
        }
        let _ = writeln!(
            s,
            "\nschedule (lane, start s, kind, target, hold ms, note):"
        );
        for (lane, f) in self.faults {
            let _ = writeln!(
                s,
                "  {lane} {:>7.1} {:<18} {} {:>6} {}",
                f.started_ms as f64 / 1000.0,
                f.planned.kind.name(),
                f.planned.target,
                f.planned.hold_ms,
                if f.injected {
                    f.note.clone()
                } else {
                    format!("NOT INJECTED: {}", f.note)
                }
            );
        }
        s
    }

    /// The timeline: one band per fault lane, one status band per agent, and the rows waiting
    /// in all buffers as a line.
    pub fn svg(&self) -> String {
        let width = 1200.0;
        let left = 110.0;
        let plot = width - left - 20.0;
        let end_ms = self.samples.last().map(|s| s.t_ms).unwrap_or(1).max(
            self.faults
                .iter()
                .map(|(_, f)| f.healed_ms)
                .max()
                .unwrap_or(1),
        );
        let x = |ms: u64| left + plot * (ms as f64 / end_ms.max(1) as f64);
        let band = 22.0;
        let agents = self.agents.len();
        let lag_top = 30.0 + band * (2 + agents) as f64 + 20.0;
        let lag_height = 140.0;
        let height = lag_top + lag_height + 40.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="11">"#
        );
        let _ = writeln!(
            s,
            r#"<text x="10" y="16">outpost chaos seed {} — faults, agent status (green online, red offline, grey API unanswered), rows waiting in buffers</text>"#,
            self.seed
        );
        for (lane, name) in ["agent faults", "service faults"].iter().enumerate() {
            let y = 30.0 + band * lane as f64;
            let _ = writeln!(s, r#"<text x="4" y="{}">{name}</text>"#, y + 14.0);
            for (l, f) in self.faults {
                if *l != lane || !f.injected {
                    continue;
                }
                let (x0, x1) = (x(f.started_ms), x(f.healed_ms).max(x(f.started_ms) + 1.5));
                let _ = writeln!(
                    s,
                    r##"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="{}" fill="#d08030"><title>{} target {} {:.1}–{:.1} s</title></rect>"##,
                    x1 - x0,
                    band - 4.0,
                    f.planned.kind.name(),
                    f.planned.target,
                    f.started_ms as f64 / 1000.0,
                    f.healed_ms as f64 / 1000.0
                );
            }
        }
        self.agent_rows(&mut s, &x, band);
        let lag: Vec<(u64, i64)> = self
            .samples
            .iter()
            .filter_map(|s| Some((s.t_ms, s.agents.as_ref()?.iter().filter_map(|a| a.1).sum())))
            .collect();
        let max_lag = lag.iter().map(|l| l.1).max().unwrap_or(0).max(1);
        let _ = writeln!(
            s,
            r#"<text x="4" y="{}">buffered rows</text><text x="4" y="{}">max {max_lag}</text>"#,
            lag_top + 14.0,
            lag_top + 28.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{lag_top}" width="{plot}" height="{lag_height}" fill="none" stroke="#999"/>"##
        );
        let points: Vec<String> = lag
            .iter()
            .map(|(t, v)| {
                format!(
                    "{:.1},{:.1}",
                    x(*t),
                    lag_top + lag_height - lag_height * (*v as f64 / max_lag as f64)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#3060c0" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
        let axis = lag_top + lag_height + 16.0;
        let step = (end_ms / 10).max(1000);
        let mut t = 0;
        while t <= end_ms {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{axis}">{}s</text>"#,
                x(t) - 8.0,
                t / 1000
            );
            t += step;
        }
        s.push_str("</svg>\n");
        s
    }

    /// One row per agent: a rectangle per run of equal status (online, offline, unanswered).
    fn agent_rows(&self, s: &mut String, x: &dyn Fn(u64) -> f64, band: f64) {
        for (i, name) in self.agents.iter().enumerate() {
            let y = 30.0 + band * (2 + i) as f64;
            let _ = writeln!(s, r#"<text x="4" y="{}">{name}</text>"#, y + 14.0);
            // One rectangle per run of equal states.
            let color = |sample: &Sample| match &sample.agents {
                None => "#b0b0b0",
                Some(a) if a.get(i).is_some_and(|a| a.0) => "#40a040",
                Some(_) => "#c03030",
            };
            let mut from = 0;
            for k in 1..=self.samples.len() {
                let same =
                    k < self.samples.len() && color(&self.samples[k]) == color(&self.samples[from]);
                if same {
                    continue;
                }
                let to = self.samples.get(k).unwrap_or(&self.samples[k - 1]).t_ms;
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{y}" width="{:.1}" height="{}" fill="{}"/>"#,
                    x(self.samples[from].t_ms),
                    (x(to) - x(self.samples[from].t_ms)).max(0.5),
                    band - 4.0,
                    color(&self.samples[from])
                );
                from = k;
            }
        }
    }
}
