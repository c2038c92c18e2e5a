//! `outpost-agent run` configuration: TOML file, `OUTPOST_*` variables and flags (flags and
//! variables win), validated at start-up. All defaults live here.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/outpost-agent";
/// Socket file name inside the data dir.
pub const SOCKET_FILE: &str = "agent.sock";

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentConfig {
    pub data_dir: Option<PathBuf>,
    pub control_plane: Option<String>,
    pub postgres: Option<String>,
    pub socket: Option<PathBuf>,
    /// `[metrics]` and `[terminal]` are read by the capabilities that use them; this build
    /// accepts the sections so one config file serves every version.
    pub metrics: Option<toml::Table>,
    pub terminal: Option<toml::Table>,
}

impl RawAgentConfig {
    pub fn over(self, file: RawAgentConfig) -> RawAgentConfig {
        RawAgentConfig {
            data_dir: self.data_dir.or(file.data_dir),
            control_plane: self.control_plane.or(file.control_plane),
            postgres: self.postgres.or(file.postgres),
            socket: self.socket.or(file.socket),
            metrics: self.metrics.or(file.metrics),
            terminal: self.terminal.or(file.terminal),
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
        "http" => Ok(url),
        "https" => bail!(
            "{field}: https is not supported by this build; put the control plane behind http on a trusted network or a TLS-terminating tunnel"
        ),
        other => bail!("{field}: scheme {other:?} must be http"),
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
    Ok(AgentConfig {
        data_dir,
        control_plane,
        postgres: raw.postgres,
        socket,
    })
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
        ] {
            let err = format!("{:#}", validate(raw).expect_err("refused"));
            assert!(err.starts_with(field), "{err}");
        }
    }
}
