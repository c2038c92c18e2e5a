//! A Postgres client over [`crate::Stream`] (TCP, or a Unix socket directory in real mode).

use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::World;

/// Connect per `config` within `timeout`. The returned task drives the connection; it ends
/// when the client is dropped (abort it to close the connection early).
pub async fn postgres_connect(
    world: &World,
    config: &Config,
    timeout: Duration,
) -> Result<(Client, tokio::task::JoinHandle<()>), String> {
    let host = config
        .get_hosts()
        .first()
        .cloned()
        .unwrap_or(Host::Tcp("localhost".into()));
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let net = world.net();
    let dial = async {
        let stream = match &host {
            Host::Tcp(name) => net.connect(&format!("{name}:{port}")).await,
            Host::Unix(dir) => {
                net.connect_unix(&dir.join(format!(".s.PGSQL.{port}")))
                    .await
            }
        }
        .map_err(|e| format!("connect to postgres: {e}"))?;
        config
            .connect_raw(stream, NoTls)
            .await
            .map_err(|e| match e.as_db_error() {
                // "db error" alone hides what the server said (e.g. the role does not exist).
                Some(db) => format!("postgres handshake: {}: {}", db.severity(), db.message()),
                None => format!("postgres handshake: {e}"),
            })
    };
    let (client, connection) = tokio::time::timeout(timeout, dial)
        .await
        .map_err(|_| "connect to postgres: timed out".to_string())??;
    let driver = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "postgres connection closed");
        }
    });
    Ok((client, driver))
}
