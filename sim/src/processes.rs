//! Simulated task processes. The table lives outside every host, so a process outlives the
//! agent that started it when that agent crashes, exactly like a real child process after a
//! kill -9, until the restarted agent terminates it or it ends by itself. Durations, exit
//! codes and hangs come from the seed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::tasks::model::{RunOutcome, status};
use agent::tasks::pool::{BoxFuture, PoolEvent, ProcessRun, Processes};

#[derive(Debug)]
struct Proc {
    task_id: String,
    /// When it ends by itself; `None`: it hangs until killed.
    ends_at: Option<Duration>,
    killed_at: Option<Duration>,
}

#[derive(Debug, Default)]
struct Table {
    next_pid: i32,
    procs: BTreeMap<i32, Proc>,
    /// Invariant violations seen when processes start.
    violations: Vec<String>,
    started: u64,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn is_alive(p: &Proc, at: Duration) -> bool {
        p.killed_at.is_none_or(|k| at < k) && p.ends_at.is_none_or(|end| at < end)
    }

    /// Live processes per task id at simulated time `at` (the driver's clock: outside every
    /// host turmoil has no current time).
    pub fn live_tasks(&self, at: Duration) -> BTreeMap<String, usize> {
        self.alive_at(at)
    }

    /// Processes per task id that were alive at `at`.
    pub fn alive_at(&self, at: Duration) -> BTreeMap<String, usize> {
        let mut live = BTreeMap::new();
        for p in self.lock().procs.values().filter(|p| Self::is_alive(p, at)) {
            *live.entry(p.task_id.clone()).or_insert(0) += 1;
        }
        live
    }

    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    pub fn started(&self) -> u64 {
        self.lock().started
    }
}

impl Processes for SimProcesses {
    fn run(&self, run: ProcessRun) -> BoxFuture<()> {
        let this = self.clone();
        Box::pin(async move {
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
            let h = mix(this.seed, &task_id, run_id);
            let start = now();
            let ends_at = match h % 10 {
                0 => None, // hangs
                _ => Some(start + Duration::from_millis(100 + (h >> 8) % 20_000)),
            };
            let exit_code = if (h >> 40).is_multiple_of(5) { 1 } else { 0 };
            let pid = {
                let mut t = this.lock();
                if let Some(other) = t
                    .procs
                    .values()
                    .find(|p| p.task_id == task_id && Self::is_alive(p, start))
                {
                    let msg = format!(
                        "task {task_id} started run {run_id} while an earlier run of it is alive (ends {:?})",
                        other.ends_at
                    );
                    t.violations.push(msg);
                }
                t.next_pid += 1;
                let pid = t.next_pid;
                t.procs.insert(
                    pid,
                    Proc {
                        task_id: task_id.clone(),
                        ends_at,
                        killed_at: None,
                    },
                );
                t.started += 1;
                pid
            };
            let _ = events
                .send(PoolEvent::Started {
                    task_id: task_id.clone(),
                    run_id,
                    pid,
                    pid_start_ticks: Some(pid as u64),
                })
                .await;
            let natural = async {
                match ends_at {
                    Some(end) => tokio::time::sleep(end.saturating_sub(start)).await,
                    None => std::future::pending().await,
                }
            };
            let outcome = tokio::select! {
                _ = natural => RunOutcome {
                    status: if exit_code == 0 { status::DONE } else { status::FAILED },
                    exit_code: Some(exit_code),
                    error: (exit_code != 0).then(|| format!("exit code {exit_code}")),
                    output: Vec::new(),
                    output_dropped_bytes: 0,
                },
                _ = tokio::time::sleep(timeout) => {
                    this.kill_after(pid, grace).await;
                    failed_outcome(status::FAILED, "timed out")
                }
                _ = kill.cancelled() => {
                    this.kill_after(pid, grace).await;
                    if shutdown.is_cancelled() {
                        failed_outcome(status::ABORTED, "the agent is shutting down")
                    } else {
                        failed_outcome(status::FAILED, "stopped on request")
                    }
                }
            };
            let _ = events
                .send(PoolEvent::Finished {
                    task_id,
                    run_id,
                    outcome,
                })
                .await;
        })
    }

    fn alive(&self, pid: i32, ticks: Option<u64>) -> bool {
        ticks == Some(pid as u64)
            && self
                .lock()
                .procs
                .get(&pid)
                .is_some_and(|p| Self::is_alive(p, now()))
    }

    fn terminate(&self, pid: i32, _ticks: Option<u64>, grace: Duration) -> BoxFuture<()> {
        let this = self.clone();
        Box::pin(async move { this.kill_after(pid, grace).await })
    }
}

impl SimProcesses {
    /// SIGTERM is ignored by a third of processes; SIGKILL after `grace` always works. A
    /// process that ends by itself during the grace period is seen ending then.
    async fn kill_after(&self, pid: i32, grace: Duration) {
        let stubborn = mix(self.seed, "term", i64::from(pid)).is_multiple_of(3);
        if stubborn {
            let natural_end = self.lock().procs.get(&pid).and_then(|p| p.ends_at);
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

fn failed_outcome(st: u32, error: &str) -> RunOutcome {
    RunOutcome {
        status: st,
        exit_code: None,
        error: Some(error.to_string()),
        output: Vec::new(),
        output_dropped_bytes: 0,
    }
}
