//! The run wrapper: the small process every task run executes in, forked by the run launcher
//! ([`super::launcher`]) as a process group of its own. It claims the run's directory (see
//! [`super::rundir`]), starts the command in the same group, copies the command's output into
//! the directory up to the limit, and writes the exit status there when the command ends. The
//! agent that asked for it may be gone by then: the next agent reads what it left. It ignores
//! SIGTERM, SIGINT and SIGHUP (a termination of the group stops the command, and the wrapper
//! stays to record how); SIGKILL stops it like anything else.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use super::process::Environment;
use super::rundir::{self, Claim, Exit};

/// How long output still held open by the command's leftovers is read after it exited.
const STRAGGLERS: Duration = Duration::from_secs(2);

/// Run `argv` as run directory `dir` says; what goes wrong is written to the status (or, if
/// even the directory cannot be written, returned).
pub fn supervise(
    dir: &Path,
    output_max: u64,
    argv: &[String],
    env: &Environment,
) -> std::io::Result<()> {
    let pid = std::process::id();
    let mine = Claim::Started {
        pid: i32::try_from(pid).unwrap_or(0),
        ticks: super::process::start_ticks(i32::try_from(pid).unwrap_or(0)),
    };
    if rundir::claim(dir, mine)? != mine {
        // A recovering agent gave the run up before this process got going: the command
        // must never start.
        return Ok(());
    }
    crate::crashpoint::pass(crate::crashpoint::WRAPPER_AFTER_CLAIM);
    let Some((program, args)) = argv.split_first() else {
        return rundir::write_exit(
            dir,
            &Exit {
                error: Some("nothing to run".into()),
                ..Exit::default()
            },
        );
    };
    let output = std::fs::File::create(dir.join(rundir::OUTPUT))?;
    // A child inherits the signal mask: the command starts with none blocked, whatever this
    // process inherited.
    SigSet::empty()
        .thread_set_mask()
        .map_err(std::io::Error::other)?;
    let (reader, writer) = std::io::pipe()?;
    let spawned = {
        let mut command = Command::new(program);
        if env.clear {
            command.env_clear();
        }
        command
            .envs(env.vars.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer);
        command.spawn()
    };
    crate::crashpoint::pass(crate::crashpoint::WRAPPER_AFTER_SPAWN);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return rundir::write_exit(
                dir,
                &Exit {
                    error: Some(format!("start {program}: {e}")),
                    ..Exit::default()
                },
            );
        }
    };
    // Blocked here and in the copying thread started below, so the whole process ignores
    // them from now on (one arriving before this line stops it: the agent that sent it
    // records the run's end itself).
    let mut blocked = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        blocked.add(sig);
    }
    blocked.thread_block().map_err(std::io::Error::other)?;
    let dropped = Arc::new(AtomicU64::new(0));
    let (copied, copy_done) = std::sync::mpsc::channel();
    {
        let (dir, dropped) = (dir.to_path_buf(), dropped.clone());
        std::thread::spawn(move || {
            copy_bounded(reader, output, output_max, &dir, &dropped);
            let _ = copied.send(());
        });
    }
    let exit = match child.wait() {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            Exit {
                exit_code: status.code(),
                signal: status.signal(),
                ..Exit::default()
            }
        }
        Err(e) => Exit {
            error: Some(format!("wait for the command: {e}")),
            ..Exit::default()
        },
    };
    // The command is gone; what it left in the group may still hold the pipe (the agent kills
    // the group once this process ends).
    let _ = copy_done.recv_timeout(STRAGGLERS);
    let exit = Exit {
        dropped: dropped.load(Ordering::SeqCst),
        ..exit
    };
    crate::crashpoint::pass(crate::crashpoint::WRAPPER_BEFORE_STATUS);
    until_written(|| rundir::write_exit(dir, &exit), std::thread::sleep)
}

/// First and longest wait between attempts to write the exit status to a full disk.
const FULL_DISK_RETRY_FIRST: Duration = Duration::from_millis(500);
const FULL_DISK_RETRY_MAX: Duration = Duration::from_secs(10);

/// Run `write` until it lands. A full disk (or quota) is waited out: this process staying
/// alive keeps the run "in flight" for whichever agent watches it, where giving up would
/// leave no status and have the run recorded as killed although its command ended by itself.
/// Any other error is returned at once.
fn until_written(
    mut write: impl FnMut() -> std::io::Result<()>,
    mut sleep: impl FnMut(Duration),
) -> std::io::Result<()> {
    let mut wait = FULL_DISK_RETRY_FIRST;
    loop {
        match write() {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                sleep(wait);
                wait = (wait * 2).min(FULL_DISK_RETRY_MAX);
            }
            other => return other,
        }
    }
}

/// Copy `from` into `to` up to `limit` bytes; count the rest in `dropped`, and write the count
/// down each time it grows by [`rundir::DROPPED_STEP`].
fn copy_bounded(
    mut from: impl Read,
    mut to: std::fs::File,
    limit: u64,
    dir: &Path,
    dropped: &AtomicU64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let (mut kept, mut noted) = (0u64, 0u64);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let room = usize::try_from(limit.saturating_sub(kept)).unwrap_or(usize::MAX);
        let mut take = room.min(n);
        if take > 0 {
            match to.write_all(&buf[..take]) {
                Ok(()) => kept += take as u64,
                // A full disk: what could not be kept is counted like the rest.
                Err(_) => take = 0,
            }
        }
        let cut = (n - take) as u64;
        let total = dropped.fetch_add(cut, Ordering::SeqCst) + cut;
        if total >= noted + rundir::DROPPED_STEP {
            noted = total;
            let _ = rundir::replace(dir, rundir::DROPPED, &total.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Error, ErrorKind};
    use std::time::Duration;

    use super::until_written;

    #[test]
    fn a_full_disk_is_waited_out_and_other_errors_are_not() {
        let mut attempts = 0;
        let mut waited = Vec::new();
        let written = until_written(
            || {
                attempts += 1;
                if attempts < 4 {
                    Err(Error::from(ErrorKind::StorageFull))
                } else {
                    Ok(())
                }
            },
            |d| waited.push(d),
        );
        assert!(written.is_ok());
        assert_eq!(
            waited,
            [500, 1000, 2000].map(Duration::from_millis).to_vec(),
            "backs off while the disk is full"
        );
        let gone = until_written(
            || Err(Error::from(ErrorKind::NotFound)),
            |_| panic!("no wait for an error a wait cannot mend"),
        );
        assert_eq!(gone.map_err(|e| e.kind()), Err(ErrorKind::NotFound));
    }
}
