//! Start-up and the serve loop: `run(listener, shutdown)` in the mini-redis style.

use std::path::Path;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use world::World;

use axum::extract::FromRef;

use crate::config::ServeConfig;
use crate::state::AppState;
use crate::storage::{PostgresStore, SqliteStore, Storage};
use crate::terminal::TerminalContext;

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

/// How long shutdown waits for background work (relay, janitor, exec runs, retention) after
/// the HTTP server stopped.
const BACKGROUND_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serve the API on `listener` until `shutdown` completes (or `state.shutdown` is cancelled),
/// then stop accepting, tell every agent channel and background task to stop (the token), and
/// wait for in-flight requests and for the background work `state.background` owns.
pub async fn run<L>(
    state: AppState,
    listener: L,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener<Io = world::Stream, Addr = world::PeerAddr>,
{
    let token = state.shutdown.clone();
    let background = state.background.clone();
    let limits = world::ServeLimits {
        max_connections: state.settings.max_connections,
        header_timeout: state.settings.header_timeout,
        max_connections_per_address: (!state.settings.behind_tls_proxy)
            .then_some(state.settings.max_connections_per_address),
    };
    let counters = std::sync::Arc::clone(&state.observed.connections);
    background.spawn(crate::terminal::relay::run(TerminalContext::from_ref(
        &state,
    )));
    background.spawn(crate::http::backup_policies::reconcile_forever(
        crate::handles::Handles::from_ref(&state),
        TerminalContext::from_ref(&state),
        state.backup_policies.clone(),
        state.shutdown.clone(),
    ));
    background.spawn(crate::rollouts::driver::run_forever(
        crate::handles::Handles::from_ref(&state),
        TerminalContext::from_ref(&state),
        crate::alerts::evaluator::replica_name(&state.world),
        state.shutdown.clone(),
    ));
    background.spawn(crate::alerts::evaluator::run_forever(
        crate::handles::Handles::from_ref(&state),
        crate::alerts::evaluator::replica_name(&state.world),
        state.shutdown.clone(),
    ));
    let app = crate::http::router(state);
    let tell = {
        let token = token.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = token.cancelled() => {}
            }
            token.cancel();
        }
    };
    world::serve(listener, app, limits, counters, tell).await;
    token.cancel();
    background.close();
    if tokio::time::timeout(BACKGROUND_GRACE, background.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = background.len(),
            "background work did not stop within {} s",
            BACKGROUND_GRACE.as_secs()
        );
    }
    Ok(())
}

/// Everything `outpost serve` does after parsing its configuration.
pub async fn serve(
    world: World,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    if let Some(trust) = &config.tls_client {
        world.set_tls_client(trust.clone());
    }
    if let Some(url) = &config.database_url {
        wait_for_postgres(&world, url).await?;
    }
    let storage = open_storage(&world, &config.data_dir, config.database_url.as_deref()).await?;
    let listener = world
        .net()
        .bind(&config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let streams = match &config.redis_url {
        Some(url) => crate::terminal::Streams::redis(world.clone(), url).context("redis_url")?,
        None => crate::terminal::Streams::memory(&world),
    };
    let shared = streams.shared().cloned();
    if let Some(redis) = &shared {
        crate::terminal::keys::load(&world, &storage, redis).await?;
        if !redis.has_password() {
            tracing::warn!(
                "redis_url has no password: anything that can reach Redis can read terminal output; give Redis a password (requirepass) and put it in the URL"
            );
        }
    }
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        scheme = if config.tls.is_some() { "https" } else { "http" },
        storage = storage.backend_name(),
        terminal_streams = streams.backend_name(),
        "outpost control plane listening"
    );
    let retention = config.settings.clone();
    let state = AppState::new(
        world.clone(),
        storage.clone(),
        config.settings,
        token.clone(),
    )
    .with_terminal(crate::terminal::Terminal::new(
        streams,
        crate::terminal::TerminalSettings::default(),
    ));
    if let Some(redis) = shared {
        state
            .background
            .spawn(crate::terminal::keys::refresh_forever(
                world.clone(),
                storage.clone(),
                redis,
                token.clone(),
            ));
    }
    state
        .background
        .spawn(prune_forever(world, storage, retention, token));
    match config.tls {
        Some(tls) => {
            let counters = std::sync::Arc::clone(&state.observed.connections);
            let listener =
                world::tls::TlsListener::new(listener, tls, counters).context("TLS listener")?;
            run(state, listener, shutdown).await
        }
        None => run(state, listener, shutdown).await,
    }
}

/// How long `serve` keeps trying a PostgreSQL that does not accept connections yet (in a
/// compose stack it starts beside the replicas), and the pause between attempts.
const DATABASE_WAIT_ATTEMPTS: u32 = 30;
const DATABASE_WAIT_PAUSE: std::time::Duration = std::time::Duration::from_secs(2);

/// Connect to `url` until it answers, logging each failure with its reason; after
/// [`DATABASE_WAIT_ATTEMPTS`] failures, stop start-up with the last reason. A wrong URL fails at once.
async fn wait_for_postgres(world: &World, url: &str) -> anyhow::Result<()> {
    let mut attempt = 1;
    loop {
        match PostgresStore::connect(world, url).await {
            Ok(_) => return Ok(()),
            Err(crate::storage::StorageError::Backend(reason))
                if attempt < DATABASE_WAIT_ATTEMPTS
                    && !reason.starts_with("invalid database URL") =>
            {
                tracing::warn!(
                    attempt,
                    of = DATABASE_WAIT_ATTEMPTS,
                    %reason,
                    "PostgreSQL (database_url) does not accept connections yet; retrying"
                );
            }
            Err(error) => {
                return Err(anyhow::anyhow!(error)).context(format!(
                    "PostgreSQL (database_url) refused {attempt} attempts over {} s: check its host, port, user and password, and that the server runs",
                    u64::from(attempt) * DATABASE_WAIT_PAUSE.as_secs()
                ));
            }
        }
        attempt += 1;
        tokio::time::sleep(DATABASE_WAIT_PAUSE).await;
    }
}

/// How often stored metrics, audit records and task snapshots are checked against their limits.
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Task snapshots an agent reported are kept this long after their last change, and at most
/// this many per agent (the newest): what a compromised agent can make the control plane keep.
const AGENT_TASKS_KEPT_MS: i64 = 90 * crate::time::DAY_MS;
const AGENT_TASKS_PER_AGENT_MAX: i64 = 1000;

/// Remove metrics, audit records and terminal recordings older than their retention now and then every
/// [`RETENTION_EVERY`].
async fn prune_forever(
    world: World,
    storage: Storage,
    settings: crate::settings::Settings,
    shutdown: CancellationToken,
) {
    let metrics_ms = crate::time::duration_ms(settings.metrics_retention);
    let audit_ms = crate::time::duration_ms(settings.audit_retention);
    let recordings_ms = crate::time::duration_ms(settings.recording_retention);
    loop {
        let now_ms = world.now_unix_ms();
        let before_ms = now_ms.saturating_sub(metrics_ms);
        match storage.prune_metrics(before_ms).await {
            Ok(p) if p.rows > 0 || p.partitions > 0 => tracing::info!(
                rows = p.rows,
                partitions = p.partitions,
                before = %crate::time::rfc3339_ms(before_ms),
                "metrics retention removed old metrics"
            ),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "metrics retention pass failed; retrying later"),
        }
        let before_ms = now_ms.saturating_sub(audit_ms);
        match storage.prune_audit(before_ms).await {
            Ok(0) => {}
            Ok(rows) => tracing::info!(
                rows,
                before = %crate::time::rfc3339_ms(before_ms),
                "audit retention removed old records"
            ),
            Err(error) => tracing::warn!(%error, "audit retention pass failed; retrying later"),
        }
        let before_ms = now_ms.saturating_sub(recordings_ms);
        match storage.prune_recordings(before_ms).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                recordings = n,
                before = %crate::time::rfc3339_ms(before_ms),
                "recording retention removed old terminal recordings"
            ),
            Err(error) => tracing::warn!(%error, "recording retention pass failed; retrying later"),
        }
        match storage
            .prune_agent_tasks(
                now_ms.saturating_sub(AGENT_TASKS_KEPT_MS),
                AGENT_TASKS_PER_AGENT_MAX,
            )
            .await
        {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, "removed old task snapshots of agents"),
            Err(error) => tracing::warn!(%error, "task snapshot pruning failed; retrying later"),
        }
        match storage
            .prune_exec_runs(now_ms.saturating_sub(crate::exec::api::RUNS_KEPT_MS))
            .await
        {
            Ok(0) => {}
            Ok(runs) => tracing::info!(runs, "removed exec runs older than 30 days"),
            Err(error) => tracing::warn!(%error, "exec run pruning failed; retrying later"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETENTION_EVERY) => {}
        }
    }
}
