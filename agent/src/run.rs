//! The daemon's top level: load the identity, keep the control channel up, stop on shutdown.

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use world::World;

use crate::config::AgentConfig;
use crate::identity;
use crate::link::{LinkConfig, LinkStatus, run_link};

/// Run the agent until `shutdown` fires, publishing the link's state on `status`.
pub async fn run(
    world: World,
    config: AgentConfig,
    status: watch::Sender<LinkStatus>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let identity = identity::load(&config.data_dir).context("load agent identity")?;
    let Some(identity) = identity else {
        tracing::warn!(
            data_dir = %config.data_dir.display(),
            "not enrolled: running without a control plane; enroll with `outpost-agent enroll --control-plane URL --token TOKEN`"
        );
        status.send_replace(LinkStatus::Stopped);
        shutdown.cancelled().await;
        return Ok(());
    };
    let control_plane = match config.control_plane {
        Some(url) => url,
        None => crate::config::control_plane_url(
            "control_plane (from identity.json)",
            &identity.control_plane,
        )?,
    };
    tracing::info!(agent_id = %identity.agent_id, name = %identity.name, control_plane = %control_plane, "agent starting");
    let link = LinkConfig::new(control_plane, identity.credential, identity.name);
    run_link(world, link, status, shutdown).await;
    tracing::info!("agent stopped");
    Ok(())
}
