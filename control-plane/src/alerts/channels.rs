//! Notification channels: what an admin posts, what is stored (the secret apart, never
//! returned), how a notice is written for each kind, and one send.
//!
//! * `webhook`: Alertmanager's webhook JSON (version 4), so existing receivers work, signed
//!   `X-Outpost-Signature: sha256=HEX` (HMAC-SHA256 of the body with the channel's secret).
//! * `slack`: a Slack-compatible incoming webhook (`{"text": …}`); its URL is the secret.
//! * `alertmanager`: `POST {url}/api/v2/alerts` to an existing Alertmanager, which then routes,
//!   groups and silences as it is configured to.
//! * `email`: a plain-text mail over SMTP (`smtp://` with STARTTLS, or `smtps://`); the
//!   password, when there is one, is the secret.
//!
//! Every message carries its idempotency key (`X-Outpost-Key`, and the webhook's `groupKey`):
//! a receiver that keeps the keys it saw drops the one duplicate a replica dying mid-send
//! may cause.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::rules::Severity;
use super::state::{Notice, Status};

/// The spec kind channels are stored under.
pub const SPEC_KIND: &str = "alert_channel";
/// Channels kept at most.
pub const CHANNELS_MAX: usize = 50;
const NAME_BYTES_MAX: usize = 64;
const URL_BYTES_MAX: usize = 2048;
const SECRET_BYTES_MAX: usize = 512;
/// A send that takes longer failed (and is tried again).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Agents listed in one Slack message; the rest are counted.
const SLACK_LINES_MAX: usize = 30;
/// How long an Alertmanager keeps a firing alert it was sent: longer than the repeat
/// interval, so a repeat renews it before it lapses.
const ALERTMANAGER_HOLD_MS: i64 = 8 * 3_600_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Webhook,
    Slack,
    Alertmanager,
    Email,
}

/// An email channel's addresses and login.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Email {
    pub from: String,
    /// 1 to 50 addresses.
    pub to: Vec<String>,
    /// Log in as this user (`AUTH PLAIN`, after TLS) with the channel's secret as password.
    #[serde(default)]
    pub user: Option<String>,
}

/// A channel as posted.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelRequest {
    /// Unique, 1 to 64 printable characters.
    pub name: String,
    pub kind: Kind,
    /// `http://` or `https://`: the receiver (`webhook`), the incoming-webhook URL (`slack`,
    /// kept secret), or the Alertmanager's base URL (`alertmanager`); for `email`,
    /// `smtp://HOST[:587]` (STARTTLS) or `smtps://HOST[:465]`.
    pub url: String,
    /// `webhook`: the HMAC key, made and shown once when absent; `email`: the SMTP password.
    #[serde(default)]
    pub secret: Option<String>,
    /// `email` only: sender, recipients, login.
    #[serde(default)]
    pub email: Option<Email>,
    /// Notices below this severity skip the channel (default `warning`: all).
    #[serde(default)]
    pub min_severity: Option<Severity>,
}

/// A channel as stored and shown (never its secret).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ChannelSpec {
    pub name: String,
    pub kind: Kind,
    /// `null` for `slack`, whose URL is its secret.
    pub url: Option<String>,
    pub min_severity: Severity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<Email>,
}

/// A stored channel, ready to send.
#[derive(Clone, Debug)]
pub struct Channel {
    pub id: String,
    pub spec: ChannelSpec,
    pub secret: Option<String>,
}

fn url_ok(url: &str) -> Result<(), String> {
    if url.len() > URL_BYTES_MAX {
        return Err(format!("url: at most {URL_BYTES_MAX} bytes"));
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("url: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err("url: must be http:// or https:// with a host".into());
    }
    Ok(())
}

impl ChannelRequest {
    /// The spec to store and the secret beside it; `secret` is the one made for a webhook
    /// posted without one. Every refusal names the field.
    pub fn into_stored(self, made_secret: String) -> Result<(ChannelSpec, Option<String>), String> {
        let name = self.name.trim().to_string();
        if name.is_empty() || name.len() > NAME_BYTES_MAX || name.chars().any(char::is_control) {
            return Err(format!(
                "name must be 1 to {NAME_BYTES_MAX} printable bytes"
            ));
        }
        if self.kind != Kind::Email {
            url_ok(&self.url)?;
            if self.email.is_some() {
                return Err("email: only email channels take it".into());
            }
        }
        if self
            .secret
            .as_ref()
            .is_some_and(|s| s.is_empty() || s.len() > SECRET_BYTES_MAX)
        {
            return Err(format!("secret: 1 to {SECRET_BYTES_MAX} bytes"));
        }
        let min_severity = self.min_severity.unwrap_or(Severity::Warning);
        let (url, secret) = match self.kind {
            Kind::Webhook => (Some(self.url), Some(self.secret.unwrap_or(made_secret))),
            Kind::Slack => {
                if self.secret.is_some() {
                    return Err("secret: a slack channel's secret is its url".into());
                }
                (None, Some(self.url))
            }
            Kind::Alertmanager => {
                if self.secret.is_some() {
                    return Err("secret: only webhook and email channels take one".into());
                }
                (Some(self.url.trim_end_matches('/').to_string()), None)
            }
            Kind::Email => {
                let email = self.email.as_ref().ok_or("email: from and to are needed")?;
                super::smtp::Mailer::from_url(
                    &self.url,
                    &email.from,
                    &email.to,
                    email.user.as_deref(),
                )?;
                (Some(self.url), self.secret)
            }
        };
        Ok((
            ChannelSpec {
                name,
                kind: self.kind,
                url,
                min_severity,
                email: self.email,
            },
            secret,
        ))
    }
}

impl Channel {
    pub fn from_row(row: &crate::storage::SpecRow) -> Option<Channel> {
        Some(Channel {
            id: row.id.clone(),
            spec: serde_json::from_str(&row.spec).ok()?,
            secret: row.secret.clone(),
        })
    }

    /// Whether `notice` goes to this channel.
    pub fn wants(&self, notice: &Notice) -> bool {
        notice.test || notice.severity >= self.spec.min_severity
    }

    /// The URL, headers and body of `notice` for this channel, written at `now_ms`.
    pub fn render(
        &self,
        notice: &Notice,
        now_ms: i64,
    ) -> Result<(url::Url, http::HeaderMap, Vec<u8>), String> {
        let base = match self.spec.kind {
            Kind::Slack => self.secret.clone().ok_or("the slack channel has no URL")?,
            _ => self.spec.url.clone().ok_or("the channel has no URL")?,
        };
        let (url, body) = match self.spec.kind {
            Kind::Email => return Err("an email channel sends mail, not HTTP".into()),
            Kind::Webhook => (base, webhook_body(notice, &self.spec.name)),
            Kind::Slack => (base, serde_json::json!({ "text": slack_text(notice) })),
            Kind::Alertmanager => (
                format!("{base}/api/v2/alerts"),
                alertmanager_body(notice, now_ms),
            ),
        };
        let url = url::Url::parse(&url).map_err(|e| format!("url: {e}"))?;
        let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let key = http::HeaderValue::from_str(&notice.key).map_err(|e| e.to_string())?;
        headers.insert("x-outpost-key", key);
        if self.spec.kind == Kind::Webhook
            && let Some(secret) = &self.secret
        {
            let signature = format!("sha256={}", sign(secret, &body));
            headers.insert(
                "x-outpost-signature",
                http::HeaderValue::from_str(&signature).map_err(|e| e.to_string())?,
            );
        }
        Ok((url, headers, body))
    }

    /// Send `notice` once, within `timeout`. `Err` says why it did not arrive.
    pub async fn send(
        &self,
        world: &world::World,
        notice: &Notice,
        timeout: Duration,
    ) -> Result<(), String> {
        if self.spec.kind == Kind::Email {
            return self.mail(world, notice, timeout).await;
        }
        let (url, headers, body) = self.render(notice, world.now_unix_ms())?;
        let r = world::http_request(
            world,
            http::Method::POST,
            &url,
            headers,
            body.into(),
            timeout,
            16 * 1024,
        )
        .await
        .map_err(|e| e.to_string())?;
        if r.status.is_success() {
            return Ok(());
        }
        let said: String = String::from_utf8_lossy(&r.body).chars().take(200).collect();
        Err(format!(
            "{} answered HTTP {}: {said}",
            self.spec.name,
            r.status.as_u16()
        ))
    }
}

impl Channel {
    async fn mail(
        &self,
        world: &world::World,
        notice: &Notice,
        timeout: Duration,
    ) -> Result<(), String> {
        let email = self
            .spec
            .email
            .as_ref()
            .ok_or("the channel has no addresses")?;
        let url = self.spec.url.as_deref().ok_or("the channel has no URL")?;
        let mailer =
            super::smtp::Mailer::from_url(url, &email.from, &email.to, email.user.as_deref())?;
        let text = slack_text(notice);
        let subject = text.lines().next().unwrap_or("Outpost").to_string();
        let mail = super::smtp::Mail {
            subject: &subject,
            body: &format!("{text}\n\nkey: {}\n", notice.key),
            key: &notice.key,
            now_ms: world.now_unix_ms(),
        };
        mailer
            .send(world, self.secret.as_deref(), &mail, timeout)
            .await
            .map_err(|e| format!("{}: {e}", self.spec.name))
    }
}

/// A test notice (`POST …/test`, `outpost notify test`), sent by `by` at `now_ms`.
pub fn test_notice(now_ms: i64, by: &str) -> Notice {
    Notice {
        key: format!("test:{now_ms}"),
        rule: "outpost_test".into(),
        status: Status::Firing,
        severity: Severity::Warning,
        digest: false,
        test: true,
        alerts: vec![super::state::Brief {
            key: "outpost_test".into(),
            agent_id: String::new(),
            agent: "outpost".into(),
            severity: Severity::Warning,
            value: 0.0,
            summary: format!("a test notification sent by {by}"),
            starts_ms: now_ms,
            ends_ms: None,
        }],
    }
}

/// HMAC-SHA256 of `body` with `secret`, in hex: what `X-Outpost-Signature` carries.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn fingerprint(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

fn ends_at(status: Status, ends_ms: Option<i64>) -> String {
    match (status, ends_ms) {
        (Status::Resolved, Some(ms)) => crate::time::rfc3339_ms(ms),
        // Alertmanager's "not ended".
        _ => "0001-01-01T00:00:00Z".to_string(),
    }
}

fn webhook_body(n: &Notice, receiver: &str) -> serde_json::Value {
    let alerts: Vec<serde_json::Value> = n
        .alerts
        .iter()
        .map(|a| {
            serde_json::json!({
                "status": n.status.as_str(),
                "labels": {"alertname": n.rule, "agent": a.agent, "agent_id": a.agent_id, "severity": a.severity.as_str()},
                "annotations": {"summary": a.summary, "value": a.value.to_string()},
                "startsAt": crate::time::rfc3339_ms(a.starts_ms),
                "endsAt": ends_at(n.status, a.ends_ms),
                "generatorURL": "",
                "fingerprint": fingerprint(&a.key),
            })
        })
        .collect();
    let mut common = serde_json::json!({"alertname": n.rule});
    if n.alerts.iter().all(|a| a.severity == n.severity) {
        common["severity"] = n.severity.as_str().into();
    }
    serde_json::json!({
        "version": "4",
        "groupKey": n.key,
        "truncatedAlerts": 0,
        "status": n.status.as_str(),
        "receiver": receiver,
        "groupLabels": {"alertname": n.rule},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "",
        "alerts": alerts,
    })
}

fn slack_text(n: &Notice) -> String {
    let head = match (n.status, n.test) {
        (_, true) => "Outpost test notification".to_string(),
        (Status::Firing, _) => format!("[FIRING {}] {}", n.severity.as_str(), n.rule),
        (Status::Resolved, _) => format!("[RESOLVED] {}", n.rule),
    };
    let mut lines = vec![if n.digest {
        format!("{head}: {} agents", n.alerts.len())
    } else {
        head
    }];
    for a in n.alerts.iter().take(SLACK_LINES_MAX) {
        lines.push(format!("• {}: {}", a.agent, a.summary));
    }
    if n.alerts.len() > SLACK_LINES_MAX {
        lines.push(format!("… and {} more", n.alerts.len() - SLACK_LINES_MAX));
    }
    lines.join("\n")
}

fn alertmanager_body(n: &Notice, now_ms: i64) -> serde_json::Value {
    let alerts: Vec<serde_json::Value> = n
        .alerts
        .iter()
        .map(|a| {
            let ends = match n.status {
                Status::Resolved => a.ends_ms.unwrap_or(now_ms),
                Status::Firing => now_ms + ALERTMANAGER_HOLD_MS,
            };
            serde_json::json!({
                "labels": {"alertname": n.rule, "agent": a.agent, "agent_id": a.agent_id, "severity": a.severity.as_str(), "source": "outpost"},
                "annotations": {"summary": a.summary, "value": a.value.to_string()},
                "startsAt": crate::time::rfc3339_ms(a.starts_ms),
                "endsAt": crate::time::rfc3339_ms(ends),
                "generatorURL": "",
            })
        })
        .collect();
    serde_json::Value::Array(alerts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::state::Brief;

    fn notice(n: usize) -> Notice {
        Notice {
            key: "xid_age/agt_1:5000:firing".into(),
            rule: "xid_age".into(),
            status: Status::Firing,
            severity: Severity::Critical,
            digest: n > 1,
            test: false,
            alerts: (0..n)
                .map(|i| Brief {
                    key: format!("xid_age/agt_{i}"),
                    agent_id: format!("agt_{i}"),
                    agent: format!("db{i}"),
                    severity: Severity::Critical,
                    value: 1.6e9,
                    summary: "database app is at transaction-ID age 1.60 billion".into(),
                    starts_ms: 5_000,
                    ends_ms: None,
                })
                .collect(),
        }
    }

    fn channel(kind: Kind, url: &str, secret: Option<&str>) -> Channel {
        let (spec, secret) = ChannelRequest {
            name: "ops".into(),
            kind,
            url: url.into(),
            secret: secret.map(str::to_string),
            min_severity: None,
            email: None,
        }
        .into_stored("made".into())
        .expect("valid");
        Channel {
            id: "ch_1".into(),
            spec,
            secret,
        }
    }

    #[test]
    fn a_webhook_is_alertmanager_json_signed_with_the_key_named() {
        let c = channel(Kind::Webhook, "http://127.0.0.1:9/hook", Some("k3y"));
        let (url, headers, body) = c.render(&notice(1), 0).expect("render");
        assert_eq!(url.path(), "/hook");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["version"], "4");
        assert_eq!(v["groupKey"], "xid_age/agt_1:5000:firing");
        assert_eq!(v["alerts"][0]["labels"]["agent"], "db0");
        assert_eq!(v["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(headers["x-outpost-key"], "xid_age/agt_1:5000:firing");
        let expected = format!("sha256={}", sign("k3y", &body));
        assert_eq!(headers["x-outpost-signature"], expected.as_str());
    }

    #[test]
    fn slack_digests_list_agents_up_to_a_limit_and_its_url_stays_secret() {
        let c = channel(Kind::Slack, "https://hooks.example/T/B/xyz", None);
        assert_eq!(c.spec.url, None);
        let (_, _, body) = c.render(&notice(40), 0).expect("render");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let text = v["text"].as_str().expect("text");
        assert!(
            text.starts_with("[FIRING critical] xid_age: 40 agents"),
            "{text}"
        );
        assert!(text.ends_with("… and 10 more"), "{text}");
    }

    #[test]
    fn bad_channels_are_refused_with_the_field_named() {
        let bad = |kind, url: &str, secret: Option<&str>| {
            ChannelRequest {
                name: "x".into(),
                kind,
                url: url.into(),
                secret: secret.map(str::to_string),
                min_severity: None,
                email: None,
            }
            .into_stored("m".into())
            .expect_err("refused")
        };
        assert!(bad(Kind::Webhook, "ftp://x/", None).starts_with("url:"));
        assert!(bad(Kind::Webhook, "not a url", None).starts_with("url:"));
        assert!(bad(Kind::Slack, "https://h/x", Some("s")).starts_with("secret:"));
        assert!(bad(Kind::Alertmanager, "https://am", Some("s")).starts_with("secret:"));
    }
}
