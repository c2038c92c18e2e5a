//! `outpost-agent buffer stats|check`: read the buffer file directly (safe while the agent runs).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde::Serialize;
use world::World;

use super::store::{self, Stats};

use crate::layout::BUFFER_FILE;

#[derive(Subcommand)]
pub enum BufferCommand {
    /// Size, age of the oldest record, utilization, delivery failures, drops by reason.
    Stats {
        #[arg(long)]
        json: bool,
        /// Agent state directory [default: /var/lib/outpost-agent].
        #[arg(long, env = "OUTPOST_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Verify the buffer's integrity; exits non-zero when it would be quarantined.
    Check {
        #[arg(long)]
        json: bool,
        #[arg(long, env = "OUTPOST_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Serialize)]
struct StatsJson {
    epoch: String,
    rows: i64,
    size_bytes: u64,
    oldest_record_age_s: i64,
    utilization: f64,
    delivery_failures: i64,
    dropped_total: std::collections::BTreeMap<String, i64>,
}

impl From<Stats> for StatsJson {
    fn from(s: Stats) -> StatsJson {
        StatsJson {
            epoch: s.epoch,
            rows: s.rows,
            size_bytes: s.size_bytes,
            oldest_record_age_s: s.oldest_record_age_s,
            utilization: s.utilization,
            delivery_failures: s.delivery_failures,
            dropped_total: s.dropped_total,
        }
    }
}

fn buffer_path(data_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = data_dir.unwrap_or_else(|| PathBuf::from(crate::layout::DEFAULT_DATA_DIR));
    let path = dir.join(BUFFER_FILE);
    if !path.exists() {
        bail!(
            "no metrics buffer at {}: has `outpost-agent run` started with this --data-dir?",
            path.display()
        );
    }
    Ok(path)
}

pub async fn run(command: BufferCommand) -> anyhow::Result<()> {
    let world = World::real();
    match command {
        BufferCommand::Stats { json, data_dir } => {
            let path = buffer_path(data_dir)?;
            let now_ms = world.now_unix_ms();
            let stats = world
                .blocking(move || store::stats_at(&path, now_ms))
                .await?
                .context("read buffer stats")?;
            if json {
                println!("{}", serde_json::to_string(&StatsJson::from(stats))?);
            } else {
                println!("epoch:               {}", stats.epoch);
                println!("rows:                {}", stats.rows);
                println!("size_bytes:          {}", stats.size_bytes);
                println!("oldest_record_age_s: {}", stats.oldest_record_age_s);
                println!("utilization:         {:.1}%", stats.utilization * 100.0);
                println!("delivery_failures:   {}", stats.delivery_failures);
                for (reason, n) in &stats.dropped_total {
                    println!(
                        "dropped ({reason}):{:>width$}",
                        n,
                        width = 14 - reason.len()
                    );
                }
            }
        }
        BufferCommand::Check { json, data_dir } => {
            let path = buffer_path(data_dir)?;
            let shown = path.display().to_string();
            let verdict = world.blocking(move || store::check(&path)).await?;
            if json {
                let v = match &verdict {
                    Ok(rows) => serde_json::json!({"path": shown, "ok": true, "rows": rows}),
                    Err(reason) => serde_json::json!({"path": shown, "ok": false, "error": reason}),
                };
                println!("{v}");
            }
            match verdict {
                Ok(rows) => {
                    if !json {
                        println!("ok: {shown} passes its integrity check ({rows} rows)");
                    }
                }
                Err(reason) => bail!(
                    "{shown} fails its integrity check ({reason}); the agent quarantines it at its next start"
                ),
            }
        }
    }
    Ok(())
}
