//! `outpost`: the control plane binary.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use control_plane::audit::action;
use control_plane::auth::{self, Role, SecretKind};
use control_plane::config::{self, RawServeConfig};
use control_plane::server;
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
    Serve(Box<ServeArgs>),
    /// Administrative commands that work on the storage directly.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Run one command on many hosts over SSH, with classified outcomes per host.
    ///
    /// Every host ends `ok` (exit 0), `command_failed` (exit ≠ 0), `not_started` (connect,
    /// handshake or authentication failed: certainly not run, retried automatically),
    /// `uncertain` (the link died after the command was sent: it may have run) or `timed_out`.
    /// Each run gets an op_id and leaves receipts on the hosts (~/.outpost/receipts), so
    /// `outpost exec status OP_ID` tells later what really happened.
    ///
    /// Example: outpost exec --inventory fleet.toml --hosts @replica --max-errors 10% -- psql -Atc 'select 1'
    Exec(Box<ExecArgs>),
    /// Try the whole appliance on this machine: a throwaway PostgreSQL (initdb in the data
    /// dir; Debian package `postgresql`), the control plane on embedded defaults and one
    /// enrolled agent collecting from that Postgres. Prints `url:`, `user:` and `password:`;
    /// open the url in a browser. Ctrl+C stops everything and deletes the data dir.
    Demo(DemoArgs),
    /// Alert notifications: channels and a test send.
    #[command(subcommand)]
    Notify(NotifyCommand),
    /// Rollouts: a change carried over agents in waves.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Exit 0 when the control plane on this host answers /healthz (the image's HEALTHCHECK).
    ///
    /// Exits 1 with the reason when /healthz does not answer 200 with status "ok". The answer
    /// is printed; it also says whether the terminal stream store (Redis) is
    /// reachable, which does not make the replica unhealthy (everything but terminals works).
    Healthcheck(HealthcheckArgs),
}

#[derive(Args)]
struct HealthcheckArgs {
    /// The URL to ask [default: http://127.0.0.1:PORT/healthz, PORT from OUTPOST_LISTEN or 8080].
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// How long to wait for the answer, e.g. 3s.
    #[arg(long, default_value = "3s", value_name = "DURATION")]
    timeout: String,
}

#[derive(Args)]
struct DemoArgs {
    /// Address for the web UI and API.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: String,
    /// A new or empty directory for everything the demo runs (deleted when it stops)
    /// [default: a fresh directory under $TMPDIR].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ExecArgs {
    #[command(subcommand)]
    status: Option<ExecCommand>,
    #[command(flatten)]
    run: ExecRunArgs,
}

#[derive(Subcommand)]
enum ExecCommand {
    /// What the receipts on each host say about an earlier run: finished (with its exit
    /// code), running, never_started, or unknown (host unreachable, or the run vanished).
    Status {
        /// The op_id printed by `outpost exec`.
        op_id: String,
        #[command(flatten)]
        select: HostSelection,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        timeouts: TimeoutArgs,
    },
}

#[derive(Args)]
struct HostSelection {
    /// Inventory TOML: [defaults] user, port, identity_file, known_hosts; [[hosts]] name,
    /// address, port, groups.
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// Which hosts: comma-separated name globs (db*), @group or group names; !term excludes.
    #[arg(long, default_value = "*", value_name = "PATTERN")]
    hosts: String,
    /// Hosts worked on at once (1-1024).
    #[arg(long, default_value_t = 32, value_name = "N")]
    concurrency: usize,
}

#[derive(Args)]
struct TimeoutArgs {
    /// TCP connect timeout.
    #[arg(long, default_value = "10s", value_name = "D")]
    connect_timeout: String,
    /// SSH handshake (key exchange and host key check) timeout.
    #[arg(long, default_value = "15s", value_name = "D")]
    handshake_timeout: String,
    /// Authentication timeout.
    #[arg(long, default_value = "15s", value_name = "D")]
    auth_timeout: String,
    /// Deadline for the command itself; past it the remote process gets TERM (timed_out).
    #[arg(long, default_value = "10m", value_name = "D")]
    command_timeout: String,
    /// Transport liveness: no data and no keepalive answer for this long means the link is
    /// dead (uncertain). A quiet command on a live link is not idle.
    #[arg(long, default_value = "30s", value_name = "D")]
    idle_timeout: String,
}

impl TimeoutArgs {
    fn parse(&self) -> anyhow::Result<remote_exec::Timeouts> {
        use control_plane::exec::duration_flag;
        Ok(remote_exec::Timeouts {
            connect: duration_flag("--connect-timeout", &self.connect_timeout)?,
            handshake: duration_flag("--handshake-timeout", &self.handshake_timeout)?,
            auth: duration_flag("--auth-timeout", &self.auth_timeout)?,
            command: duration_flag("--command-timeout", &self.command_timeout)?,
            idle: duration_flag("--idle-timeout", &self.idle_timeout)?,
        })
    }
}

#[derive(Args)]
struct ExecRunArgs {
    #[command(flatten)]
    select: HostSelection,
    /// Stop starting new hosts once more than N (or P% of the selected) hosts failed; runs in
    /// flight finish. Unlimited when not given.
    #[arg(long, value_name = "N|P%")]
    max_errors: Option<String>,
    /// The command is safe to run twice: also retry uncertain and timed_out hosts (not_started
    /// is always retried, up to 3 attempts).
    #[arg(long)]
    idempotent: bool,
    /// Record host keys missing from known_hosts instead of refusing the host. A changed key
    /// is always refused.
    #[arg(long)]
    accept_new_host_keys: bool,
    /// Take the command as one shell string (pipes, redirections) instead of an argv that is
    /// quoted word by word.
    #[arg(long)]
    raw: bool,
    /// Print one JSON object: {"op_id", "hosts":[{host, outcome, exit_code, stdout, stderr,
    /// error, duration_ms, …}], "summary":{…}}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    timeouts: TimeoutArgs,
    /// The command and its arguments, after `--`. Each argument reaches the remote program
    /// exactly as given: nothing is interpreted by the remote shell.
    #[arg(last = true, value_name = "CMD")]
    argv: Vec<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with any of: listen, data_dir, database_url, redis_url, heartbeat_interval,
    /// dead_after, session_ttl, metrics_retention, audit_retention, inventory, tls_cert, tls_key, ca_file,
    /// behind_tls_proxy, max_connections, max_connections_per_address, header_timeout,
    /// body_timeout, request_timeout, login_lockout, recording, recording_retention,
    /// recording_failure, record_input, alert_group_wait, alert_digest_over, alert_repeat,
    /// alert_evaluate_every, alert_lease_ttl.
    /// Flags and OUTPOST_* variables override it.
    #[arg(long, env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "OUTPOST_LISTEN")]
    listen: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    /// Redis for terminal streams (required with more than one replica): redis://[:PASSWORD@]HOST:PORT[/DB],
    /// or rediss:// for TLS.
    #[arg(long, env = "OUTPOST_REDIS_URL")]
    redis_url: Option<String>,
    /// How long stored metrics are kept, e.g. 30d or 2w [default: 30d]. Postgres drops whole
    /// days; SQLite deletes rows. Checked hourly.
    #[arg(long, env = "OUTPOST_METRICS_RETENTION")]
    metrics_retention: Option<String>,
    /// How long audit records are kept, e.g. 400d or 2y [default: 400d]. Checked hourly.
    #[arg(long, env = "OUTPOST_AUDIT_RETENTION")]
    audit_retention: Option<String>,
    /// Inventory TOML (as for `outpost exec`) of the hosts the web UI's fleet exec may reach.
    /// Without it, exec through the API is refused.
    #[arg(long, env = "OUTPOST_INVENTORY", value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (leaf first); needs --tls-key. Agents then
    /// use https:// URLs (and --ca-file for a private CA).
    #[arg(
        long,
        env = "OUTPOST_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        env = "OUTPOST_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates to trust for outgoing TLS (rediss://, notification channels),
    /// besides the system's.
    #[arg(long, env = "OUTPOST_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Connections served at once, WebSockets included (every agent holds one) [default: 20000].
    /// More are closed on accept and counted (outpost_http_connections_refused_total); keep the
    /// process's open-files limit above it.
    #[arg(long, env = "OUTPOST_MAX_CONNECTIONS", value_name = "N")]
    max_connections: Option<usize>,
    /// A client must send a request's headers within this, and an idle keep-alive connection
    /// is closed after it, e.g. 15s [default: 15s].
    #[arg(long, env = "OUTPOST_HEADER_TIMEOUT", value_name = "DURATION")]
    header_timeout: Option<String>,
    /// A client must send a request's whole body within this after its headers, or the
    /// connection is closed (408, counted in outpost_http_deadlines_total) [default: 15s].
    #[arg(long, env = "OUTPOST_BODY_TIMEOUT", value_name = "DURATION")]
    body_timeout: Option<String>,
    /// Every request that is not a WebSocket upgrade is answered within this, or gets 503 and
    /// its connection is closed (counted in outpost_http_deadlines_total) [default: 60s].
    #[arg(long, env = "OUTPOST_REQUEST_TIMEOUT", value_name = "DURATION")]
    request_timeout: Option<String>,
    /// Connections served at once from one source address; more are closed on accept and
    /// counted. Raise it when many agents share one NAT address; not applied with
    /// --behind-tls-proxy, where the proxy caps connections per client [default: 2000].
    #[arg(long, env = "OUTPOST_MAX_CONNECTIONS_PER_ADDRESS", value_name = "N")]
    max_connections_per_address: Option<usize>,
    /// After 5 failed logins in a row a user name is locked for this long; each further
    /// failure doubles it, up to 15m; a successful login clears it [default: 30s].
    #[arg(long, env = "OUTPOST_LOGIN_LOCKOUT", value_name = "DURATION")]
    login_lockout: Option<String>,
    /// Record terminal sessions (asciicast v2 in storage, replayable and searchable from the
    /// Recordings page): on, or off to keep no recording (the audit log still records who
    /// opened and ended which session) [default: on].
    #[arg(long, env = "OUTPOST_RECORDING", value_name = "ON|OFF", value_parser = ["on", "off"])]
    recording: Option<String>,
    /// How long terminal recordings are kept after their last event, e.g. 90d or 1y
    /// [default: 90d]. Checked hourly.
    #[arg(long, env = "OUTPOST_RECORDING_RETENTION", value_name = "DURATION")]
    recording_retention: Option<String>,
    /// When a terminal recording cannot be stored: fail_open keeps the session and marks the
    /// recording incomplete; fail_closed refuses or closes the session. Either way the user
    /// is told [default: fail_open].
    #[arg(long, env = "OUTPOST_RECORDING_FAILURE", value_name = "POLICY", value_parser = ["fail_open", "fail_closed"])]
    recording_failure: Option<String>,
    /// Record keystrokes of every terminal session, not only output (typed passwords are
    /// then kept in recordings).
    #[arg(long, env = "OUTPOST_RECORD_INPUT")]
    record_input: bool,
    /// A reverse proxy in front terminates TLS: mark the session cookie Secure and send HSTS
    /// although this port speaks plain HTTP (only ever expose it to the proxy).
    #[arg(long, env = "OUTPOST_BEHIND_TLS_PROXY")]
    behind_tls_proxy: bool,
}

#[derive(Args, Clone)]
struct StoreArgs {
    /// Directory for the embedded SQLite database and other state [default: ./outpost-data].
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL URL (postgres://user@host/db); when set, SQLite is not used.
    #[arg(long, env = "OUTPOST_DATABASE_URL")]
    database_url: Option<String>,
}

#[derive(Subcommand)]
enum NotifyCommand {
    /// Send a test notification through channel CHANNEL now (not through the outbox) and say
    /// whether it arrived. Works on the storage directly, like `outpost admin`.
    ///
    /// Example: outpost notify test ops --database-url postgres://outpost@db/outpost
    Test {
        /// The channel's name (`outpost notify channels` lists them).
        channel: String,
        /// PEM CA certificates to trust for the channel's https:// URL, besides the system's.
        #[arg(long, env = "OUTPOST_CA_FILE", value_name = "FILE")]
        ca_file: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// The notification channels (never their secrets), and what each has waiting in the
    /// outbox.
    Channels {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// The dry run of a rollout file: the waves it makes of the agents it selects now, the
    /// hosts in each (in order), and the failure that halts each wave and the whole rollout.
    /// Nothing runs. Works on the storage directly, like `outpost admin`.
    ///
    /// Example rollout.toml:
    ///   name = "minor-upgrade"
    ///   agents = ["env=prod"]
    ///   waves = [1, "1%", "10%", "100%"]
    ///   max_in_flight = 20
    ///   max_errors = "2%"          # per wave: N or P% of the wave
    ///   max_errors_total = 10
    ///   soak = "10m"
    ///   replicas_first = true      # role=replica|standby first, role=primary last
    ///   approve_after_canary = true
    ///   offline = "wait"           # or "skip"
    ///   offline_deadline = "1h"
    ///   [task]
    ///   kind = "command"
    ///   argv = ["/usr/local/bin/upgrade-minor"]
    ///   timeout = "30m"
    #[command(verbatim_doc_comment)]
    Plan {
        /// The rollout file (TOML).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Print the plan as JSON (the API's shape).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Start a rollout of FILE (the format `plan` shows): planned against the agents now and
    /// driven wave by wave by the running control-plane replicas, each host running the task
    /// once. Prints the rollout's id. Works on the storage directly, like `outpost admin`.
    Create {
        /// The rollout file (TOML).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// A rollout's state, its current wave and every host's outcome; without ID, every
    /// rollout, newest first.
    Status {
        /// The rollout's id (`ro_…`).
        id: Option<String>,
        /// Print again every 2 s until the rollout has nothing left to run or collect.
        #[arg(long)]
        watch: bool,
        /// Print as JSON (the API's shape).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Start no more hosts; tasks in flight run to their end and are recorded.
    Pause {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Continue a paused rollout.
    Resume {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Let a rollout waiting after its canary wave go on (`approve_after_canary`).
    Approve {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// End a rollout: no more hosts start. Tasks in flight run to their end unless
    /// --cancel-running.
    Abort {
        id: String,
        /// Cancel the hosts' tasks in flight too.
        #[arg(long)]
        cancel_running: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run the failed hosts again (each under a new task key) and continue from the earliest
    /// wave with one; a halted rollout runs again.
    RetryFailed {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a backup policy from a JSON file (the body of POST /api/v1/backup-policies):
    /// pgBackRest schedules for the agents it names, which every replica then puts on them.
    ///
    /// Example file: {"name": "nightly", "agents": ["db-*"], "stanza": "main",
    /// "tz": "Europe/Berlin", "full": "0 1 * * 0", "incr": "0 1 * * 1-6",
    /// "verify": "0 12 * * *", "drill": "0 14 * * 6"}
    #[command(verbatim_doc_comment)]
    BackupPolicyCreate {
        /// The policy's JSON; `-` reads standard input.
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List the backup policies: id, name, stanza, agents, schedules.
    BackupPolicies {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a backup policy; its tasks are canceled on the agents.
    BackupPolicyDelete {
        /// The policy's id (`outpost admin backup-policies`).
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
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
    /// Create an API token for an existing user and print it, e.g. for a Prometheus scraper
    /// (`Authorization: Bearer TOKEN` on /metrics). It acts with that user's role.
    ApiToken {
        /// The user the token acts as (create a `viewer` for scrapers).
        user: String,
        /// How long the token stays valid (humantime: 30d, 1y) [max 2y].
        #[arg(long, default_value = "90d")]
        ttl: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List every unexpired login and API token: id, user, created, expires (never the secret).
    Tokens {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a login or API token by the id `outpost admin tokens` shows: it stops working at
    /// once, on every replica.
    RevokeToken {
        /// The token's id (16 hex digits).
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List users: name, role, whether disabled, created.
    Users {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Change a user's role, or disable or enable it. Disabling deletes its tokens (logged-in
    /// browsers are out at once). The last enabled admin cannot be demoted or disabled.
    SetUser {
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: Option<String>,
        /// The user can no longer log in; its tokens are deleted.
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Let a disabled user log in again.
        #[arg(long)]
        enable: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a user and its tokens (not the last enabled admin).
    DeleteUser {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List agents: id, name, last seen.
    Agents {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Check a terminal recording's hash chain: every chunk carries the hash of the one before,
    /// its content matches its hash, and the recording's head names the last chunk. Exits 1
    /// and names the first broken chunk when it does not hold. The head is also held against
    /// the hash the session's `terminal.ended` audit record carries, so a recording rewritten
    /// whole after the session ended fails too.
    VerifyRecording {
        /// The session id (as listed in the UI's Recordings page or the audit log).
        session_id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove an agent by the id `outpost admin agents` shows: its credential stops working,
    /// its channel ends within a heartbeat, its stored tasks and metrics are deleted. Enroll
    /// the host again to bring it back.
    RemoveAgent {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List enrollment tokens not used yet and not expired: id, created, expires, and the
    /// agent a rekey token is for (never the secret).
    EnrollTokens {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke an unused enrollment token by the id `outpost admin enroll-tokens` shows: no
    /// host can enroll with it any more.
    RevokeEnrollToken {
        /// The token's id (16 hex digits).
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Make a new key for the entries replicas sign in Redis (terminal input and output,
    /// relayed requests). Every running replica reads it within 15 s and signs with it from
    /// 60 s on; entries and terminal sessions signed with the older keys stay valid for
    /// --old-valid-for after that, then are refused. Run it on a schedule, or at once with
    /// --old-valid-for 0s if the key (in the database, or a backup of it) may have leaked:
    /// terminal sessions opened before can then no longer be attached.
    RotateSigningKey {
        /// How long the older keys stay accepted once the new one signs (humantime: 0s, 1h,
        /// 1d) [max 30d].
        #[arg(long, default_value = "1d")]
        old_valid_for: String,
        /// When the new key starts signing (humantime) [min 20s: every replica reads the keys
        /// every 15 s and must accept a key before any signs with it].
        #[arg(long, default_value = "60s")]
        activate_in: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Create a single-use agent enrollment token and print it.
    EnrollToken {
        /// How long the token stays valid (humantime: 30m, 1h, 2d) [max 7d].
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Rotate this agent's credential instead of enrolling a new agent: on its host, run
        /// `outpost-agent enroll --force --token TOKEN` and restart the agent. It keeps its id,
        /// tasks and metrics; the old credential stops working at that enrollment.
        #[arg(long, value_name = "AGENT_ID")]
        agent: Option<String>,
        /// Print this many tokens, one per line, to enroll a fleet (not with --agent)
        /// [max 100000].
        #[arg(long, default_value_t = 1, value_name = "N")]
        count: u32,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `exec` and `demo` print their own results; only warnings belong beside them.
    init_logging(
        if matches!(cli.command, Commands::Exec(_) | Commands::Demo(_)) {
            "warn"
        } else {
            "info"
        },
    );
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
    // A daemon gives its channel tasks time to send close frames; a CLI run has none.
    let grace = if matches!(cli.command, Commands::Serve(_) | Commands::Demo(_)) {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(100)
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Commands::Serve(args) => serve(*args).await.map(|()| ExitCode::SUCCESS),
            Commands::Admin(cmd) => admin(cmd).await.map(|()| ExitCode::SUCCESS),
            Commands::Notify(cmd) => notify(cmd).await,
            Commands::Rollout(cmd) => rollout(cmd).await.map(|()| ExitCode::SUCCESS),
            Commands::Exec(args) => exec(args).await,
            Commands::Demo(args) => control_plane::demo::run(
                World::real(),
                control_plane::demo::DemoArgs {
                    listen: args.listen,
                    data_dir: args.data_dir,
                },
            )
            .await
            .map(|()| ExitCode::SUCCESS),
            Commands::Healthcheck(args) => healthcheck(args).await,
        }
    });
    runtime.shutdown_timeout(grace);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald and container logs keep plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        audit_retention: args.audit_retention,
        inventory: args.inventory,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        ca_file: args.ca_file,
        behind_tls_proxy: args.behind_tls_proxy.then_some(true),
        max_connections: args.max_connections,
        header_timeout: args.header_timeout,
        body_timeout: args.body_timeout,
        request_timeout: args.request_timeout,
        max_connections_per_address: args.max_connections_per_address,
        login_lockout: args.login_lockout,
        recording: args.recording,
        recording_retention: args.recording_retention,
        recording_failure: args.recording_failure,
        record_input: args.record_input.then_some(true),
        ..RawServeConfig::default()
    };
    let config = config::validate(flags.over(file))?;
    let shutdown = CancellationToken::new();
    let signals = world::on_shutdown_signal({
        let token = shutdown.clone();
        move || token.cancel()
    });
    let result = server::serve(World::real(), config, shutdown.clone().cancelled_owned()).await;
    signals.abort();
    result
}

async fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let timeout = humantime::parse_duration(&args.timeout)
        .with_context(|| format!("--timeout {:?}: use a duration such as 3s", args.timeout))?;
    let url = match args.url {
        Some(url) => url,
        None => {
            let listen = std::env::var("OUTPOST_LISTEN").unwrap_or_default();
            let port = listen
                .rsplit_once(':')
                .map(|(_, port)| port)
                .filter(|p| !p.is_empty())
                .unwrap_or("8080");
            format!("http://127.0.0.1:{port}/healthz")
        }
    };
    let parsed = url::Url::parse(&url).with_context(|| format!("--url {url:?}"))?;
    let world = World::real();
    let answer = world::http_request(
        &world,
        http::Method::GET,
        &parsed,
        http::HeaderMap::new(),
        bytes::Bytes::new(),
        timeout,
        64 * 1024,
    )
    .await;
    match answer {
        Ok(response) => {
            let body = String::from_utf8_lossy(&response.body);
            let ok = response.status == http::StatusCode::OK
                && serde_json::from_str::<serde_json::Value>(&body)
                    .is_ok_and(|v| v["status"] == "ok");
            println!("{url}: {} {body}", response.status.as_u16());
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(error) => {
            println!("{url}: no answer: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn inventory_path(select: &HostSelection) -> anyhow::Result<PathBuf> {
    select.inventory.clone().context(
        "--inventory FILE is required: a TOML file listing the hosts (see `outpost exec --help`)",
    )
}

async fn exec(args: Box<ExecArgs>) -> anyhow::Result<ExitCode> {
    let args = *args;
    match args.status {
        Some(ExecCommand::Status {
            op_id,
            select,
            json,
            timeouts,
        }) => {
            control_plane::exec::status(control_plane::exec::StatusRequest {
                op_id,
                inventory: inventory_path(&select)?,
                hosts: select.hosts,
                concurrency: select.concurrency,
                timeouts: timeouts.parse()?,
                json,
            })
            .await
        }
        None => {
            let run = args.run;
            if run.argv.is_empty() {
                bail!(
                    "give the command after `--`, e.g. outpost exec --inventory fleet.toml -- uptime"
                );
            }
            control_plane::exec::run(control_plane::exec::ExecRequest {
                inventory: inventory_path(&run.select)?,
                hosts: run.select.hosts,
                concurrency: run.select.concurrency,
                max_errors: run.max_errors,
                idempotent: run.idempotent,
                timeouts: run.timeouts.parse()?,
                accept_new_host_keys: run.accept_new_host_keys,
                raw: run.raw,
                json: run.json,
                argv: run.argv,
            })
            .await
        }
    }
}

/// `outpost rollout …`.
async fn rollout(cmd: RolloutCommand) -> anyhow::Result<()> {
    use control_plane::rollouts::driver;
    let world = World::real();
    let (what, id, cancel_running, store) = match cmd {
        RolloutCommand::Plan { file, json, store } => {
            let (_, plan) = rollout_plan(&world, &file, store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", plan.describe());
            }
            return Ok(());
        }
        RolloutCommand::Create { file, store } => {
            let storage = open(&world, store.clone()).await?;
            let (spec, plan) = rollout_plan(&world, &file, store).await?;
            print!("{}", plan.describe());
            let who = cli_user();
            let loaded = driver::create(&storage, &world, spec, plan, &who).await?;
            let id = loaded.rollout.id.clone();
            audit(
                &world,
                &storage,
                action::ROLLOUT_CREATED,
                &id,
                driver::created_detail(&loaded),
            )
            .await;
            println!(
                "rollout {id} created; the control plane drives it (`outpost rollout status {id} --watch`)"
            );
            return Ok(());
        }
        RolloutCommand::Status {
            id,
            watch,
            json,
            store,
        } => {
            let storage = open(&world, store).await?;
            return rollout_status(&storage, id.as_deref(), watch, json).await;
        }
        RolloutCommand::Pause { id, store } => ("pause", id, false, store),
        RolloutCommand::Resume { id, store } => ("resume", id, false, store),
        RolloutCommand::Approve { id, store } => ("approve", id, false, store),
        RolloutCommand::Abort {
            id,
            cancel_running,
            store,
        } => ("abort", id, cancel_running, store),
        RolloutCommand::RetryFailed { id, store } => ("retry-failed", id, false, store),
    };
    let storage = open(&world, store).await?;
    let (loaded, detail) =
        driver::control(&storage, &world, &id, what, &cli_user(), cancel_running)
            .await
            .map_err(|e| anyhow::anyhow!("rollout {id}: {e}"))?;
    audit(&world, &storage, action::ROLLOUT_CONTROLLED, &id, detail).await;
    print!("{}", driver::describe(&loaded, false));
    Ok(())
}

/// The spec in `file` and its plan against the stored agents now.
async fn rollout_plan(
    world: &World,
    file: &std::path::Path,
    store: StoreArgs,
) -> anyhow::Result<(
    control_plane::rollouts::RolloutSpec,
    control_plane::rollouts::Plan,
)> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("read the rollout file {}", file.display()))?;
    let spec: control_plane::rollouts::RolloutSpec =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let storage = open(world, store).await?;
    let rows = storage.list_agents().await.context("read the agents")?;
    let agents = control_plane::rollouts::Target::all(
        &rows,
        &control_plane::settings::Settings::default(),
        world.now_unix_ms(),
    );
    let plan = spec
        .plan(&agents)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok((spec, plan))
}

/// `outpost rollout status`.
async fn rollout_status(
    storage: &control_plane::storage::Storage,
    id: Option<&str>,
    watch: bool,
    json: bool,
) -> anyhow::Result<()> {
    use control_plane::rollouts::driver::Loaded;
    let Some(id) = id else {
        for row in storage.rollouts(false, 200).await? {
            let (row, hosts) = storage
                .rollout(&row.id)
                .await?
                .context("rollout vanished")?;
            let loaded = Loaded::from_rows(&row, &hosts).map_err(anyhow::Error::msg)?;
            print!(
                "{}",
                control_plane::rollouts::driver::describe(&loaded, false)
            );
        }
        return Ok(());
    };
    loop {
        let (row, hosts) = storage
            .rollout(id)
            .await?
            .with_context(|| format!("no rollout {id}"))?;
        let loaded = Loaded::from_rows(&row, &hosts).map_err(anyhow::Error::msg)?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"rollout": loaded.rollout, "hosts": loaded.hosts})
                )?
            );
        } else {
            print!(
                "{}",
                control_plane::rollouts::driver::describe(&loaded, true)
            );
        }
        if !watch || !loaded.active() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        println!();
    }
}

/// The Unix user running this command, as the audit log names it.
fn cli_user() -> String {
    let who = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {}", nix::unistd::getuid()), |u| u.name);
    format!("cli:{who}")
}

async fn open(world: &World, store: StoreArgs) -> anyhow::Result<control_plane::storage::Storage> {
    let data_dir = store
        .data_dir
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA_DIR));
    server::open_storage(world, &data_dir, store.database_url.as_deref()).await
}

/// `--FLAG VALUE`: a humantime duration (`examples` in the error) within `allowed`, which
/// `range` says in words.
fn bounded_duration(
    flag: &str,
    value: &str,
    examples: &str,
    allowed: std::ops::RangeInclusive<Duration>,
    range: &str,
) -> anyhow::Result<Duration> {
    let parsed = humantime::parse_duration(value)
        .with_context(|| format!("--{flag} {value:?} is not a duration (e.g. {examples})"))?;
    if !allowed.contains(&parsed) {
        bail!("--{flag} must be between {range}");
    }
    Ok(parsed)
}

/// Record what an `outpost admin` command changed, as `cli:USER` (the Unix user who ran it),
/// beside what the API records.
async fn audit(
    world: &World,
    storage: &control_plane::storage::Storage,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) {
    control_plane::audit::Audit::new(world.clone(), storage.clone(), Default::default())
        .record(&cli_user(), action, target, detail)
        .await;
}

/// A token id as `outpost admin tokens` and `enroll-tokens` list them, lowercased.
fn token_id(id: &str, listed_by: &str) -> anyhow::Result<String> {
    let len = control_plane::storage::TOKEN_ID_LEN;
    if id.len() != len || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{id:?}: a token id is {len} hex digits, as `outpost admin {listed_by}` lists them");
    }
    Ok(id.to_ascii_lowercase())
}

async fn admin(cmd: AdminCommand) -> anyhow::Result<()> {
    let world = World::real();
    match cmd {
        AdminCommand::CreateUser {
            name,
            role,
            password_stdin,
            store,
        } => create_user(&world, &name, &role, password_stdin, store).await,
        AdminCommand::Users { store } => list_users(&world, store).await,
        AdminCommand::SetUser {
            name,
            role,
            disable,
            enable,
            store,
        } => set_user(&world, &name, role, disable, enable, store).await,
        AdminCommand::DeleteUser { name, store } => delete_user(&world, &name, store).await,
        AdminCommand::Agents { store } => list_agents(&world, store).await,
        AdminCommand::BackupPolicyCreate { file, store } => {
            backup_policy_create(&world, &file, store).await
        }
        AdminCommand::BackupPolicies { store } => backup_policies(&world, store).await,
        AdminCommand::BackupPolicyDelete { id, store } => {
            backup_policy_delete(&world, &id, store).await
        }
        AdminCommand::VerifyRecording { session_id, store } => {
            verify_recording(&world, &session_id, store).await
        }
        AdminCommand::RemoveAgent { id, store } => remove_agent(&world, &id, store).await,
        AdminCommand::Tokens { store } => list_tokens(&world, store).await,
        AdminCommand::RevokeToken { id, store } => revoke_token(&world, &id, store).await,
        AdminCommand::EnrollTokens { store } => list_enroll_tokens(&world, store).await,
        AdminCommand::RevokeEnrollToken { id, store } => {
            revoke_enroll_token(&world, &id, store).await
        }
        AdminCommand::RotateSigningKey {
            old_valid_for,
            activate_in,
            store,
        } => rotate_signing_key(&world, &old_valid_for, &activate_in, store).await,
        AdminCommand::ApiToken { user, ttl, store } => api_token(&world, &user, &ttl, store).await,
        AdminCommand::EnrollToken {
            ttl,
            agent,
            count,
            store,
        } => enroll_token(&world, &ttl, agent, count, store).await,
    }
}

/// `outpost admin create-user`.
async fn create_user(
    world: &World,
    name: &str,
    role: &str,
    password_stdin: bool,
    store: StoreArgs,
) -> anyhow::Result<()> {
    if !control_plane::accounts::valid_user_name(name) {
        // Before the store is opened or a password read: the rule, not a storage error.
        bail!(
            "{}",
            control_plane::accounts::AccountError::BadName(name.to_string())
        );
    }
    let role = Role::parse(role).context("role must be viewer, operator or admin")?;
    let (password, generated) = if password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("read password from stdin")?;
        (line.trim_end_matches(['\n', '\r']).to_string(), false)
    } else {
        (auth::generate_password(world), true)
    };
    if !control_plane::accounts::valid_password(&password) {
        // Before the store is opened: nothing is created for a refused password.
        bail!("{}", control_plane::accounts::AccountError::BadPassword);
    }
    let storage = open(world, store).await?;
    let shown = generated.then(|| password.clone());
    control_plane::accounts::create_user(world, &storage, name, role, password).await?;
    audit(
        world,
        &storage,
        action::USER_CREATED,
        name,
        serde_json::json!({"role": role.as_str()}),
    )
    .await;
    println!("user: {name}");
    println!("role: {}", role.as_str());
    if let Some(password) = shown {
        println!("password: {password}");
    }
    Ok(())
}

/// `outpost admin users`.
async fn list_users(world: &World, store: StoreArgs) -> anyhow::Result<()> {
    let storage = open(world, store).await?;
    let users = storage.list_users().await.context("list the users")?;
    println!("{:<24}  {:<8}  {:<8}  CREATED", "NAME", "ROLE", "STATE");
    for u in users {
        println!(
            "{:<24}  {:<8}  {:<8}  {}",
            u.name,
            u.role.as_str(),
            if u.disabled { "disabled" } else { "enabled" },
            control_plane::time::rfc3339_ms(u.created_at_ms)
        );
    }
    Ok(())
}

/// `outpost admin set-user`.
async fn set_user(
    world: &World,
    name: &str,
    role: Option<String>,
    disable: bool,
    enable: bool,
    store: StoreArgs,
) -> anyhow::Result<()> {
    use control_plane::accounts::UserChange;
    let mut changes = Vec::new();
    if let Some(role) = &role {
        changes.push(UserChange::Role(
            Role::parse(role).context("role must be viewer, operator or admin")?,
        ));
    }
    if disable {
        changes.push(UserChange::Disable);
    }
    if enable {
        changes.push(UserChange::Enable);
    }
    if changes.is_empty() {
        bail!("give --role, --disable or --enable");
    }
    let storage = open(world, store).await?;
    for change in changes {
        control_plane::accounts::change_user(&storage, name, change).await?;
    }
    audit(
        world,
        &storage,
        action::USER_CHANGED,
        name,
        serde_json::json!({"role": role, "disabled": disable.then_some(true).or(enable.then_some(false))}),
    )
    .await;
    eprintln!("changed user {name}");
    Ok(())
}

/// `outpost admin delete-user`.
async fn delete_user(world: &World, name: &str, store: StoreArgs) -> anyhow::Result<()> {
    let storage = open(world, store).await?;
    control_plane::accounts::change_user(
        &storage,
        name,
        control_plane::accounts::UserChange::Delete,
    )
    .await?;
    audit(
        world,
        &storage,
        action::USER_DELETED,
        name,
        serde_json::json!({}),
    )
    .await;
    eprintln!("deleted user {name}");
    Ok(())
}

/// `outpost admin agents`.
async fn list_agents(world: &World, store: StoreArgs) -> anyhow::Result<()> {
    let storage = open(world, store).await?;
    let agents = storage.list_agents().await.context("list the agents")?;
    println!("{:<24}  {:<32}  LAST SEEN", "ID", "NAME");
    for a in agents {
        println!(
            "{:<24}  {:<32}  {}",
            a.id,
            a.name,
            a.last_seen_ms
                .map(control_plane::time::rfc3339_ms)
                .unwrap_or_else(|| "never".into())
        );
    }
    Ok(())
}

/// `outpost admin backup-policy-create`.
async fn backup_policy_create(
    world: &World,
    file: &std::path::Path,
    store: StoreArgs,
) -> anyhow::Result<()> {
    let text = if file == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
            .context("read the policy from stdin")?;
        text
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?
    };
    let spec: control_plane::backup_policies::PolicySpec = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a backup policy", file.display()))?;
    // The rules before the store is opened: nothing is touched for a refused spec.
    spec.validate().map_err(anyhow::Error::msg)?;
    let storage = open(world, store).await?;
    let row = control_plane::backup_policies::create(world, &storage, &spec).await?;
    audit(
        world,
        &storage,
        action::BACKUP_POLICY_CREATED,
        &row.id,
        serde_json::to_value(&spec).unwrap_or_default(),
    )
    .await;
    println!("created backup policy {} ({})", row.id, row.name);
    Ok(())
}

/// `outpost admin backup-policies`.
async fn notify(cmd: NotifyCommand) -> anyhow::Result<ExitCode> {
    use control_plane::alerts::channels::{self, Channel};
    let world = World::real();
    let (store, wanted) = match cmd {
        NotifyCommand::Test {
            channel,
            ca_file,
            store,
        } => {
            if let Some(path) = &ca_file {
                let tls = world::tls::client_config_with_system(path)
                    .map_err(|e| anyhow::anyhow!("--ca-file: {e}"))?;
                world.set_tls_client(tls);
            }
            (store, Some(channel))
        }
        NotifyCommand::Channels { store } => (store, None),
    };
    let storage = open(&world, store).await?;
    let list: Vec<Channel> = storage
        .specs(channels::SPEC_KIND)
        .await
        .context("read the channels")?
        .iter()
        .filter_map(Channel::from_row)
        .collect();
    let Some(wanted) = wanted else {
        let pending = storage.notifications_pending(10_000).await?;
        println!(
            "{:<24}  {:<13}  {:<9}  {:>7}  URL",
            "NAME", "KIND", "SEVERITY", "WAITING"
        );
        for c in &list {
            let waiting = pending.iter().filter(|n| n.channel == c.id).count();
            println!(
                "{:<24}  {:<13}  {:<9}  {:>7}  {}",
                c.spec.name,
                serde_json::to_value(c.spec.kind)?
                    .as_str()
                    .unwrap_or_default(),
                c.spec.min_severity.as_str(),
                waiting,
                c.spec.url.as_deref().unwrap_or("(secret)")
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    let channel = list
        .into_iter()
        .find(|c| c.spec.name == wanted)
        .with_context(|| {
            format!("no channel named {wanted:?}; `outpost notify channels` lists them")
        })?;
    let by = format!("outpost notify test on {}", std::process::id());
    let notice = channels::test_notice(world.now_unix_ms(), &by);
    match channel.send(&world, &notice, channels::SEND_TIMEOUT).await {
        Ok(()) => {
            println!("delivered a test notification to {wanted}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: the test notification did not arrive: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn backup_policies(world: &World, store: StoreArgs) -> anyhow::Result<()> {
    let storage = open(world, store).await?;
    let rows = storage
        .backup_policies()
        .await
        .context("list the backup policies")?;
    println!(
        "{:<20}  {:<24}  {:<12}  {:<24}  SCHEDULES",
        "ID", "NAME", "STANZA", "AGENTS"
    );
    for row in rows {
        let Ok(spec) =
            serde_json::from_str::<control_plane::backup_policies::PolicySpec>(&row.spec)
        else {
            println!("{:<20}  {:<24}  (unreadable spec)", row.id, row.name);
            continue;
        };
        let schedules: Vec<String> = [
            ("full", &spec.full),
            ("diff", &spec.diff),
            ("incr", &spec.incr),
            ("check", &spec.check),
            ("verify", &spec.verify),
            ("drill", &spec.drill),
        ]
        .into_iter()
        .filter_map(|(what, cron)| cron.as_ref().map(|c| format!("{what} '{c}'")))
        .collect();
        println!(
            "{:<20}  {:<24}  {:<12}  {:<24}  {} ({})",
            row.id,
            row.name,
            spec.stanza,
            spec.agents.join(","),
            schedules.join(", "),
            spec.tz.as_deref().unwrap_or("UTC")
        );
    }
    Ok(())
}

/// `outpost admin backup-policy-delete`.
async fn backup_policy_delete(world: &World, id: &str, store: StoreArgs) -> anyhow::Result<()> {
    let storage = open(world, store).await?;
    if !storage
        .delete_backup_policy(id)
        .await
        .context("delete the backup policy")?
    {
        bail!("no backup policy {id} (see `outpost admin backup-policies`)");
    }
    audit(
        world,
        &storage,
        action::BACKUP_POLICY_DELETED,
        id,
        serde_json::json!({}),
    )
    .await;
    println!("deleted backup policy {id}; every replica cancels its tasks on the agents");
    Ok(())
}

/// `outpost admin verify-recording`.
async fn verify_recording(world: &World, session_id: &str, store: StoreArgs) -> anyhow::Result<()> {
    let storage = open(world, store).await?;
    let v = control_plane::terminal::recording::api::verify(&storage, session_id)
        .await
        .with_context(|| format!("read recording {session_id}"))?;
    println!(
        "recording {}: {} chunks, {} output bytes, {} events, head {}",
        v.session_id, v.chunks, v.bytes, v.events, v.hash
    );
    println!("{}", v.audit);
    match v.problem {
        None => {
            println!("valid: the chain holds from the first chunk to the head");
            Ok(())
        }
        Some(problem) => bail!("INVALID: {problem}"),
    }
}

/// `outpost admin remove-agent`.
async fn remove_agent(world: &World, id: &str, store: StoreArgs) -> anyhow::Result<()> {
    let storage = open(world, store).await?;
    control_plane::accounts::remove_agent(&storage, id).await?;
    audit(
        world,
        &storage,
        action::AGENT_REMOVED,
        id,
        serde_json::json!({}),
    )
    .await;
    eprintln!("removed agent {id}");
    Ok(())
}

/// `outpost admin tokens`.
async fn list_tokens(world: &World, store: StoreArgs) -> anyhow::Result<()> {
    let storage = open(world, store).await?;
    let rows = storage
        .list_tokens(world.now_unix_ms())
        .await
        .context("list the tokens")?;
    println!("{:<16}  {:<24}  {:<24}  EXPIRES", "ID", "USER", "CREATED");
    for row in rows {
        println!(
            "{:<16}  {:<24}  {:<24}  {}",
            row.id,
            row.user,
            control_plane::time::rfc3339_ms(row.created_at_ms),
            control_plane::time::rfc3339_ms(row.expires_at_ms)
        );
    }
    Ok(())
}

/// `outpost admin revoke-token`.
async fn revoke_token(world: &World, id: &str, store: StoreArgs) -> anyhow::Result<()> {
    let id = token_id(id, "tokens")?;
    let storage = open(world, store).await?;
    if !storage
        .revoke_token_id(&id)
        .await
        .context("revoke the token")?
    {
        bail!("no unexpired token {id} (`outpost admin tokens` lists them)");
    }
    audit(
        world,
        &storage,
        action::TOKEN_REVOKED,
        &id,
        serde_json::json!({}),
    )
    .await;
    eprintln!("revoked token {id}");
    Ok(())
}

/// `outpost admin enroll-tokens`.
async fn list_enroll_tokens(world: &World, store: StoreArgs) -> anyhow::Result<()> {
    let storage = open(world, store).await?;
    let rows = storage
        .list_enroll_tokens(world.now_unix_ms())
        .await
        .context("list the enrollment tokens")?;
    println!("{:<16}  {:<24}  {:<24}  FOR", "ID", "CREATED", "EXPIRES");
    for row in rows {
        println!(
            "{:<16}  {:<24}  {:<24}  {}",
            row.id,
            control_plane::time::rfc3339_ms(row.created_at_ms),
            control_plane::time::rfc3339_ms(row.expires_at_ms),
            row.agent_id
                .map_or_else(|| "new agent".to_string(), |a| format!("rekey {a}"))
        );
    }
    Ok(())
}

/// `outpost admin revoke-enroll-token`.
async fn revoke_enroll_token(world: &World, id: &str, store: StoreArgs) -> anyhow::Result<()> {
    let id = token_id(id, "enroll-tokens")?;
    let storage = open(world, store).await?;
    if !storage
        .revoke_enroll_token_id(&id)
        .await
        .context("revoke the enrollment token")?
    {
        bail!("no unused enrollment token {id} (`outpost admin enroll-tokens` lists them)");
    }
    audit(
        world,
        &storage,
        action::ENROLL_TOKEN_REVOKED,
        &id,
        serde_json::json!({}),
    )
    .await;
    eprintln!("revoked enrollment token {id}");
    Ok(())
}

/// `outpost admin rotate-signing-key`.
async fn rotate_signing_key(
    world: &World,
    old_valid_for: &str,
    activate_in: &str,
    store: StoreArgs,
) -> anyhow::Result<()> {
    let activate_in = bounded_duration(
        "activate-in",
        activate_in,
        "60s, 5m",
        control_plane::terminal::keys::ACTIVATION_MIN..=Duration::from_secs(86_400),
        "20s and 1d",
    )?;
    let keep = bounded_duration(
        "old-valid-for",
        old_valid_for,
        "0s, 1h, 1d",
        Duration::ZERO..=Duration::from_secs(30 * 86_400),
        "0s and 30d",
    )?;
    let storage = open(world, store).await?;
    let rotated = control_plane::terminal::keys::rotate(world, &storage, activate_in, keep).await?;
    audit(
        world,
        &storage,
        action::SIGNING_KEY_ROTATED,
        &rotated.id.to_string(),
        serde_json::json!({"old_valid_for_s": keep.as_secs()}),
    )
    .await;
    println!(
        "signing key {} signs from {}; older keys are refused from {}",
        rotated.id,
        control_plane::time::rfc3339_ms(rotated.active_from_ms),
        control_plane::time::rfc3339_ms(rotated.old_retire_at_ms)
    );
    Ok(())
}

/// `outpost admin api-token`.
async fn api_token(world: &World, user: &str, ttl: &str, store: StoreArgs) -> anyhow::Result<()> {
    let ttl = bounded_duration(
        "ttl",
        ttl,
        "30d, 1y",
        Duration::from_secs(60)..=Duration::from_secs(2 * 366 * 86_400),
        "1m and 2y",
    )?;
    let storage = open(world, store).await?;
    let row = storage
        .user_by_name(user)
        .await
        .context("look up the user")?
        .with_context(|| {
            format!(
                "no user {user:?}; create one with `outpost admin create-user {user} --role viewer`"
            )
        })?;
    let token = auth::new_secret(world, SecretKind::ApiToken);
    let now_ms = world.now_unix_ms();
    let expires_at_ms = now_ms.saturating_add(control_plane::time::duration_ms(ttl));
    storage
        .create_api_token(&auth::secret_hash(&token), &row.id, now_ms, expires_at_ms)
        .await
        .context("store the token")?;
    audit(
        world,
        &storage,
        action::TOKEN_CREATED,
        &row.name,
        serde_json::json!({"id": &auth::secret_hash(&token)[..control_plane::storage::TOKEN_ID_LEN], "expires_at": control_plane::time::rfc3339_ms(expires_at_ms)}),
    )
    .await;
    eprintln!(
        "token for {} (role {}), valid until {}",
        row.name,
        row.role.as_str(),
        control_plane::time::rfc3339_ms(expires_at_ms)
    );
    println!("{token}");
    Ok(())
}

/// `outpost admin enroll-token`.
async fn enroll_token(
    world: &World,
    ttl: &str,
    agent: Option<String>,
    count: u32,
    store: StoreArgs,
) -> anyhow::Result<()> {
    let ttl = bounded_duration(
        "ttl",
        ttl,
        "30m, 1h",
        Duration::from_nanos(1)..=Duration::from_secs(7 * 24 * 3600),
        "1s and 7d",
    )?;
    if !(1..=100_000).contains(&count) {
        bail!("--count: 1 to 100000");
    }
    if count > 1 && agent.is_some() {
        bail!("--count and --agent: a rotation token is for one agent");
    }
    let storage = open(world, store).await?;
    let now_ms = world.now_unix_ms();
    let expires_at_ms = now_ms.saturating_add(control_plane::time::duration_ms(ttl));
    for _ in 1..count {
        let token = auth::new_secret(world, SecretKind::EnrollToken);
        storage
            .create_enroll_token(&auth::secret_hash(&token), now_ms, expires_at_ms)
            .await
            .context("store enrollment token")?;
        println!("{token}");
    }
    let token = auth::new_secret(world, SecretKind::EnrollToken);
    let hash = auth::secret_hash(&token);
    match &agent {
        None => storage
            .create_enroll_token(&hash, now_ms, expires_at_ms)
            .await
            .context("store enrollment token")?,
        Some(id) => {
            if !storage
                .create_rekey_token(&hash, id, now_ms, expires_at_ms)
                .await
                .context("store enrollment token")?
            {
                bail!("no agent {id:?} (`outpost admin agents` lists them)");
            }
        }
    }
    println!("{token}");
    let (recorded, target, detail) = match &agent {
        None => (
            action::ENROLL_TOKEN_CREATED,
            "",
            serde_json::json!({"count": count, "expires_at": control_plane::time::rfc3339_ms(expires_at_ms)}),
        ),
        Some(id) => (
            action::AGENT_REKEY_TOKEN,
            id.as_str(),
            serde_json::json!({}),
        ),
    };
    audit(world, &storage, recorded, target, detail).await;
    Ok(())
}
