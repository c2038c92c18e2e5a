//! One deployment of real processes on this machine:
//!
//! ```text
//!   root namespace                                     namespace ochaos-aN (one per agent)
//!   Postgres (storage) 127.0.0.1   Redis 127.0.0.1     outpost-agent ── data dir on a tmpfs
//!   outpost serve ×2   127.0.0.1 ◄── fault proxy ◄──── 10.213.N.1 ◄─ veth ─ 10.213.N.2
//!   Postgres (monitored, Unix socket) ◄── pgbench      (the socket is a file: no netns needed)
//!   outpost serve ── ssh ──► 10.213.10J.2:22 sshd in namespace ochaos-sJ
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::host::{self, Netns};
use crate::proxy::Proxy;
use crate::services::{self, Service, accepts, wait_ready};

/// Port of the monitored cluster's socket (`.s.PGSQL.5433`); it listens on no TCP port.
const MONITORED_PORT: u16 = 5433;
/// Size of each agent's data filesystem; the buffer is limited well below it.
const AGENT_FS_MIB: u64 = 24;
const PROXY_PORT: u16 = 7000;

pub struct Agent {
    pub index: usize,
    pub name: String,
    pub id: String,
    pub netns: Netns,
    pub service: Service,
    pub data: PathBuf,
    pub proxy: Arc<Proxy>,
}

pub struct SshHost {
    pub netns: Netns,
    pub service: Service,
}

pub struct Deployment {
    pub root: PathBuf,
    pub pg_bin: PathBuf,
    pub storage_pg: Service,
    pub storage_url: String,
    pub redis: Service,
    pub redis_port: u16,
    pub replicas: Vec<Service>,
    pub replica_addrs: Vec<String>,
    pub monitored: Service,
    pub pgbench: Service,
    pub agents: Vec<Agent>,
    pub ssh_hosts: Vec<SshHost>,
    /// Logged in as the suite's admin; shared by every workload.
    pub api: Arc<Api>,
    /// Where task runs and exec commands leave their evidence.
    pub markers: PathBuf,
    pub receipts: PathBuf,
    /// Buffers read just before a corruption fault moved them aside: (agent, ledger).
    pub lost_to_corruption: Vec<(usize, crate::verdict::BufferSnapshot)>,
    /// Task stores as read just before a corruption fault damaged them.
    pub tasks_corrupted: Vec<crate::verdict::DamagedStore>,
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Deployment {
    /// Start everything; progress goes to stderr.
    pub async fn start(
        root: &Path,
        bins: &Path,
        agents: usize,
        ssh_hosts: usize,
        seconds: u64,
        stop: &CancellationToken,
    ) -> anyhow::Result<Deployment> {
        let pg_bin = fixtures::postgres_bin_dir()?;
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs)?;
        let markers = root.join("markers");
        let receipts = root.join("receipts");
        std::fs::create_dir_all(&markers)?;
        std::fs::create_dir_all(&receipts)?;
        std::fs::create_dir_all(root.join(crate::workload::ROLLOUT_RECEIPTS))?;

        eprintln!("chaos: Postgres for storage, Redis, the monitored Postgres …");
        let (storage_pg, storage_url) = start_storage(&pg_bin, root, &logs).await?;
        let (redis, redis_port) = start_redis(root, &logs).await?;
        let (monitored, pgbench, monitored_dsn) =
            start_monitored(&pg_bin, root, &logs, seconds).await?;
        eprintln!("chaos: SSH hosts in their namespaces …");
        let (hosts, inventory_path) = start_ssh_hosts(root, &logs, ssh_hosts)?;
        eprintln!("chaos: two control-plane replicas …");
        let outpost = bins.join("outpost");
        let (replicas, replica_addrs) = start_replicas(
            &outpost,
            root,
            &logs,
            &storage_url,
            redis_port,
            &inventory_path,
        )
        .await?;
        let password = "chaos-admin-password";
        admin(
            &outpost,
            &[
                "create-user",
                "chaos",
                "--role",
                "admin",
                "--password-stdin",
            ],
            &storage_url,
            Some(password),
        )?;
        let api = Arc::new(Api::login(replica_addrs.clone(), "chaos", password).await?);
        eprintln!("chaos: {agents} agents in their namespaces …");
        let places = AgentPlaces {
            root,
            logs: &logs,
            bins,
            storage_url: &storage_url,
            replica_addrs: &replica_addrs,
            monitored_dsn: &monitored_dsn,
            psql: &pg_bin.join("psql"),
        };
        let all = start_agents(&places, agents, stop).await?;
        let mut deployment = Deployment {
            root: root.to_path_buf(),
            pg_bin,
            storage_pg,
            storage_url,
            redis,
            redis_port,
            replicas,
            replica_addrs,
            monitored,
            pgbench,
            agents: all,
            ssh_hosts: hosts,
            api,
            markers,
            receipts,
            lost_to_corruption: Vec::new(),
            tasks_corrupted: Vec::new(),
        };
        deployment.wait_online(agents).await?;
        Ok(deployment)
    }

    /// Wait until all `agents` are online, and learn their ids.
    async fn wait_online(&mut self, agents: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + services::READY_TIMEOUT;
        loop {
            let listed = self.api.agents().await.unwrap_or_default();
            for agent in &mut self.agents {
                if let Some(a) = listed.iter().find(|a| a.name == agent.name) {
                    agent.id.clone_from(&a.id);
                }
            }
            let online = listed.iter().filter(|a| a.online).count();
            if online == agents && self.agents.iter().all(|a| !a.id.is_empty()) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("only {online} of {agents} agents came online");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A DSN of the monitored cluster.
    pub fn monitored_dsn(&self) -> String {
        format!(
            "postgres://postgres@/postgres?host={}&port={MONITORED_PORT}",
            self.root.join("monitored-pg").display()
        )
    }

    /// Stop everything, agents first, gently, then by force.
    pub async fn stop(&mut self) {
        for agent in &mut self.agents {
            agent
                .service
                .stop(Signal::SIGTERM, Duration::from_secs(10))
                .await;
        }
        for host in &mut self.ssh_hosts {
            host.service
                .stop(Signal::SIGTERM, Duration::from_secs(2))
                .await;
        }
        self.pgbench
            .stop(Signal::SIGINT, Duration::from_secs(2))
            .await;
        for replica in &mut self.replicas {
            replica.stop(Signal::SIGTERM, Duration::from_secs(10)).await;
        }
        self.redis
            .stop(Signal::SIGTERM, Duration::from_secs(2))
            .await;
        self.monitored
            .stop(Signal::SIGINT, Duration::from_secs(10))
            .await;
        self.storage_pg
            .stop(Signal::SIGINT, Duration::from_secs(10))
            .await;
    }
}

/// Wait until `psql -c 'select 1'` works on `dsn` (Postgres accepts before recovery ends).
pub async fn wait_for_sql(psql: &Path, dsn: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + services::READY_TIMEOUT;
    loop {
        let ok = tokio::process::Command::new(psql)
            .args(["-X", "-At", "-c", "select 1", dsn])
            .output()
            .await
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{dsn} does not answer SQL");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a replica answers `/healthz` at `addr`.
pub async fn healthz(addr: String) -> bool {
    let Ok(url) = url::Url::parse(&format!("http://{addr}/healthz")) else {
        return false;
    };
    world::http_request(
        &world::World::real(),
        http::Method::GET,
        &url,
        http::HeaderMap::new(),
        bytes::Bytes::new(),
        Duration::from_secs(2),
        1 << 16,
    )
    .await
    .is_ok_and(|r| r.status.is_success())
}

/// `outpost admin ARGS --database-url URL`, with `stdin` as standard input; its stdout.
fn admin(outpost: &Path, args: &[&str], url: &str, stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(outpost)
        .arg("admin")
        .args(args)
        .args(["--database-url", url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run outpost admin")?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        writeln!(input, "{text}")?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "outpost admin {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The storage Postgres with the `outpost` database; its URL.
async fn start_storage(
    pg_bin: &Path,
    root: &Path,
    logs: &Path,
) -> anyhow::Result<(Service, String)> {
    let storage_port = fixtures::free_port()?;
    let mut storage_pg = services::postgres(
        "storage-postgres",
        pg_bin,
        &root.join("storage-pg"),
        storage_port,
        true,
        logs.join("storage-postgres.log"),
    )?;
    storage_pg.start()?;
    let storage_addr = format!("127.0.0.1:{storage_port}");
    wait_ready(&mut storage_pg, "accepting", || accepts(&storage_addr)).await?;
    let psql = pg_bin.join("psql");
    wait_for_sql(
        &psql,
        &format!("postgres://postgres@127.0.0.1:{storage_port}/postgres"),
    )
    .await?;
    host::run(
        &psql.display().to_string(),
        &[
            "-X",
            "-q",
            &format!("postgres://postgres@127.0.0.1:{storage_port}/postgres"),
            "-c",
            "CREATE DATABASE outpost",
        ],
    )?;
    let storage_url = format!("postgres://postgres@127.0.0.1:{storage_port}/outpost");
    Ok((storage_pg, storage_url))
}

/// Redis without persistence (a restart loses its data, as the fault means it to); its port.
async fn start_redis(root: &Path, logs: &Path) -> anyhow::Result<(Service, u16)> {
    let redis_port = fixtures::free_port()?;
    std::fs::create_dir_all(root.join("redis"))?;
    let redis_dir = root.join("redis").display().to_string();
    let redis_bin = fixtures::find_binary("redis-server", &[], "redis-server")?;
    let mut redis = Service::new(
        "redis",
        &redis_bin,
        &[
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            &redis_dir,
        ],
        logs.join("redis.log"),
    );
    redis.start()?;
    let redis_addr = format!("127.0.0.1:{redis_port}");
    wait_ready(&mut redis, "accepting", || accepts(&redis_addr)).await?;
    Ok((redis, redis_port))
}

/// The Postgres the agents watch, with the terminal workload's table and pgbench loading it
/// for the whole run; its DSN.
async fn start_monitored(
    pg_bin: &Path,
    root: &Path,
    logs: &Path,
    seconds: u64,
) -> anyhow::Result<(Service, Service, String)> {
    let psql = pg_bin.join("psql");
    let monitored_dir = root.join("monitored-pg");
    let mut monitored = services::postgres(
        "monitored-postgres",
        pg_bin,
        &monitored_dir,
        MONITORED_PORT,
        false,
        logs.join("monitored-postgres.log"),
    )?;
    monitored.start()?;
    let monitored_dsn = format!(
        "postgres://postgres@/postgres?host={}&port={MONITORED_PORT}",
        monitored_dir.display()
    );
    let socket = monitored_dir.join(format!(".s.PGSQL.{MONITORED_PORT}"));
    wait_ready(&mut monitored, "accepting", || {
        let ok = socket.exists();
        async move { ok }
    })
    .await?;
    wait_for_sql(&psql, &monitored_dsn).await?;
    host::run(
        &psql.display().to_string(),
        &[
            "-X",
            "-q",
            &monitored_dsn,
            "-c",
            "CREATE TABLE chaos_typed (session text NOT NULL, n int NOT NULL, at timestamptz NOT NULL DEFAULT now())",
        ],
    )?;
    let pgbench_bin = fixtures::find_binary("pgbench", &[], "postgresql")?;
    host::run(
        &pgbench_bin.display().to_string(),
        &["-i", "-q", "-s", "1", &monitored_dsn],
    )?;
    let mut pgbench = Service::new(
        "pgbench",
        &pgbench_bin,
        &[
            "-n",
            "-c",
            "2",
            "-j",
            "1",
            "-R",
            "20",
            "-T",
            &(seconds + 600).to_string(),
            &monitored_dsn,
        ],
        logs.join("pgbench.log"),
    );
    pgbench.start()?;
    Ok((monitored, pgbench, monitored_dsn))
}

/// `ssh_hosts` sshd servers, each in a namespace of its own, and the inventory naming them.
fn start_ssh_hosts(
    root: &Path,
    logs: &Path,
    ssh_hosts: usize,
) -> anyhow::Result<(Vec<SshHost>, PathBuf)> {
    let ssh_dir = root.join("ssh");
    std::fs::create_dir_all(&ssh_dir)?;
    let client_key = fixtures::keygen(&ssh_dir, "client")?;
    let mut known_hosts = String::new();
    let mut inventory = format!(
        "[defaults]\nuser = \"root\"\nidentity_file = {}\nknown_hosts = {}\n",
        quote(&client_key.display().to_string()),
        quote(&ssh_dir.join("known_hosts").display().to_string())
    );
    let sshd_bin = fixtures::find_binary("sshd", &[], "openssh-server")?;
    std::fs::create_dir_all("/run/sshd")?;
    let mut hosts = Vec::new();
    for j in 0..ssh_hosts {
        let name = format!("h{j}");
        let netns = Netns::create(&format!("s{j}"), 101 + j as u8)?;
        let dir = ssh_dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        let host_key = fixtures::keygen(&dir, "host")?;
        let host_pub = std::fs::read_to_string(host_key.with_extension("pub"))?;
        let key: Vec<&str> = host_pub.split_whitespace().take(2).collect();
        known_hosts.push_str(&format!("{} {}\n", netns.address, key.join(" ")));
        std::fs::copy(
            client_key.with_extension("pub"),
            dir.join("authorized_keys"),
        )?;
        let d = dir.display();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "Port 22\nListenAddress {}\nHostKey {d}/host\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n\
                 SetEnv OUTPOST_CHAOS_HOST={name}\nMaxStartups 100:30:200\nLogLevel ERROR\n",
                netns.address
            ),
        )?;
        let config = dir.join("sshd_config").display().to_string();
        let mut service = Service::new(
            &format!("sshd-{name}"),
            &sshd_bin,
            &["-D", "-e", "-f", &config],
            logs.join(format!("sshd-{name}.log")),
        )
        .in_netns(&netns.name);
        service.start()?;
        inventory.push_str(&format!(
            "[[hosts]]\nname = \"{name}\"\naddress = \"{}\"\n",
            netns.address
        ));
        hosts.push(SshHost { netns, service });
    }
    std::fs::write(ssh_dir.join("known_hosts"), known_hosts)?;
    let inventory_path = ssh_dir.join("inventory.toml");
    std::fs::write(&inventory_path, inventory)?;
    Ok((hosts, inventory_path))
}

/// Two control-plane replicas sharing the storage Postgres and Redis; their addresses.
async fn start_replicas(
    outpost: &Path,
    root: &Path,
    logs: &Path,
    storage_url: &str,
    redis_port: u16,
    inventory_path: &Path,
) -> anyhow::Result<(Vec<Service>, Vec<String>)> {
    let mut replicas = Vec::new();
    let mut replica_addrs = Vec::new();
    for i in 1..=2 {
        let port = fixtures::free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let data = root.join(format!("cp-{i}"));
        std::fs::create_dir_all(&data)?;
        // Alerts evaluated and grouped within seconds, so a short run sees them fire,
        // resolve and reach the receiver; a dead evaluator's lease lapses in 8 s.
        let config = data.join("outpost.toml");
        std::fs::write(
            &config,
            "alert_evaluate_every = \"2s\"\nalert_group_wait = \"3s\"\nalert_lease_ttl = \"8s\"\n",
        )?;
        let mut service = Service::new(
            &format!("control-plane-{i}"),
            outpost,
            &[
                "serve",
                "--listen",
                &addr,
                "--data-dir",
                &data.display().to_string(),
                "--database-url",
                storage_url,
                "--redis-url",
                &format!("redis://127.0.0.1:{redis_port}/"),
                "--inventory",
                &inventory_path.display().to_string(),
                "--config",
                &config.display().to_string(),
            ],
            logs.join(format!("control-plane-{i}.log")),
        );
        service.start()?;
        let probe = addr.clone();
        wait_ready(&mut service, "serving", || healthz(probe.clone())).await?;
        replicas.push(service);
        replica_addrs.push(addr);
    }
    Ok((replicas, replica_addrs))
}

/// Where the agents are started from.
struct AgentPlaces<'a> {
    root: &'a Path,
    logs: &'a Path,
    bins: &'a Path,
    storage_url: &'a str,
    replica_addrs: &'a [String],
    monitored_dsn: &'a str,
    psql: &'a Path,
}

/// `agents` agents, each in a namespace of its own behind its fault proxy, enrolled and
/// started (their ids are learnt once they are online).
async fn start_agents(
    places: &AgentPlaces<'_>,
    agents: usize,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<Agent>> {
    let AgentPlaces {
        root,
        logs,
        bins,
        storage_url,
        replica_addrs,
        monitored_dsn,
        psql,
    } = *places;
    let outpost = bins.join("outpost");
    let tokens = admin(
        &outpost,
        &["enroll-token", "--count", &agents.to_string()],
        storage_url,
        None,
    )?;
    let tokens: Vec<&str> = tokens.lines().filter(|l| !l.trim().is_empty()).collect();
    if tokens.len() != agents {
        bail!("enroll-token printed {} tokens, not {agents}", tokens.len());
    }
    let agent_bin = bins.join("outpost-agent");
    let mut all = Vec::new();
    for (index, token) in tokens.iter().enumerate() {
        let netns = Netns::create(&format!("a{index}"), 1 + index as u8)?;
        let proxy = Proxy::start(
            &format!("{}:{PROXY_PORT}", netns.gateway),
            replica_addrs.to_vec(),
            stop.clone(),
        )
        .await?;
        let dir = root.join(format!("agent-{index}"));
        let data = dir.join("data");
        host::mount_tmpfs(&data, AGENT_FS_MIB)?;
        let name = format!("chaos-a{index}");
        let url = format!("http://{}:{PROXY_PORT}", netns.gateway);
        let enroll = netns
            .command(&agent_bin)
            .args(["enroll", "--control-plane", &url, "--token", token.trim()])
            .args(["--name", &name, "--data-dir"])
            .arg(&data)
            .output()
            .await
            .context("run outpost-agent enroll")?;
        if !enroll.status.success() {
            bail!(
                "enroll {name}: {}",
                String::from_utf8_lossy(&enroll.stderr).trim()
            );
        }
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {}\npostgres = {}\n\n[metrics]\ninterval = \"10s\"\nbuffer_bytes_max = \"8MiB\"\n\n\
                 [tasks]\nrun_as = \"root\"\n\n[terminal]\npsql = {}\nrun_as = \"root\"\nsessions_max = 4\n",
                quote(&data.display().to_string()),
                quote(monitored_dsn),
                quote(&psql.display().to_string()),
            ),
        )?;
        let mut service = Service::new(
            &name,
            &agent_bin,
            &["run", "--config", &config.display().to_string()],
            logs.join(format!("{name}.log")),
        )
        .in_netns(&netns.name);
        // Task commands inherit it: a rollout's command says which agent ran it.
        service.set_env("OUTPOST_CHAOS_AGENT", Some(&name));
        service.start()?;
        all.push(Agent {
            index,
            name,
            id: String::new(),
            netns,
            service,
            data,
            proxy,
        });
    }
    Ok(all)
}
