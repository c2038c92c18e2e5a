//! `outpost-agent silence`: this host's alert notifications held back for a while, asked of
//! the control plane with the agent's own credential (so a nightly job can quiet the noise it
//! makes). The control plane keeps evaluating and recording; what still fires when the
//! silence ends is sent then.

use std::time::Duration;

use anyhow::Context;
use world::World;

use crate::config::AgentConfig;

const TIMEOUT: Duration = Duration::from_secs(15);

/// Ask for the silence; the control plane's answer (the silence, as JSON).
pub async fn silence(
    world: &World,
    config: &AgentConfig,
    for_: &str,
    rule: Option<&str>,
    comment: &str,
) -> anyhow::Result<serde_json::Value> {
    let identity = crate::identity::load(&config.data_dir)?.with_context(|| {
        format!(
            "{} holds no enrollment: enroll first (outpost-agent enroll)",
            config.data_dir.display()
        )
    })?;
    let base = match &config.control_plane {
        Some(url) => url.clone(),
        None => crate::config::control_plane_url(
            "control_plane (from identity.json)",
            &identity.control_plane,
        )?,
    };
    let url = base.join(proto::SILENCES_PATH)?;
    let body = serde_json::json!({"for": for_, "rule": rule, "comment": comment});
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&format!("Bearer {}", identity.credential))?,
    );
    let r = world::http_request(
        world,
        http::Method::POST,
        &url,
        headers,
        serde_json::to_vec(&body)?.into(),
        TIMEOUT,
        64 * 1024,
    )
    .await
    .with_context(|| format!("reach the control plane at {base}"))?;
    let answer: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    if !r.status.is_success() {
        anyhow::bail!(
            "the control plane refused the silence (HTTP {}): {}",
            r.status.as_u16(),
            answer["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(answer)
}
