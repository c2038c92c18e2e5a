//! The run keeper (`outpost-agent keeper`): a small, single-threaded process that runs task
//! commands for the agent, one at a time, run after run. It starts each command itself (a
//! process group of its own, no signal blocked, stdin from `/dev/null`, stdout and stderr
//! into one pipe), copies the output into its slot file ([`super::slot`]) up to the limit and
//! counts the rest, reaps the command, and records how it ended in the slot before it tells
//! the agent. So a run costs no process but its command's, and no file but a rewrite of the
//! slot's header.
//!
//! The agent starts keepers as it needs them (in process groups of their own: a Ctrl+C at the
//! agent's terminal is the agent's to handle) and talks to each over its stdin and stdout:
//! JSON lines [`Request`] in, [`Reply`] out, an `Exited` line followed by the kept output's
//! bytes. A run's end stays in the slot until the agent acknowledges it, which the next
//! `Start` (or `Retire`) does: the agent sends neither before the end is in its task store.
//!
//! When the agent is gone (stdin reaches its end) the keeper marks its slot drained, finishes
//! the run it has, records it and exits; the next agent reads the slot. Per run, in order:
//! the pipe is made and `intent` written (with the pipe's inode), the command is spawned,
//! `running` is written (its pid and start time; the agent hears of it 20 ms later, or with
//! the end of a shorter command), the output is copied, the command is
//! reaped (its group's stragglers get [`STRAGGLERS`] to close the pipe, then SIGKILL) and
//! `ended` is written. A kill -9 of the keeper at any of these instants leaves a slot that
//! says which processes may still run the command; see `OsProcesses` in [`super::pool`].

use std::fs::File;
use std::io::{Read, Write};

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::rundir::{DROPPED_STEP, Exit};
use super::slot::{self, HEADER_BYTES, Header, State};

/// The agent ⇄ keeper protocol this build speaks. Additions keep it; a change an older keeper
/// cannot follow raises it, and the agent then starts keepers of its own version (an older
/// keeper finishes its run and exits; nothing is asked of it).
pub const PROTOCOL: u32 = 1;

/// What the agent asks of a keeper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// Run `argv`. Also acknowledges the previous run's end.
    Start {
        run_id: i64,
        /// Output bytes kept; the rest is counted.
        output_max: u64,
        argv: Vec<String>,
        /// The command's environment: the keeper's own (which is the agent's) unless cleared,
        /// with these set on top.
        env_clear: bool,
        env: Vec<(String, String)>,
        /// The user the command runs as, when not the agent's: its group is signalled as
        /// that user too.
        run_uid: Option<u32>,
    },
    /// Acknowledge the previous run's end and exit.
    Retire,
}

/// What a keeper tells the agent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// Ready for runs: the protocol it speaks.
    Hello { protocol: u32 },
    /// Run `run_id`'s command is `pid` (started at `ticks`), leading its own process group.
    /// Sent [`ANNOUNCE_AFTER`] after the start, if the command still runs then (a short
    /// command's `Exited` says it all, saving the agent a message and a store update).
    Started {
        run_id: i64,
        pid: i32,
        ticks: Option<u64>,
    },
    /// Run `run_id` ended (or could not start: `exit.error`); `output` bytes follow the line.
    /// `pid` and `ticks` when no `Started` was sent for it.
    Exited {
        run_id: i64,
        exit: Exit,
        output: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ticks: Option<u64>,
    },
}

/// A command still running this long after its start is announced (`Started`).
pub const ANNOUNCE_AFTER: Duration = Duration::from_millis(20);
/// How long output still held open by the command's leftovers is read after it exited.
pub const STRAGGLERS: Duration = Duration::from_secs(2);
/// A request line longer than this ends the keeper (argv and environment are the agent's own).
const REQUEST_BYTES_MAX: usize = 1024 * 1024;

/// The run in hand.
struct Current {
    run_id: i64,
    pid: Pid,
    ticks: Option<u64>,
    /// When to announce the start (monotonic), until it is.
    announce_at: Option<Duration>,
    run_uid: Option<u32>,
    /// The output pipe's read end, until its end.
    pipe: Option<File>,
    output_max: u64,
    output: Vec<u8>,
    dropped: u64,
    noted: u64,
    /// How it ended, once it did (the leader is not reaped before the group is stopped).
    exit: Option<Exit>,
    /// When it ended (monotonic), for the stragglers' allowance.
    ended_at: Option<Duration>,
}

/// `outpost-agent keeper`: run what the agent asks until it is gone. `dir` holds the slots.
pub fn serve(dir: &Path) -> std::io::Result<()> {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    // Ignored (blocked; every command starts with no signal blocked): a keeper ends when its
    // work is done, not on a terminal's hangup, a Ctrl+C or a SIGTERM meant for the agent, nor
    // on the hangup the kernel sends a stopped process whose agent died.
    let mut ignored = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        ignored.add(sig);
    }
    ignored.thread_block().map_err(std::io::Error::other)?;
    chld.thread_block().map_err(std::io::Error::other)?;
    let exits = SignalFd::with_flags(&chld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(std::io::Error::other)?;
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let path = slot::path(dir, me, super::process::start_ticks(me));
    let mut keeper = Keeper {
        slot: slot::create(&path)?,
        path,
        header: Header::new(State::Idle),
        used: false,
        out: File::from(std::io::stdout().as_fd().try_clone_to_owned()?),
        current: None,
    };
    keeper.send(&Reply::Hello { protocol: PROTOCOL }, &[])?;
    let mut input = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut pending = Vec::new();
    let mut open = true;
    loop {
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            crate::crashpoint::delay(crate::crashpoint::KEEPER_BEFORE_REQUEST);
            match serde_json::from_slice::<Request>(&line) {
                Ok(Request::Retire) if keeper.current.is_none() => {
                    let _ = std::fs::remove_file(&keeper.path);
                    return Ok(());
                }
                Ok(Request::Start {
                    run_id,
                    output_max,
                    argv,
                    env_clear,
                    env,
                    run_uid,
                }) if keeper.current.is_none() => {
                    let env = super::process::Environment {
                        clear: env_clear,
                        vars: env,
                    };
                    keeper.start(run_id, output_max, &argv, &env, run_uid)?;
                }
                // The agent never sends these: say so and go on.
                Ok(request) => eprintln!("keeper: {request:?} while a run is in hand; ignored"),
                Err(e) => eprintln!("keeper: unreadable request ({} bytes): {e}", line.len()),
            }
        }
        if pending.len() > REQUEST_BYTES_MAX {
            return Err(std::io::Error::other("a request longer than 1 MiB"));
        }
        if !open && keeper.current.is_none() {
            // The agent is gone: a recorded end stays in the slot for the next one.
            if keeper.header.state == State::Idle {
                let _ = std::fs::remove_file(&keeper.path);
            }
            return Ok(());
        }
        let ready = keeper.wait(open.then_some(&input), &exits)?;
        if ready.input {
            let mut chunk = [0u8; 64 * 1024];
            match input.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    open = false;
                    keeper.header.drained = true;
                    slot::write(&keeper.slot, &keeper.header)?;
                }
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        }
        if ready.exits {
            while let Ok(Some(_)) = exits.read_signal() {}
        }
        keeper.progress(ready.pipe)?;
    }
}

struct Keeper {
    slot: File,
    path: std::path::PathBuf,
    header: Header,
    /// The slot holds output beyond its header.
    used: bool,
    /// The agent's end: stdout, unbuffered (each reply is one write).
    out: File,
    current: Option<Current>,
}

/// Which descriptors [`Keeper::wait`] found ready.
struct Ready {
    input: bool,
    exits: bool,
    pipe: bool,
}

fn monotonic() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default()
}

impl Keeper {
    fn send(&mut self, reply: &Reply, bytes: &[u8]) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
        line.push(b'\n');
        // One write for a short reply; a long output is not copied again.
        let small = bytes.len() <= 64 * 1024;
        if small {
            line.extend_from_slice(bytes);
        }
        // The agent may be gone: what it would have read is in the slot.
        let _ = self.out.write_all(&line).and_then(|()| match small {
            true => Ok(()),
            false => self.out.write_all(bytes),
        });
        Ok(())
    }

    fn record(&mut self, state: State) -> std::io::Result<()> {
        self.header.state = state;
        slot::write(&self.slot, &self.header)
    }

    /// Wait for a request, a child's end or output (or the stragglers' allowance to run out).
    fn wait(&self, input: Option<&File>, exits: &SignalFd) -> std::io::Result<Ready> {
        let current = self.current.as_ref();
        let pipe = current.and_then(|c| c.pipe.as_ref());
        let now = monotonic();
        let until = |at: Duration| at.saturating_sub(now);
        let left = [
            current
                .and_then(|c| c.ended_at)
                .map(|at| until(at + STRAGGLERS)),
            current.and_then(|c| c.announce_at).map(until),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = match left {
            Some(left) => PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
                .unwrap_or(PollTimeout::NONE),
            None => PollTimeout::NONE,
        };
        let mut fds = vec![PollFd::new(exits.as_fd(), PollFlags::POLLIN)];
        if let Some(input) = input {
            fds.push(PollFd::new(input.as_fd(), PollFlags::POLLIN));
        }
        if let Some(pipe) = pipe {
            fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready = |i: usize| {
            fds.get(i)
                .and_then(|fd| fd.revents())
                .is_some_and(|r| !r.is_empty())
        };
        Ok(Ready {
            exits: ready(0),
            input: input.is_some() && ready(1),
            pipe: pipe.is_some() && ready(1 + usize::from(input.is_some())),
        })
    }

    /// Start run `run_id`; a command that cannot start ends the run at once, with the reason.
    fn start(
        &mut self,
        run_id: i64,
        output_max: u64,
        argv: &[String],
        env: &super::process::Environment,
        run_uid: Option<u32>,
    ) -> std::io::Result<()> {
        if std::mem::take(&mut self.used) {
            self.slot.set_len(HEADER_BYTES)?;
        }
        self.header.dropped = 0;
        let Some((program, args)) = argv.split_first() else {
            return self.refuse(run_id, "nothing to run".into());
        };
        let (reader, writer) = std::io::pipe()?;
        let pipe = File::from(std::os::fd::OwnedFd::from(reader));
        let ino = {
            use std::os::unix::fs::MetadataExt;
            pipe.metadata()?.ino()
        };
        self.record(State::Intent { run_id, pipe: ino })?;
        crate::crashpoint::pass(crate::crashpoint::KEEPER_AFTER_INTENT);
        let spawned = spawn(program, args, env, &writer);
        drop(writer);
        let pid = match spawned {
            Ok(pid) => pid.as_raw(),
            Err(e) => return self.refuse(run_id, format!("start {program}: {e}")),
        };
        crate::crashpoint::pass(crate::crashpoint::KEEPER_AFTER_SPAWN);
        // Not reaped before the group is stopped, so the pid stays this command's.
        let ticks = super::process::start_ticks(pid);
        self.record(State::Running {
            run_id,
            pipe: ino,
            pid,
            ticks,
        })?;
        self.current = Some(Current {
            run_id,
            pid: Pid::from_raw(pid),
            ticks,
            announce_at: Some(monotonic() + ANNOUNCE_AFTER),
            run_uid,
            pipe: Some(pipe),
            output_max,
            output: Vec::new(),
            dropped: 0,
            noted: 0,
            exit: None,
            ended_at: None,
        });
        Ok(())
    }

    /// End run `run_id` that never started a command.
    fn refuse(&mut self, run_id: i64, error: String) -> std::io::Result<()> {
        let exit = Exit {
            error: Some(error),
            ..Exit::default()
        };
        self.record(State::Ended {
            run_id,
            exit: exit.clone(),
        })?;
        self.send(
            &Reply::Exited {
                run_id,
                exit,
                output: 0,
                pid: None,
                ticks: None,
            },
            &[],
        )
    }

    /// Copy output, notice the command's end, and finish the run when both are done.
    fn progress(&mut self, readable: bool) -> std::io::Result<()> {
        let Some(current) = self.current.as_mut() else {
            return Ok(());
        };
        if readable && let Some(pipe) = current.pipe.as_mut() {
            let mut chunk = [0u8; 64 * 1024];
            match pipe.read(&mut chunk) {
                Ok(0) => current.pipe = None,
                Ok(n) => keep(current, &self.slot, &chunk[..n], &mut self.used),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => current.pipe = None,
            }
            if current.dropped >= current.noted + DROPPED_STEP {
                current.noted = current.dropped;
                self.header.dropped = current.dropped;
                slot::write(&self.slot, &self.header)?;
            }
        }
        let Some(current) = self.current.as_mut() else {
            return Ok(());
        };
        if current.exit.is_none() {
            // Seen, not reaped: the zombie keeps the pid, and with it the group's id, taken.
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            match waitid(Id::Pid(current.pid), flags) {
                Ok(WaitStatus::Exited(_, code)) => current.exit = Some(exited(Some(code), None)),
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    current.exit = Some(exited(None, Some(sig as i32)));
                }
                Ok(_) => {}
                Err(e) => {
                    current.exit = Some(Exit {
                        error: Some(format!("wait for the command: {e}")),
                        ..Exit::default()
                    });
                }
            }
            if current.exit.is_some() {
                current.ended_at = Some(monotonic());
            }
        }
        let done = match current.ended_at {
            Some(at) => current.pipe.is_none() || monotonic().saturating_sub(at) >= STRAGGLERS,
            None => false,
        };
        if done {
            return self.finish();
        }
        if current.announce_at.is_some_and(|at| monotonic() >= at) {
            current.announce_at = None;
            let (run_id, pid, ticks) = (current.run_id, current.pid.as_raw(), current.ticks);
            self.send(&Reply::Started { run_id, pid, ticks }, &[])?;
        }
        Ok(())
    }

    /// The command ended and its output is in: stop what it left in its group, reap it, record
    /// the end and tell the agent.
    fn finish(&mut self) -> std::io::Result<()> {
        let Some(current) = self.current.take() else {
            return Ok(());
        };
        crate::signal::killpg_as(current.pid, Signal::SIGKILL, current.run_uid);
        let _ = waitpid(current.pid, None);
        let exit = Exit {
            dropped: current.dropped,
            ..current.exit.unwrap_or_default()
        };
        crate::crashpoint::pass(crate::crashpoint::KEEPER_BEFORE_STATUS);
        self.header.dropped = current.dropped;
        self.record(State::Ended {
            run_id: current.run_id,
            exit: exit.clone(),
        })?;
        let unannounced = current.announce_at.is_some();
        let reply = Reply::Exited {
            run_id: current.run_id,
            exit,
            output: current.output.len() as u64,
            pid: unannounced.then_some(current.pid.as_raw()),
            ticks: current.ticks.filter(|_| unannounced),
        };
        self.send(&reply, &current.output)
    }
}

fn exited(code: Option<i32>, signal: Option<i32>) -> Exit {
    Exit {
        exit_code: code,
        signal,
        ..Exit::default()
    }
}

/// Keep what fits of `bytes` (in memory for the agent, in the slot for the next agent should
/// this one be gone); count the rest. A full disk cuts the slot's copy, not the agent's.
fn keep(current: &mut Current, slot: &File, bytes: &[u8], used: &mut bool) {
    let kept = current.output.len() as u64;
    let room = usize::try_from(current.output_max.saturating_sub(kept)).unwrap_or(usize::MAX);
    let take = room.min(bytes.len());
    if take > 0 {
        let _ = slot.write_all_at(&bytes[..take], HEADER_BYTES + kept);
        *used = true;
        current.output.extend_from_slice(&bytes[..take]);
    }
    current.dropped += (bytes.len() - take) as u64;
}

/// Start `program` with `args` and `env` as a process group of its own, with no signal
/// blocked and default dispositions (whatever this keeper blocks or ignores), stdin from
/// `/dev/null`, stdout and stderr into `output`. `posix_spawn` (a `vfork` in the C library):
/// nothing of this process is copied.
fn spawn(
    program: &str,
    args: &[String],
    env: &super::process::Environment,
    output: &impl AsRawFd,
) -> Result<Pid, String> {
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
    let cstring = |s: &str| CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"));
    let mut vars: Vec<(String, String)> = if env.clear {
        Vec::new()
    } else {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    };
    for (key, value) in &env.vars {
        vars.retain(|(k, _)| k != key);
        vars.push((key.clone(), value.clone()));
    }
    let path = vars
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let resolved = resolve(program, path.unwrap_or("/usr/bin:/bin"))?;
    let argv = std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(cstring)
        .collect::<Result<Vec<_>, _>>()?;
    let envp = vars
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?;
    let os = |e: nix::errno::Errno| std::io::Error::from(e).to_string();
    let mut actions = PosixSpawnFileActions::init().map_err(os)?;
    actions.add_dup2(null.as_raw_fd(), 0).map_err(os)?;
    actions.add_dup2(output.as_raw_fd(), 1).map_err(os)?;
    actions.add_dup2(output.as_raw_fd(), 2).map_err(os)?;
    let mut attr = PosixSpawnAttr::init().map_err(os)?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETPGROUP
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .map_err(os)?;
    attr.set_pgroup(Pid::from_raw(0)).map_err(os)?;
    attr.set_sigmask(&SigSet::empty()).map_err(os)?;
    attr.set_sigdefault(&reset_signals()).map_err(os)?;
    posix_spawn(resolved.as_c_str(), &actions, &attr, &argv, &envp).map_err(os)
}

/// Signals a command gets with their default disposition whatever the keeper inherited (an
/// ignored one would stay ignored across `exec`: Rust ignores SIGPIPE, `nohup` SIGHUP).
fn reset_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGPIPE,
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
        Signal::SIGXFSZ,
        Signal::SIGALRM,
    ] {
        set.add(sig);
    }
    set
}

/// `program` as a path to execute: as given when it names a path, else the first executable
/// file of that name in `path` (the command's own `PATH`, not this keeper's).
fn resolve(program: &str, path: &str) -> Result<CString, String> {
    use std::os::unix::fs::PermissionsExt;
    let found = if program.contains('/') {
        Some(std::path::PathBuf::from(program))
    } else {
        path.split(':')
            .filter(|dir| !dir.is_empty())
            .map(|dir| Path::new(dir).join(program))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    };
    let Some(found) = found else {
        return Err(format!("not found in PATH ({path})"));
    };
    CString::new(found.into_os_string().into_encoded_bytes())
        .map_err(|_| format!("{program:?} holds a NUL byte"))
}
