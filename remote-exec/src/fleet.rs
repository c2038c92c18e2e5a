//! Fleet fan-out: one command on many hosts with a concurrency limit, an error budget, safe
//! retries and reusable connections.
//!
//! Hosts start in inventory order, at most `concurrency` at a time. Every host that ends in
//! anything but `ok` spends one unit of the error budget; once the budget is exceeded no
//! further host starts, runs already in flight finish, and the hosts never started are
//! reported `not_started` with the reason.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{Client, Connection, OutputKind, Report};
use crate::inventory::Host;
use crate::outcome::{Outcome, Phase, RetryPolicy};
use crate::receipt::{self, OpId, ReceiptStatus};

/// How many failed hosts a run tolerates before it stops starting new ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorBudget {
    Unlimited,
    Count(usize),
    /// Percent of the selected hosts, rounded down.
    Percent(u8),
}

impl ErrorBudget {
    /// `N` or `P%` (0-100).
    pub fn parse(s: &str) -> Result<ErrorBudget, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(ErrorBudget::Percent(p)),
                _ => Err(format!("{s:?}: a percentage is 0% to 100%")),
            }
        } else {
            s.parse::<usize>()
                .map(ErrorBudget::Count)
                .map_err(|_| format!("{s:?}: give a count (3) or a percentage (10%)"))
        }
    }

    /// Failures tolerated among `hosts`; `None` when unlimited.
    pub fn allowed(self, hosts: usize) -> Option<usize> {
        match self {
            ErrorBudget::Unlimited => None,
            ErrorBudget::Count(n) => Some(n),
            ErrorBudget::Percent(p) => Some(hosts * usize::from(p) / 100),
        }
    }
}

/// The head of one output stream: the first `limit` bytes, and how many were cut.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    pub bytes: Vec<u8>,
    pub truncated_bytes: u64,
}

impl Captured {
    /// Append `chunk`, keeping at most `limit` bytes and counting the rest.
    pub fn push(&mut self, chunk: &[u8], limit: usize) {
        let room = limit.saturating_sub(self.bytes.len());
        let take = room.min(chunk.len());
        self.bytes.extend_from_slice(&chunk[..take]);
        self.truncated_bytes += (chunk.len() - take) as u64;
    }
}

/// One command for a fleet.
#[derive(Clone, Debug)]
pub struct Plan {
    pub op_id: OpId,
    /// The command line for a POSIX shell (from [`crate::quote::command_line`]).
    pub command: Vec<u8>,
    /// Run under the receipt wrapper (see [`crate::receipt`]); off only where the remote side
    /// has no shell (the simulator).
    pub receipts: bool,
    pub concurrency: usize,
    pub budget: ErrorBudget,
    pub retry: RetryPolicy,
    /// Bytes of stdout and of stderr kept per host for the result (the rest is counted).
    pub output_bytes_max: usize,
}

/// Default of [`Plan::output_bytes_max`].
pub const OUTPUT_BYTES_MAX: usize = 256 * 1024;
/// Most hosts run at once, whatever is asked.
pub const CONCURRENCY_MAX: usize = 1024;

/// What happened on one host.
#[derive(Clone, Debug)]
pub struct HostResult {
    pub host: String,
    pub report: Report,
    pub attempts: u32,
    pub stdout: Captured,
    pub stderr: Captured,
}

/// Progress, for a live display. Sent with `try_send`: a slow display misses events (counted
/// in [`Summary::events_dropped`]), it never slows the run.
#[derive(Clone, Debug)]
pub enum Event {
    Started {
        host: String,
        attempt: u32,
    },
    Output {
        host: String,
        kind: OutputKind,
        bytes: Vec<u8>,
    },
    Finished(Box<HostResult>),
}

/// Totals of a run.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub hosts: usize,
    pub by_outcome: BTreeMap<Outcome, usize>,
    /// Hosts never started because the error budget was spent (counted as `not_started`).
    pub skipped: usize,
    pub budget_spent: bool,
    pub retries: u32,
    pub events_dropped: u64,
}

/// Authenticated connections kept per host for the next command.
pub struct Pool {
    client: Arc<Client>,
    idle: Mutex<BTreeMap<String, Vec<Connection>>>,
}

/// Idle connections kept per host.
const IDLE_PER_HOST_MAX: usize = 4;

impl Pool {
    pub fn new(client: Arc<Client>) -> Pool {
        Pool {
            client,
            idle: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<Connection>>> {
        // A poisoned lock means a panic elsewhere; the map is still consistent.
        match self.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A reusable idle connection to `host`, or a new one.
    pub async fn checkout(&self, host: &Host) -> Result<Connection, Report> {
        loop {
            let conn = self.idle().get_mut(&host.name).and_then(Vec::pop);
            match conn {
                Some(c) if c.is_reusable() => return Ok(c),
                Some(_) => continue,
                None => return self.client.connect(host).await,
            }
        }
    }

    /// Keep `conn` for the next command to its host, if it is still usable.
    pub fn checkin(&self, conn: Connection) {
        if !conn.is_reusable() {
            return;
        }
        let mut idle = self.idle();
        let list = idle.entry(conn.host().to_string()).or_default();
        if list.len() < IDLE_PER_HOST_MAX {
            list.push(conn);
        }
    }

    /// Idle connections held.
    pub fn idle_count(&self) -> usize {
        self.idle().values().map(Vec::len).sum()
    }

    /// Close every idle connection politely.
    pub async fn close(&self) {
        let all: Vec<Connection> = std::mem::take(&mut *self.idle())
            .into_values()
            .flatten()
            .collect();
        let mut set = JoinSet::new();
        for c in all {
            set.spawn(c.close());
        }
        while set.join_next().await.is_some() {}
    }
}

/// Run `plan` on `hosts`. Results come back in the order of `hosts`.
pub async fn run(
    pool: Arc<Pool>,
    hosts: Vec<Host>,
    plan: Arc<Plan>,
    events: Option<mpsc::Sender<Event>>,
    cancel: CancellationToken,
) -> (Vec<HostResult>, Summary) {
    let line = if plan.receipts {
        receipt::wrap(&plan.op_id, &plan.command)
    } else {
        plan.command.clone()
    };
    let line: Arc<[u8]> = line.into();
    let stop: Option<Arc<[u8]>> = plan
        .receipts
        .then(|| receipt::stop_script(&plan.op_id).into());
    let allowed = plan.budget.allowed(hosts.len());
    let concurrency = plan.concurrency.clamp(1, CONCURRENCY_MAX);
    let progress = Progress {
        tx: events,
        dropped: Arc::default(),
    };
    let mut results: Vec<Option<HostResult>> = vec![None; hosts.len()];
    let mut summary = Summary {
        hosts: hosts.len(),
        ..Summary::default()
    };
    let mut set: JoinSet<(usize, HostResult)> = JoinSet::new();
    let mut next = 0;
    let mut errors = 0usize;
    loop {
        let spent = allowed.is_some_and(|a| errors > a);
        while next < hosts.len() && set.len() < concurrency && !spent && !cancel.is_cancelled() {
            let index = next;
            let host = hosts[index].clone();
            let job = HostJob {
                pool: pool.clone(),
                plan: plan.clone(),
                line: line.clone(),
                stop: stop.clone(),
                progress: progress.clone(),
                cancel: cancel.clone(),
            };
            set.spawn(async move { (index, job.run(host).await) });
            next += 1;
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let Ok((index, result)) = joined else {
            // A host task panicked: a bug, reported as such rather than hidden.
            tracing::error!("a host task panicked");
            continue;
        };
        if result.report.outcome != Outcome::Ok {
            errors += 1;
        }
        summary.retries += result.attempts.saturating_sub(1);
        if progress.tx.is_some() {
            progress.emit(Event::Finished(Box::new(result.clone())));
        }
        results[index] = Some(result);
    }
    summary.budget_spent = allowed.is_some_and(|a| errors > a);
    let why = if cancel.is_cancelled() {
        "not started: the run was canceled"
    } else {
        "not started: the error budget (--max-errors) was spent"
    };
    let results: Vec<HostResult> = results
        .into_iter()
        .zip(&hosts)
        .map(|(r, host)| {
            r.unwrap_or_else(|| {
                summary.skipped += 1;
                HostResult {
                    host: host.name.clone(),
                    report: Report {
                        outcome: Outcome::NotStarted,
                        phase: Phase::Connect,
                        exit_code: None,
                        exit_signal: None,
                        error: Some(format!("{}: {why}", host.name)),
                        elapsed: Duration::ZERO,
                    },
                    attempts: 0,
                    stdout: Captured::default(),
                    stderr: Captured::default(),
                }
            })
        })
        .collect();
    for r in &results {
        *summary.by_outcome.entry(r.report.outcome).or_default() += 1;
    }
    summary.events_dropped = progress.dropped.load(std::sync::atomic::Ordering::Relaxed);
    (results, summary)
}

/// Where progress events go; what a full channel refused is counted, never waited for.
#[derive(Clone)]
struct Progress {
    tx: Option<mpsc::Sender<Event>>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Progress {
    fn emit(&self, event: Event) {
        if let Some(tx) = &self.tx
            && tx.try_send(event).is_err()
        {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

struct HostJob {
    pool: Arc<Pool>,
    plan: Arc<Plan>,
    line: Arc<[u8]>,
    stop: Option<Arc<[u8]>>,
    progress: Progress,
    cancel: CancellationToken,
}

impl HostJob {
    async fn run(self, host: Host) -> HostResult {
        let mut stdout = Captured::default();
        let mut stderr = Captured::default();
        let mut attempt = 0;
        let limit = self.plan.output_bytes_max;
        loop {
            attempt += 1;
            self.progress.emit(Event::Started {
                host: host.name.clone(),
                attempt,
            });
            let report = match self.pool.checkout(&host).await {
                Err(report) => report,
                Ok(mut conn) => {
                    // A retry replays the command; keep only the last attempt's output.
                    stdout = Captured::default();
                    stderr = Captured::default();
                    let mut sink = |kind: OutputKind, chunk: &[u8]| {
                        match kind {
                            OutputKind::Stdout => stdout.push(chunk, limit),
                            OutputKind::Stderr => stderr.push(chunk, limit),
                        }
                        self.progress.emit(Event::Output {
                            host: host.name.clone(),
                            kind,
                            bytes: chunk.to_vec(),
                        });
                    };
                    let report = conn
                        .exec(&self.line, self.stop.as_deref(), &mut sink, &self.cancel)
                        .await;
                    if matches!(report.outcome, Outcome::Ok | Outcome::CommandFailed) {
                        self.pool.checkin(conn);
                    }
                    report
                }
            };
            let retry = self.plan.retry.retry_after(attempt, report.outcome);
            match retry {
                Some(pause) if !self.cancel.is_cancelled() => {
                    tracing::info!(host = %host.name, attempt, outcome = %report.outcome, error = report.error.as_deref().unwrap_or(""), "retrying");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.cancel.cancelled() => {}
                    }
                }
                _ => {
                    return HostResult {
                        host: host.name,
                        report,
                        attempts: attempt,
                        stdout,
                        stderr,
                    };
                }
            }
        }
    }
}

/// What the receipts on each host say about `op_id`. Hosts that cannot be asked are
/// `unknown`, with the reason.
pub async fn status(
    pool: Arc<Pool>,
    hosts: Vec<Host>,
    op_id: &OpId,
    concurrency: usize,
) -> Vec<(String, ReceiptStatus, Option<String>)> {
    let plan = Arc::new(Plan {
        op_id: op_id.clone(),
        command: receipt::status_script(op_id),
        receipts: false,
        concurrency,
        budget: ErrorBudget::Unlimited,
        retry: RetryPolicy {
            idempotent: true,
            ..RetryPolicy::default()
        },
        output_bytes_max: 4096,
    });
    let (results, _) = run(pool, hosts, plan, None, CancellationToken::new()).await;
    results
        .into_iter()
        .map(|r| {
            let parsed = (r.report.outcome == Outcome::Ok)
                .then(|| receipt::parse_status(&r.stdout.bytes))
                .flatten();
            match parsed {
                Some(status) => (r.host, status, None),
                None => {
                    let why = r.report.error.clone().unwrap_or_else(|| {
                        format!(
                            "{}: unexpected answer: {}",
                            r.host,
                            String::from_utf8_lossy(&r.stderr.bytes).trim()
                        )
                    });
                    (r.host, ReceiptStatus::Unknown, Some(why))
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Captured, ErrorBudget};

    #[test]
    fn error_budgets_parse_and_scale() {
        assert_eq!(ErrorBudget::parse("3"), Ok(ErrorBudget::Count(3)));
        assert_eq!(ErrorBudget::parse("10%"), Ok(ErrorBudget::Percent(10)));
        assert!(ErrorBudget::parse("101%").is_err());
        assert!(ErrorBudget::parse("x").is_err());
        assert_eq!(ErrorBudget::Percent(10).allowed(55), Some(5));
        assert_eq!(ErrorBudget::Count(0).allowed(55), Some(0));
        assert_eq!(ErrorBudget::Unlimited.allowed(55), None);
    }

    #[test]
    fn captured_output_keeps_the_head_and_counts_the_rest() {
        let mut c = Captured::default();
        c.push(b"hello ", 8);
        c.push(b"world", 8);
        assert_eq!(c.bytes, b"hello wo");
        assert_eq!(c.truncated_bytes, 3);
    }
}
