//! `cargo run -p sim -- run --seed N [--scenario NAME] [--seeds K]`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sim::run::{Outcome, run_seed, schedule};
use sim::scenario::{ALL, Scenario};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Deterministic simulation of Outpost under network faults and restarts.
///
/// Each seed prints one line `seed=N scenario=NAME result=ok|FAIL trace=HEX`; the same seed
/// always prints the same trace. A failing seed belongs in sim/regressions/.
#[derive(Parser)]
#[command(name = "sim")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run seeds N, N+1, … N+K-1 of one scenario (default: every scenario).
    Run {
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// One or more (comma-separated) of: partition, hold, bounce, mixed, tasks, metrics, ssh,
        /// terminal, alerts, rollouts
        #[arg(long)]
        scenario: Option<String>,
        /// Every scenario but these (comma-separated), e.g. `--except rollouts`.
        #[arg(long, conflicts_with = "scenario")]
        except: Option<String>,
        /// How many consecutive seeds to run.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Run every seed twice and fail if the traces differ.
        #[arg(long)]
        check_determinism: bool,
        /// Print every trace event as it happens.
        #[arg(long)]
        verbose: bool,
        /// Seeds run at the same time, each in its own process.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
    /// Run exactly one seed in this process (what `run` starts for every seed).
    #[command(hide = true)]
    One {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        scenario: String,
        #[arg(long)]
        verbose: bool,
    },
    /// Replay every seed listed in the regression files (lines `seed=N scenario=NAME`).
    Regressions {
        #[arg(long, default_value = "sim/regressions")]
        dir: PathBuf,
        #[arg(long)]
        check_determinism: bool,
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
}

#[allow(clippy::disallowed_methods)] // the driver measures its own wall time, outside the simulation
fn main() -> ExitCode {
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(sim::trace::TraceLayer)
        .init();
    let cli = Cli::parse();
    if let Cmd::One {
        seed,
        scenario,
        verbose,
    } = &cli.command
    {
        let Some(scenario) = Scenario::parse(scenario) else {
            eprintln!("error: unknown scenario {scenario:?}");
            return ExitCode::from(2);
        };
        let outcome = run_seed(*seed, scenario, *verbose);
        report(&outcome);
        return if outcome.failure.is_none() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let runs: Vec<(u64, Scenario)> = match &cli.command {
        Cmd::Run {
            seed,
            scenario,
            except,
            seeds,
            ..
        } => {
            let named = |list: &str| -> Result<Vec<Scenario>, String> {
                list.split(',')
                    .map(|name| {
                        Scenario::parse(name.trim()).ok_or_else(|| {
                            let all: Vec<&str> = ALL.iter().map(|s| s.name()).collect();
                            format!("unknown scenario {name:?}; use one of: {}", all.join(", "))
                        })
                    })
                    .collect()
            };
            let scenarios = match (scenario.as_deref(), except.as_deref()) {
                (Some(list), _) => named(list),
                (None, Some(list)) => {
                    named(list).map(|out| ALL.into_iter().filter(|s| !out.contains(s)).collect())
                }
                (None, None) => Ok(ALL.to_vec()),
            };
            let scenarios = match scenarios {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            (*seed..seed.saturating_add(*seeds))
                .flat_map(|s| scenarios.iter().map(move |c| (s, *c)))
                .collect()
        }
        Cmd::Regressions { dir, .. } => match read_regressions(dir) {
            Ok(runs) => runs,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        },
        Cmd::One { .. } => Vec::new(),
    };
    let (check, verbose, jobs) = match &cli.command {
        Cmd::Run {
            check_determinism,
            verbose,
            jobs,
            ..
        } => (*check_determinism, *verbose, *jobs),
        Cmd::Regressions {
            check_determinism,
            jobs,
            ..
        } => (*check_determinism, false, *jobs),
        Cmd::One { .. } => (false, false, 1),
    };
    let wall = std::time::Instant::now();
    let results = run_all(&runs, check, verbose, jobs.max(1));
    let wall_s = wall.elapsed().as_secs_f64();
    let runs_each = if check { 2.0 } else { 1.0 };
    let simulated_s: f64 = runs
        .iter()
        .map(|(seed, c)| schedule(*c, *seed).run_for.as_secs_f64())
        .sum::<f64>()
        * runs_each;
    let failed = results.iter().filter(|ok| !**ok).count();
    eprintln!(
        "simulated {simulated_s:.0} s in {wall_s:.1} s wall on {jobs} jobs: {:.0}x real time per job",
        simulated_s / (wall_s * jobs.max(1) as f64)
    );
    println!("{} passed, {failed} failed", results.len() - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Run every seed in a fresh child process (`jobs` at a time) and print its verdict line.
/// A fresh process per seed is what makes a seed replay identically: tokio numbers tasks
/// with a process-wide counter, and the order in which a bounced host's tasks are dropped
/// follows those numbers.
fn run_all(runs: &[(u64, Scenario)], check: bool, verbose: bool, jobs: usize) -> Vec<bool> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![false; runs.len()]);
    let print = std::sync::Mutex::new(());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(runs.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((seed, scenario)) = runs.get(i).copied() else {
                        break;
                    };
                    let first = child(seed, scenario, verbose);
                    let mut line = first.line.clone();
                    let mut details = first.stderr.clone();
                    let mut ok = first.ok;
                    if check && ok {
                        let second = child(seed, scenario, false);
                        if second.trace != first.trace {
                            ok = false;
                            line = line.replace("result=ok", "result=FAIL");
                            details.push_str(&format!(
                                "--- FAIL: nondeterministic: the same seed gave trace {} then {}\n",
                                first.trace, second.trace
                            ));
                        }
                    }
                    let _guard = print.lock();
                    eprint!("{details}");
                    if verbose {
                        print!("{}", first.stdout_rest);
                    }
                    println!("{line}");
                    if let Ok(mut r) = results.lock() {
                        r[i] = ok;
                    }
                }
            });
        }
    });
    results.into_inner().unwrap_or_default()
}

struct ChildRun {
    ok: bool,
    line: String,
    trace: String,
    stderr: String,
    stdout_rest: String,
}

fn child(seed: u64, scenario: Scenario, verbose: bool) -> ChildRun {
    let failed = |why: String| ChildRun {
        ok: false,
        line: format!(
            "seed={seed} scenario={} result=FAIL trace=none",
            scenario.name()
        ),
        trace: String::new(),
        stderr: format!("--- FAIL: {why}\n"),
        stdout_rest: String::new(),
    };
    // This very binary, also when a build replaced the file meanwhile (`just test` runs the
    // seeds beside other cargo calls, which link the binaries anew): on Linux
    // `/proc/self/exe` starts the image this process runs, whatever its path now holds.
    let proc_exe = std::path::Path::new("/proc/self/exe");
    let exe = if proc_exe.exists() {
        proc_exe.to_path_buf()
    } else {
        match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return failed(format!("locate the sim binary: {e}")),
        }
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "one",
        "--seed",
        &seed.to_string(),
        "--scenario",
        scenario.name(),
    ]);
    if verbose {
        cmd.arg("--verbose");
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => return failed(format!("start the seed's process: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().rev().find(|l| l.starts_with("seed=")) else {
        return failed(format!(
            "the seed's process printed no verdict ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    };
    let trace = line.rsplit("trace=").next().unwrap_or_default().to_string();
    let rest: String = stdout
        .lines()
        .filter(|l| !l.starts_with("seed="))
        .map(|l| format!("{l}\n"))
        .collect();
    ChildRun {
        ok: out.status.success() && line.contains("result=ok"),
        line: line.to_string(),
        trace,
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        stdout_rest: rest,
    }
}

fn report(outcome: &Outcome) {
    let failure = outcome.failure.as_deref();
    if let Some(reason) = failure {
        eprintln!(
            "--- last trace events of seed {} ({}) ---",
            outcome.seed,
            outcome.scenario.name()
        );
        for line in &outcome.tail {
            eprintln!("{line}");
        }
        eprintln!("--- FAIL: {reason}");
        eprintln!(
            "replay: cargo run -p sim -- run --seed {} --scenario {} --verbose",
            outcome.seed,
            outcome.scenario.name()
        );
    }
    println!(
        "seed={} scenario={} result={} trace={}",
        outcome.seed,
        outcome.scenario.name(),
        if failure.is_some() { "FAIL" } else { "ok" },
        outcome.trace_hash
    );
}

fn read_regressions(dir: &std::path::Path) -> anyhow::Result<Vec<(u64, Scenario)>> {
    use anyhow::Context;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut runs = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut seed = None;
            let mut scenario = None;
            for part in line.split_whitespace() {
                if let Some(v) = part.strip_prefix("seed=") {
                    seed = v.parse::<u64>().ok();
                } else if let Some(v) = part.strip_prefix("scenario=") {
                    scenario = Scenario::parse(v);
                }
            }
            match (seed, scenario) {
                (Some(s), Some(c)) => runs.push((s, c)),
                _ => anyhow::bail!(
                    "{}:{}: expected `seed=N scenario=NAME`",
                    file.display(),
                    n + 1
                ),
            }
        }
    }
    Ok(runs)
}
