//! `outpost serve` configuration: a TOML file, `OUTPOST_*` variables and flags (flags and
//! variables win over the file), validated into [`ServeConfig`] at start-up. All defaults
//! live here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::settings::Settings;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./outpost-data";

/// As read from the file or the command line; every field optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServeConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    /// humantime, default 5s.
    pub heartbeat_interval: Option<String>,
    /// humantime, default 15s; must be at least twice the heartbeat interval.
    pub dead_after: Option<String>,
    /// humantime, default 12h.
    pub session_ttl: Option<String>,
    /// humantime, default 30d; at least 1d.
    pub metrics_retention: Option<String>,
    /// humantime, default 400d; at least 1d.
    pub audit_retention: Option<String>,
    /// Inventory TOML for fleet exec from the web UI and API (same format as `outpost exec`).
    pub inventory: Option<PathBuf>,
    /// PEM certificate chain (leaf first) and private key: serve HTTPS instead of HTTP.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates trusted for outgoing TLS (`rediss://`, notification channels),
    /// besides the system's.
    pub ca_file: Option<PathBuf>,
    /// A reverse proxy terminates TLS in front of this replica: browsers see HTTPS, so the
    /// session cookie is `Secure` and answers carry HSTS although this port speaks HTTP.
    pub behind_tls_proxy: Option<bool>,
    /// Connections served at once, default 20000 (each agent holds one).
    pub max_connections: Option<usize>,
    /// humantime, default 15s: deadline for a request's headers and for idle keep-alive.
    pub header_timeout: Option<String>,
    /// humantime, default 15s: deadline for a request's body, from its headers.
    pub body_timeout: Option<String>,
    /// humantime, default 60s: deadline for the answer to a request (not WebSockets).
    pub request_timeout: Option<String>,
    /// Connections at once from one source address, default 2000 (not behind a TLS proxy).
    pub max_connections_per_address: Option<usize>,
    /// humantime, default 30s: the first lockout after repeated failed logins.
    pub login_lockout: Option<String>,
    /// `on` (default) or `off`: whether terminal sessions are recorded.
    pub recording: Option<String>,
    /// humantime, default 90d; at least 1d.
    pub recording_retention: Option<String>,
    /// `fail_open` (default) or `fail_closed`.
    pub recording_failure: Option<String>,
    /// Record keystrokes of every terminal session, default false.
    pub record_input: Option<bool>,
    /// humantime, default 30s: how long an alert's notice waits for others of its rule.
    pub alert_group_wait: Option<String>,
    /// More agents than this firing one rule within the group wait make one digest
    /// (default 20).
    pub alert_digest_over: Option<usize>,
    /// humantime, default 4h: a firing alert is notified again this often.
    pub alert_repeat: Option<String>,
    /// humantime, default 15s: how often the rules are evaluated.
    pub alert_evaluate_every: Option<String>,
    /// humantime, default 20s: how long the evaluating replica's lease lasts unrenewed (the
    /// other replica takes over within it and a quarter more).
    pub alert_lease_ttl: Option<String>,
}

impl RawServeConfig {
    /// `self` (flags) over `file`.
    pub fn over(self, file: RawServeConfig) -> RawServeConfig {
        RawServeConfig {
            listen: self.listen.or(file.listen),
            data_dir: self.data_dir.or(file.data_dir),
            database_url: self.database_url.or(file.database_url),
            redis_url: self.redis_url.or(file.redis_url),
            heartbeat_interval: self.heartbeat_interval.or(file.heartbeat_interval),
            dead_after: self.dead_after.or(file.dead_after),
            session_ttl: self.session_ttl.or(file.session_ttl),
            metrics_retention: self.metrics_retention.or(file.metrics_retention),
            audit_retention: self.audit_retention.or(file.audit_retention),
            inventory: self.inventory.or(file.inventory),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            ca_file: self.ca_file.or(file.ca_file),
            behind_tls_proxy: self.behind_tls_proxy.or(file.behind_tls_proxy),
            max_connections: self.max_connections.or(file.max_connections),
            header_timeout: self.header_timeout.or(file.header_timeout),
            body_timeout: self.body_timeout.or(file.body_timeout),
            request_timeout: self.request_timeout.or(file.request_timeout),
            max_connections_per_address: self
                .max_connections_per_address
                .or(file.max_connections_per_address),
            login_lockout: self.login_lockout.or(file.login_lockout),
            recording: self.recording.or(file.recording),
            recording_retention: self.recording_retention.or(file.recording_retention),
            recording_failure: self.recording_failure.or(file.recording_failure),
            record_input: self.record_input.or(file.record_input),
            alert_group_wait: self.alert_group_wait.or(file.alert_group_wait),
            alert_digest_over: self.alert_digest_over.or(file.alert_digest_over),
            alert_repeat: self.alert_repeat.or(file.alert_repeat),
            alert_evaluate_every: self.alert_evaluate_every.or(file.alert_evaluate_every),
            alert_lease_ttl: self.alert_lease_ttl.or(file.alert_lease_ttl),
        }
    }
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    /// HTTPS when set (loaded and checked at start-up).
    pub tls: Option<Arc<world::tls::ServerConfig>>,
    /// Trust for outgoing TLS (`rediss://`), when not the system's.
    pub tls_client: Option<Arc<world::tls::ClientConfig>>,
    pub settings: Settings,
}

pub fn read_file(path: &Path) -> anyhow::Result<RawServeConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
}

fn duration(field: &str, value: Option<&str>, default: Duration) -> anyhow::Result<Duration> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v)
            .with_context(|| format!("{field}: {v:?} is not a duration (examples: 5s, 15m, 12h)")),
    }
}

pub fn validate(raw: RawServeConfig) -> anyhow::Result<ServeConfig> {
    let listen = raw
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    if listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_none()
    {
        bail!("listen: {listen:?} must be HOST:PORT, e.g. 127.0.0.1:8080");
    }
    check_urls(&raw)?;
    let mut settings = settings_of(&raw)?;
    check_settings(&settings)?;
    let (tls, tls_client) = (tls_server(&raw)?, tls_client(&raw)?);
    settings.secure_cookies = tls.is_some() || settings.behind_tls_proxy;
    Ok(ServeConfig {
        listen,
        data_dir: raw
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        database_url: raw.database_url,
        redis_url: raw.redis_url,
        tls,
        tls_client,
        settings,
    })
}

/// The storage and Redis URLs name their scheme.
fn check_urls(raw: &RawServeConfig) -> anyhow::Result<()> {
    if let Some(url) = &raw.database_url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        bail!("database_url: must start with postgres:// (omit it to use SQLite in the data dir)");
    }
    if let Some(url) = &raw.redis_url
        && !(url.starts_with("redis://") || url.starts_with("rediss://"))
    {
        bail!("redis_url: must start with redis:// or rediss://");
    }
    Ok(())
}

/// Every setting from the file and flags, or its default.
fn settings_of(raw: &RawServeConfig) -> anyhow::Result<Settings> {
    let defaults = Settings::default();
    let lease_ttl = duration(
        "alert_lease_ttl",
        raw.alert_lease_ttl.as_deref(),
        defaults.alerts.lease_ttl,
    )?;
    Ok(Settings {
        heartbeat_interval: duration(
            "heartbeat_interval",
            raw.heartbeat_interval.as_deref(),
            defaults.heartbeat_interval,
        )?,
        dead_after: duration("dead_after", raw.dead_after.as_deref(), defaults.dead_after)?,
        session_ttl: duration(
            "session_ttl",
            raw.session_ttl.as_deref(),
            defaults.session_ttl,
        )?,
        metrics_retention: duration(
            "metrics_retention",
            raw.metrics_retention.as_deref(),
            defaults.metrics_retention,
        )?,
        audit_retention: duration(
            "audit_retention",
            raw.audit_retention.as_deref(),
            defaults.audit_retention,
        )?,
        inventory: raw.inventory.clone(),
        secure_cookies: false,
        behind_tls_proxy: raw.behind_tls_proxy.unwrap_or(false),
        max_connections: raw.max_connections.unwrap_or(defaults.max_connections),
        header_timeout: duration(
            "header_timeout",
            raw.header_timeout.as_deref(),
            defaults.header_timeout,
        )?,
        body_timeout: duration(
            "body_timeout",
            raw.body_timeout.as_deref(),
            defaults.body_timeout,
        )?,
        request_timeout: duration(
            "request_timeout",
            raw.request_timeout.as_deref(),
            defaults.request_timeout,
        )?,
        max_connections_per_address: raw
            .max_connections_per_address
            .unwrap_or(defaults.max_connections_per_address),
        login_lockout: duration(
            "login_lockout",
            raw.login_lockout.as_deref(),
            defaults.login_lockout,
        )?,
        recording: match raw.recording.as_deref() {
            None => defaults.recording,
            Some("on") => true,
            Some("off") => false,
            Some(v) => bail!("recording: {v:?} must be on or off"),
        },
        recording_retention: duration(
            "recording_retention",
            raw.recording_retention.as_deref(),
            defaults.recording_retention,
        )?,
        recording_failure: match raw.recording_failure.as_deref() {
            None => defaults.recording_failure,
            Some(v) => crate::settings::RecordingFailure::parse(v).with_context(|| {
                format!("recording_failure: {v:?} must be fail_open or fail_closed")
            })?,
        },
        record_input: raw.record_input.unwrap_or(defaults.record_input),
        alerts: crate::settings::AlertTiming {
            group_wait: duration(
                "alert_group_wait",
                raw.alert_group_wait.as_deref(),
                defaults.alerts.group_wait,
            )?,
            digest_over: raw.alert_digest_over.unwrap_or(defaults.alerts.digest_over),
            repeat: duration(
                "alert_repeat",
                raw.alert_repeat.as_deref(),
                defaults.alerts.repeat,
            )?,
            evaluate_every: duration(
                "alert_evaluate_every",
                raw.alert_evaluate_every.as_deref(),
                defaults.alerts.evaluate_every,
            )?,
            lease_ttl,
            // The lease is renewed four times within its time to live.
            tick: (lease_ttl / 4).min(defaults.alerts.tick),
        },
    })
}

/// Each setting within its bounds, and the inventory loadable.
fn check_settings(settings: &Settings) -> anyhow::Result<()> {
    if settings.alerts.group_wait > Duration::from_secs(600) {
        bail!("alert_group_wait: at most 10m");
    }
    if settings.alerts.repeat < Duration::from_secs(60) {
        bail!("alert_repeat: at least 1m");
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(300))
        .contains(&settings.alerts.evaluate_every)
    {
        bail!("alert_evaluate_every: between 1s and 5m");
    }
    if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&settings.alerts.lease_ttl) {
        bail!("alert_lease_ttl: between 2s and 5m");
    }
    if settings.max_connections == 0 {
        bail!(
            "max_connections: must be at least 1 (the fleet's size plus browsers and API clients)"
        );
    }
    for (field, value) in [
        ("header_timeout", settings.header_timeout),
        ("body_timeout", settings.body_timeout),
        ("request_timeout", settings.request_timeout),
    ] {
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&value) {
            bail!("{field}: must be between 1s and 10m");
        }
    }
    if settings.max_connections_per_address == 0 {
        bail!(
            "max_connections_per_address: must be at least 1 (agents behind one NAT address share it)"
        );
    }
    if !(Duration::from_secs(1)..=crate::throttle::LOCKOUT_MAX).contains(&settings.login_lockout) {
        bail!("login_lockout: must be between 1s and 15m");
    }
    if let Some(path) = &settings.inventory {
        remote_exec::Inventory::load(path)
            .with_context(|| format!("inventory: {} is not a usable inventory", path.display()))?;
    }
    if settings.heartbeat_interval < Duration::from_millis(100) {
        bail!("heartbeat_interval: must be at least 100ms");
    }
    if settings.dead_after < settings.heartbeat_interval * 2 {
        bail!(
            "dead_after: must be at least twice heartbeat_interval, or a single lost heartbeat drops the link"
        );
    }
    if settings.session_ttl < Duration::from_secs(60) {
        bail!("session_ttl: must be at least 60s");
    }
    if settings.metrics_retention < Duration::from_secs(86_400) {
        bail!(
            "metrics_retention: must be at least 1d (Postgres keeps metrics in daily partitions)"
        );
    }
    if settings.audit_retention < Duration::from_secs(86_400) {
        bail!("audit_retention: must be at least 1d");
    }
    if settings.recording_retention < Duration::from_secs(86_400) {
        bail!("recording_retention: must be at least 1d");
    }
    Ok(())
}

/// The TLS server configuration, from `tls_cert` and `tls_key` when both are given.
fn tls_server(raw: &RawServeConfig) -> anyhow::Result<Option<Arc<world::tls::ServerConfig>>> {
    Ok(match (&raw.tls_cert, &raw.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(
            world::tls::server_config(cert, key)
                .map_err(|e| anyhow::anyhow!("tls_cert/tls_key: {e}"))?,
        ),
        _ => bail!(
            "tls_cert and tls_key: give both (PEM certificate chain and its private key) or neither"
        ),
    })
}

/// The trust for outgoing TLS: `ca_file` when given, beside the system's CAs (a private
/// Redis and a public chat service's webhook from one replica).
fn tls_client(raw: &RawServeConfig) -> anyhow::Result<Option<Arc<world::tls::ClientConfig>>> {
    raw.ca_file
        .as_ref()
        .map(|path| {
            world::tls::client_config_with_system(path).map_err(|e| anyhow::anyhow!("ca_file: {e}"))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::{RawServeConfig, validate};

    #[test]
    fn defaults_are_valid() {
        let c = validate(RawServeConfig::default()).expect("defaults validate");
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert!(c.database_url.is_none());
    }

    #[test]
    fn https_served_here_or_by_a_proxy_makes_cookies_secure() {
        let plain = validate(RawServeConfig::default()).expect("valid");
        assert!(!plain.settings.secure_cookies);
        let proxied = validate(RawServeConfig {
            behind_tls_proxy: Some(true),
            ..Default::default()
        })
        .expect("valid");
        assert!(proxied.settings.secure_cookies);
        assert!(proxied.tls.is_none(), "this port still speaks HTTP");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                RawServeConfig {
                    listen: Some("nowhere".into()),
                    ..Default::default()
                },
                "listen",
            ),
            (
                RawServeConfig {
                    database_url: Some("mysql://x".into()),
                    ..Default::default()
                },
                "database_url",
            ),
            (
                RawServeConfig {
                    redis_url: Some("http://x".into()),
                    ..Default::default()
                },
                "redis_url",
            ),
            (
                RawServeConfig {
                    dead_after: Some("soon".into()),
                    ..Default::default()
                },
                "dead_after",
            ),
            (
                RawServeConfig {
                    heartbeat_interval: Some("10s".into()),
                    dead_after: Some("15s".into()),
                    ..Default::default()
                },
                "dead_after",
            ),
        ];
        for (raw, field) in cases {
            let err = format!("{:#}", validate(raw).expect_err("must be refused"));
            assert!(err.starts_with(field), "{err:?} should name {field}");
        }
    }

    #[test]
    fn flags_win_over_file() {
        let file: RawServeConfig =
            toml::from_str("listen = \"0.0.0.0:9000\"\ndata_dir = \"/a\"").expect("parses");
        let flags = RawServeConfig {
            listen: Some("127.0.0.1:1".into()),
            ..Default::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(merged.data_dir.as_deref(), Some(std::path::Path::new("/a")));
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<RawServeConfig>("lisen = \"x\"").is_err());
    }
}
