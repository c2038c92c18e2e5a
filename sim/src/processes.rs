//! Simulated task processes. The table lives outside every host, so a process outlives the
//! agent that started it, exactly like a real run after a kill -9 or a shutdown of its agent:
//! it keeps running, ends by itself while no agent watches (leaving its exit status), and is
//! found by the next agent. Each process models the run keeper's protocol: the keeper is
//! handed the run, records its intent a little later (then the command starts); a recovering
//! agent first lets a previous agent's keepers settle (read what their agent sent), so a run
//! handed over but not yet picked up starts then and is adopted. Durations, exit codes, hangs
//! and the hand-to-intent and hand-to-report delays come from the seed. Some keepers die (as
//! if killed -9): right after recording their intent (the command never starts), while the
//! command runs (the command goes on in its group until an agent stops it), or after it ended
//! but before recording its end (its real end is lost): the run must then be recorded
//! `aborted`, never run again, and its command stopped.
//!
//! Checked as it goes (see [`SimProcesses::violations`]): a run never gets a second process;
//! no two runs of one task execute at once; a run is never forgotten while its process runs;
//! nothing runs that no run in flight accounts for; no more new runs are supervised at once
//! than the pool has slots (runs dispatched ahead wait for one).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::tasks::model::{RunOutcome, status};
use agent::tasks::pool::{BoxFuture, KEEPER_DIED, Leftover, PoolEvent, ProcessRun, Processes};

/// One process as the checks see it.
#[derive(Clone, Debug)]
pub struct Proc {
    pub pid: i32,
    pub task_id: String,
    pub run_id: i64,
    /// When its keeper records its intent and starts the command.
    pub intent_at: Duration,
    /// When it ends by itself; `None`: it hangs until killed.
    pub ends_at: Option<Duration>,
    pub exit_code: i32,
    /// When an agent began to stop it (timeout, cancellation, sweep).
    pub term_at: Option<Duration>,
    pub killed_at: Option<Duration>,
    /// Its run's end is in the store and the agent forgot it.
    pub released: bool,
    /// When its keeper dies, if it does (see [`KeeperDeath`]).
    pub keeper_dies: Option<(Duration, KeeperDeath)>,
}

/// Where in a run's life its keeper dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeeperDeath {
    /// Right after recording its intent: the command never starts.
    AfterIntent,
    /// While the command runs: the command goes on in the group.
    WhileRunning,
    /// After the command ended, before its status was written.
    BeforeStatus,
}

impl Proc {
    /// Whether the command started (by `at`).
    pub fn executed(&self, at: Duration) -> bool {
        self.intent_at <= at && !self.dies_as(KeeperDeath::AfterIntent)
    }

    fn dies_as(&self, how: KeeperDeath) -> bool {
        self.keeper_dies.is_some_and(|(_, h)| h == how)
    }

    /// Whether its keeper is dead (by `at`), leaving no exit status.
    pub fn keeper_dead(&self, at: Duration) -> bool {
        self.keeper_dies.is_some_and(|(when, _)| when <= at)
    }

    /// Its command's real end was lost with its keeper (which died before anyone began
    /// stopping the run): the run can only be `aborted`.
    pub fn status_lost(&self) -> bool {
        self.keeper_dies
            .is_some_and(|(dies, _)| self.term_at.is_none_or(|term| dies <= term))
    }

    /// Whether it is over at `at` (killed or ended by itself; a command whose keeper died
    /// right after its intent never started, so it is over then).
    pub fn over(&self, at: Duration) -> bool {
        self.killed_at.is_some_and(|k| k <= at)
            || self.ends_at.is_some_and(|e| e <= at)
            || (self.dies_as(KeeperDeath::AfterIntent) && self.keeper_dead(at))
    }

    /// Whether the command runs at `at`.
    pub fn executing(&self, at: Duration) -> bool {
        self.executed(at) && !self.over(at)
    }

    /// Handed to its keeper, not yet picked up: it will start the command.
    pub fn pending(&self, at: Duration) -> bool {
        at < self.intent_at && !self.over(at)
    }

    /// Ended by itself, before anyone began stopping it: its exit code is its real outcome.
    pub fn ended_naturally(&self) -> bool {
        match (self.ends_at, self.term_at) {
            (Some(end), Some(term)) => end <= term,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    next_pid: i32,
    procs: BTreeMap<i32, Proc>,
    /// Invariant violations seen so far.
    violations: Vec<String>,
    spawned: u64,
    adopted: u64,
    /// Runs an agent's pool supervises now (started or adopted, not yet reported ended).
    supervised: usize,
    /// The pool's slots: new runs supervised at once, at most.
    slots: Option<usize>,
    /// Set by [`SimProcesses::decided`]: no process hangs and no keeper dies; a process fails
    /// (exit code 1) exactly when its task id is listed here.
    decided: Option<std::collections::BTreeSet<String>>,
}

/// One run supervised; counted off when its supervision ends or is dropped with its agent.
struct Supervision(SimProcesses);

impl Supervision {
    fn begin(processes: &SimProcesses, new_run: i64) -> Supervision {
        let mut t = processes.lock();
        t.supervised += 1;
        if new_run >= 0
            && let Some(slots) = t.slots
            && t.supervised > slots
        {
            let at_once = t.supervised;
            t.violations.push(format!(
                "run {new_run} started while {} others were supervised: more than the pool's {slots} slots",
                at_once - 1
            ));
        }
        Supervision(processes.clone())
    }
}

impl Drop for Supervision {
    fn drop(&mut self) {
        self.0.lock().supervised -= 1;
    }
}

#[derive(Clone, Debug)]
pub struct SimProcesses {
    seed: u64,
    table: Arc<Mutex<Table>>,
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn mix(seed: u64, text: &str, n: i64) -> u64 {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15 ^ (n as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h ^ (h >> 31)
}

fn outcome(st: u32, exit_code: Option<i32>, error: Option<String>) -> RunOutcome {
    RunOutcome {
        status: st,
        exit_code,
        error,
        output: Vec::new(),
        output_dropped_bytes: 0,
    }
}

fn exit_outcome(code: i32) -> RunOutcome {
    let st = if code == 0 {
        status::DONE
    } else {
        status::FAILED
    };
    outcome(
        st,
        Some(code),
        (code != 0).then(|| format!("exit code {code}")),
    )
}

enum Stop {
    Exited(i32),
    TimedOut,
    Killed,
}

impl SimProcesses {
    pub fn new(seed: u64) -> SimProcesses {
        SimProcesses {
            seed,
            table: Arc::new(Mutex::new(Table {
                next_pid: 1000,
                ..Table::default()
            })),
        }
    }

    /// Check that at most `slots` new runs are supervised at once.
    pub fn with_slots(self, slots: usize) -> SimProcesses {
        self.lock().slots = Some(slots);
        self
    }

    /// Processes whose fate the scenario chose: each ends by itself within 1 to 12 s, no
    /// keeper dies, and a process fails (exit code 1) exactly when its task id is in
    /// `failing`. For scenarios that check what is built on the task runtime.
    pub fn decided(self, failing: std::collections::BTreeSet<String>) -> SimProcesses {
        self.lock().decided = Some(failing);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Every process so far.
    pub fn procs(&self) -> Vec<Proc> {
        self.lock().procs.values().cloned().collect()
    }

    /// Processes per task id that run or are about to at simulated time `at` (the driver's
    /// clock: outside every host turmoil has no current time).
    pub fn live_tasks(&self, at: Duration) -> BTreeMap<String, usize> {
        let mut live = BTreeMap::new();
        for p in self
            .lock()
            .procs
            .values()
            .filter(|p| p.executing(at) || p.pending(at))
        {
            *live.entry(p.task_id.clone()).or_insert(0) += 1;
        }
        live
    }

    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// Runs adopted by an agent so far.
    pub fn adopted(&self) -> u64 {
        self.lock().adopted
    }

    /// Processes spawned so far.
    pub fn spawned(&self) -> u64 {
        self.lock().spawned
    }

    fn proc_of_run(&self, run_id: i64) -> Option<Proc> {
        self.lock()
            .procs
            .values()
            .find(|p| p.run_id == run_id)
            .cloned()
    }

    /// Spawn the process of a new run: checked against every other process first.
    fn spawn(&self, task_id: &str, run_id: i64) -> Proc {
        let h = mix(self.seed, task_id, run_id);
        let start = now();
        let intent_at = start + Duration::from_millis(1 + (h >> 16) % 40);
        let decided = self
            .lock()
            .decided
            .as_ref()
            .map(|failing| failing.contains(task_id));
        let ends_at = match (h % 10, decided) {
            (_, Some(_)) => Some(intent_at + Duration::from_millis(1_000 + (h >> 8) % 11_000)),
            (0, None) => None, // hangs
            _ => Some(intent_at + Duration::from_millis(100 + (h >> 8) % 20_000)),
        };
        let exit_code = match decided {
            Some(fails) => i32::from(fails),
            None if (h >> 40).is_multiple_of(5) => 1,
            None => 0,
        };
        // One keeper in 16 dies, at one of three places (a mix of its own, so the rest of
        // the model draws what it drew before); none where the fate was decided.
        let w = mix(self.seed, "keeper", run_id);
        let keeper_dies = match (w % 16, ends_at) {
            _ if decided.is_some() => None,
            (0, _) => Some((intent_at, KeeperDeath::AfterIntent)),
            (1, Some(end)) => Some((intent_at + (end - intent_at) / 2, KeeperDeath::WhileRunning)),
            (1, None) => Some((
                intent_at + Duration::from_millis(500 + (w >> 8) % 5_000),
                KeeperDeath::WhileRunning,
            )),
            (2, Some(end)) => Some((end, KeeperDeath::BeforeStatus)),
            _ => None,
        };
        let mut t = self.lock();
        let mut found = Vec::new();
        for other in t.procs.values() {
            if other.run_id == run_id {
                found.push(format!(
                    "run {run_id} got a second process (the first, pid {}, started {})",
                    other.pid,
                    other.executed(start)
                ));
            } else if other.task_id == task_id && (other.executing(start) || other.pending(start)) {
                found.push(format!(
                    "task {task_id} started run {run_id} while its run {} is {} (ends {:?})",
                    other.run_id,
                    if other.pending(start) {
                        "about to start"
                    } else {
                        "running"
                    },
                    other.ends_at
                ));
            }
        }
        t.violations.extend(found);
        t.next_pid += 1;
        let proc = Proc {
            pid: t.next_pid,
            task_id: task_id.to_string(),
            run_id,
            intent_at,
            ends_at,
            exit_code,
            term_at: None,
            killed_at: None,
            released: false,
            keeper_dies,
        };
        t.procs.insert(proc.pid, proc.clone());
        t.spawned += 1;
        proc
    }

    /// Supervise `pid` like the pool does a real group: to its natural end, its timeout or a
    /// kill; unreported if the agent shuts down first.
    async fn watch(&self, run: ProcessRun, pid: i32) {
        let ProcessRun {
            task_id,
            run_id,
            timeout,
            grace,
            kill,
            shutdown,
            events,
            ..
        } = run;
        let Some(proc) = self.lock().procs.get(&pid).cloned() else {
            return;
        };
        // The keeper ends when the command does, or when it dies.
        let keeper_ends = match (proc.ends_at, proc.keeper_dies) {
            (Some(end), Some((dies, _))) => Some(end.min(dies)),
            (end, dies) => end.or(dies.map(|(when, _)| when)),
        };
        let natural = async {
            match keeper_ends {
                Some(end) => tokio::time::sleep(end.saturating_sub(now())).await,
                None => std::future::pending().await,
            }
        };
        let stop = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = natural => Stop::Exited(proc.exit_code),
            _ = tokio::time::sleep(timeout) => Stop::TimedOut,
            _ = kill.cancelled() => Stop::Killed,
        };
        let outcome = match stop {
            Stop::Exited(_)
                if proc
                    .keeper_dies
                    .is_some_and(|(dies, _)| Some(dies) == keeper_ends) =>
            {
                // No status: the run is aborted and what the keeper left in its group stopped.
                crate::trace::record(format!(
                    "run {run_id}: its keeper died ({:?}); aborted",
                    proc.keeper_dies.map(|(_, how)| how)
                ));
                self.stop_group(pid);
                outcome(status::ABORTED, None, Some(KEEPER_DIED.into()))
            }
            Stop::Exited(code) => exit_outcome(code),
            Stop::TimedOut => {
                self.kill_after(pid, grace).await;
                outcome(status::FAILED, None, Some("timed out".into()))
            }
            Stop::Killed => {
                self.kill_after(pid, grace).await;
                outcome(status::FAILED, None, Some("stopped on request".into()))
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

    /// SIGKILL to a dead keeper's group: the command, if it still runs, ends now.
    fn stop_group(&self, pid: i32) {
        let at = now();
        if let Some(p) = self.lock().procs.get_mut(&pid)
            && !p.over(at)
        {
            p.term_at.get_or_insert(at);
            p.killed_at.get_or_insert(at);
        }
    }

    /// SIGTERM is ignored by a third of processes; SIGKILL after `grace` always works. A
    /// process that ends by itself during the grace period is seen ending then.
    async fn kill_after(&self, pid: i32, grace: Duration) {
        let natural_end = {
            let mut t = self.lock();
            let Some(p) = t.procs.get_mut(&pid) else {
                return;
            };
            p.term_at.get_or_insert(now());
            p.ends_at
        };
        let stubborn = mix(self.seed, "term", i64::from(pid)).is_multiple_of(3);
        if stubborn {
            let wait = match natural_end {
                Some(end) => grace.min(end.saturating_sub(now())),
                None => grace,
            };
            tokio::time::sleep(wait).await;
        }
        if let Some(p) = self.lock().procs.get_mut(&pid) {
            p.killed_at.get_or_insert(now());
        }
    }
}

impl Processes for SimProcesses {
    fn run(&self, run: ProcessRun) -> BoxFuture<()> {
        let this = self.clone();
        Box::pin(async move {
            let _supervision = Supervision::begin(&this, run.run_id);
            let proc = this.spawn(&run.task_id, run.run_id);
            // The pool learns the pid a little after the spawn: a kill of the agent in between
            // leaves a process the store does not know the pid of.
            let h = mix(this.seed, "report", run.run_id);
            tokio::time::sleep(Duration::from_millis(1 + h % 40)).await;
            let _ = run
                .events
                .send(PoolEvent::Started {
                    task_id: run.task_id.clone(),
                    run_id: run.run_id,
                    pid: proc.pid,
                    pid_start_ticks: Some(proc.pid as u64),
                    at_ms: None,
                })
                .await;
            this.watch(run, proc.pid).await
        })
    }

    fn adopt(&self, run: ProcessRun, pid: i32, ticks: Option<u64>) -> BoxFuture<()> {
        let this = self.clone();
        Box::pin(async move {
            let known = this
                .proc_of_run(run.run_id)
                .is_some_and(|p| p.pid == pid && ticks == Some(pid as u64));
            if !known {
                this.lock().violations.push(format!(
                    "run {} adopted pid {pid}, which is not its process",
                    run.run_id
                ));
                return;
            }
            this.lock().adopted += 1;
            let _supervision = Supervision::begin(&this, -1);
            this.watch(run, pid).await
        })
    }

    fn leftover(
        &self,
        run_id: i64,
        _output_bytes_max: usize,
        _host_restarted: bool,
    ) -> BoxFuture<Result<Leftover, String>> {
        let this = self.clone();
        Box::pin(async move {
            let at = now();
            let mut t = this.lock();
            let Some(p) = t.procs.values_mut().find(|p| p.run_id == run_id) else {
                return Ok(Leftover::NeverStarted);
            };
            if at < p.intent_at {
                // The agent lets the keeper settle: it picks the run up now.
                if let Some((when, KeeperDeath::AfterIntent)) = p.keeper_dies.as_mut() {
                    *when = at;
                }
                p.intent_at = at;
            }
            if p.keeper_dead(at) {
                // Its keeper died and left no status; the command it left is stopped.
                crate::trace::record(format!(
                    "run {run_id}: its keeper died while no agent watched; aborted"
                ));
                if !p.over(at) {
                    p.term_at.get_or_insert(at);
                    p.killed_at.get_or_insert(at);
                }
                return Ok(Leftover::Ended(outcome(
                    status::ABORTED,
                    None,
                    Some(KEEPER_DIED.into()),
                )));
            }
            if !p.over(at) {
                return Ok(Leftover::Running {
                    pid: p.pid,
                    ticks: Some(p.pid as u64),
                });
            }
            if p.ended_naturally() {
                return Ok(Leftover::Ended(exit_outcome(p.exit_code)));
            }
            Ok(Leftover::Ended(outcome(
                status::ABORTED,
                None,
                Some("killed; left no exit status".into()),
            )))
        })
    }

    /// The simulated host never reboots (its agent crashes and restarts).
    fn boot_id(&self) -> Option<String> {
        Some("sim".into())
    }

    fn release(&self, run_id: i64) -> BoxFuture<()> {
        let this = self.clone();
        Box::pin(async move {
            let at = now();
            let mut t = this.lock();
            let mut found = None;
            if let Some(p) = t.procs.values_mut().find(|p| p.run_id == run_id) {
                p.released = true;
                if p.executing(at) || p.pending(at) {
                    found = Some(format!(
                        "run {run_id} was forgotten while its process (pid {}) still runs",
                        p.pid
                    ));
                }
            }
            t.violations.extend(found);
        })
    }

    fn sweep(&self, in_flight: Vec<i64>, grace: Duration) -> BoxFuture<usize> {
        let this = self.clone();
        Box::pin(async move {
            let at = now();
            let strays: Vec<(i32, i64)> = this
                .lock()
                .procs
                .values()
                .filter(|p| !p.released && !in_flight.contains(&p.run_id))
                .filter(|p| p.executing(at) || p.pending(at))
                .map(|p| (p.pid, p.run_id))
                .collect();
            for (pid, run_id) in &strays {
                this.lock().violations.push(format!(
                    "process {pid} of run {run_id} runs, but no run in flight accounts for it"
                ));
                this.kill_after(*pid, grace).await;
            }
            let mut t = this.lock();
            for p in t.procs.values_mut() {
                if !in_flight.contains(&p.run_id) {
                    p.released = true;
                }
            }
            strays.len()
        })
    }
}
