//! Runs as OS processes ([`OsProcesses`]): each command runs in a run keeper
//! ([`super::keeper`]) as a process group of its own, so a hung, leaking or deadlocked task
//! can be stopped unconditionally (SIGTERM to the group, a grace period, SIGKILL). A run
//! outlives the agent: its keeper finishes it and records its end in its slot
//! ([`super::slot`]), and the next agent reads the slots at start-up.
//!
//! Recovery first lets every keeper of a previous agent *settle*: read all its dead agent
//! sent (it marks its slot drained), so a `Start` still in a pipe runs, and is seen, before
//! anything is decided; a keeper that does not settle within [`SETTLE_WAIT`] is killed. Then
//! each run in flight is what the slot naming it says: none, never started (and never will:
//! no drained keeper starts a run); `running` with its keeper alive, adopted; `ended`, its
//! real end; `intent` or `running` with its keeper dead, `aborted`, its processes stopped
//! (the group, or whatever holds the run's output pipe when the keeper died before it
//! recorded the command's pid).
//!
//! Agents before run keepers left a directory per run (`DATA_DIR/runs`, [`super::rundir`]),
//! watched by a wrapper process: those are still read, so an upgrade never loses a run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::keeper::{Request, STRAGGLERS};
use super::keepers::{ANSWER_TIMEOUT, Heard, Keepers, Link};
use super::model::{RunOutcome, status};
use super::pool::{
    BoxFuture, KEEPER_DIED, KEEPER_LOST, LEFT_NO_STATUS, Leftover, PoolEvent, ProcessRun,
    Processes, failed, terminate_group,
};
use super::process::{alive, start_ticks};
use super::rundir::{self, Claim, Exit};
use super::slot::{self, Header, State};
use crate::signal::killpg_as;
use world::World;

/// How often an adopted run's keeper (not this agent's child) is looked at.
const ADOPTED_POLL: Duration = Duration::from_millis(200);
/// How long a killed adopted run may take to end before it is given up on.
const ADOPTED_KILL_WAIT: Duration = Duration::from_secs(5);
/// How long a previous agent's keeper has to read what its agent sent.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// Runs as OS processes, in run keepers.
#[derive(Clone, Debug)]
pub struct OsProcesses {
    world: World,
    /// `DATA_DIR/runs`: run directories of agents before run keepers.
    runs: PathBuf,
    keepers: Arc<Keepers>,
    /// The user commands run as (`[tasks] run_as`) when it is not the agent's: run groups
    /// are signalled as that user too.
    run_uid: Option<u32>,
    /// Runs whose end was read from a slot (or a run directory) rather than heard from a
    /// keeper this agent lent: what to remove once the end is committed.
    found: Arc<Mutex<BTreeMap<i64, Found>>>,
}

#[derive(Clone, Debug)]
enum Found {
    Slot(PathBuf),
    RunDir,
}

impl OsProcesses {
    pub fn new(world: World, data_dir: &Path, exe: PathBuf, run_uid: Option<u32>) -> OsProcesses {
        OsProcesses {
            world,
            runs: data_dir.join(crate::layout::RUNS_DIR),
            keepers: Arc::new(Keepers::new(exe, data_dir.join(crate::layout::KEEPERS_DIR))),
            run_uid,
            found: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    fn note(&self, run_id: i64, found: Found) {
        self.found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(run_id, found);
    }
}

impl Processes for OsProcesses {
    fn run(&self, run: ProcessRun) -> BoxFuture<()> {
        Box::pin(run_in_keeper(self.clone(), run))
    }

    fn adopt(&self, run: ProcessRun, pid: i32, ticks: Option<u64>) -> BoxFuture<()> {
        Box::pin(adopt(self.clone(), run, pid, ticks))
    }

    fn leftover(
        &self,
        run_id: i64,
        output_bytes_max: usize,
        host_restarted: bool,
    ) -> BoxFuture<Result<Leftover, String>> {
        let this = self.clone();
        Box::pin(async move {
            let (runs, dir, run_uid) = (this.runs.clone(), this.keepers.dir.clone(), this.run_uid);
            let kept = this.keepers.kept();
            let (left, found) = this
                .world
                .blocking(move || {
                    let legacy = rundir::dir(&runs, run_id);
                    if legacy.exists() {
                        let left =
                            legacy_leftover(&legacy, output_bytes_max, host_restarted, run_uid);
                        return left
                            .map(|l| (l, Some(Found::RunDir)))
                            .map_err(|e| format!("run directory {}: {e}", legacy.display()));
                    }
                    let shown = dir.display().to_string();
                    slot_leftover(
                        &dir,
                        &kept,
                        run_id,
                        output_bytes_max,
                        host_restarted,
                        run_uid,
                    )
                    .map_err(|e| format!("run keepers' slots in {shown}: {e}"))
                })
                .await
                .map_err(|e| e.to_string())??;
            if let Some(found) = found {
                this.note(run_id, found);
            }
            Ok(left)
        })
    }

    fn boot_id(&self) -> Option<String> {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(id.trim().to_string()).filter(|id| !id.is_empty())
    }

    fn release(&self, run_id: i64) -> BoxFuture<()> {
        self.release_all(vec![run_id])
    }

    /// Keepers this agent lent go back to the idle ones (no file is touched); what was read
    /// from slots or run directories is removed with one hand-off to a blocking thread.
    fn release_all(&self, run_ids: Vec<i64>) -> BoxFuture<()> {
        let this = self.clone();
        Box::pin(async move {
            let mut files = Vec::new();
            for run_id in run_ids {
                if this.keepers.release(run_id) {
                    continue;
                }
                let found = this
                    .found
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&run_id);
                match found {
                    Some(Found::Slot(path)) => files.push((run_id, path)),
                    Some(Found::RunDir) => files.push((run_id, rundir::dir(&this.runs, run_id))),
                    None => {}
                }
            }
            if files.is_empty() {
                return;
            }
            let removed = this
                .world
                .blocking(move || {
                    files
                        .into_iter()
                        .filter_map(|(run_id, path)| {
                            remove(&path)
                                .err()
                                .map(|e| (run_id, path.display().to_string(), e))
                        })
                        .collect::<Vec<_>>()
                })
                .await;
            for (run_id, path, error) in removed.unwrap_or_default() {
                tracing::warn!(run_id, %path, %error, "remove what a finished run left");
            }
        })
    }

    fn sweep(&self, in_flight: Vec<i64>, grace: Duration) -> BoxFuture<usize> {
        let this = self.clone();
        Box::pin(async move {
            let (dir, run_uid) = (this.keepers.dir.clone(), this.run_uid);
            let (flight, kept) = (in_flight.clone(), this.keepers.kept());
            let slots = this
                .world
                .blocking(move || sweep_slots(&dir, &kept, &flight, run_uid))
                .await;
            let mut stopped = match slots {
                Ok(Ok(n)) => n,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "look at the run keepers' slots");
                    0
                }
                Err(_) => 0,
            };
            stopped += sweep_run_dirs(&this, &in_flight, grace).await;
            // Recovery is done: one keeper waits for the first run.
            this.keepers.warm().await;
            stopped
        })
    }
}

fn remove(path: &Path) -> std::io::Result<()> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Start `run` in a keeper and supervise it to its end.
async fn run_in_keeper(this: OsProcesses, run: ProcessRun) {
    let finish = |outcome| PoolEvent::Finished {
        task_id: run.task_id.clone(),
        run_id: run.run_id,
        outcome,
    };
    this.keepers.retire_idle();
    let mut link = match this.keepers.take().await {
        Ok(link) => link,
        Err(e) => {
            let _ = run.events.send(finish(failed(e))).await;
            return;
        }
    };
    let start = Request::Start {
        run_id: run.run_id,
        output_max: run.output_bytes_max as u64,
        argv: run.argv.clone(),
        env_clear: run.env.clear,
        env: run.env.vars.clone(),
        run_uid: this.run_uid,
    };
    // The keeper starts the command as soon as it reads this.
    let handed_ms = this.world.now_unix_ms();
    let heard = match link.send(&start).await {
        Ok(()) => {
            crate::crashpoint::pass(crate::crashpoint::AFTER_HANDOVER);
            match tokio::time::timeout(ANSWER_TIMEOUT, link.next()).await {
                Ok(heard) => heard,
                Err(_) => Heard::Gone(format!(
                    "it did not answer within {} s and was stopped",
                    ANSWER_TIMEOUT.as_secs()
                )),
            }
        }
        Err(e) => Heard::Gone(e),
    };
    match heard {
        Heard::Started { pid, ticks } => {
            crate::crashpoint::pass(crate::crashpoint::AFTER_SPAWN);
            let _ = run
                .events
                .send(PoolEvent::Started {
                    task_id: run.task_id.clone(),
                    run_id: run.run_id,
                    pid,
                    pid_start_ticks: ticks,
                    at_ms: Some(handed_ms),
                })
                .await;
            supervise(this, run, link, pid).await;
        }
        Heard::Exited {
            exit,
            output,
            started,
        } => {
            if let Some((pid, ticks)) = started {
                // A command that ended before its start was announced.
                crate::crashpoint::pass(crate::crashpoint::AFTER_SPAWN);
                let _ = run
                    .events
                    .send(PoolEvent::Started {
                        task_id: run.task_id.clone(),
                        run_id: run.run_id,
                        pid,
                        pid_start_ticks: ticks,
                        at_ms: Some(handed_ms),
                    })
                    .await;
            }
            let outcome = with_output(exit.outcome(), output, exit.dropped);
            this.keepers.hold(run.run_id, link);
            let _ = run.events.send(finish(outcome)).await;
        }
        Heard::Gone(why) => {
            let outcome =
                keeper_lost(&this, &mut link, run.run_id, run.output_bytes_max, &why).await;
            let _ = run.events.send(finish(outcome)).await;
        }
    }
}

/// `outcome`, or, for a run stopped on timeout or request (`why`), that failure with the
/// outcome's output.
fn stopped_or(why: Option<String>, outcome: RunOutcome) -> RunOutcome {
    match why {
        Some(why) => RunOutcome {
            output: outcome.output,
            output_dropped_bytes: outcome.output_dropped_bytes,
            ..failed(why)
        },
        None => outcome,
    }
}

fn with_output(outcome: RunOutcome, output: Vec<u8>, dropped: u64) -> RunOutcome {
    RunOutcome {
        output,
        output_dropped_bytes: dropped,
        ..outcome
    }
}

enum Stop {
    Exited(Heard),
    TimedOut,
    Killed,
}

/// Watch a started run to its end: its keeper's word, its timeout, or a cancellation. Left
/// alone, unreported, if the agent shuts down first (its keeper finishes it).
async fn supervise(this: OsProcesses, run: ProcessRun, mut link: Link, pid: i32) {
    let ProcessRun {
        task_id,
        run_id,
        timeout,
        grace,
        output_bytes_max,
        kill,
        shutdown,
        events,
        ..
    } = run;
    let stop = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return,
        heard = link.next() => Stop::Exited(heard),
        _ = tokio::time::sleep(timeout) => Stop::TimedOut,
        _ = kill.cancelled() => Stop::Killed,
    };
    let why = match &stop {
        Stop::Exited(_) => None,
        Stop::TimedOut => Some(format!(
            "timed out after {}; process group terminated",
            humantime::format_duration(timeout)
        )),
        Stop::Killed => Some("stopped on request; process group terminated".into()),
    };
    let heard = match stop {
        Stop::Exited(heard) => heard,
        Stop::TimedOut | Stop::Killed => stop_group(&mut link, pid, grace, this.run_uid).await,
    };
    let outcome = match heard {
        Heard::Exited { exit, output, .. } => {
            this.keepers.hold(run_id, link);
            let outcome = match why {
                Some(why) => failed(why),
                None => exit.outcome(),
            };
            with_output(outcome, output, exit.dropped)
        }
        Heard::Started { .. } => {
            let why = "it announced a second start".to_string();
            keeper_lost(&this, &mut link, run_id, output_bytes_max, &why).await
        }
        Heard::Gone(gone) => {
            let lost = keeper_lost(&this, &mut link, run_id, output_bytes_max, &gone).await;
            stopped_or(why, lost)
        }
    };
    let _ = events
        .send(PoolEvent::Finished {
            task_id,
            run_id,
            outcome,
        })
        .await;
}

/// SIGTERM the run's group, `grace`, SIGKILL; the keeper's word on how it ended.
async fn stop_group(link: &mut Link, pid: i32, grace: Duration, run_uid: Option<u32>) -> Heard {
    let group = Pid::from_raw(pid);
    killpg_as(group, Signal::SIGTERM, run_uid);
    if let Ok(heard) = tokio::time::timeout(grace, link.next()).await {
        return heard;
    }
    killpg_as(group, Signal::SIGKILL, run_uid);
    let allowance = STRAGGLERS + ANSWER_TIMEOUT;
    match tokio::time::timeout(allowance, link.next()).await {
        Ok(heard) => heard,
        Err(_) => Heard::Gone("it did not report the stopped run".into()),
    }
}

/// The keeper lent to run `run_id` is gone or broken (`why`): stop it, and make the run's end
/// what its slot says. The slot stays until the end is committed.
async fn keeper_lost(
    this: &OsProcesses,
    link: &mut Link,
    run_id: i64,
    output_max: usize,
    why: &str,
) -> RunOutcome {
    link.kill().await;
    tracing::warn!(run_id, keeper = link.pid, why, "{KEEPER_LOST}");
    this.note(run_id, Found::Slot(link.slot.clone()));
    let (path, run_uid) = (link.slot.clone(), this.run_uid);
    let read = this
        .world
        .blocking(move || slot::read(&path).map(|h| (h, slot::read_output(&path, output_max))))
        .await;
    match read {
        Ok(Ok((Some(header), output))) => match end_of(&header, run_id, false, run_uid) {
            Some(outcome) => with_output(outcome, output, header.dropped),
            None => failed(format!(
                "its run keeper ended before it started the run ({why})"
            )),
        },
        _ => failed(format!(
            "its run keeper ended and its slot is unreadable ({why})"
        )),
    }
}

/// What a slot says of run `run_id` whose keeper is gone (or, `host_restarted`, whose host
/// restarted): its recorded end, or `aborted` with whatever still runs its command stopped.
/// `None`: the run is not in this slot, so it never started.
fn end_of(
    header: &Header,
    run_id: i64,
    host_restarted: bool,
    run_uid: Option<u32>,
) -> Option<RunOutcome> {
    if header.state.run_id() != Some(run_id) {
        return None;
    }
    let aborted = |why: &str| RunOutcome {
        status: status::ABORTED,
        ..failed(why.into())
    };
    let why = if host_restarted {
        "the host restarted while this run was in flight"
    } else {
        KEEPER_DIED
    };
    Some(match &header.state {
        State::Ended { exit, .. } => exit.outcome(),
        State::Running { pid, ticks, .. } => {
            if !host_restarted {
                stop_leftover_group(*pid, *ticks, run_uid);
            }
            aborted(why)
        }
        State::Intent { pipe, .. } => {
            if !host_restarted {
                stop_pipe_holders(*pipe, run_uid);
            }
            aborted(why)
        }
        State::Idle => return None,
    })
}

/// Stop whatever an ended run left in its process group (whose id is its command's pid).
/// Nothing is sent when that pid now names another process: a pid still naming a group is
/// never handed out again, so the group is empty then.
pub fn stop_leftover_group(pid: i32, ticks: Option<u64>, run_uid: Option<u32>) {
    let ours_or_free = match (start_ticks(pid), ticks) {
        (None, _) => true,
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => false,
    };
    if ours_or_free {
        killpg_as(Pid::from_raw(pid), Signal::SIGKILL, run_uid);
    }
}

/// SIGKILL every process holding the pipe with inode `pipe` (a run's output pipe, whose
/// command's pid its keeper died before recording), and its group when it leads one.
fn stop_pipe_holders(pipe: u64, run_uid: Option<u32>) {
    let wanted = format!("pipe:[{pipe}]");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.filter_map(|fd| fd.ok()).any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str())
        });
        if holds {
            tracing::warn!(
                pid,
                "stopping a process of a run whose keeper died as it started it"
            );
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            killpg_as(Pid::from_raw(pid), Signal::SIGKILL, run_uid);
        }
    }
}

/// Every slot under `dir` with its header and whether its keeper lives.
fn slots(dir: &Path) -> std::io::Result<Vec<(PathBuf, Option<Header>, bool)>> {
    Ok(slot::list(dir)?
        .into_iter()
        .map(|path| {
            let header = slot::read(&path).ok().flatten();
            let live = slot::owner(&path).is_some_and(|(pid, ticks)| alive(pid, ticks));
            (path, header, live)
        })
        .collect())
}

/// Whether the slot's keeper is not one this agent holds (`kept`): a previous agent's, or one
/// whose run this agent let go of.
fn foreign(path: &Path, kept: &[i32]) -> bool {
    slot::owner(path).is_none_or(|(pid, _)| !kept.contains(&pid))
}

/// Let every live keeper of a previous agent read all its agent sent (see the module's doc);
/// kill those that do not within [`SETTLE_WAIT`].
fn settle(dir: &Path, kept: &[i32]) -> std::io::Result<()> {
    let step = Duration::from_millis(10);
    let mut waited = Duration::ZERO;
    loop {
        let unsettled: Vec<PathBuf> = slots(dir)?
            .into_iter()
            .filter(|(path, header, live)| {
                *live && foreign(path, kept) && !header.as_ref().is_some_and(|h| h.drained)
            })
            .map(|(path, _, _)| path)
            .collect();
        if unsettled.is_empty() {
            return Ok(());
        }
        if waited >= SETTLE_WAIT {
            for path in unsettled {
                if let Some((pid, ticks)) = slot::owner(&path)
                    && alive(pid, ticks)
                {
                    tracing::warn!(
                        keeper = pid,
                        "a previous agent's run keeper did not settle; killing it"
                    );
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                    while alive(pid, ticks) {
                        std::thread::sleep(step);
                    }
                }
            }
            return Ok(());
        }
        std::thread::sleep(step);
        waited += step;
    }
}

/// [`Processes::leftover`] from the keepers' slots.
fn slot_leftover(
    dir: &Path,
    kept: &[i32],
    run_id: i64,
    output_max: usize,
    host_restarted: bool,
    run_uid: Option<u32>,
) -> std::io::Result<(Leftover, Option<Found>)> {
    if !host_restarted {
        settle(dir, kept)?;
    }
    let mine = slots(dir)?
        .into_iter()
        .find(|(_, header, _)| header.as_ref().and_then(|h| h.state.run_id()) == Some(run_id));
    let Some((path, Some(header), live)) = mine else {
        if host_restarted {
            let outcome = RunOutcome {
                status: status::ABORTED,
                ..failed("the host restarted while this run was in flight".into())
            };
            return Ok((Leftover::Ended(outcome), None));
        }
        return Ok((Leftover::NeverStarted, None));
    };
    let found = Some(Found::Slot(path.clone()));
    if let State::Running { pid, ticks, .. } = header.state
        && live
        && !host_restarted
    {
        return Ok((Leftover::Running { pid, ticks }, found));
    }
    let outcome = end_of(&header, run_id, host_restarted, run_uid)
        .unwrap_or_else(|| failed(LEFT_NO_STATUS.into()));
    let output = slot::read_output(&path, output_max);
    Ok((
        Leftover::Ended(with_output(outcome, output, header.dropped)),
        found,
    ))
}

/// Stop what no run in flight accounts for: slots of runs not in `in_flight` whose keeper or
/// command still lives, then the slots themselves. How many keepers had to be stopped.
fn sweep_slots(
    dir: &Path,
    kept: &[i32],
    in_flight: &[i64],
    run_uid: Option<u32>,
) -> std::io::Result<usize> {
    let mut stopped = 0;
    for (path, header, live) in slots(dir)? {
        if !foreign(&path, kept) {
            continue;
        }
        let run = header.as_ref().and_then(|h| h.state.run_id());
        if run.is_some_and(|r| in_flight.contains(&r)) {
            continue;
        }
        if live && let Some((pid, ticks)) = slot::owner(&path) {
            tracing::error!(
                keeper = pid,
                run_id = run,
                "a run keeper of a run the task store does not have in flight is alive; stopping it"
            );
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            while alive(pid, ticks) {
                std::thread::sleep(Duration::from_millis(10));
            }
            stopped += 1;
        }
        if let (Some(header), Some(run_id)) = (&header, run) {
            let _ = end_of(header, run_id, false, run_uid);
        }
        remove(&path)?;
    }
    Ok(stopped)
}

/// Supervise a run a previous agent left running: its keeper finishes it (and exits, its
/// agent gone); watched every [`ADOPTED_POLL`], then its slot is read.
async fn adopt(this: OsProcesses, run: ProcessRun, pid: i32, ticks: Option<u64>) {
    let (runs, dir, run_id) = (this.runs.clone(), this.keepers.dir.clone(), run.run_id);
    let source = this
        .world
        .blocking(move || {
            let legacy = rundir::dir(&runs, run_id);
            if legacy.exists() {
                return Source::RunDir(legacy);
            }
            slots(&dir)
                .unwrap_or_default()
                .into_iter()
                .find(|(_, h, _)| h.as_ref().and_then(|h| h.state.run_id()) == Some(run_id))
                .and_then(|(path, _, _)| Some((slot::owner(&path)?, path)))
                .map_or(Source::Nothing, |(owner, path)| Source::Slot(owner, path))
        })
        .await
        .unwrap_or(Source::Nothing);
    // What ends with the run: its keeper, or (a run directory's) its wrapper, which leads the
    // group.
    let watched = match &source {
        Source::Slot(owner, _) => *owner,
        Source::RunDir(_) | Source::Nothing => (pid, ticks),
    };
    let ProcessRun {
        task_id,
        timeout,
        grace,
        output_bytes_max,
        kill,
        shutdown,
        events,
        ..
    } = run;
    let gone = async {
        while alive(watched.0, watched.1) {
            tokio::time::sleep(ADOPTED_POLL).await;
        }
    };
    let why = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return,
        _ = gone => None,
        _ = tokio::time::sleep(timeout) => Some(format!(
            "timed out after {}; process group terminated",
            humantime::format_duration(timeout)
        )),
        _ = kill.cancelled() => Some("stopped on request; process group terminated".to_string()),
    };
    if why.is_some() {
        terminate_group(pid, grace, this.run_uid, || !alive(watched.0, watched.1)).await;
        let _ = tokio::time::timeout(ADOPTED_KILL_WAIT, async {
            while alive(watched.0, watched.1) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    let run_uid = this.run_uid;
    let read = this
        .world
        .blocking(move || adopted_end(&source, run_id, pid, ticks, output_bytes_max, run_uid))
        .await;
    let (outcome, found) = read.unwrap_or_else(|e| (failed(e.to_string()), None));
    if let Some(found) = found {
        this.note(run_id, found);
    }
    let outcome = stopped_or(why, outcome);
    let _ = events
        .send(PoolEvent::Finished {
            task_id,
            run_id,
            outcome,
        })
        .await;
}

/// Where an adopted run's end will be written.
#[derive(Debug)]
enum Source {
    /// A keeper's slot: (keeper pid, its start ticks), the slot.
    Slot((i32, Option<u64>), PathBuf),
    /// A run directory of an agent before run keepers.
    RunDir(PathBuf),
    Nothing,
}

/// How an adopted run ended, once what watched it is gone.
fn adopted_end(
    source: &Source,
    run_id: i64,
    pid: i32,
    ticks: Option<u64>,
    output_max: usize,
    run_uid: Option<u32>,
) -> (RunOutcome, Option<Found>) {
    match source {
        Source::Slot(_, path) => {
            let header = slot::read(path).ok().flatten();
            let outcome = header
                .as_ref()
                .and_then(|h| end_of(h, run_id, false, run_uid))
                .unwrap_or_else(|| {
                    stop_leftover_group(pid, ticks, run_uid);
                    aborted(KEEPER_DIED)
                });
            let dropped = header.map_or(0, |h| h.dropped);
            let output = slot::read_output(path, output_max);
            (
                with_output(outcome, output, dropped),
                Some(Found::Slot(path.clone())),
            )
        }
        Source::RunDir(dir) => {
            stop_leftover_group(pid, ticks, run_uid);
            let exit = rundir::read_exit(dir);
            let (output, dropped) = rundir::read_output(dir, output_max, exit.as_ref());
            let outcome = exit.map_or_else(|| aborted(KEEPER_DIED), |e| e.outcome());
            (with_output(outcome, output, dropped), Some(Found::RunDir))
        }
        Source::Nothing => {
            stop_leftover_group(pid, ticks, run_uid);
            (aborted(LEFT_NO_STATUS), None)
        }
    }
}

fn aborted(why: &str) -> RunOutcome {
    RunOutcome {
        status: status::ABORTED,
        ..failed(why.into())
    }
}

/// [`Processes::leftover`] on a run directory left by an agent before run keepers.
fn legacy_leftover(
    dir: &Path,
    output_bytes_max: usize,
    host_restarted: bool,
    run_uid: Option<u32>,
) -> std::io::Result<Leftover> {
    let ended = |exit: Option<Exit>, why: &str| {
        let (output, dropped) = rundir::read_output(dir, output_bytes_max, exit.as_ref());
        let outcome = exit.map_or_else(|| aborted(why), |exit| exit.outcome());
        Leftover::Ended(with_output(outcome, output, dropped))
    };
    if host_restarted {
        return Ok(ended(
            rundir::read_exit(dir),
            "the host restarted while this run was in flight",
        ));
    }
    let (pid, ticks) = match rundir::claim(dir, Claim::Abandoned)? {
        Claim::Abandoned => return Ok(Leftover::NeverStarted),
        Claim::Started { pid, ticks } => (pid, ticks),
    };
    if let Some(exit) = rundir::read_exit(dir) {
        stop_leftover_group(pid, ticks, run_uid);
        return Ok(ended(Some(exit), LEFT_NO_STATUS));
    }
    if alive(pid, ticks) {
        return Ok(Leftover::Running { pid, ticks });
    }
    stop_leftover_group(pid, ticks, run_uid);
    Ok(ended(rundir::read_exit(dir), LEFT_NO_STATUS))
}

/// Run directories (of agents before run keepers) of runs not in flight: stop what still
/// runs there and remove them.
async fn sweep_run_dirs(this: &OsProcesses, in_flight: &[i64], grace: Duration) -> usize {
    let runs = this.runs.clone();
    let ids = match this.world.blocking(move || rundir::list(&runs)).await {
        Ok(Ok(ids)) => ids,
        Ok(Err(error)) => {
            tracing::warn!(runs = %this.runs.display(), %error, "list run directories");
            return 0;
        }
        Err(_) => return 0,
    };
    let mut stopped = 0;
    for run_id in ids.into_iter().filter(|id| !in_flight.contains(id)) {
        let dir = rundir::dir(&this.runs, run_id);
        if let Ok(Some(Claim::Started { pid, ticks })) = rundir::read_claim(&dir)
            && alive(pid, ticks)
        {
            tracing::error!(
                run_id,
                pid,
                "a process of a run the task store does not have in flight is alive; stopping it"
            );
            terminate_group(pid, grace, this.run_uid, || !alive(pid, ticks)).await;
            stopped += 1;
        }
        this.note(run_id, Found::RunDir);
        this.release(run_id).await;
    }
    stopped
}
