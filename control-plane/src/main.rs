//! `outpost`: the control plane binary.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use control_plane::auth::{self, Role, SecretKind};
use control_plane::config::{self, RawServeConfig};
use control_plane::server;
use control_plane::storage::{StorageError, UserRow};
use tokio_util::sync::CancellationToken;
use world::World;

/// Outpost control plane: API, web UI and agent channels for a PostgreSQL fleet.
///
/// Start with `outpost serve`; create the first user with `outpost admin create-user NAME
/// --role admin` and an agent enrollment token with `outpost admin enroll-token`.
#[derive(Parser)]
#[command(name = "outpost", version)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the control plane.
    Serve(ServeArgs),
    /// Administrative commands that work on the storage directly.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with any of: listen, data_dir, database_url, redis_url, heartbeat_interval,
    /// dead_after, session_ttl, metrics_retention. Flags and OUTPOST_* variables override it.
    #[arg(long, env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "OUTPOST_LISTEN")]
    listen: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    /// Redis for terminal streams (required with more than one replica).
    #[arg(long, env = "OUTPOST_REDIS_URL")]
    redis_url: Option<String>,
    /// How long stored metrics are kept, e.g. 30d or 2w [default: 30d]. Postgres drops whole
    /// days; SQLite deletes rows. Checked hourly.
    #[arg(long, env = "OUTPOST_METRICS_RETENTION")]
    metrics_retention: Option<String>,
}

#[derive(Args)]
struct StoreArgs {
    /// Directory for the embedded SQLite database and other state [default: ./outpost-data].
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL URL (postgres://user@host/db); when set, SQLite is not used.
    #[arg(long, env = "OUTPOST_DATABASE_URL")]
    database_url: Option<String>,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user; prints a generated password unless one is given on stdin.
    CreateUser {
        /// Login name: 1-64 characters of A-Z a-z 0-9 . _ -
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// Read the password from the first line of standard input (at least 12 characters).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Create a single-use agent enrollment token and print it.
    EnrollToken {
        /// How long the token stays valid (humantime: 30m, 1h, 2d) [max 7d].
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
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
    let result = runtime.block_on(async move {
        match cli.command {
            Commands::Serve(args) => serve(args).await,
            Commands::Admin(cmd) => admin(cmd).await,
        }
    });
    // Channel tasks got the shutdown signal; give them a moment to send their close frames.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => config::read_file(path)?,
        None => RawServeConfig::default(),
    };
    let flags = RawServeConfig {
        listen: args.listen,
        data_dir: args.store.data_dir,
        database_url: args.store.database_url,
        redis_url: args.redis_url,
        metrics_retention: args.metrics_retention,
        ..RawServeConfig::default()
    };
    let config = config::validate(flags.over(file))?;
    let shutdown = CancellationToken::new();
    let signals = {
        let token = shutdown.clone();
        tokio::spawn(async move {
            world::shutdown_signal().await;
            token.cancel();
        })
    };
    let result = server::serve(World::real(), config, shutdown.clone()).await;
    signals.abort();
    result
}

async fn open(world: &World, store: StoreArgs) -> anyhow::Result<control_plane::storage::Storage> {
    let data_dir = store
        .data_dir
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA_DIR));
    server::open_storage(world, &data_dir, store.database_url.as_deref()).await
}

fn valid_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

async fn admin(cmd: AdminCommand) -> anyhow::Result<()> {
    let world = World::real();
    match cmd {
        AdminCommand::CreateUser {
            name,
            role,
            password_stdin,
            store,
        } => {
            if !valid_user_name(&name) {
                bail!("user name {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ -");
            }
            let role = Role::parse(&role).context("role must be viewer, operator or admin")?;
            let (password, generated) = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("read password from stdin")?;
                (line.trim_end_matches(['\n', '\r']).to_string(), false)
            } else {
                (generate_password(&world), true)
            };
            if password.chars().count() < auth::PASSWORD_CHARS_MIN
                || password.len() > auth::PASSWORD_BYTES_MAX
            {
                bail!(
                    "password must be {} to {} bytes long",
                    auth::PASSWORD_CHARS_MIN,
                    auth::PASSWORD_BYTES_MAX
                );
            }
            let storage = open(&world, store).await?;
            let salt = world.random_bytes::<16>();
            let hash = world
                .blocking(move || auth::hash_password(salt, &password).map(|h| (h, password)))
                .await??;
            let (hash, password) = hash;
            let user = UserRow {
                id: auth::new_id(&world, "usr"),
                name: name.clone(),
                role,
                password_hash: hash,
                created_at_ms: world.now_unix_ms(),
            };
            match storage.create_user(user).await {
                Ok(()) => {}
                Err(StorageError::Conflict(_)) => bail!("user {name:?} already exists"),
                Err(e) => return Err(e).context("create user"),
            }
            println!("user: {name}");
            println!("role: {}", role.as_str());
            if generated {
                println!("password: {password}");
            }
            Ok(())
        }
        AdminCommand::EnrollToken { ttl, store } => {
            let ttl = humantime::parse_duration(&ttl)
                .with_context(|| format!("--ttl {ttl:?} is not a duration (e.g. 30m, 1h)"))?;
            if ttl.is_zero() || ttl > Duration::from_secs(7 * 24 * 3600) {
                bail!("--ttl must be between 1s and 7d");
            }
            let storage = open(&world, store).await?;
            let token = auth::new_secret(&world, SecretKind::EnrollToken);
            let now_ms = world.now_unix_ms();
            let expires_at_ms =
                now_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
            storage
                .create_enroll_token(&auth::secret_hash(&token), now_ms, expires_at_ms)
                .await
                .context("store enrollment token")?;
            println!("{token}");
            Ok(())
        }
    }
}

fn generate_password(world: &World) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    (0..20)
        .map(|_| {
            let i = usize::try_from(world.random_below(ALPHABET.len() as u64)).unwrap_or(0);
            char::from(ALPHABET[i])
        })
        .collect()
}
