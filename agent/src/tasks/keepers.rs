//! The agent's side of the run keepers ([`super::keeper`]): starts them as runs need them,
//! lends each to one run at a time, holds it while that run's end is being committed (the
//! keeper keeps the end until then), and retires keepers idle for [`IDLE_RETIRE`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::keeper::{PROTOCOL, Reply, Request};
use super::rundir::Exit;

/// How long a keeper has to answer (its hello, or a run's start).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// A keeper idle this long is retired.
const IDLE_RETIRE: Duration = Duration::from_secs(60);
/// Output bytes a keeper may announce: the largest limit the config allows, with room.
const OUTPUT_ANNOUNCED_MAX: u64 = 65 << 20;

/// A command's pid and start ticks.
pub type StartedAs = (i32, Option<u64>);

/// What a keeper said about its run.
#[derive(Debug)]
pub enum Heard {
    Started {
        pid: i32,
        ticks: Option<u64>,
    },
    /// `started`: the command's pid and start ticks, when no `Started` came before.
    Exited {
        exit: Exit,
        output: Vec<u8>,
        started: Option<StartedAs>,
    },
    /// It is gone (or talks nonsense): its slot says what became of the run.
    Gone(String),
}

/// One keeper, lent to one run at a time.
#[derive(Debug)]
pub struct Link {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: i32,
    /// Its slot file.
    pub slot: PathBuf,
    /// A reply line read so far (kept here so a read cut short by `select!` loses nothing).
    line: Vec<u8>,
    /// An `Exited` whose output is still being read: the end, the bytes wanted, the start.
    exited: Option<(Exit, u64, Option<StartedAs>)>,
    output: Vec<u8>,
    idle_since: tokio::time::Instant,
}

impl Link {
    pub async fn send(&mut self, request: &Request) -> Result<(), String> {
        let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        line.push(b'\n');
        match tokio::time::timeout(ANSWER_TIMEOUT, self.stdin.write_all(&line)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("send to the run keeper: {e}")),
            Err(_) => Err(format!(
                "the run keeper took no request for {} s",
                ANSWER_TIMEOUT.as_secs()
            )),
        }
    }

    /// The keeper's next word. Cancel-safe: what was read stays for the next call.
    pub async fn next(&mut self) -> Heard {
        loop {
            if let Some((_, want, _)) = &self.exited {
                let missing = want.saturating_sub(self.output.len() as u64);
                if missing > 0 {
                    let mut part = (&mut self.stdout).take(missing);
                    match part.read_buf(&mut self.output).await {
                        Ok(0) | Err(_) => return Heard::Gone("its output ended".into()),
                        Ok(_) => continue,
                    }
                }
                let Some((exit, _, started)) = self.exited.take() else {
                    continue;
                };
                return Heard::Exited {
                    exit,
                    output: std::mem::take(&mut self.output),
                    started,
                };
            }
            match self.stdout.read_until(b'\n', &mut self.line).await {
                Ok(0) | Err(_) => return Heard::Gone("it ended".into()),
                Ok(_) if !self.line.ends_with(b"\n") => return Heard::Gone("it ended".into()),
                Ok(_) => {}
            }
            let reply = serde_json::from_slice::<Reply>(&self.line);
            self.line.clear();
            match reply {
                Ok(Reply::Started { pid, ticks, .. }) => return Heard::Started { pid, ticks },
                Ok(Reply::Exited {
                    exit,
                    output,
                    pid,
                    ticks,
                    ..
                }) if output <= OUTPUT_ANNOUNCED_MAX => {
                    self.output = Vec::with_capacity(output as usize);
                    self.exited = Some((exit, output, pid.map(|pid| (pid, ticks))));
                }
                Ok(Reply::Hello { .. }) => {}
                Ok(other) => return Heard::Gone(format!("it said {other:?}")),
                Err(e) => return Heard::Gone(format!("unreadable answer: {e}")),
            }
        }
    }

    /// Stop the keeper (SIGKILL; it is this agent's child, so its pid is still its own) and
    /// wait for its end.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, self.child.wait()).await;
    }

    /// Tell an idle keeper to exit, and reap it.
    async fn retire(mut self) {
        if self.send(&Request::Retire).await.is_ok() {
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, self.child.wait()).await;
        } else {
            self.kill().await;
        }
    }
}

/// The keepers of one agent.
#[derive(Debug)]
pub struct Keepers {
    /// The agent binary, whose `keeper` subcommand is the keeper.
    exe: PathBuf,
    /// `DATA_DIR/keepers`, where their slots are.
    pub dir: PathBuf,
    state: Mutex<Lent>,
    /// The background retirement runs.
    retiring: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct Lent {
    idle: Vec<Link>,
    /// Keepers whose run ended and whose end is not committed yet, by run id.
    holding: BTreeMap<i64, Link>,
}

impl Keepers {
    pub fn new(exe: PathBuf, dir: PathBuf) -> Keepers {
        Keepers {
            exe,
            dir,
            state: Mutex::new(Lent::default()),
            retiring: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lent(&self) -> std::sync::MutexGuard<'_, Lent> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pids of the keepers this agent holds (idle, or keeping an end until its commit):
    /// recovery leaves them alone. Every other live keeper is a previous agent's, or one whose
    /// run this agent let go of (its pool was restarted).
    pub fn kept(&self) -> Vec<i32> {
        let lent = self.lent();
        lent.idle
            .iter()
            .chain(lent.holding.values())
            .map(|l| l.pid)
            .collect()
    }

    /// Start a keeper ahead of the first run, so that run does not wait for one to start.
    pub async fn warm(&self) {
        if !self.lent().idle.is_empty() {
            return;
        }
        match self.spawn().await {
            Ok(link) => self.lent().idle.push(link),
            Err(error) => tracing::warn!(%error, "start a run keeper ahead of the first run"),
        }
    }

    /// An idle keeper, or a new one.
    pub async fn take(&self) -> Result<Link, String> {
        let idle = self.lent().idle.pop();
        match idle {
            Some(link) => Ok(link),
            None => self.spawn().await,
        }
    }

    /// `link`'s run `run_id` ended: hold it until the end is committed.
    pub fn hold(&self, run_id: i64, link: Link) {
        self.lent().holding.insert(run_id, link);
    }

    /// Run `run_id`'s end is committed: its keeper (if this agent lent it) is idle again; the
    /// next `Start` it gets acknowledges the end. Whether the run had a keeper here.
    pub fn release(&self, run_id: i64) -> bool {
        let mut lent = self.lent();
        match lent.holding.remove(&run_id) {
            Some(mut link) => {
                link.idle_since = tokio::time::Instant::now();
                lent.idle.push(link);
                true
            }
            None => false,
        }
    }

    /// Retire the keepers idle for [`IDLE_RETIRE`], until none is idle: run by the agent
    /// beside its runs (see [`Keepers::retire_idle`]).
    async fn retire_stale(&self) {
        loop {
            let (stale, next) = {
                let mut lent = self.lent();
                // The oldest idle keepers are at the front (taken from the back).
                let n = lent
                    .idle
                    .iter()
                    .take_while(|l| l.idle_since.elapsed() >= IDLE_RETIRE)
                    .count();
                let stale: Vec<Link> = lent.idle.drain(..n).collect();
                (stale, lent.idle.first().map(|l| l.idle_since + IDLE_RETIRE))
            };
            for link in stale {
                link.retire().await;
            }
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => tokio::time::sleep(IDLE_RETIRE).await,
            }
        }
    }

    /// Start retiring idle keepers in the background (once; the task ends with the runtime).
    pub fn retire_idle(self: &std::sync::Arc<Self>) {
        if self
            .retiring
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let this = std::sync::Arc::clone(self);
        tokio::spawn(async move { this.retire_stale().await });
    }

    async fn spawn(&self) -> Result<Link, String> {
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("keeper")
            .arg("--dir")
            .arg(&self.dir)
            // Not in the agent's group: a Ctrl+C at the agent's terminal is the agent's to
            // handle; a keeper ends when the agent's end of its pipe closes.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start a run keeper {}: {e}", self.exe.display()))?;
        let (Some(stdin), Some(stdout), Some(pid)) =
            (child.stdin.take(), child.stdout.take(), child.id())
        else {
            return Err("a run keeper's pipes are missing".into());
        };
        let pid = i32::try_from(pid).unwrap_or(0);
        let mut link = Link {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            pid,
            slot: super::slot::path(&self.dir, pid, super::process::start_ticks(pid)),
            line: Vec::new(),
            exited: None,
            output: Vec::new(),
            idle_since: tokio::time::Instant::now(),
        };
        let mut hello = Vec::new();
        let read = tokio::time::timeout(ANSWER_TIMEOUT, link.stdout.read_until(b'\n', &mut hello));
        let protocol = match read.await {
            Ok(Ok(_)) => match serde_json::from_slice::<Reply>(&hello) {
                Ok(Reply::Hello { protocol }) => protocol,
                _ => 0,
            },
            _ => 0,
        };
        if protocol != PROTOCOL {
            link.kill().await;
            return Err(format!(
                "a run keeper did not start (it said {:?})",
                String::from_utf8_lossy(&hello).trim()
            ));
        }
        Ok(link)
    }
}
