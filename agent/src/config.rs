//! `outpost-agent run` configuration: TOML file, `OUTPOST_*` variables and flags (flags and
//! variables win), validated at start-up. All defaults live here.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::run_as::RunAs;

use crate::layout::{DEFAULT_DATA_DIR, SOCKET_FILE};

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentConfig {
    pub data_dir: Option<PathBuf>,
    pub control_plane: Option<String>,
    pub postgres: Option<String>,
    pub socket: Option<PathBuf>,
    /// PEM CA certificates trusted for an https:// control plane (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// `[metrics]` and `[terminal]` are read by the capabilities that use them; this build
    /// accepts the sections so one config file serves every version.
    pub metrics: Option<RawMetricsConfig>,
    pub terminal: Option<RawTerminalConfig>,
    pub tasks: Option<RawTasksConfig>,
    pub backups: Option<RawBackupsConfig>,
    /// `[labels]`: `env = "prod"`, `cluster = "main"`…, sent to the control plane at each
    /// connection, where they win over the stored labels for the keys they name.
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// `[backups]`: what this host grants the pgBackRest task kinds, and the status collection.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackupsConfig {
    /// The backup tool; `pgbackrest` (the only one this build runs).
    pub tool: Option<String>,
    /// The pgBackRest program (default `pgbackrest`, looked up in PATH).
    pub pgbackrest: Option<PathBuf>,
    /// pgBackRest's config file (default: its own, /etc/pgbackrest/pgbackrest.conf).
    pub config: Option<PathBuf>,
    /// Stanzas the backup kinds may name and whose status is collected (default: none, the
    /// kinds are off).
    pub stanzas: Option<Vec<String>>,
    /// How often `pgbackrest info` is collected (default 5m; 1m to 1h). It is also collected
    /// after each backup task.
    pub info_interval: Option<String>,
    /// The OS user pgBackRest runs as: the data directory's owner, usually `postgres`
    /// (default: `[tasks] run_as`). Only the backup kinds get its rights.
    pub run_as: Option<String>,
    /// Absolute directories restore drills may restore into (default: none, drills are off).
    pub restore_scratch_dirs: Option<Vec<PathBuf>>,
    /// The server programs a drill starts (default: Debian's for the backup's major version,
    /// /usr/lib/postgresql/VERSION/bin).
    pub pg_bin: Option<PathBuf>,
}

/// Validated `[backups]`.
#[derive(Clone, Debug)]
pub struct BackupsConfig {
    pub grant: crate::tasks::backup::BackupGrant,
    pub info_interval: std::time::Duration,
}

fn validate_backups(raw: RawBackupsConfig) -> anyhow::Result<Option<BackupsConfig>> {
    match raw.tool.as_deref() {
        None | Some("pgbackrest") => {}
        Some(other) => bail!("backups.tool: {other:?} is not supported (use \"pgbackrest\")"),
    }
    let stanzas = raw.stanzas.unwrap_or_default();
    if stanzas.is_empty() {
        return Ok(None);
    }
    if stanzas.len() > 64 {
        bail!("backups.stanzas: at most 64");
    }
    for stanza in &stanzas {
        crate::tasks::backup::check_stanza_name(stanza)
            .map_err(|e| anyhow::anyhow!("backups.stanzas: {e}"))?;
    }
    for (field, path) in [("config", &raw.config), ("pg_bin", &raw.pg_bin)] {
        if let Some(path) = path
            && !path.is_absolute()
        {
            bail!(
                "backups.{field}: {} must be an absolute path",
                path.display()
            );
        }
    }
    let scratch_dirs = raw.restore_scratch_dirs.unwrap_or_default();
    if let Some(dir) = scratch_dirs
        .iter()
        .find(|d| !d.is_absolute() || d.components().any(|c| c == std::path::Component::ParentDir))
    {
        bail!(
            "backups.restore_scratch_dirs: {} must be an absolute path without ..",
            dir.display()
        );
    }
    let info_interval = match &raw.info_interval {
        None => std::time::Duration::from_secs(300),
        Some(v) => humantime::parse_duration(v).with_context(|| {
            format!("backups.info_interval: {v:?} is not a duration (examples: 5m, 15m)")
        })?,
    };
    if !(std::time::Duration::from_secs(60)..=std::time::Duration::from_secs(3600))
        .contains(&info_interval)
    {
        bail!("backups.info_interval: must be between 1m and 1h");
    }
    Ok(Some(BackupsConfig {
        grant: crate::tasks::backup::BackupGrant {
            pgbackrest: raw.pgbackrest.unwrap_or_else(|| "pgbackrest".into()),
            config: raw.config,
            stanzas,
            run_as: match raw.run_as.as_deref() {
                Some(user) => Some(crate::run_as::resolve("backups", Some(user))?),
                None => None,
            },
            scratch_dirs,
            pg_bin: raw.pg_bin,
        },
        info_interval,
    }))
}

/// `[metrics]`: collection and the offline buffer.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetricsConfig {
    /// Collection interval (default 15s; 10s to 30s).
    pub interval: Option<String>,
    /// Buffer file size limit (default 128MiB).
    pub buffer_bytes_max: Option<String>,
    /// Older records are discarded (default 6h).
    pub record_age_max: Option<String>,
    /// Records per delivery batch (default 500).
    pub batch_rows_max: Option<usize>,
    /// Serve the agent's own figures at `http://LISTEN/metrics` (Prometheus text); off unless
    /// set. Loopback addresses only (e.g. 127.0.0.1:9187): the listener has no authentication.
    pub listen: Option<String>,
}

/// Validated `[metrics]`.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    pub interval: std::time::Duration,
    pub buffer: crate::buffer::Limits,
    pub batch_rows_max: usize,
    /// The metrics listener's address, when enabled.
    pub listen: Option<std::net::SocketAddr>,
}

fn validate_metrics(raw: RawMetricsConfig) -> anyhow::Result<MetricsConfig> {
    let duration =
        |field: &str, v: &Option<String>, default: u64| -> anyhow::Result<std::time::Duration> {
            match v {
                None => Ok(std::time::Duration::from_secs(default)),
                Some(v) => humantime::parse_duration(v).with_context(|| {
                    format!("{field}: {v:?} is not a duration (examples: 15s, 6h)")
                }),
            }
        };
    let interval = duration("metrics.interval", &raw.interval, 15)?;
    if !(std::time::Duration::from_secs(10)..=std::time::Duration::from_secs(30))
        .contains(&interval)
    {
        bail!("metrics.interval: must be between 10s and 30s");
    }
    let record_age_max = duration("metrics.record_age_max", &raw.record_age_max, 6 * 3600)?;
    if record_age_max < std::time::Duration::from_secs(1) {
        bail!("metrics.record_age_max: must be at least 1s");
    }
    let bytes_max = match &raw.buffer_bytes_max {
        Some(v) => parse_size("metrics.buffer_bytes_max", v)? as u64,
        None => 128 << 20,
    };
    if bytes_max < 1 << 20 {
        bail!("metrics.buffer_bytes_max: must be at least 1MiB");
    }
    let batch_rows_max = raw.batch_rows_max.unwrap_or(500);
    if !(1..=10_000).contains(&batch_rows_max) {
        bail!("metrics.batch_rows_max: must be 1 to 10000");
    }
    let listen = match &raw.listen {
        None => None,
        Some(v) => {
            let addr: std::net::SocketAddr = v.parse().with_context(|| {
                format!("metrics.listen: {v:?} is not an address like 127.0.0.1:9187")
            })?;
            if !addr.ip().is_loopback() {
                bail!(
                    "metrics.listen: {addr} is not a loopback address; the listener has no authentication, so it only binds 127.0.0.1 or ::1 (put a proxy with authentication in front to expose it)"
                );
            }
            Some(addr)
        }
    };
    Ok(MetricsConfig {
        listen,
        interval,
        buffer: crate::buffer::Limits {
            bytes_max,
            age_max_ms: i64::try_from(record_age_max.as_millis()).unwrap_or(i64::MAX),
            quarantined_max: 3,
        },
        batch_rows_max,
    })
}

/// `[tasks]`: the task runtime.
/// `[terminal]`: the browser psql terminal.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTerminalConfig {
    /// Whether the control plane may open terminals here (default true).
    pub enabled: Option<bool>,
    /// psql binary (default `psql` on `PATH`).
    pub psql: Option<PathBuf>,
    /// Connection string psql gets (default: the agent's `postgres`).
    pub database: Option<String>,
    /// OS user psql runs as when the agent runs as root (default: none, the agent's user).
    pub run_as: Option<String>,
    pub sessions_max: Option<usize>,
    pub reconnect_window: Option<String>,
    pub idle_timeout: Option<String>,
    /// PTY output kept for a link that is down or slow (default 1MiB).
    pub output_buffer_bytes_max: Option<String>,
    /// Ask the control plane to record keystrokes too, not only output (default false:
    /// typed passwords would be kept).
    pub record_input: Option<bool>,
}

fn validate_terminal(
    raw: RawTerminalConfig,
    postgres: Option<&str>,
) -> anyhow::Result<crate::terminal::TerminalConfig> {
    let duration = |field: &str, v: &Option<String>, default_s: u64| match v {
        None => Ok(std::time::Duration::from_secs(default_s)),
        Some(v) => humantime::parse_duration(v)
            .with_context(|| format!("{field}: {v:?} is not a duration (examples: 60s, 30m)")),
    };
    let sessions_max = raw.sessions_max.unwrap_or(10);
    if !(1..=1000).contains(&sessions_max) {
        bail!("terminal.sessions_max: must be 1 to 1000");
    }
    let reconnect_window = duration("terminal.reconnect_window", &raw.reconnect_window, 60)?;
    if reconnect_window > std::time::Duration::from_secs(3600) {
        bail!("terminal.reconnect_window: at most 1h");
    }
    let idle_timeout = duration("terminal.idle_timeout", &raw.idle_timeout, 30 * 60)?;
    if idle_timeout < std::time::Duration::from_secs(10) {
        bail!("terminal.idle_timeout: at least 10s");
    }
    let output_bytes_max = match &raw.output_buffer_bytes_max {
        Some(v) => parse_size("terminal.output_buffer_bytes_max", v)?,
        None => 1 << 20,
    };
    if !((64 << 10)..=(256 << 20)).contains(&output_bytes_max) {
        bail!("terminal.output_buffer_bytes_max: must be 64KiB to 256MiB");
    }
    Ok(crate::terminal::TerminalConfig {
        enabled: raw.enabled.unwrap_or(true),
        psql: raw.psql.unwrap_or_else(|| "psql".into()),
        database: raw.database.or_else(|| postgres.map(str::to_string)),
        run_as: crate::run_as::resolve("terminal", raw.run_as.as_deref())?,
        sessions_max,
        reconnect_window,
        idle_timeout,
        output_bytes_max,
        record_input: raw.record_input.unwrap_or(false),
    })
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTasksConfig {
    /// Runs at the same time (default 4).
    pub concurrency_max: Option<usize>,
    /// `run_once` (default) or `skip`: what happens to runs that fell due while the agent was down.
    pub missed_runs: Option<String>,
    /// Output kept per run (default 64KiB); the rest is counted.
    pub output_bytes_max: Option<String>,
    /// Ended tasks are purged after this long (default 30d).
    pub history_retention: Option<String>,
    /// Automatic retries of idempotent kinds (default 3).
    pub retries_max: Option<u32>,
    pub psql: Option<PathBuf>,
    pub pg_dump: Option<PathBuf>,
    /// OS user task commands run as when the agent runs as root; required then (`"root"`
    /// allows root explicitly). An agent that is not root runs them as itself.
    pub run_as: Option<String>,
    /// Kinds the control plane may create (default: every kind).
    pub remote_kinds: Option<Vec<String>>,
    /// Absolute directories pg_dump may write under (default: none, pg_dump is off).
    pub dump_dirs: Option<Vec<PathBuf>>,
}

/// Validated `[tasks]`.
#[derive(Clone, Debug)]
pub struct TasksConfig {
    pub concurrency_max: usize,
    pub missed: crate::tasks::core::MissedRuns,
    pub output_bytes_max: usize,
    pub history_retention: std::time::Duration,
    pub retries_max: u32,
    pub psql: PathBuf,
    pub pg_dump: PathBuf,
    pub run_as: RunAs,
    pub policy: crate::tasks::policy::TaskPolicy,
}

/// Parse `128MiB`, `64KiB`, `1000` (bytes).
pub fn parse_size(field: &str, v: &str) -> anyhow::Result<usize> {
    let v = v.trim();
    let (digits, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: usize = digits
        .parse()
        .with_context(|| format!("{field}: {v:?} is not a size (examples: 64KiB, 128MiB)"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => bail!("{field}: unknown unit {other:?} (use B, KiB, MiB or GiB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("{field}: {v:?} is too large"))
}

fn validate_tasks(raw: RawTasksConfig) -> anyhow::Result<TasksConfig> {
    use crate::tasks::core::MissedRuns;
    let concurrency_max = raw.concurrency_max.unwrap_or(4);
    if !(1..=256).contains(&concurrency_max) {
        bail!("tasks.concurrency_max: must be 1 to 256");
    }
    let missed = match raw.missed_runs.as_deref() {
        None | Some("run_once") => MissedRuns::RunOnce,
        Some("skip") => MissedRuns::Skip,
        Some(other) => bail!("tasks.missed_runs: {other:?} must be run_once or skip"),
    };
    let output_bytes_max = match &raw.output_bytes_max {
        Some(v) => parse_size("tasks.output_bytes_max", v)?,
        None => 64 * 1024,
    };
    if output_bytes_max > 64 << 20 {
        bail!("tasks.output_bytes_max: at most 64MiB");
    }
    let history_retention = match &raw.history_retention {
        Some(v) => humantime::parse_duration(v)
            .with_context(|| format!("tasks.history_retention: {v:?} is not a duration"))?,
        None => std::time::Duration::from_secs(30 * 24 * 3600),
    };
    let retries_max = raw.retries_max.unwrap_or(3);
    if retries_max > 20 {
        bail!("tasks.retries_max: at most 20");
    }
    let mut policy = crate::tasks::policy::TaskPolicy::default();
    if let Some(kinds) = &raw.remote_kinds {
        policy.remote_kinds = kinds
            .iter()
            .map(|k| {
                crate::tasks::model::Kind::parse(k).with_context(|| {
                    let known: Vec<&str> = crate::tasks::model::KINDS
                        .iter()
                        .map(|k| k.name())
                        .collect();
                    format!(
                        "tasks.remote_kinds: unknown kind {k:?} (kinds: {})",
                        known.join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(dirs) = raw.dump_dirs {
        if let Some(dir) = dirs.iter().find(|d| !d.is_absolute()) {
            bail!(
                "tasks.dump_dirs: {} must be an absolute path",
                dir.display()
            );
        }
        policy.dump_dirs = dirs;
    }
    Ok(TasksConfig {
        concurrency_max,
        missed,
        output_bytes_max,
        history_retention,
        retries_max,
        psql: raw.psql.unwrap_or_else(|| "psql".into()),
        pg_dump: raw.pg_dump.unwrap_or_else(|| "pg_dump".into()),
        run_as: crate::run_as::resolve("tasks", raw.run_as.as_deref())?,
        policy,
    })
}

impl RawAgentConfig {
    pub fn over(self, file: RawAgentConfig) -> RawAgentConfig {
        RawAgentConfig {
            data_dir: self.data_dir.or(file.data_dir),
            control_plane: self.control_plane.or(file.control_plane),
            postgres: self.postgres.or(file.postgres),
            socket: self.socket.or(file.socket),
            ca_file: self.ca_file.or(file.ca_file),
            metrics: self.metrics.or(file.metrics),
            terminal: self.terminal.or(file.terminal),
            tasks: self.tasks.or(file.tasks),
            backups: self.backups.or(file.backups),
            labels: self.labels.or(file.labels),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    /// Overrides the URL stored at enrollment.
    pub control_plane: Option<url::Url>,
    pub postgres: Option<String>,
    pub socket: PathBuf,
    /// Trust for an https:// control plane, loaded and checked at start-up.
    pub tls_client: Option<std::sync::Arc<world::tls::ClientConfig>>,
    pub tasks: TasksConfig,
    pub metrics: MetricsConfig,
    pub terminal: crate::terminal::TerminalConfig,
    /// `[backups]`, when it grants any stanza.
    pub backups: Option<BackupsConfig>,
    /// `[labels]`, checked like the control plane checks labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

pub fn read_file(path: &Path) -> anyhow::Result<RawAgentConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
}

/// Parse and check a control-plane URL (`http://host:port`).
pub fn control_plane_url(field: &str, value: &str) -> anyhow::Result<url::Url> {
    let url = url::Url::parse(value).with_context(|| {
        format!("{field}: {value:?} is not a URL (example: http://cp.example:8080)")
    })?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => bail!("{field}: scheme {other:?} must be http or https"),
    }
}

pub fn validate(raw: RawAgentConfig) -> anyhow::Result<AgentConfig> {
    let data_dir = raw
        .data_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let control_plane = raw
        .control_plane
        .as_deref()
        .map(|v| control_plane_url("control_plane", v))
        .transpose()?;
    if let Some(dsn) = &raw.postgres
        && !(dsn.starts_with("postgres://")
            || dsn.starts_with("postgresql://")
            || dsn.contains('='))
    {
        bail!("postgres: {dsn:?} must be a postgres:// URL or a key=value connection string");
    }
    let socket = raw.socket.unwrap_or_else(|| data_dir.join(SOCKET_FILE));
    let terminal = validate_terminal(raw.terminal.unwrap_or_default(), raw.postgres.as_deref())?;
    let tls_client = match &raw.ca_file {
        Some(path) => {
            Some(world::tls::client_config(path).map_err(|e| anyhow::anyhow!("ca_file: {e}"))?)
        }
        None => None,
    };
    let backups = validate_backups(raw.backups.unwrap_or_default())?;
    let mut tasks = validate_tasks(raw.tasks.unwrap_or_default())?;
    tasks.policy.backups = backups.as_ref().map(|b| b.grant.clone());
    Ok(AgentConfig {
        data_dir,
        control_plane,
        postgres: raw.postgres,
        socket,
        tls_client,
        backups,
        tasks,
        metrics: validate_metrics(raw.metrics.unwrap_or_default())?,
        terminal,
        labels: validate_labels(raw.labels.unwrap_or_default())?,
    })
}

/// `[labels]`, checked by the rule the control plane applies (so a bad one fails here, at
/// start-up, instead of being refused at every connection).
fn validate_labels(
    labels: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    proto::labels::validate(&labels).map_err(|e| anyhow::anyhow!("[labels]: {e}"))?;
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::{RawAgentConfig, validate};

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
data_dir = "/var/lib/outpost-agent"
control_plane = "http://cp.example:8443"
postgres = "postgres://outpost@/postgres?host=/run/postgresql"
[metrics]
interval = "15s"
buffer_bytes_max = "128MiB"
record_age_max = "6h"
batch_rows_max = 500
[terminal]
sessions_max = 10
reconnect_window = "60s"
"#;
        let raw: RawAgentConfig = toml::from_str(text).expect("parses");
        let c = validate(raw).expect("validates");
        assert_eq!(
            c.socket,
            std::path::Path::new("/var/lib/outpost-agent/agent.sock")
        );
        assert_eq!(
            c.control_plane.expect("set").as_str(),
            "http://cp.example:8443/"
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        for (raw, field) in [
            (
                RawAgentConfig {
                    metrics: Some(super::RawMetricsConfig {
                        interval: Some("2s".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "metrics.interval",
            ),
            (
                RawAgentConfig {
                    metrics: Some(super::RawMetricsConfig {
                        buffer_bytes_max: Some("12XB".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "metrics.buffer_bytes_max",
            ),
            (
                RawAgentConfig {
                    control_plane: Some("cp:80".into()),
                    ..Default::default()
                },
                "control_plane",
            ),
            (
                RawAgentConfig {
                    control_plane: Some("ftp://cp".into()),
                    ..Default::default()
                },
                "control_plane",
            ),
            (
                RawAgentConfig {
                    postgres: Some("nonsense".into()),
                    ..Default::default()
                },
                "postgres",
            ),
            (
                RawAgentConfig {
                    tasks: Some(super::RawTasksConfig {
                        missed_runs: Some("later".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "tasks.missed_runs",
            ),
            (
                RawAgentConfig {
                    tasks: Some(super::RawTasksConfig {
                        output_bytes_max: Some("12 parsecs".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "tasks.output_bytes_max",
            ),
        ] {
            let err = format!("{:#}", validate(raw).expect_err("refused"));
            assert!(err.starts_with(field), "{err}");
        }
    }
}
