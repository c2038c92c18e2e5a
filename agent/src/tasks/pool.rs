//! The worker pool: a subprocess supervisor. Every run is a child process in its own process
//! group, so a hung, leaking or deadlocked task can be stopped unconditionally: on timeout or
//! cancellation the group gets SIGTERM, a grace period, then SIGKILL. Output (stdout and
//! stderr interleaved) is kept up to a limit and the rest is counted, never silently cut.
//! The pool shares no memory with the scheduler: jobs come in and events go out on bounded
//! queues.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::core::Job;
use super::model::{Kind, RunOutcome, TaskSpec, status};

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    pub output_bytes_max: usize,
    /// Connection string for the Postgres kinds; `None` makes them fail with a reason.
    pub postgres: Option<String>,
    pub psql: PathBuf,
    pub pg_dump: PathBuf,
    /// This agent binary, for `retention_cleanup` (`outpost-agent tasks purge`).
    pub agent_exe: PathBuf,
    pub data_dir: PathBuf,
    /// Where runs execute.
    pub processes: Arc<dyn Processes>,
}

pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// Where runs execute: real OS processes ([`OsProcesses`]) or a simulation's.
pub trait Processes: Send + Sync + std::fmt::Debug + 'static {
    /// Run to the end: send [`PoolEvent::Started`] once it runs, then [`PoolEvent::Finished`].
    fn run(&self, run: ProcessRun) -> BoxFuture<()>;
    /// Whether the process `pid` (started at `ticks`) a previous agent left is still alive.
    fn alive(&self, pid: i32, ticks: Option<u64>) -> bool;
    /// Stop a leftover process group: SIGTERM, up to `grace`, SIGKILL.
    fn terminate(&self, pid: i32, ticks: Option<u64>, grace: Duration) -> BoxFuture<()>;
}

/// One run for [`Processes::run`].
pub struct ProcessRun {
    pub task_id: String,
    pub run_id: i64,
    pub argv: Vec<String>,
    pub timeout: Duration,
    pub grace: Duration,
    pub output_bytes_max: usize,
    /// Fires on cancellation, and on shutdown (then `shutdown` is cancelled too).
    pub kill: CancellationToken,
    pub shutdown: CancellationToken,
    pub events: mpsc::Sender<PoolEvent>,
}

/// Runs as child processes of this agent, each in its own process group.
#[derive(Debug, Default)]
pub struct OsProcesses;

impl Processes for OsProcesses {
    fn run(&self, run: ProcessRun) -> BoxFuture<()> {
        Box::pin(run_os_process(run))
    }

    fn alive(&self, pid: i32, ticks: Option<u64>) -> bool {
        alive(pid, ticks)
    }

    fn terminate(&self, pid: i32, ticks: Option<u64>, grace: Duration) -> BoxFuture<()> {
        Box::pin(async move { terminate_group(pid, grace, || !alive(pid, ticks)).await })
    }
}

pub enum PoolCommand {
    Run(Job),
    Kill { run_id: i64 },
}

#[derive(Debug)]
pub enum PoolEvent {
    Started {
        task_id: String,
        run_id: i64,
        pid: i32,
        pid_start_ticks: Option<u64>,
    },
    Finished {
        task_id: String,
        run_id: i64,
        outcome: RunOutcome,
    },
}

/// Double-quote an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `dsn` pointed at `database` (URL path replaced, or `dbname=` appended: later keys win).
pub fn dsn_for(dsn: &str, database: Option<&str>) -> String {
    let Some(db) = database else {
        return dsn.to_string();
    };
    if let Ok(mut url) = url::Url::parse(dsn)
        && (url.scheme() == "postgres" || url.scheme() == "postgresql")
    {
        url.set_path(&format!("/{db}"));
        return url.to_string();
    }
    format!(
        "{dsn} dbname='{}'",
        db.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

/// The argv that runs `spec`; an error when the spec cannot run here.
pub fn argv_for(spec: &TaskSpec, config: &PoolConfig) -> Result<Vec<String>, String> {
    let p = |k: &str| spec.params.get(k).map(String::as_str);
    let postgres = || {
        config.postgres.clone().ok_or_else(|| {
            format!(
                "{} needs a Postgres connection: start the agent with --postgres",
                spec.kind.name()
            )
        })
    };
    let psql = |sql: String| -> Result<Vec<String>, String> {
        let dsn = dsn_for(&postgres()?, p("database"));
        Ok(vec![
            config.psql.display().to_string(),
            "-X".into(),
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            "-d".into(),
            dsn,
            "-c".into(),
            sql,
        ])
    };
    let target = || match (p("schema"), p("table")) {
        (Some(s), Some(t)) => format!(" {}.{}", quote_ident(s), quote_ident(t)),
        (None, Some(t)) => format!(" {}", quote_ident(t)),
        _ => String::new(),
    };
    match spec.kind {
        Kind::Command => {
            if spec.argv.is_empty() {
                return Err("command needs its argv after --".into());
            }
            Ok(spec.argv.clone())
        }
        Kind::Vacuum => {
            let full = if p("full") == Some("true") {
                " (FULL)"
            } else {
                ""
            };
            psql(format!("VACUUM{full}{}", target()))
        }
        Kind::Analyze => psql(format!("ANALYZE{}", target())),
        Kind::HealthCheck => psql("SELECT 1".into()),
        Kind::Sql => psql(p("query").unwrap_or_default().to_string()),
        Kind::PgDump => {
            let dsn = dsn_for(&postgres()?, p("database"));
            let mut argv = vec![
                config.pg_dump.display().to_string(),
                "-d".into(),
                dsn,
                "-f".into(),
                p("path").unwrap_or_default().into(),
            ];
            if let Some(s) = p("schema") {
                argv.extend(["-n".into(), s.into()]);
            }
            if let Some(t) = p("table") {
                argv.extend(["-t".into(), t.into()]);
            }
            Ok(argv)
        }
        Kind::RetentionCleanup => Ok(vec![
            config.agent_exe.display().to_string(),
            "tasks".into(),
            "purge".into(),
            "--older-than".into(),
            p("older_than").unwrap_or("30d").into(),
            "--data-dir".into(),
            config.data_dir.display().to_string(),
        ]),
    }
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat): with the pid
/// it identifies a process across pid reuse.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process `pid` that started at `ticks` is still alive (not a zombie).
pub fn alive(pid: i32, ticks: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let mut fields = stat[close + 1..].split_whitespace();
    if fields.next() == Some("Z") {
        return false;
    }
    match ticks {
        Some(t) => start_ticks(pid) == Some(t),
        None => true,
    }
}

/// SIGTERM the process group led by `pid`, wait up to `grace`, then SIGKILL it.
pub async fn terminate_group(pid: i32, grace: Duration, mut exited: impl FnMut() -> bool) {
    let group = Pid::from_raw(pid);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if exited() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Also reaps stragglers the leader left behind in its group.
    let _ = killpg(group, Signal::SIGKILL);
}

/// Interleaved stdout+stderr, the first `limit` bytes kept.
struct Capture {
    kept: Vec<u8>,
    dropped: u64,
    limit: usize,
}

impl Capture {
    fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.kept.len());
        let take = room.min(chunk.len());
        self.kept.extend_from_slice(&chunk[..take]);
        self.dropped += (chunk.len() - take) as u64;
    }
}

async fn drain(mut pipe: impl tokio::io::AsyncRead + Unpin, capture: Arc<Mutex<Capture>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut c) = capture.lock() {
                    c.push(&buf[..n]);
                }
            }
        }
    }
}

fn failed(error: String) -> RunOutcome {
    RunOutcome {
        status: status::FAILED,
        exit_code: None,
        error: Some(error),
        output: Vec::new(),
        output_dropped_bytes: 0,
    }
}

enum Stop {
    Exited(std::process::ExitStatus),
    TimedOut,
    Killed,
    WaitFailed(String),
}

async fn run_job(
    job: Job,
    config: Arc<PoolConfig>,
    kill: CancellationToken,
    shutdown: CancellationToken,
    events: mpsc::Sender<PoolEvent>,
) {
    let Job {
        task_id,
        run_id,
        spec,
    } = job;
    let argv = match argv_for(&spec, &config) {
        Ok(argv) => argv,
        Err(e) => {
            let _ = events
                .send(PoolEvent::Finished {
                    task_id,
                    run_id,
                    outcome: failed(e),
                })
                .await;
            return;
        }
    };
    let run = ProcessRun {
        task_id,
        run_id,
        argv,
        timeout: Duration::from_millis(u64::try_from(spec.timeout_ms).unwrap_or(0)),
        grace: config.grace,
        output_bytes_max: config.output_bytes_max,
        kill,
        shutdown,
        events,
    };
    config.processes.run(run).await;
}

async fn run_os_process(run: ProcessRun) {
    let ProcessRun {
        task_id,
        run_id,
        argv,
        timeout,
        grace,
        output_bytes_max,
        kill,
        shutdown,
        events,
    } = run;
    let finish = |outcome| PoolEvent::Finished {
        task_id: task_id.clone(),
        run_id,
        outcome,
    };
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = events
                .send(finish(failed(format!("start {}: {e}", argv[0]))))
                .await;
            return;
        }
    };
    let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let _ = events
        .send(PoolEvent::Started {
            task_id: task_id.clone(),
            run_id,
            pid,
            pid_start_ticks: start_ticks(pid),
        })
        .await;
    let capture = Arc::new(Mutex::new(Capture {
        kept: Vec::new(),
        dropped: 0,
        limit: output_bytes_max,
    }));
    let readers = {
        let (out, err) = (child.stdout.take(), child.stderr.take());
        let (c1, c2) = (capture.clone(), capture.clone());
        async move {
            let a = async {
                if let Some(o) = out {
                    drain(o, c1).await;
                }
            };
            let b = async {
                if let Some(e) = err {
                    drain(e, c2).await;
                }
            };
            tokio::join!(a, b);
        }
    };
    let supervise = async {
        let stop = tokio::select! {
            r = child.wait() => match r {
                Ok(s) => Stop::Exited(s),
                Err(e) => Stop::WaitFailed(e.to_string()),
            },
            _ = tokio::time::sleep(timeout) => Stop::TimedOut,
            _ = kill.cancelled() => Stop::Killed,
        };
        match stop {
            Stop::TimedOut | Stop::Killed => {
                terminate_group(pid, grace, || matches!(child.try_wait(), Ok(Some(_)))).await;
                let _ = child.wait().await;
                stop
            }
            other => {
                // The leader is gone; whatever it left in its group goes too.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                other
            }
        }
    };
    let (stop, ()) = tokio::join!(supervise, readers);
    let (kept, dropped) = match capture.lock() {
        Ok(mut c) => (std::mem::take(&mut c.kept), c.dropped),
        Err(_) => (Vec::new(), 0),
    };
    let mut outcome = match stop {
        Stop::Exited(s) if s.success() => RunOutcome {
            status: status::DONE,
            exit_code: Some(0),
            error: None,
            output: Vec::new(),
            output_dropped_bytes: 0,
        },
        Stop::Exited(s) => {
            use std::os::unix::process::ExitStatusExt;
            let error = match (s.code(), s.signal()) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "ended abnormally".into(),
            };
            RunOutcome {
                exit_code: s.code(),
                ..failed(error)
            }
        }
        Stop::TimedOut => failed(format!(
            "timed out after {}; process group terminated",
            humantime::format_duration(timeout)
        )),
        Stop::Killed if shutdown.is_cancelled() => RunOutcome {
            status: status::ABORTED,
            ..failed("the agent is shutting down; process group terminated".into())
        },
        Stop::Killed => failed("stopped on request; process group terminated".into()),
        Stop::WaitFailed(e) => failed(format!("wait for the process: {e}")),
    };
    outcome.output = kept;
    outcome.output_dropped_bytes = dropped;
    let _ = events.send(finish(outcome)).await;
}

/// Run jobs until `commands` closes or `shutdown` fires; on shutdown every running group is
/// terminated and reported `aborted`.
pub async fn run_pool(
    config: PoolConfig,
    mut commands: mpsc::Receiver<PoolCommand>,
    events: mpsc::Sender<PoolEvent>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let mut jobs = JoinSet::new();
    let mut kills: BTreeMap<i64, CancellationToken> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                if let Ok(run_id) = done {
                    kills.remove(&run_id);
                }
            }
            command = commands.recv() => match command {
                None => break,
                Some(PoolCommand::Run(job)) => {
                    let kill = shutdown.child_token();
                    kills.insert(job.run_id, kill.clone());
                    let run_id = job.run_id;
                    let run = run_job(job, config.clone(), kill, shutdown.clone(), events.clone());
                    jobs.spawn(async move {
                        run.await;
                        run_id
                    });
                }
                Some(PoolCommand::Kill { run_id }) => {
                    if let Some(token) = kills.remove(&run_id) {
                        token.cancel();
                    }
                }
            },
        }
    }
    // Shutdown: the child tokens fired with `shutdown`; let every run report its end.
    while jobs.join_next().await.is_some() {}
}
