//! The `tasks` scenario: one agent running the real scheduler, store and worker pool over
//! simulated processes that outlive it, killed (bounced or crashed with downtime) at random
//! points while runs are in flight, and also right after a dispatch (before or after the
//! run's keeper picks it up, before its pid is in the store). Checked: a run never gets two
//! processes and no two runs of a task overlap; nothing runs that no run in flight accounts
//! for; every run ends with its process's real outcome, or `aborted` when its process never
//! ran or left no exit status (its keeper may die at any point: then the command it left is
//! stopped too); nothing stays `doing` without a live process; every due one-off
//! task ends in a recorded terminal state and was run (no run lost by a restart); periodic
//! tasks keep running; future tasks survive. A backup schedule rides along (a pgBackRest
//! backup and check on cron, granted by the host's `[backups]`): each keeps running across the
//! restarts, and runs at most once per cron slot plus once per agent start (the `run_once`
//! missed-run policy: a slot missed while the agent was down runs once, not once per slot).

use std::path::Path;
use std::time::Duration;

use agent::tasks::driver::{self, Request};
use agent::tasks::model::{Kind, Schedule, TaskSpec, Window, WindowAt, status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::harness::{self, Driver, EPOCH_S, Power, host_world, new_sim};
use crate::processes::SimProcesses;
use crate::scenario::{Fault, Schedule as Plan, secs};
use crate::trace;

const TASKS: usize = 24;
/// How long a due task may legitimately still be busy: up to 3 attempts (retries of an
/// idempotent kind) of at most 15 s plus a 2 s kill grace each, retry backoff, and waiting
/// for one of 3 slots shared by 24 tasks.
const SETTLE_MS: i64 = 150_000;

/// The backup schedule: (key, kind, cron, time zone, cron period in ms).
const BACKUPS: [(&str, Kind, &str, &str, i64); 2] = [
    (
        "backup-incr",
        Kind::PgbackrestBackup,
        "*/2 * * * *",
        "UTC",
        120_000,
    ),
    (
        "backup-check",
        Kind::PgbackrestCheck,
        "*/3 * * * *",
        "Europe/Berlin",
        180_000,
    ),
];

/// The tasks the operator submits at every boot (duplicates after the first are refused).
fn workload(seed: u64) -> Vec<TaskSpec> {
    let mut tasks = random_tasks(seed);
    for (key, kind, expr, tz, _) in BACKUPS {
        let mut params = std::collections::BTreeMap::new();
        params.insert("stanza".to_string(), "main".to_string());
        // No Postgres in the simulation to ask for the role: any host runs them.
        params.insert("run_on".to_string(), "any".to_string());
        tasks.push(TaskSpec {
            kind,
            params,
            argv: Vec::new(),
            schedule: Schedule::Cron {
                expr: expr.into(),
                tz: tz.into(),
            },
            timeout_ms: 15_000,
            key: key.into(),
            window: None,
            critical: false,
        });
    }
    tasks.push(windowed());
    tasks
}

/// A task due every 10 s but gated by a window (every 2 minutes for 60 s, no start in its
/// last 15 s): whatever restarts and crashes happen, its runs start only inside the window.
fn windowed() -> TaskSpec {
    TaskSpec {
        kind: Kind::Command,
        params: Default::default(),
        argv: vec!["work".into()],
        schedule: Schedule::Every {
            interval_ms: 10_000,
            first_ms: (EPOCH_S * 1000) as i64,
        },
        timeout_ms: 15_000,
        key: "windowed".into(),
        window: Some(Window {
            name: "every-other-minute".into(),
            cron: "*/2 * * * *".into(),
            tz: "Europe/Berlin".into(),
            duration_ms: 60_000,
            cutoff_ms: 15_000,
            grace_ms: None,
        }),
        critical: false,
    }
}

/// Every run of a window-gated task was queued while its window was open for new runs, and
/// one ran in the first opening at least.
fn check_window(conn: &rusqlite::Connection, id: &str, window: &Window) -> anyhow::Result<()> {
    let mut stmt = conn.prepare("SELECT run_id, queued_ms FROM runs WHERE task_id = ?1")?;
    let queued: Vec<(i64, i64)> = stmt
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (run_id, at) in &queued {
        if !matches!(window.at(*at), Ok(WindowAt::Open { .. })) {
            anyhow::bail!(
                "run {run_id} of window-gated task {id} was queued at {at}, outside its window ({:?})",
                window.at(*at)
            );
        }
    }
    if queued.is_empty() {
        anyhow::bail!("window-gated task {id} never ran");
    }
    trace::record(format!(
        "final: window-gated task: {} runs, all inside the window",
        queued.len()
    ));
    Ok(())
}

fn random_tasks(seed: u64) -> Vec<TaskSpec> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7a5c);
    let epoch_ms = (EPOCH_S * 1000) as i64;
    (0..TASKS)
        .map(|i| {
            let kind = if rng.random_range(0..2) == 0 {
                Kind::Command
            } else {
                Kind::RetentionCleanup
            };
            let schedule = if i % 4 == 0 {
                Schedule::Every {
                    interval_ms: rng.random_range(5_000..30_000),
                    first_ms: epoch_ms + rng.random_range(0..20_000),
                }
            } else {
                Schedule::Once {
                    at_ms: epoch_ms + rng.random_range(0..200_000),
                }
            };
            TaskSpec {
                kind,
                params: Default::default(),
                argv: if kind == Kind::Command {
                    vec!["work".into()]
                } else {
                    Vec::new()
                },
                schedule,
                timeout_ms: rng.random_range(5_000..15_000),
                key: format!("task-{i}"),
                window: None,
                critical: false,
            }
        })
        .collect()
}

/// Commands at once on the simulated agent (as many more wait dispatched ahead).
const CONCURRENCY_MAX: usize = 3;

async fn submit_all(
    requests: mpsc::Sender<Request>,
    ready: oneshot::Receiver<()>,
    specs: Vec<TaskSpec>,
) {
    if ready.await.is_err() {
        return;
    }
    let mut fresh = 0;
    for spec in specs {
        let (reply, answer) = oneshot::channel();
        if requests
            .send(Request::Submit { spec, reply })
            .await
            .is_err()
        {
            return;
        }
        if let Ok(Ok(_)) = answer.await {
            fresh += 1;
        }
    }
    tracing::info!(target: "agent::sim", fresh, "workload submitted (the rest already existed)");
}

pub fn simulate_tasks(seed: u64, plan: &Plan) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-sim-tasks-")
        .tempdir()?;
    let data = dir.path().join("agent1");
    std::fs::create_dir_all(&data)?;
    let processes = SimProcesses::new(seed).with_slots(CONCURRENCY_MAX);
    let mut sim = new_sim(seed, plan);
    {
        let world = host_world(seed, "agent1");
        let (data, processes) = (data.clone(), processes.clone());
        sim.host("agent1", move || {
            let (world, config, specs) = (
                world.clone(),
                harness::task_runtime(&data, &processes, CONCURRENCY_MAX),
                workload(seed),
            );
            async move {
                let (requests, requests_rx) = mpsc::channel(1024);
                let (ready, recovered) = oneshot::channel();
                // Owned by the host: it ends with the host, like the process it stands for.
                tokio::spawn(submit_all(requests, recovered, specs));
                driver::run(world, config, requests_rx, ready, CancellationToken::new())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        });
    }
    let mut driver = TasksDriver {
        processes: processes.clone(),
        agent: Power::on("agent1"),
        rng: StdRng::seed_from_u64(seed ^ 0x0d15_a7c4),
        spawned: 0,
        quiet_from: plan.quiet_from,
        start_at: None,
        starts: 1,
    };
    harness::drive(&mut sim, plan, &mut driver)?;
    final_check(
        &data.join("tasks.db"),
        &processes,
        plan,
        seed,
        sim.elapsed(),
        driver.starts,
    )
}

/// Agent kills: bounced (restarted at once) or crashed with downtime, as the plan says; and,
/// until the quiet period, a kill right after one in four dispatches.
struct TasksDriver {
    processes: SimProcesses,
    agent: Power,
    rng: StdRng,
    /// Processes spawned as of the last step.
    spawned: u64,
    quiet_from: Duration,
    /// When the agent killed after a dispatch comes back.
    start_at: Option<Duration>,
    /// How many times the agent started (the first boot included).
    starts: i64,
}

impl<'a> Driver<'a> for TasksDriver {
    fn fault(
        &mut self,
        sim: &mut turmoil::Sim<'a>,
        fault: &Fault,
        _now: Duration,
    ) -> anyhow::Result<()> {
        match fault {
            Fault::BounceAgent { .. } => {
                self.agent.bounce(sim);
                self.starts += 1;
            }
            Fault::CrashAgent { .. } => {
                self.agent.crash(sim);
            }
            Fault::StartAgent { .. } if self.agent.start(sim) => self.starts += 1,
            _ => {}
        }
        Ok(())
    }

    fn stepped(&mut self, sim: &mut turmoil::Sim<'a>, now: Duration) -> anyhow::Result<()> {
        if let Some(v) = self.processes.violations().first() {
            anyhow::bail!("{v}");
        }
        if self.start_at.is_some_and(|at| at <= now) {
            self.start_at = None;
            if self.agent.start(sim) {
                self.starts += 1;
                trace::record("agent started after a kill right after a dispatch".to_string());
            }
        }
        let spawned = self.processes.spawned();
        let dispatched = spawned > self.spawned;
        self.spawned = spawned;
        if dispatched
            && now < self.quiet_from
            && self.agent.is_up()
            && self.rng.random_range(0..4) == 0
        {
            // Now, the run is handed to its keeper; its intent and the pool's start report are a few
            // milliseconds away, the store's pid commit after that.
            if self.rng.random_range(0..2) == 0 {
                trace::record(
                    "fault kill -9 of the agent right after a dispatch; restarted at once"
                        .to_string(),
                );
                self.agent.bounce(sim);
                self.starts += 1;
            } else {
                let down = Duration::from_millis(self.rng.random_range(10..3_000));
                trace::record(format!(
                    "fault kill -9 of the agent right after a dispatch; down {down:?}"
                ));
                self.agent.crash(sim);
                self.start_at = Some(now + down);
            }
        }
        Ok(())
    }
}

fn final_check(
    db: &Path,
    processes: &SimProcesses,
    plan: &Plan,
    seed: u64,
    now: Duration,
    starts: i64,
) -> anyhow::Result<()> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let live = processes.live_tasks(now);
    let end_ms = (EPOCH_S * 1000) as i64 + i64::try_from(plan.run_for.as_millis())?;
    let specs = workload(seed);
    let mut terminal = 0;
    for spec in &specs {
        let id = driver::task_id(&spec.key);
        let row: Option<(u32, Option<i64>)> = conn
            .query_row(
                "SELECT status, next_run_ms FROM tasks WHERE id = ?1",
                [&id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ok();
        let Some((st, _next)) = row else {
            anyhow::bail!(
                "task {} ({id}) was submitted but is not in the store",
                spec.key
            );
        };
        let runs: i64 =
            conn.query_row("SELECT count(*) FROM runs WHERE task_id = ?1", [&id], |r| {
                r.get(0)
            })?;
        let live_runs = live.get(&id).copied().unwrap_or(0);
        if live_runs > 1 {
            anyhow::bail!("task {id} has {live_runs} live processes");
        }
        if st == status::DOING && live_runs == 0 {
            anyhow::bail!(
                "task {id} is doing but no process of it is alive; runs: {:?}",
                history(&conn, &id, end_ms)?
            );
        }
        let stuck: i64 = conn.query_row(
            "SELECT count(*) FROM runs WHERE task_id = ?1 AND status & ?2 != 0",
            rusqlite::params![&id, status::IN_FLIGHT],
            |r| r.get(0),
        )?;
        if stuck > 1 {
            anyhow::bail!("task {id} has {stuck} runs in flight");
        }
        if let Some(window) = &spec.window {
            check_window(&conn, &id, window)?;
        }
        match &spec.schedule {
            Schedule::Once { at_ms } if *at_ms < end_ms - SETTLE_MS => {
                if st & status::TERMINAL == 0 {
                    anyhow::bail!(
                        "one-off task {id} due {} s before the end is still {} (next {:?}); runs: {:?}",
                        (end_ms - at_ms) / 1000,
                        status::name(st),
                        _next.map(|n| n - end_ms),
                        history(&conn, &id, end_ms)?
                    );
                }
                if runs == 0 {
                    anyhow::bail!(
                        "one-off task {id} ended {} without ever running",
                        status::name(st)
                    );
                }
                terminal += 1;
            }
            // Its liveness is check_window's: it waits for its window, not its interval.
            Schedule::Every { .. } if spec.window.is_some() => {}
            Schedule::Every { interval_ms, .. } => {
                let last: Option<i64> = conn.query_row(
                    "SELECT max(queued_ms) FROM runs WHERE task_id = ?1",
                    [&id],
                    |r| r.get(0),
                )?;
                let bound = interval_ms + SETTLE_MS;
                if last.is_none_or(|l| end_ms - l > bound) {
                    let history = history(&conn, &id, end_ms)?;
                    anyhow::bail!(
                        "periodic task {id} (every {} s) last queued {:?} ms before the end; now {} next {:?}; runs: {history:?}",
                        interval_ms / 1000,
                        last.map(|l| end_ms - l),
                        status::name(st),
                        _next.map(|n| n - end_ms)
                    );
                }
                if st & status::TERMINAL != 0 {
                    anyhow::bail!("periodic task {id} ended ({})", status::name(st));
                }
            }
            Schedule::Cron { .. } => {
                check_cron(&conn, &id, &spec.key, st, end_ms, starts)?;
            }
            Schedule::Once { .. } => {}
        }
    }
    let never_started = check_runs(&conn, processes, now)?;
    trace::record(format!(
        "final: {terminal} one-off tasks ended, {} processes spawned, {} runs adopted, {never_started} runs never started",
        processes.spawned(),
        processes.adopted()
    ));
    Ok(())
}

/// A cron backup task: still scheduled, queued recently, and run at most once per slot plus
/// once per start of the agent after downtime (the `run_once` missed-run policy).
fn check_cron(
    conn: &rusqlite::Connection,
    id: &str,
    key: &str,
    st: u32,
    end_ms: i64,
    boots: i64,
) -> anyhow::Result<()> {
    let Some(&(_, _, _, _, period_ms)) = BACKUPS.iter().find(|b| b.0 == key) else {
        return Ok(());
    };
    if st & status::TERMINAL != 0 {
        anyhow::bail!("cron task {key} ended ({})", status::name(st));
    }
    let (first, last, runs): (Option<i64>, Option<i64>, i64) = conn.query_row(
        "SELECT min(queued_ms), max(queued_ms), count(*) FROM runs WHERE task_id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    if last.is_none_or(|l| end_ms - l > period_ms + SETTLE_MS) {
        anyhow::bail!(
            "cron task {key} (every {} s) last queued {:?} ms before the end",
            period_ms / 1000,
            last.map(|l| end_ms - l)
        );
    }
    let span = last.unwrap_or(0) - first.unwrap_or(0);
    let slots = span / period_ms + 1;
    trace::record(format!(
        "final: cron {key}: {runs} runs over {} s ({slots} slots, {boots} agent starts)",
        span / 1000
    ));
    if runs > slots + boots {
        anyhow::bail!(
            "cron task {key} ran {runs} times over {} s: more than its {slots} slots plus one catch-up per agent start ({boots})",
            span / 1000
        );
    }
    Ok(())
}

/// Every run against its process: the store holds each process's real outcome (its exit code
/// when it ended by itself), `aborted` where the process never ran, was killed while no agent
/// watched, or its keeper died without recording how it ended, and `doing` exactly while it
/// runs. Returns how many runs never started.
fn check_runs(
    conn: &rusqlite::Connection,
    processes: &SimProcesses,
    now: Duration,
) -> anyhow::Result<usize> {
    let mut stmt = conn.prepare(
        "SELECT run_id, task_id, status, exit_code, error, pid FROM runs ORDER BY run_id",
    )?;
    type Row = (i64, String, u32, Option<i32>, Option<String>, Option<i32>);
    let rows: Vec<Row> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let procs = processes.procs();
    let mut never_started = 0;
    for (run_id, task_id, st, exit_code, error, pid) in &rows {
        let proc = procs.iter().find(|p| p.run_id == *run_id);
        let ran = proc.filter(|p| p.executed(now));
        let Some(p) = ran else {
            // Dispatched in the last few milliseconds: its keeper has not picked it up yet.
            let starting = proc.is_none_or(|p| p.pending(now));
            if *st & status::IN_FLIGHT != 0 && !starting {
                anyhow::bail!(
                    "run {run_id} of {task_id} is {} but its process never ran",
                    status::name(*st)
                );
            }
            if *st & status::IN_FLIGHT != 0 {
                continue;
            }
            if *st != status::ABORTED {
                anyhow::bail!(
                    "run {run_id} of {task_id} never ran but is recorded {} ({error:?})",
                    status::name(*st)
                );
            }
            never_started += 1;
            continue;
        };
        if p.task_id != *task_id {
            anyhow::bail!(
                "run {run_id}: process of {} recorded for {task_id}",
                p.task_id
            );
        }
        if *st & status::IN_FLIGHT != 0 {
            if !p.executing(now) {
                anyhow::bail!(
                    "run {run_id} of {task_id} is {} but its process is over",
                    status::name(*st)
                );
            }
        } else if p.executing(now) {
            anyhow::bail!(
                "run {run_id} of {task_id} is recorded {} while its process still runs",
                status::name(*st)
            );
        } else if p.status_lost() {
            // Its keeper died without writing the command's end: only `aborted` is honest.
            if *st != status::ABORTED {
                anyhow::bail!(
                    "run {run_id} of {task_id} lost its keeper (and its status) but is recorded {} ({error:?})",
                    status::name(*st)
                );
            }
        } else if p.ended_naturally() {
            let want = if p.exit_code == 0 {
                status::DONE
            } else {
                status::FAILED
            };
            if *st != want || *exit_code != Some(p.exit_code) {
                anyhow::bail!(
                    "run {run_id} of {task_id} exited {} by itself but is recorded {} with exit code {exit_code:?} ({error:?})",
                    p.exit_code,
                    status::name(*st)
                );
            }
        } else if *st & (status::FAILED | status::ABORTED | status::CANCELED) == 0 {
            anyhow::bail!(
                "run {run_id} of {task_id} was killed but is recorded {}",
                status::name(*st)
            );
        }
        if pid.is_some_and(|pid| pid != p.pid) {
            anyhow::bail!(
                "run {run_id}: pid {pid:?} recorded, its process is {}",
                p.pid
            );
        }
    }
    for p in procs.iter().filter(|p| p.executed(now)) {
        if !rows.iter().any(|r| r.0 == p.run_id) {
            anyhow::bail!(
                "process {} ran for run {}, which the store does not have",
                p.pid,
                p.run_id
            );
        }
    }
    Ok(never_started)
}

/// A task's runs, times relative to the end of the run, for failure messages.
fn history(conn: &rusqlite::Connection, id: &str, end_ms: i64) -> anyhow::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT run_id, status, queued_ms, started_ms, finished_ms, error FROM runs WHERE task_id = ?1 ORDER BY run_id")?;
    let rows = stmt
        .query_map([id], |r| {
            Ok(format!(
                "run {} {} queued {} started {:?} finished {:?} {:?}",
                r.get::<_, i64>(0)?,
                status::name(r.get(1)?),
                r.get::<_, i64>(2)? - end_ms,
                r.get::<_, Option<i64>>(3)?.map(|f| f - end_ms),
                r.get::<_, Option<i64>>(4)?.map(|f| f - end_ms),
                r.get::<_, Option<String>>(5)?
            ))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Agent restarts (instant, like a supervisor's) and crashes with downtime, at random points.
pub fn schedule(rng: &mut StdRng) -> Plan {
    let mut events = Vec::new();
    let mut t = secs(rng, 1, 15);
    while t < Duration::from_secs(180) {
        if rng.random_range(0..2) == 0 {
            events.push((t, Fault::BounceAgent { agent: 0 }));
            t += secs(rng, 1, 25);
        } else {
            let down = secs(rng, 1, 40);
            events.push((t, Fault::CrashAgent { agent: 0 }));
            events.push((t + down, Fault::StartAgent { agent: 0 }));
            t += down + secs(rng, 1, 25);
        }
    }
    let quiet_from = events.last().map(|(at, _)| *at).unwrap_or_default();
    Plan {
        events,
        quiet_from,
        run_for: quiet_from + Duration::from_secs(180),
    }
}
