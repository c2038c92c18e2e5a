//! `outpost-chaos` (`just chaos`): the simulator's faults inflicted on real processes.
//!
//! It starts a deployment on this machine (two control-plane replicas sharing a real
//! Postgres and Redis, agents in their own network namespaces collecting from a real Postgres
//! under pgbench load, SSH hosts in namespaces), runs workloads that leave evidence, injects
//! faults from a seeded schedule, lets everything heal, and then checks the invariants from
//! the ledger those workloads left. See ARCHITECTURE.md ("Chaos suite").

mod api;
mod deploy;
mod faults;
mod host;
mod proxy;
mod report;
mod services;
mod verdict;
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use crate::deploy::Deployment;
use crate::faults::{Done, Kind, Shared};
use crate::report::{Report, Sample};
use crate::verdict::{Outcome, Verdict};
use crate::workload::{AskedTask, ExecRun, TaskShape, TerminalLedger};

#[derive(Parser, Debug)]
#[command(
    name = "outpost-chaos",
    about = "Real processes, real faults: start a deployment on this machine, inject faults from a seeded schedule, and check every invariant from the evidence left behind",
    after_help = "Runs as root (namespaces, iptables, tmpfs). Everything it starts is stopped and removed when it ends, also on Ctrl+C or failure; a failed run keeps its logs and data in the folder it prints.\n\nExamples:\n  just chaos                                  # seed 1 for 3 minutes\n  just chaos --seed 7 --duration 10m\n  just chaos --duration 1h --faults agent_kill,partition,replica_kill\n  outpost-chaos --list-faults"
)]
struct Args {
    /// Seed of the fault schedule: the same seed gives the same schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long faults are injected (humantime: 90s, 10m, 1h); recovery and checks follow.
    #[arg(long, default_value = "3m")]
    duration: String,
    /// Fault kinds to inject, comma-separated (default: all; see --list-faults).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Agents, each in its own network namespace.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// SSH hosts for fleet exec, each in its own network namespace.
    #[arg(long, default_value_t = 2)]
    ssh_hosts: usize,
    /// Where `outpost` and `outpost-agent` are (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the report and timeline go.
    #[arg(long, default_value = "target/chaos")]
    report_dir: PathBuf,
    /// Keep the run's folder (logs, data) also when every invariant holds.
    #[arg(long)]
    keep: bool,
    /// Print the fault kinds and exit.
    #[arg(long)]
    list_faults: bool,
}

/// How long the run may take to come back after the last fault heals.
const RECOVERY_BOUND: Duration = Duration::from_secs(120);

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.list_faults {
        for kind in Kind::all() {
            let lane = if faults::AGENT_LANE.contains(&kind) {
                "agent"
            } else {
                "service"
            };
            println!("{:<18} {lane:<8} {}", kind.name(), kind.describe());
        }
        return std::process::ExitCode::SUCCESS;
    }
    match run(args).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let duration = humantime::parse_duration(&args.duration)
        .with_context(|| format!("--duration {:?}: use e.g. 90s, 10m, 1h", args.duration))?;
    if duration < Duration::from_secs(20) {
        bail!("--duration must be at least 20s");
    }
    let kinds: Vec<Kind> = if args.faults.is_empty() {
        Kind::all().collect()
    } else {
        args.faults
            .iter()
            .map(|f| {
                Kind::parse(f.trim()).with_context(|| {
                    format!(
                        "unknown fault {f:?}; known: {}",
                        Kind::all().map(Kind::name).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    if args.agents == 0 || args.agents > 50 {
        bail!("--agents must be between 1 and 50");
    }
    if args.ssh_hosts > 50 {
        bail!("--ssh-hosts must be at most 50");
    }
    host::preflight()?;
    let bins = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the program's directory")?
            .to_path_buf(),
    };
    for bin in ["outpost", "outpost-agent"] {
        if !bins.join(bin).is_file() {
            bail!(
                "{} is missing: build it (`cargo build --bins`) or pass --bin-dir",
                bins.join(bin).display()
            );
        }
    }
    for leftover in host::sweep() {
        eprintln!("chaos: removed a leftover {leftover}");
    }
    let root = std::env::temp_dir().join(format!(
        "{}{}-{:08x}",
        host::RUN_DIR_MARK,
        args.seed,
        world::World::real().random_u64() as u32
    ));
    std::fs::create_dir_all(&root)?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Postgres runs as `postgres` and must reach its directories in here.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))?;
    }
    let stop = CancellationToken::new();
    let signals = world::on_shutdown_signal({
        let stop = stop.clone();
        move || stop.cancel()
    });
    eprintln!(
        "chaos: seed {} for {} s; run folder {}",
        args.seed,
        duration.as_secs(),
        root.display()
    );
    let deployment = tokio::select! {
        () = stop.cancelled() => Err(anyhow::anyhow!("interrupted while starting")),
        d = Deployment::start(&root, &bins, args.agents, args.ssh_hosts, duration.as_secs(), &stop) => d,
    };
    let outcome = match deployment {
        Ok(d) => {
            let shared: Shared = Arc::new(tokio::sync::Mutex::new(d));
            let outcome = exercise(&args, &kinds, duration, &shared, &root, &stop).await;
            shared.lock().await.stop().await;
            outcome
        }
        Err(e) => Err(e),
    };
    stop.cancel();
    signals.abort();
    let keep = args.keep || !matches!(outcome, Ok(true));
    if keep {
        keep_agent_data(&root);
    }
    for removed in host::sweep() {
        if !removed.starts_with("mount")
            && !removed.starts_with("namespace")
            && !removed.starts_with("link")
        {
            eprintln!("chaos: removed {removed}");
        }
    }
    if keep {
        eprintln!("chaos: logs and data kept in {}", root.display());
    } else if let Err(e) = std::fs::remove_dir_all(&root) {
        eprintln!("chaos: could not remove {}: {e}", root.display());
    }
    outcome
}

/// Workloads, faults, recovery, verdicts and the report. Returns whether every invariant held.
async fn exercise(
    args: &Args,
    kinds: &[Kind],
    duration: Duration,
    d: &Shared,
    root: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let started = tokio::time::Instant::now();
    let elapsed_ms = move || started.elapsed().as_millis() as u64;
    let work = stop.child_token();
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

    // Recurring and future tasks on every agent.
    let asked: Arc<Mutex<Vec<AskedTask>>> = Arc::default();
    for (i, id) in agent_ids.iter().enumerate() {
        let missing = ask_recurring(&api, &asked, id, i, &markers, "", Duration::ZERO).await;
        if let Some(label) = missing.first() {
            bail!("could not create the {label} task on agent {i}");
        }
    }
    // One-off tasks, round robin, every 3 s.
    let oneoffs = {
        let (api, asked, ids, markers, work) = (
            Arc::clone(&api),
            Arc::clone(&asked),
            agent_ids.clone(),
            markers.clone(),
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
    };
    // Terminal browsers on the first two agents.
    let terminal = Arc::new(Mutex::new(TerminalLedger::default()));
    let mut browsers = Vec::new();
    for (i, id) in agent_ids.iter().take(2).enumerate() {
        browsers.push(tokio::spawn(workload::terminal_browser(
            Arc::clone(&api),
            id.clone(),
            format!("a{i}"),
            Arc::clone(&terminal),
            started,
            work.clone(),
        )));
    }
    // Fleet exec every 10 s, alternating replicas.
    let execs: Arc<Mutex<Vec<ExecRun>>> = Arc::default();
    let exec_loop = {
        let (api, execs, receipts, work) = (
            Arc::clone(&api),
            Arc::clone(&execs),
            receipts.clone(),
            work.clone(),
        );
        let hosts = args.ssh_hosts;
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
    };
    // Once a second: agents' status and buffers; every 2 s: the replicas' resources.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let resources: Arc<Mutex<Series>> = Arc::default();
    let sampler = {
        let (api, samples, resources, d, stop) = (
            Arc::clone(&api),
            Arc::clone(&samples),
            Arc::clone(&resources),
            Arc::clone(d),
            stop.clone(),
        );
        let ids = agent_ids.clone();
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
                        t_ms: elapsed_ms(),
                        agents,
                    });
                }
                if tick.is_multiple_of(2) {
                    let pids: Vec<(usize, Option<i32>)> = {
                        let g = d.lock().await;
                        g.replicas
                            .iter()
                            .map(services::Service::pid)
                            .enumerate()
                            .collect()
                    };
                    for (i, pid) in pids {
                        if let Some(pid) = pid
                            && let Some(p) = proc_figures(pid)
                            && let Ok(mut r) = resources.lock()
                        {
                            r.entry((i, pid)).or_default().push((elapsed_ms(), p));
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
    };

    // The fault lanes.
    let duration_ms = duration.as_millis() as u64;
    let agent_kinds: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| faults::AGENT_LANE.contains(k))
        .collect();
    let service_kinds: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| faults::SERVICE_LANE.contains(k))
        .collect();
    let plans = [
        faults::plan(args.seed, 0, &agent_kinds, args.agents, duration_ms),
        faults::plan(args.seed, 1, &service_kinds, 2, duration_ms),
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
            Arc::clone(&api),
            Arc::clone(&asked),
            agent_ids.clone(),
            markers.clone(),
        );
        lanes.push(tokio::spawn(async move {
            for p in plan {
                let wait = p.at_ms.saturating_sub(elapsed_ms());
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(wait)) => {}
                }
                let started_ms = elapsed_ms();
                let (injected, note) = faults::carry_out(&d, &p).await;
                let healed_ms = elapsed_ms();
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
    if stop.is_cancelled() {
        bail!("interrupted");
    }
    let healed_ms = elapsed_ms();
    eprintln!(
        "chaos: last fault healed at {:.1} s; waiting for recovery …",
        healed_ms as f64 / 1000.0
    );

    // Recovery: every agent online, every buffer drained, the terminals answering again, every
    // one-off task finished.
    let mut recovery: Vec<(String, Option<u64>)> = Vec::new();
    let deadline = tokio::time::Instant::now() + RECOVERY_BOUND;
    let (mut online_at, mut drained_at, mut terminal_at) = (None, None, None);
    while tokio::time::Instant::now() < deadline && !stop.is_cancelled() {
        let last = samples.lock().ok().and_then(|s| s.last().cloned());
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
            && let Ok(l) = terminal.lock()
            && l.last_confirmed_ms > healed_ms
        {
            terminal_at = Some(l.last_confirmed_ms - healed_ms);
        }
        if online_at.is_some() && drained_at.is_some() && terminal_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    recovery.push(("every agent online".into(), online_at));
    recovery.push((
        "every buffer drained (heartbeat shows 0 rows)".into(),
        drained_at,
    ));
    recovery.push(("terminal sessions answering again".into(), terminal_at));

    work.cancel();
    let _ = oneoffs.await;
    let _ = exec_loop.await;
    for b in browsers {
        let _ = b.await;
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
    let orphans = marker_processes(&markers);

    let g = d.lock().await;
    let psql = g.pg_bin.join("psql");
    let mut verdicts = Vec::new();
    // Metrics.
    let stored = query(
        &psql,
        &g.storage_url,
        "SELECT agent_id, epoch, seq, count(*) FROM metrics GROUP BY 1, 2, 3",
    );
    let mut metric_inputs = Vec::new();
    match &stored {
        Ok(rows) => {
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
    let asked_list = asked.lock().map(|l| l.clone()).unwrap_or_default();
    let mut task_verdict =
        verdict::tasks(&asked_list, &stores, &g.tasks_corrupted, &markers, end_ms);
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
    let terminal_verdict = terminal
        .lock()
        .map(|l| verdict::terminal(&l, &executed))
        .map_err(|_| anyhow::anyhow!("terminal ledger poisoned"))?;
    verdicts.push(terminal_verdict);
    // Exec.
    if args.ssh_hosts > 0 {
        let runs = execs.lock().map(|l| l.clone()).unwrap_or_default();
        verdicts.push(verdict::exec(&runs, &workload::read_receipts(&receipts)));
    }
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
        resource_verdict(&resources.lock().map(|r| r.clone()).unwrap_or_default());
    verdicts.push(resource_verdict);
    drop(g);

    let faults_done = done.lock().map(|l| l.clone()).unwrap_or_default();
    let samples_all = samples.lock().map(|s| s.clone()).unwrap_or_default();
    stop.cancel();
    let _ = sampler.await;
    let report = Report {
        seed: args.seed,
        duration_s: duration.as_secs(),
        faults: &faults_done,
        verdicts: &verdicts,
        samples: &samples_all,
        recovery: &recovery,
        resources: &resource_lines,
        agents: &names,
    };
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

/// Copy each agent's data (on a tmpfs that the sweep unmounts) to `agent-N/data-kept`.
fn keep_agent_data(root: &Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let data = entry.path().join("data");
        if entry.file_name().to_string_lossy().starts_with("agent-") && data.is_dir() {
            let kept = entry.path().join("data-kept");
            if !host::try_run(
                "cp",
                &[
                    "-a",
                    &data.display().to_string(),
                    &kept.display().to_string(),
                ],
            ) {
                eprintln!("chaos: could not copy {} out of its tmpfs", data.display());
            }
        }
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

/// Pids of processes whose command line names the marker folder (task runs).
fn marker_processes(markers: &Path) -> Vec<i32> {
    let needle = markers.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// Resource samples per (replica, pid): (ms since start, figures).
type Series = BTreeMap<(usize, i32), Vec<(u64, Proc)>>;

/// A process's open files, threads and resident memory.
#[derive(Clone, Copy, Debug)]
struct Proc {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn proc_figures(pid: i32) -> Option<Proc> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some(Proc {
        fds,
        threads: field("Threads:")? as usize,
        rss_kib: field("VmRSS:")?,
    })
}

/// No growth of file descriptors, threads or memory in a replica: each replica process that
/// lived long enough is compared between a window after its warm-up and its last window.
fn resource_verdict(series: &Series) -> (Vec<String>, Verdict) {
    let mut lines = Vec::new();
    let mut invalid = Vec::new();
    let mut judged = 0;
    for ((replica, pid), points) in series {
        let (Some(first), Some(last)) = (points.first(), points.last()) else {
            continue;
        };
        let life = last.0 - first.0;
        let avg = |from: u64, to: u64| {
            let w: Vec<&Proc> = points
                .iter()
                .filter(|(t, _)| *t >= from && *t <= to)
                .map(|(_, p)| p)
                .collect();
            if w.is_empty() {
                return None;
            }
            let n = w.len() as f64;
            Some((
                w.iter().map(|p| p.fds as f64).sum::<f64>() / n,
                w.iter().map(|p| p.threads as f64).sum::<f64>() / n,
                w.iter().map(|p| p.rss_kib as f64).sum::<f64>() / n,
            ))
        };
        if life < 90_000 {
            continue;
        }
        let (Some(early), Some(late)) = (
            avg(first.0 + 30_000, first.0 + 50_000),
            avg(last.0 - 20_000, last.0),
        ) else {
            continue;
        };
        judged += 1;
        lines.push(format!(
            "replica {} (pid {pid}, {} s): fds {:.0} → {:.0}, threads {:.0} → {:.0}, RSS {:.1} → {:.1} MiB",
            replica + 1,
            life / 1000,
            early.0,
            late.0,
            early.1,
            late.1,
            early.2 / 1024.0,
            late.2 / 1024.0
        ));
        if late.0 > early.0 * 1.25 + 16.0 {
            invalid.push(format!(
                "replica {} file descriptors grew {:.0} → {:.0}",
                replica + 1,
                early.0,
                late.0
            ));
        }
        if late.1 > early.1 + 8.0 {
            invalid.push(format!(
                "replica {} threads grew {:.0} → {:.0}",
                replica + 1,
                early.1,
                late.1
            ));
        }
        if late.2 > early.2 * 1.5 + 65_536.0 {
            invalid.push(format!(
                "replica {} RSS grew {:.1} → {:.1} MiB",
                replica + 1,
                early.2 / 1024.0,
                late.2 / 1024.0
            ));
        }
    }
    let unknown = if judged == 0 {
        vec!["no replica process lived 90 s: nothing to compare".to_string()]
    } else {
        Vec::new()
    };
    (
        lines,
        Verdict::new(
            "resources: no growth of fds, threads or memory in the control plane",
            format!("{judged} replica processes compared after warm-up against their last 20 s"),
            invalid,
            unknown,
        ),
    )
}
