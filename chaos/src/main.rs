//! `outpost-chaos` (`just chaos`): the simulator's faults inflicted on real processes.
//!
//! It starts a deployment on this machine (two control-plane replicas sharing a real
//! Postgres and Redis, agents in their own network namespaces collecting from a real Postgres
//! under pgbench load, SSH hosts in namespaces), runs workloads that leave evidence, injects
//! faults from a seeded schedule, lets everything heal, and then checks the invariants from
//! the ledger those workloads left. See ARCHITECTURE.md ("Chaos suite").

mod api;
mod deploy;
mod exercise;
mod faults;
mod host;
mod proxy;
mod report;
mod resources;
mod services;
mod verdict;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::deploy::Deployment;
use crate::faults::{Kind, Shared};

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
            let outcome = exercise::exercise(&args, &kinds, duration, &shared, &root, &stop).await;
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
