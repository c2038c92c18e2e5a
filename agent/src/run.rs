//! The daemon's top level: the task runtime and its local API always run; the control
//! channel runs when the agent is enrolled. Everything stops on shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use world::World;

use crate::buffer::delivery::{DeliveryConfig, run_delivery};
use crate::buffer::{Buffer, OpenReport};
use crate::config::AgentConfig;
use crate::identity;
use crate::link::{LinkConfig, LinkStatus, run_link};
use crate::tasks::driver::{self, Reader, RuntimeConfig};
use crate::tasks::pool::PoolConfig;
use crate::tasks::store::Store;
use crate::tasks::{api, bridge, core};

use crate::layout::TASKS_FILE;

fn runtime_config(
    world: &World,
    config: &AgentConfig,
    backup_ended: Arc<tokio::sync::Notify>,
) -> RuntimeConfig {
    let tasks = &config.tasks;
    let exe = std::env::current_exe().unwrap_or_else(|_| "outpost-agent".into());
    RuntimeConfig {
        db_path: config.data_dir.join(TASKS_FILE),
        core: core::Config {
            concurrency_max: tasks.concurrency_max,
            // One more run per slot waits ready, so an ending run's slot is taken at once.
            dispatch_ahead: tasks.concurrency_max,
            retries_max: tasks.retries_max,
            missed: tasks.missed,
            ..core::Config::default()
        },
        pool: PoolConfig {
            grace: Duration::from_secs(5),
            output_bytes_max: tasks.output_bytes_max,
            postgres: config.postgres.clone(),
            psql: tasks.psql.clone(),
            pg_dump: tasks.pg_dump.clone(),
            agent_exe: exe.clone(),
            data_dir: config.data_dir.clone(),
            run_as: tasks.run_as.clone(),
            policy: Arc::new(tasks.policy.clone()),
            processes: Arc::new(crate::tasks::os::OsProcesses::new(
                world.clone(),
                &config.data_dir,
                exe,
                tasks.run_as.other_uid(),
            )),
        },
        history_retention: tasks.history_retention,
        backup_ended,
    }
}

async fn open_buffer(world: &World, config: &AgentConfig) -> anyhow::Result<Buffer> {
    let path = config.data_dir.join(crate::layout::BUFFER_FILE);
    let epoch = format!("ep_{:016x}", world.random_u64());
    let (limits, now_ms) = (config.metrics.buffer, world.now_unix_ms());
    let shown = path.display().to_string();
    let (buffer, report) = world
        .blocking(move || Buffer::open(&path, limits, &epoch, now_ms))
        .await?
        .with_context(|| format!("open metrics buffer {shown}"))?;
    match report {
        OpenReport::Quarantined {
            moved_to,
            reason,
            rows_lost,
        } => tracing::error!(
            buffer = %shown,
            quarantined = %moved_to.display(),
            %reason,
            rows_lost,
            epoch = buffer.epoch(),
            "metrics buffer failed its integrity check: quarantined, new epoch started"
        ),
        OpenReport::Created => {
            tracing::info!(buffer = %shown, epoch = buffer.epoch(), "metrics buffer created")
        }
        OpenReport::Opened => {
            tracing::debug!(buffer = %shown, epoch = buffer.epoch(), "metrics buffer opened")
        }
    }
    Ok(buffer)
}

/// The agent's parts, each a task that ends with its name and result.
type Parts = JoinSet<(&'static str, anyhow::Result<()>)>;

/// Run the agent until `shutdown` fires, publishing the link's state on `status`.
pub async fn run(
    world: World,
    config: AgentConfig,
    status: watch::Sender<LinkStatus>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    }
    let identity = identity::load(&config.data_dir).context("load agent identity")?;
    // Corruption never blocks start-up: a bad buffer is moved aside and a new epoch begins.
    let buffer = crate::buffer::SharedBuffer::new(open_buffer(&world, &config).await?);
    let stop = shutdown.child_token();
    let mut parts = Parts::new();

    // The task runtime and its API: they work with or without a control plane.
    let backup_ended = Arc::new(tokio::sync::Notify::new());
    let bridge = start_tasks(&world, &config, &mut parts, &stop, backup_ended.clone()).await?;
    if let Some(backups) = config.backups.clone() {
        let (world, stop, buffer) = (world.clone(), stop.clone(), buffer.clone());
        let tasks = bridge.reader.clone();
        let run_as = backups
            .grant
            .run_as
            .clone()
            .unwrap_or_else(|| config.tasks.run_as.clone());
        parts.spawn(async move {
            crate::buffer::backups::run(world, backups, run_as, buffer, backup_ended, tasks, stop)
                .await;
            ("backup status collector", Ok(()))
        });
    }

    // Collection never depends on the control plane: it only appends to the buffer.
    match config.postgres.clone() {
        Some(dsn) => {
            let (world, stop, buffer, interval) = (
                world.clone(),
                stop.clone(),
                buffer.clone(),
                config.metrics.interval,
            );
            parts.spawn(async move {
                crate::buffer::collector::run_collector(world, dsn, interval, buffer, stop).await;
                ("metrics collector", Ok(()))
            });
        }
        None => tracing::info!("no --postgres: metrics collection is off (tasks still run)"),
    }

    let link_status = status.subscribe();
    let agent_name = identity
        .as_ref()
        .map_or_else(|| "unenrolled".to_string(), |i| i.name.clone());
    let metrics_reader = bridge.reader.clone();
    let terminals = match identity {
        None => {
            tracing::warn!(
                data_dir = %config.data_dir.display(),
                "not enrolled: running without a control plane; enroll with `outpost-agent enroll --control-plane URL --token TOKEN`"
            );
            status.send_replace(LinkStatus::Stopped);
            None
        }
        Some(identity) => {
            let online = Online {
                identity,
                bridge,
                buffer: buffer.clone(),
                status,
            };
            Some(start_online(&world, &config, online, &mut parts, &stop)?)
        }
    };

    if let Some(addr) = config.metrics.listen {
        let figures = crate::observe::Figures {
            world: world.clone(),
            name: agent_name,
            buffer: buffer.clone(),
            tasks: metrics_reader,
            terminals,
            link: link_status,
        };
        let stop = stop.clone();
        parts.spawn(async move {
            (
                "metrics listener",
                crate::observe::serve(figures, addr, stop).await,
            )
        });
    }
    until_one_ends(parts, &stop).await
}

/// Start the task runtime, wait for its recovery, then serve its socket API; the bridge the
/// control channel uses to reach it.
async fn start_tasks(
    world: &World,
    config: &AgentConfig,
    parts: &mut Parts,
    stop: &CancellationToken,
    backup_ended: Arc<tokio::sync::Notify>,
) -> anyhow::Result<bridge::Bridge> {
    let runtime = runtime_config(world, config, backup_ended);
    let (requests, requests_rx) = mpsc::channel(driver::REQUESTS_QUEUED_MAX);
    let (ready, recovered) = oneshot::channel();
    {
        let (world, stop) = (world.clone(), stop.clone());
        let runtime = runtime.clone();
        parts.spawn(async move {
            let result = driver::run(world, runtime, requests_rx, ready, stop).await;
            ("task runtime", result)
        });
    }
    // The API answers from the store: serve it only once recovery has rewritten it.
    if recovered.await.is_err() {
        if let Some(Ok((part, Err(e)))) = parts.join_next().await {
            return Err(e.context(format!("{part} failed")));
        }
        anyhow::bail!("the task runtime stopped during recovery");
    }
    let db = runtime.db_path.clone();
    let reader_store = world
        .blocking(move || Store::open(&db))
        .await?
        .context("open the task store for reading")?;
    let reader = Reader {
        world: world.clone(),
        store: Arc::new(Mutex::new(reader_store)),
    };
    let bridge = bridge::Bridge {
        reader,
        requests,
        has_postgres: config.postgres.is_some(),
        policy: Arc::new(config.tasks.policy.clone()),
    };
    let app = api::router(bridge.clone(), api::own_ids(&config.data_dir));
    let (world, stop, socket) = (world.clone(), stop.clone(), config.socket.clone());
    parts.spawn(async move { ("task API", api::serve(&world, &socket, app, stop).await) });
    Ok(bridge)
}

/// What the parts that need the control plane start from.
struct Online {
    identity: identity::Identity,
    bridge: bridge::Bridge,
    buffer: crate::buffer::SharedBuffer,
    status: watch::Sender<LinkStatus>,
}

/// Start metrics delivery and the control channel (which carries tasks and terminals); the
/// terminals, for the metrics listener.
fn start_online(
    world: &World,
    config: &AgentConfig,
    online: Online,
    parts: &mut Parts,
    stop: &CancellationToken,
) -> anyhow::Result<crate::terminal::Terminals> {
    let Online {
        identity,
        bridge,
        buffer,
        status,
    } = online;
    let control_plane = match config.control_plane.clone() {
        Some(url) => url,
        None => crate::config::control_plane_url(
            "control_plane (from identity.json)",
            &identity.control_plane,
        )?,
    };
    tracing::info!(agent_id = %identity.agent_id, name = %identity.name, control_plane = %control_plane, "agent starting");
    let delivery = DeliveryConfig {
        url: control_plane
            .join(proto::METRICS_PATH)
            .context("metrics delivery URL")?,
        credential: identity.credential.clone(),
        batch_rows_max: config.metrics.batch_rows_max,
        idle_poll: Duration::from_secs(1),
        request_timeout: Duration::from_secs(30),
    };
    {
        let (world, stop, buffer) = (world.clone(), stop.clone(), buffer.clone());
        parts.spawn(async move {
            run_delivery(world, buffer, delivery, stop).await;
            ("metrics delivery", Ok(()))
        });
    }
    let terminals = crate::terminal::Terminals::new(
        world.clone(),
        config.terminal.clone(),
        crate::terminal::TerminalLink {
            control_plane: control_plane.clone(),
            credential: identity.credential.clone(),
        },
        Arc::new(crate::terminal::OsPty),
        stop.clone(),
    );
    let mut link = LinkConfig::new(control_plane, identity.credential, identity.name);
    link.tasks = Some(bridge);
    link.buffer = Some(buffer);
    link.labels = config.labels.clone();
    link.terminals = Some(terminals.clone());
    let running = terminals.clone();
    let (world, stop) = (world.clone(), stop.clone());
    parts.spawn(async move {
        run_link(world, link, status, stop).await;
        // Sessions end with `stop`; their PTYs are gone when this returns.
        running.wait().await;
        ("control channel", Ok(()))
    });
    Ok(terminals)
}

/// The first part to end (shutdown or failure) stops the others; the first failure is the
/// agent's.
async fn until_one_ends(mut parts: Parts, stop: &CancellationToken) -> anyhow::Result<()> {
    let mut failure = None;
    while let Some(joined) = parts.join_next().await {
        stop.cancel();
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((part, Err(e))) => {
                failure.get_or_insert(e.context(format!("{part} failed")));
            }
            Err(e) => {
                failure.get_or_insert(anyhow::anyhow!("agent part panicked: {e}"));
            }
        }
    }
    tracing::info!("agent stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
