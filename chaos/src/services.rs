//! The processes of a deployment, each a [`Service`] the suite can start, signal, kill and
//! start again with the same command line. Every child is started through `setpriv
//! --pdeathsig KILL`, so none outlives the suite, even when the suite itself is killed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::Child;

/// How long any service may take to come up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Service {
    pub name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    /// Network namespace to start in.
    netns: Option<String>,
    /// Run as this uid and gid (Postgres refuses root).
    owner: Option<(u32, u32)>,
    pub log: PathBuf,
    child: Option<Child>,
    /// Set while the process is stopped with SIGSTOP.
    pub paused: bool,
}

impl Service {
    pub fn new(name: &str, program: &Path, args: &[&str], log: PathBuf) -> Service {
        Service {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.iter().map(OsString::from).collect(),
            env: Vec::new(),
            netns: None,
            owner: None,
            log,
            child: None,
            paused: false,
        }
    }

    pub fn in_netns(mut self, netns: &str) -> Service {
        self.netns = Some(netns.to_string());
        self
    }

    pub fn run_as(mut self, owner: Option<(u32, u32)>) -> Service {
        self.owner = owner;
        self
    }

    /// Set (or with `None` remove) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.running() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let mut command = tokio::process::Command::new("setpriv");
        command.args(["--pdeathsig", "KILL", "--"]);
        if let Some(ns) = &self.netns {
            command.args(["ip", "netns", "exec", ns]);
        }
        command
            .arg(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        let child = command
            .spawn()
            .with_context(|| format!("start {}", self.name))?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .and_then(|p| i32::try_from(p).ok())
    }

    /// Whether the process is alive (reaping it if it exited).
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(None) => true,
                _ => {
                    self.child = None;
                    false
                }
            },
            None => false,
        }
    }

    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        nix::sys::signal::kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("send {signal} to {}", self.name))
    }

    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.paused = false;
        self.signal(Signal::SIGCONT)
    }

    /// Send `signal` and wait up to `grace` for the exit, then SIGKILL and wait.
    pub async fn stop(&mut self, signal: Signal, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            if self.paused {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
        }
        self.paused = false;
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }

    /// kill -9, and wait until it is gone.
    pub async fn kill9(&mut self) {
        self.stop(Signal::SIGKILL, Duration::from_secs(10)).await;
    }

    /// How many times `needle` appears in the whole log.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|t| t.matches(needle).count())
            .unwrap_or(0)
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Poll `ready` until true; fail naming `what` with the service's log tail.
pub async fn wait_ready<F, Fut>(
    service: &mut Service,
    what: &str,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if !service.running() {
            bail!(
                "{} exited while {what}:\n{}",
                service.name,
                service.log_tail(15)
            );
        }
        if ready().await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{} not {what} within {} s:\n{}",
                service.name,
                READY_TIMEOUT.as_secs(),
                service.log_tail(15)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether something accepts TCP connections at `addr`.
pub async fn accepts(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            world::World::real().net().connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

/// A Postgres cluster in `dir` (owned by `postgres`), listening on `port` on 127.0.0.1 (if
/// `tcp`) and on a Unix socket in `dir`.
pub fn postgres(
    name: &str,
    bin: &Path,
    dir: &Path,
    port: u16,
    tcp: bool,
    log: PathBuf,
) -> anyhow::Result<Service> {
    use std::os::unix::fs::DirBuilderExt;
    let owner = fixtures::user_ids("postgres")?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    std::os::unix::fs::chown(dir, Some(owner.0), Some(owner.1))?;
    let data = dir.join("data");
    fixtures::init_cluster(&bin.join("initdb"), &data, Some(owner))?;
    let data_s = data.display().to_string();
    let dir_s = dir.display().to_string();
    let listen = if tcp {
        "listen_addresses=127.0.0.1"
    } else {
        "listen_addresses="
    };
    let port_s = port.to_string();
    let args = [
        "-D",
        &data_s,
        "-p",
        &port_s,
        "-k",
        &dir_s,
        "-c",
        listen,
        "-c",
        "max_connections=200",
        "-c",
        "unix_socket_permissions=0777",
    ];
    Ok(Service::new(name, &bin.join("postgres"), &args, log).run_as(Some(owner)))
}
