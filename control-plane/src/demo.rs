//! `outpost demo`: the whole appliance on one machine, for a first look.
//!
//! It starts, in order:
//! 1. a throwaway PostgreSQL cluster, initialised in the data dir (`initdb`) and listening
//!    only on a Unix socket there, in a directory only its owner (and root) may enter: the
//!    cluster trusts whoever reaches the socket. It runs as the `postgres` user when the demo
//!    runs as root, because Postgres refuses root;
//! 2. the control plane on embedded defaults (SQLite in the data dir, in-process terminal
//!    streams), with an `admin` user whose generated password is printed;
//! 3. one `outpost-agent` (the binary next to `outpost`), enrolled with a single-use token. It
//!    collects that cluster's statistics every 10 s and opens psql on it for the browser
//!    terminal.
//!
//! Ctrl+C (or SIGTERM) stops the agent, the control plane and Postgres, in that order, and
//! removes the data dir. Nothing is left running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use world::World;

use crate::auth::{self, Role, SecretKind};
use crate::config::{RawServeConfig, validate};
use crate::state::AppState;
use crate::storage::UserRow;

/// The Debian package that holds `initdb`, `postgres` and `psql`.
const POSTGRES_PACKAGE: &str = "postgresql";
/// Port number in the socket's name; the cluster listens on no TCP port.
const SOCKET_PORT: u16 = 5432;
/// Name of the demo's user.
pub const DEMO_USER: &str = "admin";
/// Name the demo's agent enrolls with.
pub const DEMO_AGENT: &str = "demo-agent";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How often start-up checks whether Postgres and the agent are ready.
const POLL_EVERY: Duration = Duration::from_millis(200);

pub struct DemoArgs {
    pub listen: String,
    /// Where everything lives; must be new or empty. Default: a fresh temporary directory.
    pub data_dir: Option<PathBuf>,
}

/// Where the demo's pieces live inside its data dir.
struct Layout {
    root: PathBuf,
    /// Owned by `postgres` when running as root: the cluster and its socket.
    pg: PathBuf,
    control_plane: PathBuf,
    agent: PathBuf,
}

impl Layout {
    fn new(root: PathBuf) -> Layout {
        Layout {
            pg: root.join("pg"),
            control_plane: root.join("control-plane"),
            agent: root.join("agent"),
            root,
        }
    }

    fn dsn(&self) -> String {
        format!(
            "postgres://postgres@/postgres?host={}&port={SOCKET_PORT}",
            self.pg.display()
        )
    }
}

/// Run the demo until Ctrl+C. Progress goes to stderr; the `url:`, `user:` and `password:`
/// lines to stdout.
pub async fn run(world: World, args: DemoArgs) -> anyhow::Result<()> {
    let tools = PostgresTools::find()?;
    let agent_bin = sibling_binary("outpost-agent")?;
    let layout = Layout::new(prepare_root(&world, args.data_dir)?);
    let result = run_in(&world, &layout, &tools, &agent_bin, &args.listen).await;
    match std::fs::remove_dir_all(&layout.root) {
        Ok(()) => eprintln!("demo stopped; removed {}", layout.root.display()),
        Err(e) => eprintln!(
            "demo stopped; could not remove {}: {e}",
            layout.root.display()
        ),
    }
    result
}

async fn run_in(
    world: &World,
    layout: &Layout,
    tools: &PostgresTools,
    agent_bin: &Path,
    listen: &str,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let signals = world::on_shutdown_signal({
        let stop = stop.clone();
        move || stop.cancel()
    });
    let mut children = Children::default();
    let result = async {
        eprintln!("starting a throwaway PostgreSQL in {} …", layout.pg.display());
        children.postgres = Some(start_postgres(tools, layout, &stop).await?);

        let config = validate(
            RawServeConfig {
                listen: Some(listen.to_string()),
                data_dir: Some(layout.control_plane.clone()),
                ..RawServeConfig::default()
            }
            .over(RawServeConfig::default()),
        )?;
        let storage = crate::server::open_storage(world, &config.data_dir, None).await?;
        let password = create_demo_user(world, &storage).await?;
        let token = auth::new_secret(world, SecretKind::EnrollToken);
        let now_ms = world.now_unix_ms();
        storage
            .create_enroll_token(&auth::secret_hash(&token), now_ms, now_ms + 600_000)
            .await
            .context("store the agent's enrollment token")?;
        let listener = world
            .net()
            .bind(&config.listen)
            .await
            .with_context(|| format!("listen on {} (pass --listen ADDR to use another)", config.listen))?;
        let addr = listener.local_addr().context("listening address")?;
        let url = format!("http://{addr}");
        let state = AppState::new(world.clone(), storage, config.settings, stop.clone());
        let server = tokio::spawn(crate::server::run(
            state.clone(),
            listener,
            stop.clone().cancelled_owned(),
        ));
        children.server = Some(server);
        eprintln!("control plane listening on {url}");

        children.agent = Some(start_agent(agent_bin, layout, tools, &url, &token).await?);
        eprintln!("agent {DEMO_AGENT} enrolled; waiting for it to connect …");
        wait_online(&state, &stop).await?;

        println!("url: {url}");
        println!("user: {DEMO_USER}");
        println!("password: {password}");
        eprintln!("open the url in a browser and log in; Ctrl+C stops everything.");
        let agent = children.agent.as_mut().context("agent")?;
        tokio::select! {
            () = stop.cancelled() => Ok(()),
            status = agent.wait() => {
                bail!("the agent exited ({}); see {}", status.map(|s| s.to_string()).unwrap_or_default(), layout.root.join("agent.log").display())
            }
        }
    }
    .await;
    if stop.is_cancelled() {
        eprintln!("stopping …");
    }
    stop.cancel();
    children.stop().await;
    signals.abort();
    result
}

/// A directory for the demo, new or empty; its permissions let `postgres` reach `pg/`.
fn prepare_root(world: &World, data_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let root = match data_dir {
        Some(dir) => {
            if dir.exists() {
                let empty = std::fs::read_dir(&dir)
                    .with_context(|| format!("read {}", dir.display()))?
                    .next()
                    .is_none();
                if !empty {
                    bail!(
                        "--data-dir {} is not empty; the demo starts from nothing and deletes its directory when it stops: give a new path or omit --data-dir",
                        dir.display()
                    );
                }
            } else {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("create {}", dir.display()))?;
            }
            std::path::absolute(&dir).with_context(|| format!("resolve {}", dir.display()))?
        }
        None => {
            let name = format!("outpost-demo-{}", hex::encode(world.random_bytes::<4>()));
            let dir = std::env::temp_dir().join(name);
            std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
            dir
        }
    };
    // Others may traverse (not list) it: the `postgres` user needs to reach its own subdir.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("chmod {}", root.display()))?;
    Ok(root)
}

/// `name` next to the running `outpost`, else on `PATH`.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    on_path(name).with_context(|| {
        format!("{name} was not found next to outpost or on PATH; build both binaries with `cargo build --bins`")
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The Postgres programs the demo needs.
struct PostgresTools {
    initdb: PathBuf,
    postgres: PathBuf,
    psql: PathBuf,
}

impl PostgresTools {
    fn find() -> anyhow::Result<PostgresTools> {
        // Debian keeps the server programs in a versioned directory off PATH; newest first.
        let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| {
                        let version = e.file_name().to_str()?.parse().ok()?;
                        Some((version, e.path().join("bin")))
                    })
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
        let find = |name: &str| {
            dirs.iter()
                .map(|(_, dir)| dir.join(name))
                .find(|p| p.is_file())
                .or_else(|| on_path(name))
                .with_context(|| {
                    format!(
                        "the demo runs a throwaway PostgreSQL, but `{name}` was not found (looked in /usr/lib/postgresql/*/bin and PATH): install the `{POSTGRES_PACKAGE}` package (apt-get install {POSTGRES_PACKAGE})"
                    )
                })
        };
        Ok(PostgresTools {
            initdb: find("initdb")?,
            postgres: find("postgres")?,
            psql: find("psql")?,
        })
    }
}

/// A command for a long-running child that dies with the demo even if the demo is killed
/// with SIGKILL: started through `setpriv --pdeathsig TERM` (util-linux) when it is there.
/// (Setting the signal ourselves would need `pre_exec`, which is unsafe code.)
fn tied_to_us(program: &Path) -> Command {
    match on_path("setpriv") {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "TERM", "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// uid and gid of `postgres` when we are root (Postgres refuses to run as root), else `None`.
fn postgres_owner() -> anyhow::Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")
        .context("look up the postgres user")?
        .with_context(|| {
            format!("running as root, the demo starts Postgres as the `postgres` user, which does not exist: install the `{POSTGRES_PACKAGE}` package (it creates the user)")
        })?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    Ok(Stdio::from(file))
}

async fn start_postgres(
    tools: &PostgresTools,
    layout: &Layout,
    stop: &CancellationToken,
) -> anyhow::Result<Child> {
    let owner = postgres_owner()?;
    use std::os::unix::fs::DirBuilderExt;
    // Postgres trusts whoever reaches its socket in here: only its owner (and root) may.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&layout.pg)
        .with_context(|| format!("create {}", layout.pg.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&layout.pg, Some(uid), Some(gid))
            .with_context(|| format!("hand {} to postgres", layout.pg.display()))?;
    }
    let data = layout.pg.join("data");
    let mut init = Command::new(&tools.initdb);
    init.arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        ])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_owner(&mut init, owner);
    let out = init
        .output()
        .await
        .with_context(|| format!("run {}", tools.initdb.display()))?;
    if !out.status.success() {
        let hint = if owner.is_some() {
            "; as root the cluster runs as `postgres`, which must be able to reach the data dir (every parent directory traversable): choose a --data-dir under /tmp or omit it"
        } else {
            ""
        };
        bail!(
            "initdb failed: {}{hint}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let log = layout.root.join("postgres.log");
    let mut server = tied_to_us(&tools.postgres);
    server
        .arg("-D")
        .arg(&data)
        .args(["-p", &SOCKET_PORT.to_string(), "-k"])
        .arg(&layout.pg)
        .args([
            "-c",
            "listen_addresses=",
            "-c",
            "unix_socket_permissions=0700",
            "-c",
            "max_connections=50",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&log)?)
        .kill_on_drop(true);
    as_owner(&mut server, owner);
    let mut child = server
        .spawn()
        .with_context(|| format!("start {}", tools.postgres.display()))?;
    let socket = layout.pg.join(format!(".s.PGSQL.{SOCKET_PORT}"));
    let accepting = async {
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("postgres exited ({status})");
            }
            if socket.exists() && ready(tools, layout).await {
                return Ok(());
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    };
    within_ready_timeout(stop, "Postgres started", accepting)
        .await
        .with_context(|| format!("postgres did not accept connections; see {}", log.display()))?;
    Ok(child)
}

/// Run `wait` (a polling loop) until it ends, [`READY_TIMEOUT`] passes or `stop` fires;
/// `doing` names it in the error.
async fn within_ready_timeout(
    stop: &CancellationToken,
    doing: &str,
    wait: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::select! {
        () = stop.cancelled() => bail!("interrupted while {doing}"),
        waited = tokio::time::timeout(READY_TIMEOUT, wait) => match waited {
            Ok(result) => result,
            Err(_) => bail!("not done within {} s", READY_TIMEOUT.as_secs()),
        },
    }
}

async fn ready(tools: &PostgresTools, layout: &Layout) -> bool {
    Command::new(&tools.psql)
        .args(["-X", "-At", "-c", "select 1", &layout.dsn()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

async fn create_demo_user(
    world: &World,
    storage: &crate::storage::Storage,
) -> anyhow::Result<String> {
    let password = auth::generate_password(world);
    let salt = world.random_bytes::<16>();
    let to_hash = password.clone();
    let hash = world
        .blocking(move || auth::hash_password(salt, &to_hash))
        .await??;
    storage
        .create_user(UserRow {
            id: auth::new_id(world, "usr"),
            name: DEMO_USER.to_string(),
            role: Role::Admin,
            password_hash: hash,
            created_at_ms: world.now_unix_ms(),
        })
        .await
        .context("create the demo user")?;
    Ok(password)
}

async fn start_agent(
    agent_bin: &Path,
    layout: &Layout,
    tools: &PostgresTools,
    url: &str,
    token: &str,
) -> anyhow::Result<Child> {
    let enroll = Command::new(agent_bin)
        .args([
            "enroll",
            "--control-plane",
            url,
            "--token",
            token,
            "--name",
            DEMO_AGENT,
        ])
        .arg("--data-dir")
        .arg(&layout.agent)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {} enroll", agent_bin.display()))?;
    if !enroll.status.success() {
        bail!(
            "agent enrollment failed: {}",
            String::from_utf8_lossy(&enroll.stderr).trim()
        );
    }
    let config = layout.agent.join("agent.toml");
    let quote = |s: String| toml::Value::String(s).to_string();
    // Started as root, the demo's agent says explicitly that psql and tasks may run as root
    // (a real agent runs as its own user, or names another one).
    let as_root = if nix::unistd::geteuid().is_root() {
        "run_as = \"root\"\n"
    } else {
        ""
    };
    let text = format!(
        "# Written by `outpost demo`.\ndata_dir = {}\npostgres = {}\n\n[metrics]\ninterval = \"10s\"\n\n[tasks]\n{as_root}\n[terminal]\npsql = {}\nsessions_max = 4\n{as_root}",
        quote(layout.agent.display().to_string()),
        quote(layout.dsn()),
        quote(tools.psql.display().to_string()),
    );
    std::fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
    let child = tied_to_us(agent_bin)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&layout.root.join("agent.log"))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {} run", agent_bin.display()))?;
    Ok(child)
}

async fn wait_online(state: &AppState, stop: &CancellationToken) -> anyhow::Result<()> {
    let online = async {
        loop {
            let agents = state.storage.list_agents().await?;
            let now_ms = state.world.now_unix_ms();
            if agents
                .iter()
                .any(|a| a.name == DEMO_AGENT && state.settings.is_online(a, now_ms))
            {
                return Ok(());
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    };
    within_ready_timeout(stop, "the agent connected", online)
        .await
        .context("the agent did not connect")
}

/// What the demo started, stopped in reverse order.
#[derive(Default)]
struct Children {
    postgres: Option<Child>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    agent: Option<Child>,
}

impl Children {
    async fn stop(&mut self) {
        if let Some(agent) = self.agent.take() {
            stop_child("agent", agent, nix::sys::signal::Signal::SIGTERM).await;
        }
        if let Some(server) = self.server.take() {
            match tokio::time::timeout(STOP_GRACE, server).await {
                Ok(Ok(Err(e))) => eprintln!("control plane: {e:#}"),
                Ok(_) => {}
                Err(_) => eprintln!(
                    "control plane did not stop within {} s",
                    STOP_GRACE.as_secs()
                ),
            }
        }
        if let Some(postgres) = self.postgres.take() {
            // SIGINT is Postgres's fast shutdown: sessions end, the cluster stops cleanly.
            stop_child("postgres", postgres, nix::sys::signal::Signal::SIGINT).await;
        }
    }
}

/// Signal `child`, wait up to [`STOP_GRACE`], then kill it.
async fn stop_child(name: &str, mut child: Child, signal: nix::sys::signal::Signal) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            eprintln!(
                "{name} did not stop within {} s; killing it",
                STOP_GRACE.as_secs()
            );
            let _ = child.kill().await;
        }
    }
}
