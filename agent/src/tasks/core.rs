//! The scheduler as a plain state machine: it takes `now` and an input, changes its state,
//! and returns the effects the driver must carry out (persist, dispatch, kill). It never
//! touches a disk, a clock or a process, so it is tested without a runtime.

use std::collections::{BTreeMap, BTreeSet};

use super::cron::Cron;
use super::model::{RunOutcome, Schedule, TaskSpec, Window, WindowAt, status};

/// What to do with a run that fell due while the agent was down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissedRuns {
    /// Run it once at start-up (however many slots were missed).
    RunOnce,
    /// Skip to the next slot; a one-off task that was missed ends `aborted`.
    Skip,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Runs whose commands execute at once, at most.
    pub concurrency_max: usize,
    /// Runs dispatched beyond `concurrency_max`, waiting in the pool for a free slot, so that a
    /// slot freed by an ending run is taken at once instead of after the end's commit. Tasks
    /// with a maintenance window are never dispatched ahead (their deadline counts from the
    /// dispatch).
    pub dispatch_ahead: usize,
    pub retries_max: u32,
    pub retry_base_ms: i64,
    pub missed: MissedRuns,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            concurrency_max: 4,
            dispatch_ahead: 0,
            retries_max: 3,
            retry_base_ms: 10_000,
            missed: MissedRuns::RunOnce,
        }
    }
}

/// A task as the scheduler holds it (and as it is persisted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskState {
    pub id: String,
    pub spec: TaskSpec,
    pub status: u32,
    pub next_run_ms: Option<i64>,
    /// Failed attempts of the current run (for retries of idempotent kinds).
    pub attempt: u32,
    pub created_ms: i64,
    /// Cancellation was asked while a run was in flight.
    pub cancel_requested: bool,
}

/// What the driver found of a run a previous agent (or a dead worker pool) had in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Its process still runs: adopt it.
    Running,
    /// It ended while nobody watched: its outcome (`aborted` if it left none).
    Ended(RunOutcome),
    /// Its process never started the command, and never will.
    NeverStarted,
}

/// A run to start in the worker pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub task_id: String,
    pub run_id: i64,
    pub spec: TaskSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Persist this task state (insert or replace).
    SaveTask(TaskState),
    /// Record a new run as queued.
    RunQueued {
        task_id: String,
        run_id: i64,
        queued_ms: i64,
    },
    /// Hand the run to the worker pool (after the effects before it are durable).
    Dispatch(Job),
    /// Stop a run in flight (cancellation).
    Kill { task_id: String, run_id: i64 },
    /// Forget a run whose process provably never started (it was dispatched, or waited for a
    /// slot, when the agent stopped): nothing ran, so nothing is recorded; its task runs again.
    RunWithdrawn { task_id: String, run_id: i64 },
    /// Record how a run ended.
    RunEnded {
        task_id: String,
        run_id: i64,
        finished_ms: i64,
        outcome: RunOutcome,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error(
        "task {id} with the same signature already exists ({status}); cancel it or use another --key"
    )]
    Duplicate { id: String, status: &'static str },
    #[error("invalid schedule: {0}")]
    Schedule(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RescheduleError {
    #[error("no task {0}")]
    Unknown(String),
    #[error("task {id} already ended ({status}); submit a new one")]
    Finished { id: String, status: &'static str },
    #[error("invalid schedule: {0}")]
    Schedule(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CancelError {
    #[error("no task {0}")]
    Unknown(String),
    #[error("task {id} already ended ({status})")]
    Finished { id: String, status: &'static str },
}

/// Why [`Scheduler::live`] found no live task.
enum Lookup {
    Unknown,
    Ended(u32),
}

pub struct Scheduler {
    config: Config,
    tasks: BTreeMap<String, TaskState>,
    /// Scheduled tasks by due time.
    due: BTreeSet<(i64, String)>,
    /// Runs handed to the pool and not yet ended: run id → task id.
    running: BTreeMap<i64, String>,
    /// Tasks that ended before this start-up (still in the history): id → status. Their
    /// signatures stay taken until the history is purged.
    ended: BTreeMap<String, u32>,
    next_run_id: i64,
    /// Runs started inside a window: run id → when that window ends.
    window_ends: BTreeMap<i64, i64>,
}

/// A run that ended `past_ms` after its window did says so in its record (and, stopped by
/// the window's grace, why it was stopped).
fn overran(outcome: RunOutcome, w: &Window, past_ms: i64) -> RunOutcome {
    let past = humantime::format_duration(std::time::Duration::from_secs(
        u64::try_from(past_ms / 1000).unwrap_or(0),
    ));
    let note = match w.grace_ms {
        Some(grace) if past_ms >= grace && outcome.status != status::DONE => format!(
            "stopped: still running {past} after window {:?} ended (its grace)",
            w.name
        ),
        _ => format!("ran {past} past the end of window {:?}", w.name),
    };
    let error = match outcome.error {
        Some(e) => format!("{note}; {e}"),
        None => note,
    };
    RunOutcome {
        error: Some(error),
        ..outcome
    }
}

/// The next time `schedule` fires strictly after `after_ms`.
pub fn next_slot(schedule: &Schedule, after_ms: i64) -> Result<Option<i64>, String> {
    match schedule {
        Schedule::Once { .. } => Ok(None),
        Schedule::Every {
            interval_ms,
            first_ms,
        } => {
            if *interval_ms <= 0 {
                return Err("interval must be positive".into());
            }
            if after_ms < *first_ms {
                return Ok(Some(*first_ms));
            }
            let k = (after_ms - first_ms) / interval_ms + 1;
            Ok(Some(first_ms + k * interval_ms))
        }
        Schedule::Cron { expr, tz } => {
            let cron = Cron::parse(expr, tz).map_err(|e| e.to_string())?;
            Ok(cron.next_after_ms(after_ms))
        }
    }
}

/// When a new task first runs.
pub fn first_run(schedule: &Schedule, now_ms: i64) -> Result<Option<i64>, String> {
    match schedule {
        Schedule::Once { at_ms } => Ok(Some(*at_ms)),
        Schedule::Every { first_ms, .. } => Ok(Some(*first_ms)),
        Schedule::Cron { .. } => next_slot(schedule, now_ms),
    }
}

impl Scheduler {
    pub fn new(config: Config) -> Scheduler {
        Scheduler {
            config,
            tasks: BTreeMap::new(),
            due: BTreeSet::new(),
            running: BTreeMap::new(),
            ended: BTreeMap::new(),
            next_run_id: 1,
            window_ends: BTreeMap::new(),
        }
    }

    pub fn task(&self, id: &str) -> Option<&TaskState> {
        self.tasks.get(id)
    }

    /// What must hold between any two calls: each run in flight belongs to a task that is
    /// queued or doing, a task has at most one run in flight and is in flight only with one,
    /// the due index is exactly the scheduled tasks' next runs, and run ids are never reused.
    /// The first violation, in words.
    pub fn invariant_violation(&self) -> Option<String> {
        let mut runs_of = BTreeMap::<&str, i64>::new();
        for (run_id, task_id) in &self.running {
            if *run_id >= self.next_run_id {
                return Some(format!(
                    "run {run_id} is not below the next run id {}",
                    self.next_run_id
                ));
            }
            match self.tasks.get(task_id) {
                Some(t) if t.status & status::IN_FLIGHT != 0 => {}
                Some(t) => {
                    return Some(format!(
                        "run {run_id} is in flight but its task {task_id} is {}",
                        status::name(t.status)
                    ));
                }
                None => return Some(format!("run {run_id} belongs to no known task {task_id}")),
            }
            if let Some(other) = runs_of.insert(task_id, *run_id) {
                return Some(format!(
                    "task {task_id} has two runs in flight: {other} and {run_id}"
                ));
            }
        }
        for (id, t) in &self.tasks {
            if t.status & status::IN_FLIGHT != 0 && !runs_of.contains_key(id.as_str()) {
                return Some(format!(
                    "task {id} is {} with no run in flight",
                    status::name(t.status)
                ));
            }
            let indexed = t.status == status::SCHEDULED && t.next_run_ms.is_some();
            if indexed
                && !self
                    .due
                    .contains(&(t.next_run_ms.unwrap_or_default(), id.clone()))
            {
                return Some(format!("scheduled task {id} is missing from the due index"));
            }
        }
        for (at, id) in &self.due {
            match self.tasks.get(id) {
                Some(t) if t.status == status::SCHEDULED && t.next_run_ms == Some(*at) => {}
                _ => {
                    return Some(format!(
                        "the due index holds ({at}, {id}), which is not a scheduled task's next run"
                    ));
                }
            }
        }
        None
    }

    /// Stop the process on a violated invariant, in debug builds (tests, the simulator).
    pub fn debug_assert_invariants(&self) {
        if cfg!(debug_assertions)
            && let Some(violation) = self.invariant_violation()
        {
            panic!("task scheduler invariant violated: {violation}");
        }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// When the earliest scheduled task is due, if any can start (a free slot).
    pub fn next_due_ms(&self) -> Option<i64> {
        let (at, id) = self.due.first()?;
        if self.running.len() >= self.dispatch_max(id) {
            return None;
        }
        Some(*at)
    }

    /// How many runs may be in flight for task `id` to be dispatched.
    fn dispatch_max(&self, id: &str) -> usize {
        let windowed = self.tasks.get(id).is_some_and(|t| t.spec.window.is_some());
        if windowed {
            self.config.concurrency_max
        } else {
            self.config.concurrency_max + self.config.dispatch_ahead
        }
    }

    fn index(&mut self, task: &TaskState) {
        if task.status == status::SCHEDULED
            && let Some(at) = task.next_run_ms
        {
            self.due.insert((at, task.id.clone()));
        }
    }

    fn unindex(&mut self, task: &TaskState) {
        if let Some(at) = task.next_run_ms {
            self.due.remove(&(at, task.id.clone()));
        }
    }

    fn replace(&mut self, task: TaskState) -> Effect {
        if let Some(old) = self.tasks.get(&task.id).cloned() {
            self.unindex(&old);
        }
        self.index(&task);
        self.tasks.insert(task.id.clone(), task.clone());
        Effect::SaveTask(task)
    }

    /// Remember tasks that ended before this start-up, so their signatures stay taken.
    pub fn remember_ended(&mut self, ended: Vec<(String, u32)>) {
        self.ended.extend(ended);
    }

    /// The history of these tasks was purged: their signatures may be used again.
    pub fn forget(&mut self, ids: &[String]) {
        for id in ids {
            self.ended.remove(id);
            if self
                .tasks
                .get(id)
                .is_some_and(|t| t.status & status::TERMINAL != 0)
            {
                self.tasks.remove(id);
            }
        }
    }

    /// Load persisted state at start-up and recover. `runs` are the runs a previous agent had
    /// in flight (run id, task id) and what the driver found of each: a run still running is
    /// adopted (it stays `doing`, holds its slot, and its task does not run again until it
    /// ends; a cancellation asked before the stop is carried out); a run that ended while no
    /// agent watched gets its real outcome; a run whose process never started is withdrawn
    /// (it leaves no record: nothing ran) and its task runs again at once.
    pub fn recover(
        &mut self,
        now_ms: i64,
        tasks: Vec<TaskState>,
        runs: Vec<(i64, String, Found)>,
        max_run_id: i64,
    ) -> Vec<Effect> {
        self.next_run_id = max_run_id + 1;
        let mut effects = Vec::new();
        for mut task in tasks {
            if task.status == status::SCHEDULED
                && task.next_run_ms.is_some_and(|at| at < now_ms)
                && self.config.missed == MissedRuns::Skip
            {
                task = match next_slot(&task.spec.schedule, now_ms) {
                    Ok(Some(next)) => TaskState {
                        next_run_ms: Some(next),
                        ..task
                    },
                    _ => TaskState {
                        status: status::ABORTED,
                        next_run_ms: None,
                        ..task
                    },
                };
                effects.push(Effect::SaveTask(task.clone()));
            }
            self.index(&task);
            self.tasks.insert(task.id.clone(), task);
        }
        for (run_id, task_id, found) in runs {
            if !self.tasks.contains_key(&task_id) {
                continue;
            }
            self.running.insert(run_id, task_id.clone());
            effects.extend(self.reclaimed(now_ms, &task_id, run_id, found));
        }
        // A task in flight always has its run row (both are written in one transaction); one
        // without is ended like an interrupted run, should a store ever hold one.
        let orphaned: Vec<TaskState> = self
            .tasks
            .values()
            .filter(|t| t.status & status::IN_FLIGHT != 0)
            .filter(|t| !self.running.values().any(|id| *id == t.id))
            .cloned()
            .collect();
        for task in orphaned {
            let next = self.after_run(now_ms, task, status::ABORTED);
            effects.push(self.replace(next));
        }
        effects
    }

    /// A run in flight whose process the driver looked for again (at start-up, or after the
    /// worker pool that watched it died): see [`Scheduler::recover`].
    pub fn reclaimed(
        &mut self,
        now_ms: i64,
        task_id: &str,
        run_id: i64,
        found: Found,
    ) -> Vec<Effect> {
        match found {
            Found::Running => {
                let mut effects = self.started(task_id, run_id);
                if self.tasks.get(task_id).is_some_and(|t| t.cancel_requested) {
                    effects.push(Effect::Kill {
                        task_id: task_id.to_string(),
                        run_id,
                    });
                }
                effects
            }
            Found::Ended(outcome) => self.finish_one(now_ms, task_id, run_id, outcome),
            Found::NeverStarted => {
                if self.running.remove(&run_id).is_none() {
                    return Vec::new();
                }
                let Some(task) = self.tasks.get(task_id).cloned() else {
                    return Vec::new();
                };
                let mut effects = vec![Effect::RunWithdrawn {
                    task_id: task_id.to_string(),
                    run_id,
                }];
                let next = if task.cancel_requested {
                    TaskState {
                        status: status::CANCELED,
                        next_run_ms: None,
                        cancel_requested: false,
                        ..task
                    }
                } else {
                    TaskState {
                        status: status::SCHEDULED,
                        next_run_ms: Some(now_ms),
                        ..task
                    }
                };
                effects.push(self.replace(next));
                effects
            }
        }
    }

    /// Runs in flight: (run id, task id).
    pub fn runs_in_flight(&self) -> Vec<(i64, String)> {
        self.running.iter().map(|(r, t)| (*r, t.clone())).collect()
    }

    pub fn submit(
        &mut self,
        now_ms: i64,
        id: String,
        spec: TaskSpec,
    ) -> Result<Vec<Effect>, SubmitError> {
        let existing = self
            .tasks
            .get(&id)
            .map(|t| t.status)
            .or_else(|| self.ended.get(&id).copied());
        if let Some(st) = existing {
            return Err(SubmitError::Duplicate {
                id,
                status: status::name(st),
            });
        }
        let next = first_run(&spec.schedule, now_ms).map_err(SubmitError::Schedule)?;
        let Some(next) = next else {
            return Err(SubmitError::Schedule("it never fires".into()));
        };
        let task = TaskState {
            id,
            spec,
            status: status::SCHEDULED,
            next_run_ms: Some(next),
            attempt: 0,
            created_ms: now_ms,
            cancel_requested: false,
        };
        Ok(vec![self.replace(task)])
    }

    pub fn cancel(&mut self, id: &str) -> Result<Vec<Effect>, CancelError> {
        let task = self.live(id).map_err(|lookup| match lookup {
            Lookup::Unknown => CancelError::Unknown(id.to_string()),
            Lookup::Ended(st) => CancelError::Finished {
                id: id.to_string(),
                status: status::name(st),
            },
        })?;
        if task.status & status::IN_FLIGHT != 0 {
            let run_id = self.running.iter().find(|(_, t)| *t == id).map(|(r, _)| *r);
            let task = TaskState {
                cancel_requested: true,
                ..task
            };
            let mut effects = vec![self.replace(task)];
            if let Some(run_id) = run_id {
                effects.push(Effect::Kill {
                    task_id: id.to_string(),
                    run_id,
                });
            }
            return Ok(effects);
        }
        let task = TaskState {
            status: status::CANCELED,
            next_run_ms: None,
            ..task
        };
        Ok(vec![self.replace(task)])
    }

    /// A task that has not ended.
    fn live(&self, id: &str) -> Result<TaskState, Lookup> {
        if let Some(st) = self.ended.get(id) {
            return Err(Lookup::Ended(*st));
        }
        match self.tasks.get(id) {
            None => Err(Lookup::Unknown),
            Some(t) if t.status & status::TERMINAL != 0 => Err(Lookup::Ended(t.status)),
            Some(t) => Ok(t.clone()),
        }
    }

    /// Give a task a new schedule. A run in flight finishes first; the next run follows the
    /// new schedule.
    pub fn reschedule(
        &mut self,
        now_ms: i64,
        id: &str,
        schedule: Schedule,
    ) -> Result<Vec<Effect>, RescheduleError> {
        let task = self.live(id).map_err(|lookup| match lookup {
            Lookup::Unknown => RescheduleError::Unknown(id.to_string()),
            Lookup::Ended(st) => RescheduleError::Finished {
                id: id.to_string(),
                status: status::name(st),
            },
        })?;
        let next = first_run(&schedule, now_ms)
            .map_err(RescheduleError::Schedule)?
            .ok_or_else(|| RescheduleError::Schedule("it never fires".into()))?;
        let mut spec = task.spec.clone();
        spec.schedule = schedule;
        let task = if task.status == status::SCHEDULED {
            TaskState {
                spec,
                next_run_ms: Some(next),
                attempt: 0,
                ..task
            }
        } else {
            TaskState { spec, ..task }
        };
        Ok(vec![self.replace(task)])
    }

    /// Start every due task there is room for: earliest first.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Effect> {
        let mut effects = Vec::new();
        while let Some((at, id)) = self.due.first().cloned() {
            // Earliest first: a windowed task at the head waits for a free slot, and what is
            // due after it waits too.
            if at > now_ms || self.running.len() >= self.dispatch_max(&id) {
                break;
            }
            self.due.remove(&(at, id.clone()));
            let Some(task) = self.tasks.get(&id).cloned() else {
                continue;
            };
            let window_end = match task.spec.window.as_ref().map(|w| w.at(now_ms)) {
                None => None,
                Some(Ok(WindowAt::Open { end_ms })) => Some(end_ms),
                // Outside its window (or past the cutoff): due again when it next opens, so
                // slots missed meanwhile collapse into one run there.
                Some(Ok(WindowAt::Closed { opens_ms })) => {
                    effects.push(self.replace(TaskState {
                        next_run_ms: opens_ms,
                        ..task
                    }));
                    continue;
                }
                // A window this build cannot read (it was checked when the task was made):
                // the task waits rather than run outside it.
                Some(Err(_)) => {
                    effects.push(self.replace(TaskState {
                        next_run_ms: None,
                        ..task
                    }));
                    continue;
                }
            };
            let run_id = self.next_run_id;
            self.next_run_id += 1;
            self.running.insert(run_id, id.clone());
            let queued = TaskState {
                status: status::QUEUED,
                ..task
            };
            let mut spec = queued.spec.clone();
            if let (Some(end_ms), Some(w)) = (window_end, &spec.window) {
                self.window_ends.insert(run_id, end_ms);
                if let Some(grace) = w.grace_ms {
                    // Stopped by the run's deadline once the window's grace is over.
                    let left = end_ms.saturating_add(grace).saturating_sub(now_ms).max(1);
                    spec.timeout_ms = spec.timeout_ms.min(left);
                }
            }
            effects.push(self.replace(queued));
            effects.push(Effect::RunQueued {
                task_id: id.clone(),
                run_id,
                queued_ms: now_ms,
            });
            effects.push(Effect::Dispatch(Job {
                task_id: id,
                run_id,
                spec,
            }));
        }
        effects
    }

    /// The pool started the run's process.
    pub fn started(&mut self, task_id: &str, run_id: i64) -> Vec<Effect> {
        if !self.running.contains_key(&run_id) {
            return Vec::new();
        }
        match self.tasks.get(task_id).cloned() {
            Some(task) if task.status == status::QUEUED => vec![self.replace(TaskState {
                status: status::DOING,
                ..task
            })],
            _ => Vec::new(),
        }
    }

    /// The pool reports a run's end; freed slots are filled at once.
    pub fn finished(
        &mut self,
        now_ms: i64,
        task_id: &str,
        run_id: i64,
        outcome: RunOutcome,
    ) -> Vec<Effect> {
        let mut effects = self.finish_one(now_ms, task_id, run_id, outcome);
        effects.extend(self.tick(now_ms));
        effects
    }

    /// Record a run's end without starting anything new.
    pub fn finish_one(
        &mut self,
        now_ms: i64,
        task_id: &str,
        run_id: i64,
        outcome: RunOutcome,
    ) -> Vec<Effect> {
        if self.running.remove(&run_id).is_none() {
            return Vec::new();
        }
        let window_end = self.window_ends.remove(&run_id);
        let Some(task) = self.tasks.get(task_id).cloned() else {
            return Vec::new();
        };
        let run_status = if task.cancel_requested {
            status::CANCELED
        } else {
            outcome.status
        };
        let outcome = match (window_end, &task.spec.window) {
            (Some(end_ms), Some(w)) if now_ms > end_ms => overran(outcome, w, now_ms - end_ms),
            _ => outcome,
        };
        let mut effects = vec![Effect::RunEnded {
            task_id: task_id.to_string(),
            run_id,
            finished_ms: now_ms,
            outcome: RunOutcome {
                status: run_status,
                ..outcome
            },
        }];
        let next = self.after_run(now_ms, task, run_status);
        effects.push(self.replace(next));
        effects
    }

    /// Where a task goes after a run ended with `run_status`.
    fn after_run(&self, now_ms: i64, task: TaskState, run_status: u32) -> TaskState {
        if task.cancel_requested || run_status == status::CANCELED {
            return TaskState {
                status: status::CANCELED,
                next_run_ms: None,
                cancel_requested: false,
                ..task
            };
        }
        let failed = run_status & (status::FAILED | status::ABORTED) != 0;
        if failed && task.spec.kind.idempotent() && task.attempt < self.config.retries_max {
            let backoff = self
                .config
                .retry_base_ms
                .saturating_mul(1 << task.attempt.min(16));
            return TaskState {
                status: status::SCHEDULED,
                next_run_ms: Some(now_ms.saturating_add(backoff)),
                attempt: task.attempt + 1,
                ..task
            };
        }
        match next_slot(&task.spec.schedule, now_ms) {
            Ok(Some(next)) => TaskState {
                status: status::SCHEDULED,
                next_run_ms: Some(next),
                attempt: 0,
                ..task
            },
            _ => TaskState {
                status: run_status,
                next_run_ms: None,
                ..task
            },
        }
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
