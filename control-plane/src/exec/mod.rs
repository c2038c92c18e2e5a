//! Fleet exec: `outpost exec`, one command across the fleet over supervised SSH, and
//! `outpost exec status OP_ID` to reconcile runs whose outcome was uncertain (this file, the
//! CLI); [`api`] runs the same from the web UI and keeps those runs.

pub mod api;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use remote_exec::fleet::{self, ErrorBudget, Event, HostResult, Plan, Pool, Summary};
use remote_exec::quote::command_line;
use remote_exec::{
    Client, HostKeyPolicy, Inventory, OpId, Outcome, ReceiptStatus, RetryPolicy, Timeouts,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use world::World;

/// What `outpost exec` was asked to do, parsed from flags.
pub struct ExecRequest {
    pub inventory: PathBuf,
    pub hosts: String,
    pub concurrency: usize,
    pub max_errors: Option<String>,
    pub idempotent: bool,
    pub timeouts: Timeouts,
    pub accept_new_host_keys: bool,
    pub raw: bool,
    pub json: bool,
    pub argv: Vec<String>,
}

/// Parse a humantime duration flag, naming the flag in the error.
pub fn duration_flag(flag: &str, value: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(value)
        .with_context(|| format!("{flag} {value:?}: use a duration like 10s, 2m or 1h"))?;
    if d.is_zero() {
        bail!("{flag} must be longer than zero");
    }
    Ok(d)
}

fn load_hosts(
    inventory: &std::path::Path,
    pattern: &str,
) -> anyhow::Result<Vec<remote_exec::Host>> {
    let inv = Inventory::load(inventory)?;
    Ok(inv.select(pattern)?)
}

/// Run the command; the exit code is 0 when every host is `ok`, 1 otherwise.
pub async fn run(req: ExecRequest) -> anyhow::Result<ExitCode> {
    let world = World::real();
    if !(1..=fleet::CONCURRENCY_MAX).contains(&req.concurrency) {
        bail!(
            "--concurrency must be 1 to {} (got {})",
            fleet::CONCURRENCY_MAX,
            req.concurrency
        );
    }
    let budget = match &req.max_errors {
        Some(s) => ErrorBudget::parse(s).map_err(|e| anyhow::anyhow!("--max-errors {e}"))?,
        None => ErrorBudget::Unlimited,
    };
    let command = if req.raw {
        let [script] = req.argv.as_slice() else {
            bail!("--raw takes the whole shell command as one argument: -- 'CMD | CMD'");
        };
        command_line(&["sh", "-c", script.as_str()])?
    } else {
        command_line(&req.argv)?
    };
    let hosts = load_hosts(&req.inventory, &req.hosts)?;
    let policy = if req.accept_new_host_keys {
        HostKeyPolicy::AcceptNew
    } else {
        HostKeyPolicy::Strict
    };
    let client = Arc::new(Client::new(world.clone(), req.timeouts, policy));
    // A missing or unreadable identity is a setup error, not a per-host outcome.
    for h in &hosts {
        client
            .load_key(&h.identity_file)
            .map_err(|e| anyhow::anyhow!("{e} (host {})", h.name))?;
    }
    let op_id = OpId::generate(&world);
    let plan = Arc::new(Plan {
        op_id: op_id.clone(),
        command,
        receipts: true,
        concurrency: req.concurrency,
        budget,
        retry: RetryPolicy {
            idempotent: req.idempotent,
            ..RetryPolicy::default()
        },
        output_bytes_max: fleet::OUTPUT_BYTES_MAX,
    });
    let pool = Arc::new(Pool::new(client));
    let cancel = CancellationToken::new();
    let interrupt = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            world::shutdown_signal().await;
            eprintln!("\ninterrupted: stopping running commands (TERM) and starting no more hosts");
            cancel.cancel();
        })
    };
    let tty = std::io::stderr().is_terminal() && !req.json;
    if !req.json {
        eprintln!("op_id: {op_id} ({} hosts)", hosts.len());
    }
    let (tx, rx) = mpsc::channel(1024);
    let progress = tokio::spawn(show_progress(rx, hosts.len(), tty));
    let started = tokio::time::Instant::now();
    let (results, summary) = fleet::run(pool.clone(), hosts, plan, Some(tx), cancel).await;
    let elapsed = started.elapsed();
    let _ = progress.await;
    interrupt.abort();
    pool.close().await;

    let mut out = std::io::stdout().lock();
    if req.json {
        let doc = JsonRun::new(&op_id, &results, &summary, elapsed);
        serde_json::to_writer(&mut out, &doc).context("write JSON")?;
        writeln!(out)?;
    } else {
        print_human(&mut out, &op_id, &req, &results, &summary, elapsed)?;
    }
    Ok(if results.iter().all(|r| r.report.outcome == Outcome::Ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A one-line live count on a TTY; nothing otherwise.
async fn show_progress(mut rx: mpsc::Receiver<Event>, total: usize, tty: bool) {
    let mut done = 0usize;
    let mut running = 0usize;
    let mut counts = [0usize; 5];
    while let Some(event) = rx.recv().await {
        match event {
            Event::Started { attempt: 1, .. } => running += 1,
            Event::Started { .. } | Event::Output { .. } => continue,
            Event::Finished(r) => {
                done += 1;
                running = running.saturating_sub(1);
                if let Some(i) = Outcome::ALL.iter().position(|o| *o == r.report.outcome) {
                    counts[i] += 1;
                }
            }
        }
        if tty {
            eprint!(
                "\r\x1b[K[{done}/{total}] running {running} · ok {} · failed {} · not_started {} · uncertain {} · timed_out {}",
                counts[0], counts[1], counts[2], counts[3], counts[4]
            );
        }
    }
    if tty {
        eprint!("\r\x1b[K");
    }
}

fn print_human(
    out: &mut impl Write,
    op_id: &OpId,
    req: &ExecRequest,
    results: &[HostResult],
    summary: &Summary,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let width = results.iter().map(|r| r.host.len()).max().unwrap_or(4);
    for r in results {
        let rep = &r.report;
        let status = match (&rep.exit_code, &rep.exit_signal) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => String::new(),
        };
        writeln!(
            out,
            "{:<width$}  {:<14} {:<9} {:>7.2}s{}",
            r.host,
            rep.outcome.as_str(),
            status,
            rep.elapsed.as_secs_f64(),
            if r.attempts > 1 {
                format!("  ({} attempts)", r.attempts)
            } else {
                String::new()
            }
        )?;
        for (mark, captured) in [("|", &r.stdout), ("!", &r.stderr)] {
            for line in String::from_utf8_lossy(&captured.bytes).lines() {
                writeln!(out, "  {mark} {line}")?;
            }
            if captured.truncated_bytes > 0 {
                writeln!(
                    out,
                    "  {mark} … {} more bytes not kept",
                    captured.truncated_bytes
                )?;
            }
        }
        if let Some(e) = &rep.error
            && rep.outcome != Outcome::CommandFailed
        {
            writeln!(out, "  error: {e}")?;
        }
    }
    let counts: Vec<String> = Outcome::ALL
        .iter()
        .filter_map(|o| {
            summary
                .by_outcome
                .get(o)
                .map(|n| format!("{} {n}", o.as_str()))
        })
        .collect();
    writeln!(
        out,
        "\n{op_id}: {} hosts in {:.2}s: {}{}",
        summary.hosts,
        elapsed.as_secs_f64(),
        counts.join(", "),
        if summary.skipped > 0 {
            format!(
                " ({} never started: error budget spent or interrupted)",
                summary.skipped
            )
        } else {
            String::new()
        }
    )?;
    if summary.by_outcome.contains_key(&Outcome::Uncertain)
        || summary.by_outcome.contains_key(&Outcome::TimedOut)
    {
        writeln!(
            out,
            "some runs may have executed: check with `outpost exec status {op_id} --inventory {}`",
            req.inventory.display()
        )?;
    }
    Ok(())
}

#[derive(Serialize)]
struct JsonHost<'a> {
    host: &'a str,
    outcome: &'static str,
    exit_code: Option<i32>,
    exit_signal: Option<&'a str>,
    stdout: String,
    stderr: String,
    stdout_truncated_bytes: u64,
    stderr_truncated_bytes: u64,
    error: Option<&'a str>,
    duration_ms: u64,
    attempts: u32,
}

#[derive(Serialize)]
struct JsonSummary {
    hosts: usize,
    ok: usize,
    command_failed: usize,
    not_started: usize,
    uncertain: usize,
    timed_out: usize,
    skipped: usize,
    budget_spent: bool,
    retries: u32,
    duration_ms: u64,
}

#[derive(Serialize)]
struct JsonRun<'a> {
    op_id: &'a str,
    hosts: Vec<JsonHost<'a>>,
    summary: JsonSummary,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<'a> JsonRun<'a> {
    fn new(
        op_id: &'a OpId,
        results: &'a [HostResult],
        summary: &Summary,
        elapsed: Duration,
    ) -> JsonRun<'a> {
        let n = |o| summary.by_outcome.get(&o).copied().unwrap_or(0);
        JsonRun {
            op_id: op_id.as_str(),
            hosts: results
                .iter()
                .map(|r| JsonHost {
                    host: &r.host,
                    outcome: r.report.outcome.as_str(),
                    exit_code: r.report.exit_code,
                    exit_signal: r.report.exit_signal.as_deref(),
                    stdout: String::from_utf8_lossy(&r.stdout.bytes).into_owned(),
                    stderr: String::from_utf8_lossy(&r.stderr.bytes).into_owned(),
                    stdout_truncated_bytes: r.stdout.truncated_bytes,
                    stderr_truncated_bytes: r.stderr.truncated_bytes,
                    error: r.report.error.as_deref(),
                    duration_ms: ms(r.report.elapsed),
                    attempts: r.attempts,
                })
                .collect(),
            summary: JsonSummary {
                hosts: summary.hosts,
                ok: n(Outcome::Ok),
                command_failed: n(Outcome::CommandFailed),
                not_started: n(Outcome::NotStarted),
                uncertain: n(Outcome::Uncertain),
                timed_out: n(Outcome::TimedOut),
                skipped: summary.skipped,
                budget_spent: summary.budget_spent,
                retries: summary.retries,
                duration_ms: ms(elapsed),
            },
        }
    }
}

/// What `outpost exec status` was asked.
pub struct StatusRequest {
    pub op_id: String,
    pub inventory: PathBuf,
    pub hosts: String,
    pub concurrency: usize,
    pub timeouts: Timeouts,
    pub json: bool,
}

#[derive(Serialize)]
struct JsonStatusHost<'a> {
    host: &'a str,
    status: &'static str,
    exit_code: Option<i32>,
    error: Option<&'a str>,
}

/// Ask every host what its receipts say. Exit code 0 when every host answered.
pub async fn status(req: StatusRequest) -> anyhow::Result<ExitCode> {
    let op_id = OpId::parse(&req.op_id)?;
    let hosts = load_hosts(&req.inventory, &req.hosts)?;
    let client = Arc::new(Client::new(
        World::real(),
        req.timeouts,
        HostKeyPolicy::Strict,
    ));
    let pool = Arc::new(Pool::new(client));
    let answers = fleet::status(pool.clone(), hosts, &op_id, req.concurrency.max(1)).await;
    pool.close().await;
    let mut out = std::io::stdout().lock();
    if req.json {
        let hosts: Vec<JsonStatusHost> = answers
            .iter()
            .map(|(host, status, error)| JsonStatusHost {
                host,
                status: status.as_str(),
                exit_code: match status {
                    ReceiptStatus::Finished(code) => Some(*code),
                    _ => None,
                },
                error: error.as_deref(),
            })
            .collect();
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({"op_id": op_id.as_str(), "hosts": hosts}),
        )?;
        writeln!(out)?;
    } else {
        let width = answers.iter().map(|(h, _, _)| h.len()).max().unwrap_or(4);
        for (host, status, error) in &answers {
            let detail = match status {
                ReceiptStatus::Finished(code) => format!("exit {code}"),
                _ => String::new(),
            };
            writeln!(out, "{host:<width$}  {:<13} {detail}", status.as_str())?;
            if let Some(e) = error {
                writeln!(out, "  error: {e}")?;
            }
        }
    }
    Ok(if answers.iter().all(|(_, _, e)| e.is_none()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
