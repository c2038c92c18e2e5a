//! `just bench tasks`: the task runtime against its targets (README, Benchmarks), next to SqliteHuey on the same
//! machine, in the same run, with the same workload.
//!
//! * durable enqueue over the socket API (64 concurrent clients, `synchronous=FULL`)
//! * subprocess tasks drained (`true`, 4 workers), two ways: overlapped (64 clients enqueue
//!   while the runs drain; from the first start to the last end) and as a phase of its own
//!   (every task enqueued first, due at one instant; from the first start to the last end),
//!   which is what SqliteHuey's figure is (its enqueue is not in its drain), with the CPU
//!   seconds per run of the agent and everything it started
//! * dispatch lag p50/p99 (tasks due every 20 ms, nothing queued behind the limit)
//! * start-up recovery of a 100k-task store
#![allow(clippy::disallowed_methods)] // a benchmark measures wall time

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::tasks::core::{Config, Found, Scheduler};
use agent::tasks::model::{Kind, Schedule, TaskSpec};
use agent::tasks::store::Store;
use world::{Target, World};

const ENQUEUE_N: usize = 20_000;
const CLIENTS: usize = 64;
const DRAIN_N: usize = 2_000;
const WORKERS: usize = 4;
const LAG_N: usize = 200;
const RECOVERY_N: usize = 100_000;

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_agent(dir: &Path, concurrency: usize) -> AgentProc {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[tasks]\nconcurrency_max = {concurrency}\n{}",
            // As root, commands run as root only when the config says so.
            if nix::unistd::geteuid().is_root() {
                "run_as = \"root\"\n"
            } else {
                ""
            }
        ),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
        .args(["run", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&config)
        .env("OUTPOST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start outpost-agent");
    let proc = AgentProc(child);
    let world = World::real();
    for _ in 0..200 {
        if post(
            &world,
            dir,
            r#"{"kind":"command","argv":["true"],"in":"1h","key":"probe"}"#,
        )
        .await
        .is_ok()
        {
            return proc;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("agent did not start");
}

fn json_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers
}

async fn post(world: &World, dir: &Path, body: &str) -> Result<(), String> {
    let socket = dir.join("data").join("agent.sock");
    let r = world::request(
        world,
        Target::Unix {
            socket: &socket,
            path: "/v1/tasks",
        },
        http::Method::POST,
        json_headers(),
        body.to_string().into(),
        Duration::from_secs(30),
        1 << 20,
    )
    .await
    .map_err(|e| e.to_string())?;
    if r.status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", r.status))
    }
}

fn db(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        dir.join("data").join("tasks.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open db")
}

async fn enqueue_rate() -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let _agent = start_agent(dir.path(), WORKERS).await;
    let world = World::real();
    let start = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (world, dir) = (world.clone(), dir.path().to_path_buf());
        clients.spawn(async move {
            for i in (c..ENQUEUE_N).step_by(CLIENTS) {
                post(
                    &world,
                    &dir,
                    &format!(r#"{{"kind":"command","argv":["true"],"in":"1h","key":"e{i}"}}"#),
                )
                .await
                .expect("enqueue");
            }
        });
    }
    while clients.join_next().await.is_some() {}
    ENQUEUE_N as f64 / start.elapsed().as_secs_f64()
}

/// Enqueue [`DRAIN_N`] tasks from [`CLIENTS`] concurrent clients; `body` makes task `i`'s JSON.
async fn enqueue_drain_tasks(dir: &Path, body: impl Fn(usize) -> String + Send + Sync + 'static) {
    let world = World::real();
    let body = std::sync::Arc::new(body);
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (world, dir, body) = (world.clone(), dir.to_path_buf(), body.clone());
        clients.spawn(async move {
            for i in (c..DRAIN_N).step_by(CLIENTS) {
                post(&world, &dir, &body(i)).await.expect("enqueue");
            }
        });
    }
    while clients.join_next().await.is_some() {}
}

/// Wait until [`DRAIN_N`] runs have finished; their drain rate from the first start to the
/// last end, in runs/s.
async fn drained_rate(dir: &Path) -> f64 {
    let conn = db(dir);
    for _ in 0..6000 {
        let done: i64 = conn
            .query_row(
                "SELECT count(*) FROM runs WHERE finished_ms IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .expect("count");
        if done as usize >= DRAIN_N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (first, last): (i64, i64) = conn
        .query_row(
            "SELECT min(started_ms), max(finished_ms) FROM runs WHERE finished_ms IS NOT NULL",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("span");
    DRAIN_N as f64 / ((last - first).max(1) as f64 / 1000.0)
}

/// The drain overlapped with the enqueue: tasks due at once, runs start while clients add more.
async fn drain_rate() -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let _agent = start_agent(dir.path(), WORKERS).await;
    enqueue_drain_tasks(dir.path(), |i| {
        format!(r#"{{"kind":"command","argv":["true"],"key":"d{i}"}}"#)
    })
    .await;
    drained_rate(dir.path()).await
}

/// CPU seconds the agent process and its run keepers (with the commands they reaped)
/// have used: utime + stime + cutime + cstime of each, from /proc.
fn cpu_s(agent_pid: u32) -> f64 {
    let ticks = |pid: u32| -> u64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return 0;
        };
        let Some(close) = stat.rfind(')') else {
            return 0;
        };
        // Fields 14 to 17 (utime, stime, cutime, cstime), counted after the command name.
        stat[close + 2..]
            .split_whitespace()
            .skip(11)
            .take(4)
            .filter_map(|v| v.parse::<u64>().ok())
            .sum()
    };
    // Children are listed per thread that started them.
    let children: Vec<u32> = std::fs::read_dir(format!("/proc/{agent_pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    let total: u64 = ticks(agent_pid) + children.into_iter().map(ticks).sum::<u64>();
    // USER_HZ is 100 on Linux.
    total as f64 / 100.0
}

/// The drain as a phase of its own: every task is enqueued first, all due at one instant,
/// then timed from the first start to the last end. Returns (runs/s, CPU ms per run).
async fn drain_rate_phased() -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(dir.path(), WORKERS).await;
    let world = World::real();
    let due_ms = world.now_unix_ms() + 6_000;
    let at = jiff::Timestamp::from_millisecond(due_ms).expect("time");
    enqueue_drain_tasks(dir.path(), move |i| {
        format!(r#"{{"kind":"command","argv":["true"],"at":"{at}","key":"p{i}"}}"#)
    })
    .await;
    let early = world.now_unix_ms();
    assert!(
        early < due_ms,
        "enqueueing {DRAIN_N} tasks took past their due time: the phases overlap"
    );
    tokio::time::sleep(Duration::from_millis((due_ms - early) as u64 - 200)).await;
    let cpu_before = cpu_s(agent.0.id());
    let rate = drained_rate(dir.path()).await;
    let cpu = cpu_s(agent.0.id()) - cpu_before;
    (rate, cpu / DRAIN_N as f64 * 1000.0)
}

async fn dispatch_lag() -> (i64, i64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let _agent = start_agent(dir.path(), WORKERS).await;
    let world = World::real();
    let base = world.now_unix_ms() + 2000;
    for i in 0..LAG_N {
        let at = jiff::Timestamp::from_millisecond(base + (i as i64) * 20).expect("time");
        post(
            &world,
            dir.path(),
            &format!(r#"{{"kind":"command","argv":["true"],"at":"{at}","key":"l{i}"}}"#),
        )
        .await
        .expect("enqueue");
    }
    tokio::time::sleep(Duration::from_millis(2000 + 20 * LAG_N as u64 + 1000)).await;
    let conn = db(dir.path());
    let mut stmt = conn
        .prepare("SELECT r.started_ms - CAST(substr(t.schedule, 6) AS INTEGER) FROM runs r JOIN tasks t ON t.id = r.task_id WHERE t.key LIKE 'l%' AND r.started_ms IS NOT NULL")
        .expect("query");
    let mut lags: Vec<i64> = stmt
        .query_map([], |r| r.get(0))
        .expect("rows")
        .filter_map(Result::ok)
        .collect();
    lags.sort_unstable();
    if std::env::var("OUTPOST_TASKS_ONLY").as_deref() == Ok("lag") {
        println!(
            "worst lags: {:?}",
            lags.iter().rev().take(8).collect::<Vec<_>>()
        );
    }
    let pick = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(-1)
    };
    (pick(0.5), pick(0.99))
}

fn recovery_time() -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tasks.db");
    {
        let mut store = Store::open(&path).expect("open");
        let mut s = Scheduler::new(Config::default());
        let mut effects = Vec::new();
        for i in 0..RECOVERY_N {
            let spec = TaskSpec {
                kind: Kind::Command,
                params: Default::default(),
                argv: vec!["true".into()],
                schedule: Schedule::Once {
                    at_ms: 4_000_000_000_000 + i as i64,
                },
                timeout_ms: 60_000,
                key: format!("r{i}"),
                window: None,
                critical: false,
            };
            effects.extend(s.submit(0, format!("t{i}"), spec).expect("submit"));
            if effects.len() >= 10_000 {
                store.apply(0, &effects, &[]).expect("apply");
                effects.clear();
            }
        }
        store.apply(0, &effects, &[]).expect("apply");
    }
    let start = Instant::now();
    let mut store = Store::open(&path).expect("open");
    let loaded = store.load().expect("load");
    let mut s = Scheduler::new(Config::default());
    let interrupted = loaded
        .interrupted
        .iter()
        .map(|r| (r.run_id, r.task_id.clone(), Found::NeverStarted))
        .collect();
    let effects = s.recover(1, loaded.tasks, interrupted, loaded.max_run_id);
    store.apply(1, &effects, &[]).expect("apply");
    start.elapsed()
}

/// SqliteHuey's (enqueue/s, drain/s, CPU ms per drained run).
fn huey(python: &Path) -> Option<(f64, f64, f64)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/huey_tasks.py");
    let out = Command::new(python)
        .arg(script)
        .args([
            ENQUEUE_N.to_string(),
            DRAIN_N.to_string(),
            WORKERS.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "SqliteHuey run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        v["enqueue_per_s"].as_f64()?,
        v["drain_per_s"].as_f64()?,
        v["cpu_per_run_ms"].as_f64()?,
    ))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // `OUTPOST_TASKS_ONLY=drain`: only the subprocess drain (for a profiler).
    if std::env::var("OUTPOST_TASKS_ONLY").as_deref() == Ok("drain") {
        println!(
            "subprocess tasks drained: {:.0}/s",
            rt.block_on(drain_rate())
        );
        return;
    }
    // `OUTPOST_TASKS_ONLY=lag`: only the dispatch lag.
    if std::env::var("OUTPOST_TASKS_ONLY").as_deref() == Ok("lag") {
        let (p50, p99) = rt.block_on(dispatch_lag());
        println!("dispatch lag p50 / p99: {p50} / {p99} ms");
        return;
    }
    let enqueue = rt.block_on(enqueue_rate());
    let drain = rt.block_on(drain_rate());
    let (phased, cpu_ms) = rt.block_on(drain_rate_phased());
    let (p50, p99) = rt.block_on(dispatch_lag());
    let recovery = recovery_time();
    let peer = huey(Path::new(
        &std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()),
    ));
    let (h_enq, h_drain, h_cpu) = match peer {
        Some((e, d, c)) => (
            format!("{e:>10.0}/s"),
            format!("{d:>10.0}/s"),
            format!("{c:>9.2} ms"),
        ),
        None => (
            "   (not run)".into(),
            "   (not run)".into(),
            "   (not run)".into(),
        ),
    };
    let ratio =
        |ours: f64| peer.map_or_else(|| "-".to_string(), |(_, d, _)| format!("{:.2}x", ours / d));
    println!(
        "tasks benchmark ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<46} {:>12} {:>13} {:>14}",
        "workload", "outpost", "SqliteHuey", "target"
    );
    println!(
        "{:<46} {:>10.0}/s {:>13} {:>14}",
        format!("durable enqueue, socket API, {CLIENTS} clients"),
        enqueue,
        h_enq,
        ">= 10,000/s"
    );
    println!(
        "{:<46} {:>10.0}/s {:>13} {:>14}",
        format!("subprocess drain, overlapped ({WORKERS} workers)"),
        drain,
        h_drain,
        format!("({} of peer)", ratio(drain))
    );
    println!(
        "{:<46} {:>10.0}/s {:>13} {:>14}",
        format!("subprocess drain, own phase ({WORKERS} workers)"),
        phased,
        h_drain,
        format!(">= 1.1x ({})", ratio(phased))
    );
    println!(
        "{:<46} {:>9.2} ms {:>13} {:>14}",
        "CPU per drained run (all processes)", cpu_ms, h_cpu, "-"
    );
    println!(
        "{:<46} {:>12} {:>13} {:>14}",
        "dispatch lag p50 / p99",
        format!("{p50} / {p99} ms"),
        "-",
        "-"
    );
    println!(
        "{:<46} {:>10.3} s {:>13} {:>14}",
        "start-up recovery, 100k-task store",
        recovery.as_secs_f64(),
        "-",
        "< 0.5 s"
    );
}
