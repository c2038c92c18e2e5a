//! The agent's optional metrics listener (`[metrics] listen`): its own figures at `/metrics`
//! in the Prometheus text format, read at scrape time. Loopback only (enforced by the
//! configuration), since it has no authentication; every other path answers 404.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use proto::prometheus::{Exposition, write_buffers};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use world::World;

use crate::buffer::SharedBuffer;
use crate::link::LinkStatus;
use crate::tasks::driver::Reader;

/// What the listener reads from.
#[derive(Clone)]
pub struct Figures {
    pub world: World,
    pub name: String,
    pub buffer: SharedBuffer,
    pub tasks: Reader,
    pub terminals: Option<crate::terminal::Terminals>,
    pub link: watch::Receiver<LinkStatus>,
}

/// Serve `/metrics` on `addr` until `stop`.
pub async fn serve(
    figures: Figures,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = figures
        .world
        .net()
        .bind(&addr.to_string())
        .await
        .with_context(|| format!("metrics listener on {addr}"))?;
    tracing::info!(%addr, "metrics listener on /metrics");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(figures));
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
        .context("serve metrics")
}

async fn metrics(State(figures): State<Arc<Figures>>) -> Response {
    let mut out = Exposition::default();
    if let Some(stats) = figures.buffer.wire_stats(&figures.world).await {
        write_buffers(&mut out, &[(figures.name.as_str(), stats)]);
    }
    match figures.tasks.with(|store| store.status_counts()).await {
        Ok((tasks, runs)) => {
            out.family(
                "outpost_agent_tasks",
                "gauge",
                "Tasks in the agent's store by status.",
            );
            for (status, n) in &tasks {
                out.sample("outpost_agent_tasks", &[("status", status)], *n as f64);
            }
            out.family(
                "outpost_agent_task_runs",
                "gauge",
                "Task runs kept in the agent's store by outcome (old runs are purged).",
            );
            for (status, n) in &runs {
                out.sample("outpost_agent_task_runs", &[("status", status)], *n as f64);
            }
        }
        Err(error) => tracing::warn!(%error, "metrics: task store unreadable"),
    }
    if let Some(terminals) = &figures.terminals {
        out.single(
            "outpost_agent_terminal_sessions",
            "gauge",
            "Terminal sessions (psql in a PTY) running on this agent.",
            terminals.count() as f64,
        );
    }
    let online = matches!(*figures.link.borrow(), LinkStatus::Online { .. });
    out.single(
        "outpost_agent_control_plane_connected",
        "gauge",
        "1 while the control channel is up.",
        if online { 1.0 } else { 0.0 },
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, proto::prometheus::CONTENT_TYPE)],
        out.finish(),
    )
        .into_response()
}
