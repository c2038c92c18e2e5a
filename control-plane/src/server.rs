//! Start-up and the serve loop: `run(listener, shutdown)` in the mini-redis style.

use std::path::Path;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use world::World;

use crate::config::ServeConfig;
use crate::state::AppState;
use crate::storage::{PostgresStore, SqliteStore, Storage};

/// File name of the embedded SQLite database inside the data dir.
pub const SQLITE_FILE: &str = "outpost.db";

/// Open the configured backend (Postgres when a URL is given, else SQLite in `data_dir`) and
/// bring its schema up to date.
pub async fn open_storage(
    world: &World,
    data_dir: &Path,
    database_url: Option<&str>,
) -> anyhow::Result<Storage> {
    let storage = match database_url {
        Some(url) => Storage::Postgres(
            PostgresStore::connect(world, url)
                .await
                .context("connect to the database")?,
        ),
        None => {
            create_private_dir(data_dir)?;
            let path = data_dir.join(SQLITE_FILE);
            Storage::Sqlite(
                SqliteStore::open(world, &path)
                    .await
                    .with_context(|| format!("open {}", path.display()))?,
            )
        }
    };
    let version = storage
        .migrate()
        .await
        .context("migrate the database schema")?;
    tracing::debug!(backend = storage.backend_name(), version, "storage ready");
    Ok(storage)
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create data dir {}", dir.display()))
}

/// Serve the API on `listener` until `state.shutdown` fires, then stop accepting, tell every
/// agent channel to close and wait for in-flight requests.
pub async fn run(state: AppState, listener: world::Listener) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    let app = crate::http::router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("serve HTTP")
}

/// Everything `outpost serve` does after parsing its configuration.
pub async fn serve(
    world: World,
    config: ServeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let storage = open_storage(&world, &config.data_dir, config.database_url.as_deref()).await?;
    let listener = world
        .net()
        .bind(&config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    if config.redis_url.is_some() {
        tracing::info!(
            "redis_url is set; it carries terminal streams once the terminal is enabled"
        );
    }
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        storage = storage.backend_name(),
        "outpost control plane listening"
    );
    run(
        AppState::new(world, storage, config.settings, shutdown),
        listener,
    )
    .await
}
