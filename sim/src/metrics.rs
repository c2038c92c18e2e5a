//! The `metrics` scenario: an agent appends rows to the real buffer (through the
//! crash-injecting VFS) and the real delivery loop sends them to a real control plane, under
//! partitions, holds, control-plane bounces, agent kills and agent crashes inside a SQLite
//! write. A ledger outside the simulation records every row the buffer accepted.
//!
//! Checked at the end: no row is stored twice; every stored row was accepted; every accepted
//! row is stored unless a power-loss crash took it before a WAL sync made it durable (the
//! trade-off `synchronous=NORMAL` accepts) or the buffer counted it as dropped; the backlog
//! drained to zero after the faults healed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent::buffer::delivery::{DeliveryConfig, run_delivery};
use agent::buffer::{Buffer, Limits, SharedBuffer};
use control_plane::settings::Settings;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::harness::{self, CP_PORT, Driver, LinkFaults, Power, Prepare, host_world, new_sim};
use crate::scenario::{Fault, Schedule, secs};
use crate::trace;
use crate::vfs::{self, CrashState, Rollback};
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// One accepted row.
struct Accepted {
    /// WAL syncs completed when its append returned: durable once a later one completes.
    syncs_at_commit: u64,
    /// A power-loss crash came before any WAL sync after it: the disk may have lost it.
    at_risk: bool,
}

#[derive(Default)]
struct Ledger {
    next_id: u64,
    rows: BTreeMap<u64, Accepted>,
}

type SharedLedger = Arc<Mutex<Ledger>>;

fn lock(ledger: &SharedLedger) -> MutexGuard<'_, Ledger> {
    match ledger.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn limits() -> Limits {
    // No policy drops in this scenario: every missing row must be explained by a crash.
    Limits {
        bytes_max: 1 << 40,
        age_max_ms: i64::MAX / 4,
        quarantined_max: 3,
    }
}

/// The simulated collector: a few rows a second, each with a unique id in its payload.
async fn collect(
    world: world::World,
    buffer: SharedBuffer,
    ledger: SharedLedger,
    state: Arc<vfs::CrashState>,
) {
    loop {
        let n = world.random_below(5) + 1;
        let first = lock(&ledger).next_id;
        let rows: Vec<(String, String)> = (first..first + n)
            .map(|id| ("sim".to_string(), format!("{{\"id\":{id}}}")))
            .collect();
        // The simulated world runs blocking work inline: no yield, as a real lock would be.
        let now_ms = world.now_unix_ms();
        let appended = buffer.with(&world, move |b| b.append(now_ms, &rows)).await;
        if appended.is_ok() {
            let syncs = state.wal_syncs();
            let mut l = lock(&ledger);
            l.next_id = first + n;
            for id in first..first + n {
                l.rows.insert(
                    id,
                    Accepted {
                        syncs_at_commit: syncs,
                        at_risk: false,
                    },
                );
            }
        }
        tokio::time::sleep(COLLECT_EVERY).await;
    }
}

pub fn simulate_metrics(seed: u64, plan: &Schedule) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-sim-metrics-")
        .tempdir()?;
    let credential = harness::prepare(dir.path(), seed, &[Prepare::EnrolledAgent])?.remove(0);
    let crash = vfs::register(&format!("crash-{seed}-{}", std::process::id()))?;
    let ledger: SharedLedger = Arc::default();
    let buffer_path = dir.path().join("agent1").join("buffer.db");
    std::fs::create_dir_all(dir.path().join("agent1"))?;
    let mut sim = new_sim(seed, plan);
    harness::control_plane_host(&mut sim, seed, dir.path().join("cp"), Settings::default());
    {
        let world = host_world(seed, "agent1");
        let (path, ledger, state, vfs_name) = (
            buffer_path.clone(),
            ledger.clone(),
            crash.state.clone(),
            crash.name.clone(),
        );
        let config = DeliveryConfig {
            url: url::Url::parse(&format!("http://cp:{CP_PORT}{}", proto::METRICS_PATH))?,
            credential,
            batch_rows_max: 25,
            idle_poll: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
        };
        sim.host("agent1", move || {
            let (world, path, ledger, state, vfs_name, config) = (
                world.clone(),
                path.clone(),
                ledger.clone(),
                state.clone(),
                vfs_name.clone(),
                config.clone(),
            );
            async move {
                let epoch = format!("ep{}", world.random_u64());
                let (buffer, report) = Buffer::open_with_vfs(
                    &path,
                    limits(),
                    &epoch,
                    world.now_unix_ms(),
                    Some(&vfs_name),
                )
                .map_err(|e| e.to_string())?;
                if let agent::buffer::store::OpenReport::Quarantined { reason, .. } = &report {
                    trace::record(format!("QUARANTINED: {reason}"));
                }
                let buffer = SharedBuffer::new(buffer);
                tokio::spawn(collect(world.clone(), buffer.clone(), ledger, state));
                run_delivery(world, buffer, config, CancellationToken::new()).await;
                Ok(())
            }
        });
    }

    let mut driver = MetricsDriver {
        crash: crash.state.clone(),
        ledger: ledger.clone(),
        rng: StdRng::seed_from_u64(seed ^ 0xd15c),
        rollback: Rollback::KeepAll,
        crashes: 0,
        cp: Power::on("cp"),
        links: LinkFaults::default(),
        quiet_from: plan.quiet_from,
    };
    harness::drive(&mut sim, plan, &mut driver)?;
    let crashes = driver.crashes;
    final_check(
        &buffer_path,
        &dir.path()
            .join("cp")
            .join(control_plane::server::SQLITE_FILE),
        &ledger,
        crashes,
        (harness::EPOCH_S * 1000) as i64 + i64::try_from(sim.elapsed().as_millis())?,
    )
}

/// Partitions, holds, control-plane bounces, agent kills and disk crashes inside SQLite writes.
struct MetricsDriver {
    crash: Arc<CrashState>,
    ledger: SharedLedger,
    rng: StdRng,
    rollback: Rollback,
    crashes: u32,
    cp: Power,
    links: LinkFaults,
    quiet_from: Duration,
}

impl<'a> Driver<'a> for MetricsDriver {
    fn tick(&mut self, _sim: &mut turmoil::Sim<'a>, now: Duration) -> anyhow::Result<()> {
        if now >= self.quiet_from {
            self.crash.arm(None);
        }
        Ok(())
    }

    fn fault(
        &mut self,
        sim: &mut turmoil::Sim<'a>,
        fault: &Fault,
        _now: Duration,
    ) -> anyhow::Result<()> {
        self.links.count(fault);
        match fault {
            Fault::BounceCp => self.cp.bounce(sim),
            Fault::CrashCp => {
                self.cp.crash(sim);
            }
            Fault::StartCp => {
                self.cp.start(sim);
            }
            Fault::BounceAgent { .. } => {
                // A kill: the page cache keeps every write.
                sim.bounce("agent1");
                self.crash.restore(Rollback::KeepAll, &mut self.rng)?;
            }
            Fault::DiskCrash {
                after_ops,
                rollback: mode,
                ..
            } => {
                self.rollback = match mode {
                    0 => Rollback::KeepAll,
                    1 => Rollback::LoseAll,
                    _ => Rollback::Torn,
                };
                self.crash.arm(Some(*after_ops));
            }
            _ => {}
        }
        self.links.apply(sim, "agent1", "cp");
        Ok(())
    }

    fn stepped(&mut self, sim: &mut turmoil::Sim<'a>, _now: Duration) -> anyhow::Result<()> {
        if self.crash.is_dead() {
            // The agent dies inside a write. Its connection closes (it cannot checkpoint: the
            // disk is gone), then the disk keeps what `rollback` says, then it starts again.
            sim.crash("agent1");
            let synced = self.crash.wal_syncs();
            if self.rollback != Rollback::KeepAll {
                for row in lock(&self.ledger).rows.values_mut() {
                    if row.syncs_at_commit >= synced {
                        row.at_risk = true;
                    }
                }
            }
            let reverted = self.crash.restore(self.rollback, &mut self.rng)?;
            self.crashes += 1;
            trace::record(format!(
                "disk crash at op {} ({:?}): {reverted} bytes reverted",
                self.crash.ops(),
                self.rollback
            ));
            sim.bounce("agent1");
        }
        Ok(())
    }
}

fn final_check(
    buffer: &Path,
    cp_db: &PathBuf,
    ledger: &SharedLedger,
    crashes: u32,
    end_ms: i64,
) -> anyhow::Result<()> {
    let conn =
        rusqlite::Connection::open_with_flags(buffer, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    // Rows collected in the last few seconds may still be on their way.
    let left: i64 = conn.query_row(
        "SELECT count(*) FROM records WHERE ts_ms < ?1",
        [end_ms - 5_000],
        |r| r.get(0),
    )?;
    // The recent rows still on their way are pending, not missing.
    let pending: std::collections::BTreeSet<u64> = conn
        .prepare("SELECT data FROM records")?
        .query_map([], |r| r.get::<_, String>(0))?
        .filter_map(Result::ok)
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(&d).ok()?["id"].as_u64())
        .collect();
    let dropped: i64 = conn.query_row(
        "SELECT COALESCE(SUM(CAST(value AS INTEGER)), 0) FROM meta WHERE key LIKE 'dropped_%'",
        [],
        |r| r.get(0),
    )?;
    let quarantined = std::fs::read_dir(buffer.parent().unwrap_or(Path::new(".")))?
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
    anyhow::ensure!(
        !quarantined,
        "the buffer was quarantined after a crash: under synchronous=NORMAL it never should be"
    );
    anyhow::ensure!(
        left == 0,
        "{left} rows older than 5 s still buffered a minute after the last fault healed"
    );
    let cp =
        rusqlite::Connection::open_with_flags(cp_db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = cp.prepare("SELECT epoch, seq, data FROM metrics")?;
    let mut stored: BTreeMap<u64, (String, i64)> = BTreeMap::new();
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    let l = lock(ledger);
    for row in rows {
        let (epoch, seq, data) = row?;
        let id = serde_json::from_str::<serde_json::Value>(&data)?["id"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("stored row {epoch}/{seq} has no id: {data}"))?;
        if let Some(first) = stored.insert(id, (epoch.clone(), seq)) {
            anyhow::bail!("row {id} stored twice: as {first:?} and as ({epoch}, {seq})");
        }
        anyhow::ensure!(
            l.rows.contains_key(&id),
            "row {id} stored as ({epoch}, {seq}) but the buffer never accepted it"
        );
    }
    let missing: Vec<u64> = l
        .rows
        .iter()
        .filter(|(id, row)| !row.at_risk && !stored.contains_key(id) && !pending.contains(id))
        .map(|(id, _)| *id)
        .collect();
    anyhow::ensure!(
        missing.len() as i64 <= dropped,
        "{} accepted rows were durable yet never stored and {dropped} were counted as dropped; first missing: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let lost_unsynced = l
        .rows
        .iter()
        .filter(|(id, row)| row.at_risk && !stored.contains_key(id))
        .count();
    trace::record(format!(
        "final: {} accepted, {} stored, {lost_unsynced} lost unsynced to power loss, {dropped} dropped, {crashes} disk crashes",
        l.rows.len(),
        stored.len()
    ));
    Ok(())
}

/// One fault at a time for 200 s, then a quiet minute for the backlog to drain.
pub fn schedule(rng: &mut StdRng) -> Schedule {
    let mut events = Vec::new();
    let mut t = secs(rng, 2, 10);
    while t < Duration::from_secs(200) {
        let length = secs(rng, 1, 30);
        match rng.random_range(0..6) {
            0 => {
                events.push((t, Fault::Partition { agent: 0 }));
                events.push((t + length, Fault::Repair { agent: 0 }));
            }
            1 => {
                // Short holds stall a batch past the agent's request timeout: the ack is lost
                // after the rows were stored, and the batch goes again.
                let length = secs(rng, 1, 4);
                events.push((t, Fault::Hold { agent: 0 }));
                events.push((t + length, Fault::Release { agent: 0 }));
            }
            2 => events.push((t, Fault::BounceCp)),
            3 => {
                events.push((t, Fault::CrashCp));
                events.push((t + length, Fault::StartCp));
            }
            4 => events.push((t, Fault::BounceAgent { agent: 0 })),
            _ => events.push((
                t,
                Fault::DiskCrash {
                    agent: 0,
                    after_ops: rng.random_range(1..150),
                    rollback: rng.random_range(0..3),
                },
            )),
        }
        t += length + secs(rng, 1, 15);
    }
    let quiet_from = events.last().map(|(at, _)| *at).unwrap_or_default() + Duration::from_secs(31);
    Schedule {
        events,
        quiet_from,
        run_for: quiet_from + Duration::from_secs(60),
    }
}
