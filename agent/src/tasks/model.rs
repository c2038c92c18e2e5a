//! Task runtime types: status bitmask, kinds, schedules, specs.

use std::collections::BTreeMap;

/// Task and run states, as bits so that recovery is one predicate:
/// `status & (DOING | QUEUED) != 0`.
pub mod status {
    pub const DEFAULT: u32 = 0;
    pub const SCHEDULED: u32 = 1;
    pub const QUEUED: u32 = 2;
    pub const DOING: u32 = 4;
    pub const DONE: u32 = 8;
    pub const FAILED: u32 = 16;
    pub const ABORTED: u32 = 32;
    pub const CANCELED: u32 = 64;
    /// States a restart interrupts.
    pub const IN_FLIGHT: u32 = DOING | QUEUED;
    /// States nothing happens after.
    pub const TERMINAL: u32 = DONE | FAILED | ABORTED | CANCELED;

    pub fn name(s: u32) -> &'static str {
        match s {
            SCHEDULED => "scheduled",
            QUEUED => "queued",
            DOING => "doing",
            DONE => "done",
            FAILED => "failed",
            ABORTED => "aborted",
            CANCELED => "canceled",
            _ => "default",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Vacuum,
    Analyze,
    HealthCheck,
    RetentionCleanup,
    PgDump,
    Sql,
    Command,
}

pub const KINDS: [Kind; 7] = [
    Kind::Vacuum,
    Kind::Analyze,
    Kind::HealthCheck,
    Kind::RetentionCleanup,
    Kind::PgDump,
    Kind::Sql,
    Kind::Command,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vacuum => "vacuum",
            Kind::Analyze => "analyze",
            Kind::HealthCheck => "health_check",
            Kind::RetentionCleanup => "retention_cleanup",
            Kind::PgDump => "pg_dump",
            Kind::Sql => "sql",
            Kind::Command => "command",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        KINDS.into_iter().find(|k| k.name() == s)
    }

    /// Only idempotent kinds are retried automatically: running them twice is harmless.
    pub fn idempotent(self) -> bool {
        match self {
            Kind::Vacuum
            | Kind::Analyze
            | Kind::HealthCheck
            | Kind::RetentionCleanup
            | Kind::PgDump => true,
            Kind::Sql | Kind::Command => false,
        }
    }

    /// Parameters this kind requires, and the ones it accepts.
    pub fn params(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Kind::Vacuum | Kind::Analyze => {
                (&["database"], &["database", "schema", "table", "full"])
            }
            Kind::HealthCheck => (&[], &["database"]),
            Kind::RetentionCleanup => (&[], &["older_than"]),
            Kind::PgDump => (
                &["database", "path"],
                &["database", "path", "schema", "table"],
            ),
            Kind::Sql => (&["database", "query"], &["database", "query"]),
            Kind::Command => (&[], &[]),
        }
    }
}

/// When a task runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Once, at this time (`--at`, `--in`, or now).
    Once { at_ms: i64 },
    /// Every `interval_ms`, first at `first_ms`; never overlapping itself.
    Every { interval_ms: i64, first_ms: i64 },
    /// A five-field cron expression evaluated in an IANA time zone.
    Cron { expr: String, tz: String },
}

impl Schedule {
    pub fn is_periodic(&self) -> bool {
        !matches!(self, Schedule::Once { .. })
    }

    /// Human and machine readable form, as shown in task JSON.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Once { .. } => "once".to_string(),
            Schedule::Every { interval_ms, .. } => {
                let d = std::time::Duration::from_millis(u64::try_from(*interval_ms).unwrap_or(0));
                format!("every {}", humantime::format_duration(d))
            }
            Schedule::Cron { expr, tz } => format!("cron {expr} {tz}"),
        }
    }
}

/// What to run. Validated before it reaches the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    pub kind: Kind,
    pub params: BTreeMap<String, String>,
    /// The command's argv (kind `command` only).
    pub argv: Vec<String>,
    pub schedule: Schedule,
    pub timeout_ms: i64,
    /// Operation signature the id derives from.
    pub key: String,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// One of the terminal status bits.
    pub status: u32,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub output: Vec<u8>,
    /// Bytes of output that did not fit the per-run limit and were dropped.
    pub output_dropped_bytes: u64,
}
