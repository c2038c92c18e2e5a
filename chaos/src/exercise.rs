//! One chaos run once the deployment is up, phase by phase: the workloads start, the fault
//! lanes play their schedule, recovery is awaited, the workloads stop, the evidence is judged
//! and the report written.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::faults::{self, Done, Kind, Shared};
use crate::report::{Report, Sample};
use crate::resources::{self, Series};
use crate::verdict::{self, Outcome, Verdict};
use crate::workload::{self, AskedTask, ExecRun, RolloutRun, TaskShape, TerminalLedger};
use crate::{Args, RECOVERY_BOUND, api};

/// Milliseconds since `started`.
fn ms_since(started: tokio::time::Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

/// What the workloads running beside the faults share, and their tasks.
struct Workloads {
    api: Arc<api::Api>,
    agent_ids: Vec<String>,
    names: Vec<String>,
    markers: std::path::PathBuf,
    receipts: std::path::PathBuf,
    asked: Arc<Mutex<Vec<AskedTask>>>,
    terminal: Arc<Mutex<TerminalLedger>>,
    execs: Arc<Mutex<Vec<ExecRun>>>,
    rollouts: Arc<Mutex<Vec<RolloutRun>>>,
    /// Where rollouts' commands leave their receipts.
    rollout_receipts: std::path::PathBuf,
    samples: Arc<Mutex<Vec<Sample>>>,
    resources: Arc<Mutex<Series>>,
    /// What the alert receiver took.
    alerts: workload::AlertSink,
    /// One-off tasks, terminal browsers and fleet exec: they end with `work`.
    loops: Vec<JoinHandle<()>>,
    /// The sampler: it ends with `stop`.
    sampler: JoinHandle<()>,
}

/// Workloads, faults, recovery, verdicts and the report. Returns whether every invariant held.
pub async fn exercise(
    args: &Args,
    kinds: &[Kind],
    duration: Duration,
    d: &Shared,
    root: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let started = tokio::time::Instant::now();
    let work = stop.child_token();
    let mut w = start_workloads(args, d, started, &work, stop).await?;
    let done = play_faults(args, kinds, duration, d, &w, started, stop).await;
    if stop.is_cancelled() {
        bail!("interrupted");
    }
    let healed_ms = ms_since(started);
    eprintln!(
        "chaos: last fault healed at {:.1} s; waiting for recovery …",
        healed_ms as f64 / 1000.0
    );
    let recovery = await_recovery(&w, healed_ms, stop).await;

    work.cancel();
    for task in w.loops.drain(..) {
        let _ = task.await;
    }
    // Let the last one-off tasks run (each takes about a second).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let end_ms = world::World::real().now_unix_ms();
    // Stop the agents gently; any marker process still alive afterwards belongs to no one.
    {
        let mut g = d.lock().await;
        for a in &mut g.agents {
            a.service
                .stop(Signal::SIGTERM, Duration::from_secs(15))
                .await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let orphans = resources::marker_processes(&w.markers);

    let (verdicts, resource_lines) = judge(args, d, &w, &recovery, &orphans, end_ms).await?;
    let faults_done = done.lock().map(|l| l.clone()).unwrap_or_default();
    let samples_all = w.samples.lock().map(|s| s.clone()).unwrap_or_default();
    stop.cancel();
    let _ = w.sampler.await;
    let report = Report {
        seed: args.seed,
        duration_s: duration.as_secs(),
        faults: &faults_done,
        verdicts: &verdicts,
        samples: &samples_all,
        recovery: &recovery,
        resources: &resource_lines,
        agents: &w.names,
    };
    write_report(args, root, &report)
}

/// Recurring and future tasks on every agent, then the loops: one-off tasks, terminal
/// browsers, fleet exec and the sampler.
async fn start_workloads(
    args: &Args,
    d: &Shared,
    started: tokio::time::Instant,
    work: &CancellationToken,
    stop: &CancellationToken,
) -> anyhow::Result<Workloads> {
    let (api, agent_ids, names, markers, receipts) = {
        let g = d.lock().await;
        (
            Arc::clone(&g.api),
            g.agents.iter().map(|a| a.id.clone()).collect::<Vec<_>>(),
            g.agents.iter().map(|a| a.name.clone()).collect::<Vec<_>>(),
            g.markers.clone(),
            g.receipts.clone(),
        )
    };
    let alerts = workload::AlertSink::default();
    workload::start_alert_path(&api, alerts.clone()).await?;
    let asked: Arc<Mutex<Vec<AskedTask>>> = Arc::default();
    for (i, id) in agent_ids.iter().enumerate() {
        let missing = ask_recurring(&api, &asked, id, i, &markers, "", Duration::ZERO).await;
        if let Some(label) = missing.first() {
            bail!("could not create the {label} task on agent {i}");
        }
    }
    let mut loops = vec![spawn_oneoffs(&api, &asked, &agent_ids, &markers, work)];
    // Terminal browsers on the first two agents.
    let terminal = Arc::new(Mutex::new(TerminalLedger::default()));
    for (i, id) in agent_ids.iter().take(2).enumerate() {
        loops.push(tokio::spawn(workload::terminal_browser(
            Arc::clone(&api),
            id.clone(),
            format!("a{i}"),
            Arc::clone(&terminal),
            started,
            work.clone(),
        )));
    }
    let execs: Arc<Mutex<Vec<ExecRun>>> = Arc::default();
    loops.push(spawn_exec_loop(
        &api,
        &execs,
        &receipts,
        args.ssh_hosts,
        work,
    ));
    let rollouts: Arc<Mutex<Vec<RolloutRun>>> = Arc::default();
    let rollout_receipts = receipts
        .parent()
        .unwrap_or(&receipts)
        .join(workload::ROLLOUT_RECEIPTS);
    loops.push(spawn_rollout_loop(&api, &rollouts, &rollout_receipts, work));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let resources: Arc<Mutex<Series>> = Arc::default();
    let sampler = spawn_sampler(&api, &samples, &resources, d, &agent_ids, started, stop);
    Ok(Workloads {
        api,
        agent_ids,
        names,
        markers,
        receipts,
        asked,
        terminal,
        execs,
        rollouts,
        rollout_receipts,
        samples,
        resources,
        alerts,
        loops,
        sampler,
    })
}

/// One-off tasks, round robin, every 3 s.
fn spawn_oneoffs(
    api: &Arc<api::Api>,
    asked: &Arc<Mutex<Vec<AskedTask>>>,
    ids: &[String],
    markers: &Path,
    work: &CancellationToken,
) -> JoinHandle<()> {
    let (api, asked, ids, markers, work) = (
        Arc::clone(api),
        Arc::clone(asked),
        ids.to_vec(),
        markers.to_path_buf(),
        work.clone(),
    );
    tokio::spawn(async move {
        let mut k = 0usize;
        while !work.is_cancelled() {
            let i = k % ids.len();
            let a = workload::ask_task(
                &api,
                &ids[i],
                i,
                &format!("once-{k}"),
                TaskShape::OneOff,
                &markers,
            )
            .await;
            if let Ok(mut l) = asked.lock() {
                l.push(a);
            }
            k += 1;
            tokio::select! {
                () = work.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(3)) => {}
            }
        }
    })
}

/// Fleet exec every 10 s, alternating replicas (none without SSH hosts).
fn spawn_exec_loop(
    api: &Arc<api::Api>,
    execs: &Arc<Mutex<Vec<ExecRun>>>,
    receipts: &Path,
    hosts: usize,
    work: &CancellationToken,
) -> JoinHandle<()> {
    let (api, execs, receipts, work) = (
        Arc::clone(api),
        Arc::clone(execs),
        receipts.to_path_buf(),
        work.clone(),
    );
    tokio::spawn(async move {
        let mut k = 0usize;
        while hosts > 0 && !work.is_cancelled() {
            let run = workload::exec_once(&api, &format!("exec-{k}"), &receipts, k).await;
            if let Ok(mut l) = execs.lock() {
                l.push(run);
            }
            k += 1;
            tokio::select! {
                () = work.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
    })
}

/// A rollout over every agent every 40 s, alternating replicas; they overlap the faults.
fn spawn_rollout_loop(
    api: &Arc<api::Api>,
    rollouts: &Arc<Mutex<Vec<RolloutRun>>>,
    receipts: &Path,
    work: &CancellationToken,
) -> JoinHandle<()> {
    let (api, rollouts, receipts, work) = (
        Arc::clone(api),
        Arc::clone(rollouts),
        receipts.to_path_buf(),
        work.clone(),
    );
    tokio::spawn(async move {
        let mut k = 0usize;
        while !work.is_cancelled() {
            let run = workload::rollout_once(&api, &format!("rollout-{k}"), &receipts, k).await;
            if let Ok(mut l) = rollouts.lock() {
                l.push(run);
            }
            k += 1;
            tokio::select! {
                () = work.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(40)) => {}
            }
        }
    })
}

/// Once a second: agents' status and buffers; every 2 s: the replicas' resources.
fn spawn_sampler(
    api: &Arc<api::Api>,
    samples: &Arc<Mutex<Vec<Sample>>>,
    resources: &Arc<Mutex<Series>>,
    d: &Shared,
    ids: &[String],
    started: tokio::time::Instant,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    let (api, samples, resources, d, stop) = (
        Arc::clone(api),
        Arc::clone(samples),
        Arc::clone(resources),
        Arc::clone(d),
        stop.clone(),
    );
    let ids = ids.to_vec();
    tokio::spawn(async move {
        let mut tick = 0u64;
        while !stop.is_cancelled() {
            let agents = api.agents().await.ok().map(|listed| {
                ids.iter()
                    .map(|id| {
                        listed
                            .iter()
                            .find(|a| &a.id == id)
                            .map(|a| (a.online, a.buffered))
                            .unwrap_or((false, None))
                    })
                    .collect()
            });
            if let Ok(mut s) = samples.lock() {
                s.push(Sample {
                    t_ms: ms_since(started),
                    agents,
                });
            }
            if tick.is_multiple_of(2) {
                let pids: Vec<(usize, Option<i32>)> = {
                    let g = d.lock().await;
                    g.replicas
                        .iter()
                        .map(crate::services::Service::pid)
                        .enumerate()
                        .collect()
                };
                for (i, pid) in pids {
                    if let Some(pid) = pid
                        && let Some(p) = resources::proc_figures(pid)
                        && let Ok(mut r) = resources.lock()
                    {
                        r.entry((i, pid)).or_default().push((ms_since(started), p));
                    }
                }
            }
            tick += 1;
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

/// The two fault lanes (agents; services) play their seeded schedules side by side; what
/// was done, per lane.
async fn play_faults(
    args: &Args,
    kinds: &[Kind],
    duration: Duration,
    d: &Shared,
    w: &Workloads,
    started: tokio::time::Instant,
    stop: &CancellationToken,
) -> Arc<Mutex<Vec<(usize, Done)>>> {
    let duration_ms = duration.as_millis() as u64;
    let lane_kinds = |lane: &[Kind]| -> Vec<Kind> {
        kinds.iter().copied().filter(|k| lane.contains(k)).collect()
    };
    let plans = [
        faults::plan(
            args.seed,
            0,
            &lane_kinds(&faults::AGENT_LANE),
            args.agents,
            duration_ms,
        ),
        faults::plan(
            args.seed,
            1,
            &lane_kinds(&faults::SERVICE_LANE),
            2,
            duration_ms,
        ),
    ];
    eprintln!(
        "chaos: deployment up; {} faults planned over {} s",
        plans[0].len() + plans[1].len(),
        duration.as_secs()
    );
    let done: Arc<Mutex<Vec<(usize, Done)>>> = Arc::default();
    let mut lanes = Vec::new();
    for (lane, plan) in plans.into_iter().enumerate() {
        let (d, done, stop) = (Arc::clone(d), Arc::clone(&done), stop.clone());
        let (api, asked, ids, markers) = (
            Arc::clone(&w.api),
            Arc::clone(&w.asked),
            w.agent_ids.clone(),
            w.markers.clone(),
        );
        lanes.push(tokio::spawn(async move {
            for p in plan {
                let wait = p.at_ms.saturating_sub(ms_since(started));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(wait)) => {}
                }
                let started_ms = ms_since(started);
                let (injected, note) = faults::carry_out(&d, &p).await;
                let healed_ms = ms_since(started);
                eprintln!(
                    "chaos: {:>6.1}s {} target {}{}",
                    started_ms as f64 / 1000.0,
                    p.kind.name(),
                    p.target,
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!(": {note}")
                    }
                );
                if injected && p.kind == Kind::CorruptTasks {
                    // As the agent's error asks: create the recurring tasks again.
                    let i = p.target % ids.len();
                    let suffix = format!("-{healed_ms}");
                    let patience = Duration::from_secs(60);
                    ask_recurring(&api, &asked, &ids[i], i, &markers, &suffix, patience).await;
                }
                if let Ok(mut l) = done.lock() {
                    l.push((
                        lane,
                        Done {
                            planned: p,
                            started_ms,
                            healed_ms,
                            note,
                            injected,
                        },
                    ));
                }
            }
        }));
    }
    for lane in lanes {
        let _ = lane.await;
    }
    done
}

/// Recovery after the last fault healed: every agent online, every buffer drained, the
/// terminals answering again; how long each took (ms), `None` if not within the bound.
async fn await_recovery(
    w: &Workloads,
    healed_ms: u64,
    stop: &CancellationToken,
) -> Vec<(String, Option<u64>)> {
    let deadline = tokio::time::Instant::now() + RECOVERY_BOUND;
    let (mut online_at, mut drained_at, mut terminal_at) = (None, None, None);
    while tokio::time::Instant::now() < deadline && !stop.is_cancelled() {
        let last = w.samples.lock().ok().and_then(|s| s.last().cloned());
        if let Some((t_ms, agents)) = last
            .filter(|s| s.t_ms > healed_ms)
            .and_then(|s| Some((s.t_ms, s.agents?)))
        {
            if online_at.is_none() && agents.iter().all(|a| a.0) {
                online_at = Some(t_ms - healed_ms);
            }
            if drained_at.is_none() && agents.iter().all(|a| a.0 && a.1 == Some(0)) {
                drained_at = Some(t_ms - healed_ms);
            }
        }
        if terminal_at.is_none()
            && let Ok(l) = w.terminal.lock()
            && l.last_confirmed_ms > healed_ms
        {
            terminal_at = Some(l.last_confirmed_ms - healed_ms);
        }
        if online_at.is_some() && drained_at.is_some() && terminal_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    vec![
        ("every agent online".into(), online_at),
        (
            "every buffer drained (heartbeat shows 0 rows)".into(),
            drained_at,
        ),
        ("terminal sessions answering again".into(), terminal_at),
    ]
}

/// Every verdict from the evidence the run left (storage, buffers, task stores, markers,
/// receipts, the monitored database), and the resource lines of the report.
async fn judge(
    args: &Args,
    d: &Shared,
    w: &Workloads,
    recovery: &[(String, Option<u64>)],
    orphans: &[i32],
    end_ms: i64,
) -> anyhow::Result<(Vec<Verdict>, Vec<String>)> {
    let g = d.lock().await;
    let psql = g.pg_bin.join("psql");
    let mut verdicts = Vec::new();
    // Metrics.
    let stored = query(
        &psql,
        &g.storage_url,
        "SELECT agent_id, epoch, seq, count(*) FROM metrics GROUP BY 1, 2, 3",
    );
    match &stored {
        Ok(rows) => {
            let mut metric_inputs = Vec::new();
            for a in &g.agents {
                let mine: verdict::Stored = rows
                    .iter()
                    .filter(|r| r.first() == Some(&a.id))
                    .filter_map(|r| {
                        Some((
                            (r.get(1)?.clone(), r.get(2)?.parse().ok()?),
                            r.get(3)?.parse().ok()?,
                        ))
                    })
                    .collect();
                let corrupted = g
                    .lost_to_corruption
                    .iter()
                    .filter(|(i, _)| *i == a.index)
                    .map(|(_, s)| s.clone())
                    .collect();
                metric_inputs.push((
                    a.name.clone(),
                    verdict::snapshot_buffer(&a.data.join("buffer.db")),
                    mine,
                    corrupted,
                ));
            }
            verdicts.push(verdict::metrics(&metric_inputs));
        }
        Err(e) => verdicts.push(Verdict::new(
            "metrics: nothing lost, nothing stored twice",
            String::new(),
            Vec::new(),
            vec![format!("stored metrics could not be read: {e}")],
        )),
    }
    // Tasks.
    let stores: Vec<_> = g
        .agents
        .iter()
        .map(|a| verdict::read_tasks(&a.data.join("tasks.db")))
        .collect();
    let asked_list = w.asked.lock().map(|l| l.clone()).unwrap_or_default();
    let mut task_verdict =
        verdict::tasks(&asked_list, &stores, &g.tasks_corrupted, &w.markers, end_ms);
    if !orphans.is_empty() {
        task_verdict.outcome = Outcome::Invalid;
        task_verdict.evidence.push(format!(
            "{} task processes outlived every agent: pids {orphans:?}",
            orphans.len()
        ));
    }
    verdicts.push(task_verdict);
    // Terminal.
    let executed = query(
        &psql,
        &g.monitored_dsn(),
        "SELECT session, n, count(*) FROM chaos_typed GROUP BY 1, 2",
    )
    .map(|rows| {
        rows.iter()
            .filter_map(|r| {
                Some((
                    (r.first()?.clone(), r.get(1)?.parse().ok()?),
                    r.get(2)?.parse().ok()?,
                ))
            })
            .collect()
    });
    let terminal_verdict = w
        .terminal
        .lock()
        .map(|l| verdict::terminal(&l, &executed))
        .map_err(|_| anyhow::anyhow!("terminal ledger poisoned"))?;
    verdicts.push(terminal_verdict);
    // Exec.
    if args.ssh_hosts > 0 {
        let runs = w.execs.lock().map(|l| l.clone()).unwrap_or_default();
        verdicts.push(verdict::exec(&runs, &workload::read_receipts(&w.receipts)));
    }
    // Rollouts: read as the replicas show them now (before the agents were stopped, the
    // last ones had their 8 s to report).
    let mut rollout_runs = w.rollouts.lock().map(|l| l.clone()).unwrap_or_default();
    workload::rollouts_read(&w.api, &mut rollout_runs).await;
    verdicts.push(verdict::rollouts(
        &rollout_runs,
        &workload::read_receipts(&w.rollout_receipts),
    ));
    // Alerts.
    verdicts.push(alert_verdict(&psql, &g.storage_url, &w.alerts, end_ms));
    // Recovery.
    let missing: Vec<String> = recovery
        .iter()
        .filter(|(_, at)| at.is_none())
        .map(|(what, _)| format!("{what}: not within {} s", RECOVERY_BOUND.as_secs()))
        .collect();
    verdicts.push(Verdict::new(
        "recovery: after the last fault, everything back without a restart",
        format!("bound {} s", RECOVERY_BOUND.as_secs()),
        missing,
        Vec::new(),
    ));
    // Resources.
    let (resource_lines, resource_verdict) =
        resources::resource_verdict(&w.resources.lock().map(|r| r.clone()).unwrap_or_default());
    verdicts.push(resource_verdict);
    Ok((verdicts, resource_lines))
}

/// Write the report and its timeline (into the report folder, and beside the kept logs),
/// print it; whether every invariant held.
fn write_report(args: &Args, root: &Path, report: &Report<'_>) -> anyhow::Result<bool> {
    let text = report.text();
    let valid = report.valid();
    let dir = &args.report_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let base = format!("seed-{}", args.seed);
    std::fs::write(dir.join(format!("{base}.txt")), &text)?;
    std::fs::write(dir.join(format!("{base}.svg")), report.svg())?;
    // On failure the report also goes with the kept logs and data.
    std::fs::write(root.join("report.txt"), &text)?;
    std::fs::write(root.join("timeline.svg"), report.svg())?;
    println!("{text}");
    println!(
        "verdict: {}; report {}/{base}.txt, timeline {}/{base}.svg",
        if valid { "VALID" } else { "NOT VALID" },
        dir.display(),
        dir.display()
    );
    Ok(valid)
}

/// Ask for an agent's periodic, cron and future tasks (keys `LABEL-aN` + `suffix`), each
/// retried for up to `patience` while it is neither created nor possibly created. Returns
/// the labels of those that were not created. Used at the start, and after a damaged task
/// store took an agent's tasks (as the agent's error asks).
async fn ask_recurring(
    api: &api::Api,
    asked: &Mutex<Vec<AskedTask>>,
    agent_id: &str,
    agent: usize,
    markers: &Path,
    suffix: &str,
    patience: Duration,
) -> Vec<&'static str> {
    let mut missing = Vec::new();
    for (what, label) in [
        (TaskShape::Periodic, "periodic"),
        (TaskShape::Cron, "cron"),
        (TaskShape::Future, "future"),
    ] {
        let key = format!("{label}-a{agent}{suffix}");
        let deadline = tokio::time::Instant::now() + patience;
        let a = loop {
            let a = workload::ask_task(api, agent_id, agent, &key, what, markers).await;
            if a.id.is_some() || a.uncertain || tokio::time::Instant::now() >= deadline {
                break a;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        if a.id.is_none() {
            missing.push(label);
        }
        if let Ok(mut l) = asked.lock() {
            l.push(a);
        }
    }
    missing
}

/// The alert path's verdict from the outbox in storage and what the receiver took.
fn alert_verdict(psql: &Path, dsn: &str, sink: &workload::AlertSink, end_ms: i64) -> Verdict {
    let rows = query(
        psql,
        dsn,
        "SELECT id, key, created_ms, delivered_ms FROM notifications ORDER BY id",
    );
    let outbox: Result<Vec<verdict::Notification>, String> = rows.and_then(|rows| {
        rows.iter()
            .map(|r| {
                let field = |i: usize| r.get(i).map(String::as_str).unwrap_or("");
                Some(verdict::Notification {
                    id: field(0).parse().ok()?,
                    key: field(1).to_string(),
                    created_ms: field(2).parse().ok()?,
                    delivered_ms: field(3).parse().ok(),
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "an outbox row that does not parse".to_string())
    });
    match outbox {
        Ok(outbox) => {
            let taken = sink.taken.lock().map(|t| t.clone()).unwrap_or_default();
            verdict::alerts(&outbox, &taken, end_ms)
        }
        Err(e) => Verdict::new(
            "alerts: every transition delivered once (at most one duplicate), in order",
            String::new(),
            Vec::new(),
            vec![format!("the outbox could not be read: {e}")],
        ),
    }
}

/// Rows of `sql` run through psql on `dsn`, fields split.
fn query(psql: &Path, dsn: &str, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let out = std::process::Command::new(psql)
        .args(["-X", "-At", "-F", "\t", "-c", sql, dsn])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect())
}
