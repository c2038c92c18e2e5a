//! The run launcher: one long-lived helper process (`outpost-agent launcher`) that starts every
//! run's wrapper by forking itself, so a run costs one `fork` instead of executing the agent
//! binary again (loading it, relocating it, initialising the C library: about three times what
//! the command itself costs when it is short).
//!
//! The agent starts the launcher on the first run, in a process group of its own, and talks to
//! it over its stdin and stdout in JSON lines: a [`Request`] per run, answered by
//! [`Reply::Started`] (the wrapper's pid and start time) or [`Reply::Failed`]; later
//! [`Reply::Exited`] when the launcher reaps that wrapper. A wrapper's `Started` always comes
//! before its `Exited` on the one stream, so a pid is never mistaken for a reused one.
//!
//! The launcher is single-threaded by construction: it starts no runtime, no logger and no
//! thread, which is what makes running ordinary Rust code (the wrapper, [`super::wrapper`]) in
//! a forked child sound. It ends when the agent does (its stdin reaches end of file); the
//! wrappers it forked are their own process groups and live on, as runs must: the next agent
//! adopts them through their run directories exactly as before. If the launcher dies, runs in
//! flight are watched through `/proc` like adopted ones and the next run starts a new
//! launcher.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, setpgid};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use super::process::Environment;

/// One run to start.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    /// The run's directory (`DATA_DIR/runs/RUN_ID`), created by the agent.
    pub dir: PathBuf,
    /// Output bytes kept; the rest is counted.
    pub output_max: u64,
    pub argv: Vec<String>,
    /// The command's environment: the launcher's own (which is the agent's) unless cleared,
    /// with these set on top.
    pub env_clear: bool,
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// The wrapper of request `id` is process `pid`, started at `ticks` (clock ticks since
    /// boot), leading its own process group.
    Started {
        id: u64,
        pid: i32,
        ticks: Option<u64>,
    },
    /// Request `id` could not be started.
    Failed { id: u64, error: String },
    /// The wrapper `pid` ended and was reaped.
    Exited { pid: i32 },
}

/// A request line longer than this is refused (argv and environment are the agent's own).
const REQUEST_BYTES_MAX: usize = 1024 * 1024;

/// `outpost-agent launcher`: serve requests on stdin until it ends. Call only from a process
/// that has started no thread (the binary's `main`, before anything else).
pub fn serve() -> std::io::Result<()> {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.thread_block().map_err(std::io::Error::other)?;
    let exits = SignalFd::with_flags(&chld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(std::io::Error::other)?;
    let mut input = BufReader::new(std::fs::File::from(
        std::io::stdin().as_fd().try_clone_to_owned()?,
    ));
    let mut out = std::io::stdout().lock();
    let mut line = Vec::new();
    loop {
        // Lines already buffered are served before waiting: poll only sees the pipe.
        if !input.buffer().contains(&b'\n') {
            let (requests, exited) = {
                let mut fds = [
                    PollFd::new(input.get_ref().as_fd(), PollFlags::POLLIN),
                    PollFd::new(exits.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            if exited {
                while let Ok(Some(_)) = exits.read_signal() {}
                reap(&mut out)?;
            }
            if !requests {
                continue;
            }
        }
        line.clear();
        let read = (&mut input)
            .take(REQUEST_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            // The agent is gone (or closed the pipe): so is the launcher. Its wrappers stay.
            return Ok(());
        }
        let reply = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => start(request),
            Err(e) => {
                // Nothing to answer to: the agent never sends this. Say so and go on.
                eprintln!("launcher: unreadable request ({} bytes): {e}", line.len());
                continue;
            }
        };
        send(&mut out, &reply)?;
    }
}

fn send(out: &mut impl Write, reply: &Reply) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    text.push(b'\n');
    out.write_all(&text)?;
    out.flush()
}

/// Reap every wrapper that ended and report it.
fn reap(out: &mut impl Write) -> std::io::Result<()> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => {
                send(out, &Reply::Exited { pid: pid.as_raw() })?;
            }
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return Ok(()),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Fork the wrapper of `request`.
fn start(request: Request) -> Reply {
    let id = request.id;
    // SAFETY: `serve` runs in a process that started no thread (see the module's doc), so the
    // child is a complete copy of a single-threaded process: no lock is held by a thread that
    // does not exist there, and it may allocate, start threads and run the wrapper.
    #[allow(unsafe_code)]
    let forked = unsafe { fork() };
    match forked {
        Ok(ForkResult::Child) => {
            // The signal descriptor stays open here (close-on-exec keeps it from the command).
            let code = match wrapper_child(&request) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: run directory {}: {e}", request.dir.display());
                    1
                }
            };
            std::process::exit(code)
        }
        Ok(ForkResult::Parent { child }) => {
            crate::crashpoint::pass(crate::crashpoint::AFTER_FORK);
            Reply::Started {
                id,
                pid: child.as_raw(),
                // Read before this process can reap it: the pid is still this wrapper's.
                ticks: super::process::start_ticks(child.as_raw()),
            }
        }
        Err(e) => Reply::Failed {
            id,
            error: format!("fork the run's wrapper: {e}"),
        },
    }
}

/// In the forked child: become the run's process group, let go of the launcher's pipes and
/// signal mask, and run the wrapper.
fn wrapper_child(request: &Request) -> std::io::Result<()> {
    setpgid(Pid::from_raw(0), Pid::from_raw(0)).map_err(std::io::Error::other)?;
    // The pipes to the agent must not be held by a process that outlives it.
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null).map_err(std::io::Error::other)?;
    nix::unistd::dup2_stdout(&null).map_err(std::io::Error::other)?;
    nix::unistd::dup2_stderr(&null).map_err(std::io::Error::other)?;
    let env = Environment {
        clear: request.env_clear,
        vars: request.env.clone(),
    };
    super::wrapper::supervise(&request.dir, request.output_max, &request.argv, &env)
}

/// The agent's side: starts the launcher when needed and matches its answers to the runs.
#[derive(Debug)]
pub struct Launcher {
    exe: PathBuf,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

#[derive(Debug)]
struct Conn {
    stdin: tokio::process::ChildStdin,
    pid: Option<u32>,
    next_id: u64,
    shared: Arc<Mutex<Shared>>,
}

impl Conn {
    fn give_up(&self, id: u64) {
        give_up(self.pid, &self.shared, id);
    }
}

/// Stop using the launcher `pid` (it is killed; its wrappers are not) and forget request `id`:
/// the caller looks at the run's directory for what became of it.
fn give_up(pid: Option<u32>, shared: &Mutex<Shared>, id: u64) {
    let Ok(mut shared) = shared.lock() else {
        return;
    };
    shared.waiting.remove(&id);
    // Until its reader saw the end (and set `gone`) the launcher is not reaped, so its pid
    // is still its own.
    if !std::mem::replace(&mut shared.gone, true)
        && let Some(pid) = pid.and_then(|p| i32::try_from(p).ok())
    {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// What the reader of the launcher's answers and the runs share.
#[derive(Debug, Default)]
struct Shared {
    /// Requests waiting for their answer.
    waiting: BTreeMap<u64, oneshot::Sender<Result<Started, String>>>,
    /// Wrappers this launcher started that have not ended, by pid.
    running: BTreeMap<i32, oneshot::Sender<()>>,
    /// The launcher's output ended.
    gone: bool,
}

/// A wrapper the launcher started.
#[derive(Debug)]
pub struct Started {
    pub pid: i32,
    pub ticks: Option<u64>,
    /// Resolves when the launcher reaped it; an error when the launcher went away first (the
    /// wrapper may still run: look at `/proc`).
    pub ended: oneshot::Receiver<()>,
}

/// How long the launcher has to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl Launcher {
    /// `exe`: the agent binary, whose `launcher` subcommand is the launcher.
    pub fn new(exe: PathBuf) -> Launcher {
        Launcher {
            exe,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Start the wrapper of run directory `dir` for `argv`.
    pub async fn start(
        &self,
        dir: &Path,
        output_max: u64,
        argv: &[String],
        env: &Environment,
    ) -> Result<Started, String> {
        // The request goes out under the lock (lines must not interleave); the answer is
        // awaited without it.
        let answer = {
            let mut conn = self.conn.lock().await;
            let dead = conn
                .as_ref()
                .is_none_or(|c| c.shared.lock().map_or(true, |s| s.gone));
            if dead {
                if let Some(old) = conn.as_ref() {
                    tracing::warn!(
                        pid = old.pid,
                        "the run launcher ended; starting a new one (runs in flight are watched through /proc)"
                    );
                }
                *conn = Some(self.spawn()?);
            }
            let Some(c) = conn.as_mut() else {
                return Err("the run launcher is not running".into());
            };
            c.next_id += 1;
            let request = Request {
                id: c.next_id,
                dir: dir.to_path_buf(),
                output_max,
                argv: argv.to_vec(),
                env_clear: env.clear,
                env: env.vars.clone(),
            };
            let (tx, rx) = oneshot::channel();
            if let Ok(mut shared) = c.shared.lock() {
                shared.waiting.insert(request.id, tx);
            }
            let mut line = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
            line.push(b'\n');
            let sent = tokio::time::timeout(ANSWER_TIMEOUT, c.stdin.write_all(&line)).await;
            let failed = match sent {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("send the run to the launcher: {e}")),
                Err(_) => Some(format!(
                    "the run launcher took no request for {} s",
                    ANSWER_TIMEOUT.as_secs()
                )),
            };
            if let Some(error) = failed {
                c.give_up(request.id);
                return Err(error);
            }
            (rx, request.id, c.pid, Arc::clone(&c.shared))
        };
        let (rx, id, pid, shared) = answer;
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(started)) => started,
            Ok(Err(_)) => Err("the run launcher ended before it answered".into()),
            Err(_) => {
                // A launcher that hangs is replaced: the next run starts a new one.
                give_up(pid, &shared, id);
                Err(format!(
                    "the run launcher did not answer within {} s",
                    ANSWER_TIMEOUT.as_secs()
                ))
            }
        }
    }

    fn spawn(&self) -> Result<Conn, String> {
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("launcher")
            // Not in the agent's group: a Ctrl+C at the agent's terminal is the agent's to
            // handle; the launcher ends when the agent's end of the pipe closes.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start the run launcher {}: {e}", self.exe.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the run launcher's pipes are missing".into());
        };
        let pid = child.id();
        let shared = Arc::new(Mutex::new(Shared::default()));
        tokio::spawn(read_answers(child, stdout, Arc::clone(&shared)));
        Ok(Conn {
            stdin,
            pid,
            next_id: 0,
            shared,
        })
    }
}

/// Deliver the launcher's answers until its output ends; then fail what still waits.
async fn read_answers(
    mut child: tokio::process::Child,
    stdout: tokio::process::ChildStdout,
    shared: Arc<Mutex<Shared>>,
) {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Reply>(&line) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable answer from the run launcher; ignored");
                continue;
            }
        };
        let Ok(mut shared) = shared.lock() else { break };
        match reply {
            Reply::Started { id, pid, ticks } => {
                let (tx, ended) = oneshot::channel();
                shared.running.insert(pid, tx);
                if let Some(waiting) = shared.waiting.remove(&id) {
                    let _ = waiting.send(Ok(Started { pid, ticks, ended }));
                }
            }
            Reply::Failed { id, error } => {
                if let Some(waiting) = shared.waiting.remove(&id) {
                    let _ = waiting.send(Err(error));
                }
            }
            Reply::Exited { pid } => {
                if let Some(running) = shared.running.remove(&pid) {
                    let _ = running.send(());
                }
            }
        }
    }
    if let Ok(mut shared) = shared.lock() {
        shared.gone = true;
        // Dropping the senders tells every waiter.
        shared.waiting.clear();
        shared.running.clear();
    }
    match child.wait().await {
        Ok(status) if status.success() => {}
        Ok(status) => tracing::warn!(%status, "the run launcher ended"),
        Err(e) => tracing::warn!(error = %e, "the run launcher ended; its status is unknown"),
    }
}
