//! `outpost-agent`: the daemon on each database host.

use std::path::PathBuf;
use std::process::ExitCode;

use agent::config::{self, RawAgentConfig};
use agent::identity;
use agent::link::LinkStatus;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use world::World;

/// Outpost agent: keeps a control channel to the Outpost control plane and runs on every
/// database host. Enroll once with `outpost-agent enroll`, then run `outpost-agent run`
/// (usually from systemd).
#[derive(Parser)]
#[command(name = "outpost-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Commands {
    /// Run the agent daemon until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Enroll this host with a control plane using a one-time token.
    Enroll(EnrollArgs),
    /// Scheduled maintenance on this host (talks to the running agent's socket).
    #[command(subcommand)]
    Tasks(agent::tasks::cli::TasksCommand),
    /// The offline metrics buffer on this host.
    #[command(subcommand)]
    Buffer(agent::buffer::cli::BufferCommand),
    /// Check this host's setup, one line per check with what to do.
    ///
    /// Checks the config, the data directory, enrollment, the control plane and its
    /// certificate, clock skew, Postgres and the role's privileges, psql/pg_dump against the
    /// server, and the task socket. Exits 1 when anything blocks normal operation. Takes the
    /// same flags as `run`.
    Doctor(DoctorArgs),
    /// Hold back this host's alert notifications for a while, e.g. around a nightly job.
    ///
    /// Example: outpost-agent silence --for 1h --rule replication_lag --comment "nightly pg_dump"
    ///
    /// Alerts are still evaluated and recorded; what still fires when the silence ends is
    /// sent then. Takes the same flags as `run` (it uses the agent's enrollment).
    Silence(SilenceArgs),
    /// Run task commands for the agent, one at a time, as it asks on stdin (the agent starts
    /// these; they are not meant to be run by hand).
    #[command(hide = true)]
    Keeper {
        /// Where the keepers' slot files are (`DATA_DIR/keepers`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Open a pg_dump task's file without following links, then run pg_dump writing to it
    /// (the agent starts this as the run user; it is not meant to be run by hand).
    #[command(hide = true)]
    DumpInto {
        path: PathBuf,
        /// pg_dump and its arguments (`--file` is added).
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Restore a backup into a scratch directory, start it, check it, report its RTO, and
    /// remove it (a restore_drill task; the agent starts this as the run user).
    #[command(hide = true)]
    RestoreDrill(agent::tasks::drill::Drill),
    /// Run a pgBackRest task's command only on the role it names: exits 75 with the reason
    /// when this host's role is another, else becomes the command (the agent starts this as
    /// the run user; it is not meant to be run by hand).
    #[command(hide = true)]
    BackupGate {
        /// primary, standby or any.
        #[arg(long)]
        run_on: String,
        /// Where to ask `pg_is_in_recovery()` (password in PGPASSWORD).
        #[arg(short = 'd')]
        dsn: Option<String>,
        /// Run the command as a child and fail when its `verify` output shows a hole
        /// between archived WAL ranges.
        #[arg(long)]
        check_wal_ranges: bool,
        /// pgBackRest and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

#[derive(Args)]
struct DoctorArgs {
    #[command(flatten)]
    run: RunArgs,
    /// One JSON array of {check, status, detail, fix}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SilenceArgs {
    #[command(flatten)]
    run: RunArgs,
    /// How long, e.g. 30m, 2h (at most 7d).
    #[arg(long = "for", value_name = "DURATION")]
    for_: String,
    /// Only this rule (agent_offline, xid_age, replication_lag, connections,
    /// metrics_buffer_full, metrics_delivery_failing, backup_rpo, archiving_failing); every
    /// rule when absent.
    #[arg(long)]
    rule: Option<String>,
    /// Why, shown with the silence and in the audit log.
    #[arg(long, default_value = "silenced from the host")]
    comment: String,
}

#[derive(Args)]
struct RunArgs {
    /// TOML config file (see the README); flags and OUTPOST_* variables override it.
    #[arg(long, env = "OUTPOST_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// State directory [default: /var/lib/outpost-agent].
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Local API socket [default: DATA_DIR/agent.sock].
    #[arg(long, env = "OUTPOST_SOCKET")]
    socket: Option<PathBuf>,
    /// Control plane URL; overrides the one stored at enrollment.
    #[arg(long, env = "OUTPOST_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Postgres connection string for metrics collection and maintenance tasks.
    #[arg(long, env = "OUTPOST_POSTGRES")]
    postgres: Option<String>,
    /// PEM CA certificates to trust for an https:// control plane [default: the system's].
    #[arg(long, env = "OUTPOST_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

#[derive(Args)]
struct EnrollArgs {
    /// Control plane URL, e.g. http://cp.example:8080
    #[arg(long, env = "OUTPOST_CONTROL_PLANE")]
    control_plane: String,
    /// Enrollment token from `outpost admin enroll-token`.
    #[arg(long, env = "OUTPOST_ENROLL_TOKEN")]
    token: String,
    /// Name shown in the fleet [default: this host's name].
    #[arg(long)]
    name: Option<String>,
    /// State directory [default: /var/lib/outpost-agent].
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Enroll again even if this data dir already holds an identity.
    #[arg(long)]
    force: bool,
    /// PEM CA certificates to trust for an https:// control plane [default: the system's].
    #[arg(long, env = "OUTPOST_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// A label for selectors, KEY=VALUE (repeat it): `--label env=prod --label cluster=main`.
    /// Keys are a-z, 0-9, _ . - starting with a letter; an admin can change them later.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
}

fn main() -> ExitCode {
    type Work = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>;
    let work: Work = match Cli::parse().command {
        // No runtime, no logging, no thread: a keeper is a small single-threaded loop.
        Commands::Keeper { dir } => return keeper(&dir),
        Commands::DumpInto { path, argv } => {
            eprintln!("error: {}", agent::tasks::dumpfile::exec(&path, &argv));
            return ExitCode::FAILURE;
        }
        Commands::BackupGate {
            run_on,
            dsn,
            check_wal_ranges,
            argv,
        } => {
            eprintln!(
                "error: {}",
                agent::tasks::backup::gate(&run_on, dsn.as_deref(), check_wal_ranges, &argv)
            );
            return ExitCode::FAILURE;
        }
        Commands::RestoreDrill(drill) => {
            return match agent::tasks::drill::run(&drill) {
                0 => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            };
        }
        Commands::Run(args) => Box::pin(run(args)),
        Commands::Doctor(args) => Box::pin(doctor(args)),
        Commands::Silence(args) => Box::pin(silence(args)),
        Commands::Enroll(args) => Box::pin(enroll(args)),
        Commands::Tasks(command) => Box::pin(agent::tasks::cli::run(command)),
        Commands::Buffer(command) => Box::pin(agent::buffer::cli::run(command)),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald and container logs keep plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(work);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn keeper(dir: &std::path::Path) -> ExitCode {
    match agent::tasks::keeper::serve(dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: run keeper: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration `run` (and `doctor`) use: the file, then flags and variables over it.
fn load_config(args: &RunArgs) -> anyhow::Result<config::AgentConfig> {
    let file = match &args.config {
        Some(path) => config::read_file(path)?,
        None => RawAgentConfig::default(),
    };
    let flags = RawAgentConfig {
        data_dir: args.data_dir.clone(),
        control_plane: args.control_plane.clone(),
        postgres: args.postgres.clone(),
        socket: args.socket.clone(),
        ca_file: args.ca_file.clone(),
        ..RawAgentConfig::default()
    };
    config::validate(flags.over(file))
}

async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let world = World::real();
    let checks =
        agent::doctor::checks(&world, args.run.config.as_deref(), load_config(&args.run)).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        print!("{}", agent::doctor::render(&checks));
    }
    let failed = checks
        .iter()
        .filter(|c| c.status == agent::doctor::Status::Fail)
        .count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}

async fn silence(args: SilenceArgs) -> anyhow::Result<()> {
    let config = load_config(&args.run)?;
    let world = World::real();
    if let Some(tls) = &config.tls_client {
        world.set_tls_client(tls.clone());
    }
    let s = agent::silence::silence(
        &world,
        &config,
        &args.for_,
        args.rule.as_deref(),
        &args.comment,
    )
    .await?;
    let ends = s["ends_ms"].as_i64().unwrap_or_default();
    println!(
        "silenced {} on this host until {} (silence {}; end it early with DELETE /api/v1/silences/{})",
        s["rule"].as_str().unwrap_or("every rule"),
        jiff::Timestamp::from_millisecond(ends)
            .map_or_else(|_| ends.to_string(), |t| t.to_string()),
        s["id"].as_str().unwrap_or_default(),
        s["id"].as_str().unwrap_or_default(),
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let shutdown = CancellationToken::new();
    let signals = world::on_shutdown_signal({
        let token = shutdown.clone();
        move || token.cancel()
    });
    let (status, _) = watch::channel(LinkStatus::Connecting { attempt: 0 });
    let world = World::real();
    if let Some(tls) = &config.tls_client {
        world.set_tls_client(tls.clone());
    }
    let result = agent::run::run(world, config, status, shutdown).await;
    signals.abort();
    result
}

/// Enrollment carries a one-time token and brings back the agent's credential: over plain
/// HTTP to another host anyone on the path can take both. Loopback is left alone (the demo).
fn plain_http_warning(url: &url::Url) -> Option<String> {
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    (url.scheme() == "http" && !loopback).then(|| {
        format!(
            "WARNING: enrolling over plain http:// ({url}): the enrollment token and this agent's credential cross the network unencrypted; use https:// (outpost serve --tls-cert/--tls-key)"
        )
    })
}

async fn enroll(args: EnrollArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| PathBuf::from(agent::layout::DEFAULT_DATA_DIR));
    let url = config::control_plane_url("--control-plane", &args.control_plane)?;
    if let Some(warning) = plain_http_warning(&url) {
        eprintln!("{warning}");
    }
    if !args.force
        && let Some(existing) = identity::load(&data_dir)?
    {
        anyhow::bail!(
            "{} already holds agent {} ({}); pass --force to enroll again",
            data_dir.display(),
            existing.agent_id,
            existing.name
        );
    }
    let name = args.name.unwrap_or_else(identity::hostname);
    let world = World::real();
    if let Some(path) = &args.ca_file {
        let tls = world::tls::client_config(path).map_err(|e| anyhow::anyhow!("--ca-file: {e}"))?;
        world.set_tls_client(tls);
    }
    let mut labels = std::collections::BTreeMap::new();
    for pair in &args.labels {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--label {pair:?}: write KEY=VALUE"))?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    let id = identity::enroll(
        &world,
        &data_dir,
        &args.control_plane,
        &args.token,
        &name,
        labels,
    )
    .await
    .context("enroll")?;
    println!("agent_id: {}", id.agent_id);
    println!("name: {}", id.name);
    println!("identity: {}", identity::identity_path(&data_dir).display());
    Ok(())
}
