//! The faults and their seeded schedule. Two lanes run side by side, each one fault at a
//! time: the agent lane (kills, pauses, crash points, cuts, slow links, full disks,
//! corrupted files) and the service lane (replicas, Redis, the storage Postgres, SSH hosts).
//! The same seed gives the same schedule; the report prints it.

use std::time::Duration;

use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};

use crate::deploy::Deployment;
use crate::proxy::Mode;
use crate::services::{accepts, wait_ready};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    AgentKill,
    AgentPause,
    /// The agent kills itself right after the control plane acknowledged a batch, before the
    /// buffer deletes it.
    CrashAfterAck,
    /// The agent kills itself between starting a task's process and storing its pid.
    CrashAfterSpawn,
    /// A run keeper kills itself between starting a command and recording its pid (its
    /// `nth` start); the agent lives on.
    CrashKeeperAfterSpawn,
    /// Every run keeper kills itself at one of its points (after recording its intent, after
    /// starting the command, before recording its end) while the agent lives on.
    CrashKeeper,
    Partition,
    /// The agent's namespace drops what comes in: it keeps writing into nothing.
    HalfOpenIn,
    /// The agent's namespace drops what goes out: the control plane hears nothing.
    HalfOpenOut,
    Latency,
    SlowLink,
    DiskFull,
    CorruptBuffer,
    CorruptTasks,
    ReplicaKill,
    RedisRestart,
    StorageRestart,
    StorageKill,
    SshCut,
}

pub const AGENT_LANE: [Kind; 14] = [
    Kind::AgentKill,
    Kind::AgentPause,
    Kind::CrashAfterAck,
    Kind::CrashAfterSpawn,
    Kind::CrashKeeperAfterSpawn,
    Kind::CrashKeeper,
    Kind::Partition,
    Kind::HalfOpenIn,
    Kind::HalfOpenOut,
    Kind::Latency,
    Kind::SlowLink,
    Kind::DiskFull,
    Kind::CorruptBuffer,
    Kind::CorruptTasks,
];

pub const SERVICE_LANE: [Kind; 5] = [
    Kind::ReplicaKill,
    Kind::RedisRestart,
    Kind::StorageRestart,
    Kind::StorageKill,
    Kind::SshCut,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::AgentKill => "agent_kill",
            Kind::AgentPause => "agent_pause",
            Kind::CrashAfterAck => "crash_after_ack",
            Kind::CrashAfterSpawn => "crash_after_spawn",
            Kind::CrashKeeperAfterSpawn => "crash_keeper_after_spawn",
            Kind::CrashKeeper => "crash_keeper",
            Kind::Partition => "partition",
            Kind::HalfOpenIn => "half_open_in",
            Kind::HalfOpenOut => "half_open_out",
            Kind::Latency => "latency",
            Kind::SlowLink => "slow_link",
            Kind::DiskFull => "disk_full",
            Kind::CorruptBuffer => "corrupt_buffer",
            Kind::CorruptTasks => "corrupt_tasks",
            Kind::ReplicaKill => "replica_kill",
            Kind::RedisRestart => "redis_restart",
            Kind::StorageRestart => "storage_restart",
            Kind::StorageKill => "storage_kill",
            Kind::SshCut => "ssh_cut",
        }
    }

    /// One line for `--list-faults`.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::AgentKill => "kill -9 an agent, start it again after the hold",
            Kind::AgentPause => "SIGSTOP an agent for the hold, then SIGCONT",
            Kind::CrashAfterAck => {
                "an agent dies as if killed -9 right after a batch's acknowledgement, before the buffer deletes it"
            }
            Kind::CrashAfterSpawn => {
                "an agent dies as if killed -9 after a task's process started, before its pid is stored"
            }
            Kind::CrashKeeperAfterSpawn => {
                "an agent's run keeper dies as if killed -9 after starting a command, before recording its pid (the agent lives on)"
            }
            Kind::CrashKeeper => {
                "an agent's run keepers die as if killed -9 after recording their intent, after starting the command, or before recording its end (the agent lives on)"
            }
            Kind::Partition => "drop everything between an agent's namespace and the control plane",
            Kind::HalfOpenIn => "an agent's namespace drops what comes in (it keeps sending)",
            Kind::HalfOpenOut => {
                "an agent's namespace drops what goes out (the control plane hears nothing)"
            }
            Kind::Latency => {
                "the proxy delays every chunk of an agent's connections by 200-1500 ms"
            }
            Kind::SlowLink => "the proxy limits an agent's connections to 2 KiB/s",
            Kind::DiskFull => "fill an agent's data filesystem for the hold",
            Kind::CorruptBuffer => "kill -9 an agent and overwrite its metrics buffer's header",
            Kind::CorruptTasks => "kill -9 an agent and overwrite its task store's header",
            Kind::ReplicaKill => "kill -9 a control-plane replica, start it again after the hold",
            Kind::RedisRestart => {
                "kill -9 Redis (no persistence: its data is lost), start it again"
            }
            Kind::StorageRestart => "fast shutdown of the storage Postgres, start it again",
            Kind::StorageKill => "kill -9 the storage Postgres, start it again (crash recovery)",
            Kind::SshCut => "drop everything to and from an SSH host's namespace",
        }
    }

    pub fn all() -> impl Iterator<Item = Kind> {
        AGENT_LANE.into_iter().chain(SERVICE_LANE)
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::all().find(|k| k.name() == name)
    }
}

/// One planned fault.
#[derive(Clone, Debug)]
pub struct Planned {
    /// Not before this many ms after the workloads started.
    pub at_ms: u64,
    pub kind: Kind,
    /// Agent, replica or SSH host index.
    pub target: usize,
    pub hold_ms: u64,
    /// For crash points: the pass through the point that crashes.
    pub nth: u64,
}

/// The schedule of one lane: faults from `kinds` until `duration_ms`.
pub fn plan(
    seed: u64,
    lane: u64,
    kinds: &[Kind],
    targets: usize,
    duration_ms: u64,
) -> Vec<Planned> {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (lane.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let mut out = Vec::new();
    if kinds.is_empty() {
        return out;
    }
    let mut at = 5_000 + rng.random_range(0..3_000);
    while at < duration_ms {
        let kind = kinds[rng.random_range(0..kinds.len())];
        let hold_ms = match kind {
            Kind::AgentPause | Kind::Latency | Kind::SlowLink => rng.random_range(2_000..8_000),
            Kind::Partition | Kind::HalfOpenIn | Kind::HalfOpenOut => {
                rng.random_range(3_000..20_000)
            }
            Kind::DiskFull => rng.random_range(5_000..15_000),
            _ => rng.random_range(500..3_000),
        };
        let mut target = rng.random_range(0..targets.max(1));
        // The first replica is killed only while at least the resource check's life is left
        // of the run (and never in its second half), so one replica process lives long
        // enough to be compared.
        if kind == Kind::ReplicaKill
            && (at > duration_ms / 2 || at + crate::resources::LIFE_COMPARED_MS > duration_ms)
        {
            target = 1;
        }
        out.push(Planned {
            at_ms: at,
            kind,
            target,
            hold_ms,
            nth: rng.random_range(1..3),
        });
        at += hold_ms + rng.random_range(1_000..4_000);
    }
    out
}

/// What happened when a planned fault was carried out.
#[derive(Clone, Debug)]
pub struct Done {
    pub planned: Planned,
    pub started_ms: u64,
    pub healed_ms: u64,
    /// What the fault did, or why it could not (e.g. the crash point was not reached).
    pub note: String,
    pub injected: bool,
}

/// Crash point names the agent knows (`OUTPOST_CHAOS_CRASH_AT=NAME:N`).
pub const CRASH_AFTER_ACK: &str = agent::crashpoint::AFTER_ACK;
pub const CRASH_AFTER_SPAWN: &str = agent::crashpoint::AFTER_SPAWN;
pub const CRASH_KEEPER_AFTER_SPAWN: &str = agent::crashpoint::KEEPER_AFTER_SPAWN;
/// The keeper's points; a `crash_keeper` fault takes one by its `nth`.
const CRASH_KEEPER_AT: [&str; 3] = [
    agent::crashpoint::KEEPER_AFTER_INTENT,
    agent::crashpoint::KEEPER_AFTER_SPAWN,
    agent::crashpoint::KEEPER_BEFORE_STATUS,
];

/// What the agent logs when a run keeper dies under a run.
const KEEPER_LOST: &str = agent::tasks::pool::KEEPER_LOST;

pub type Shared = std::sync::Arc<tokio::sync::Mutex<Deployment>>;

fn agent_index(d: &Deployment, target: usize) -> usize {
    target % d.agents.len().max(1)
}

/// Start agent `i` again (without a crash point) and report whether it runs.
async fn start_agent(d: &Shared, i: usize) -> String {
    let mut d = d.lock().await;
    let a = &mut d.agents[i];
    a.service.set_env("OUTPOST_CHAOS_CRASH_AT", None);
    match a.service.start() {
        Ok(()) => String::new(),
        Err(e) => format!("restart failed: {e:#}"),
    }
}

/// Restart an agent with a crash point in its helper processes (`point`: in the run
/// keepers), wait for a helper to die there (the agent logs `died`
/// and goes on), hold, then restart the agent gracefully without it, so later helpers live.
async fn crash_helper(d: &Shared, p: &Planned, point: &str, died: &str) -> (bool, String) {
    let seen = |g: &Deployment, i: usize| g.agents[i].service.log_count(died);
    let (i, before) = {
        let mut g = d.lock().await;
        let i = agent_index(&g, p.target);
        let before = seen(&g, i);
        let a = &mut g.agents[i];
        a.service.kill9().await;
        a.service.set_env("OUTPOST_CHAOS_CRASH_AT", Some(point));
        if let Err(e) = a.service.start() {
            return (false, format!("start with the crash point: {e:#}"));
        }
        (i, before)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut crashed = false;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let g = d.lock().await;
        if seen(&g, i) > before {
            crashed = true;
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(p.hold_ms)).await;
    {
        let mut g = d.lock().await;
        g.agents[i]
            .service
            .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(15))
            .await;
    }
    let note = start_agent(d, i).await;
    if crashed {
        (true, note)
    } else {
        (true, format!("{point} not reached within 45 s {note}"))
    }
}

/// Carry out `p` on the deployment: inject, hold, heal. Locks the deployment only while it
/// changes something. Returns whether the fault was injected, and a note.
pub async fn carry_out(d: &Shared, p: &Planned) -> (bool, String) {
    match p.kind {
        Kind::AgentKill => kill_agent(d, p).await,
        Kind::AgentPause => pause_agent(d, p).await,
        Kind::CrashAfterAck | Kind::CrashAfterSpawn => crash_agent_at(d, p).await,
        Kind::CrashKeeperAfterSpawn => {
            let point = format!("{CRASH_KEEPER_AFTER_SPAWN}:{}", p.nth);
            crash_helper(d, p, &point, KEEPER_LOST).await
        }
        Kind::CrashKeeper => {
            // Every keeper the agent starts meanwhile dies at its first pass.
            let at = CRASH_KEEPER_AT[p.nth as usize % CRASH_KEEPER_AT.len()];
            crash_helper(d, p, &format!("{at}:1"), KEEPER_LOST).await
        }
        Kind::Partition | Kind::HalfOpenIn | Kind::HalfOpenOut => cut_agent(d, p).await,
        Kind::Latency | Kind::SlowLink => slow_agent(d, p).await,
        Kind::DiskFull => fill_disk(d, p).await,
        Kind::CorruptBuffer => corrupt_buffer(d, p).await,
        Kind::CorruptTasks => corrupt_tasks(d, p).await,
        Kind::ReplicaKill => kill_replica(d, p).await,
        Kind::RedisRestart => restart_redis(d, p).await,
        Kind::StorageRestart | Kind::StorageKill => restart_storage(d, p).await,
        Kind::SshCut => cut_ssh(d, p).await,
    }
}

/// The AgentKill fault: inject, hold, heal.
async fn kill_agent(d: &Shared, p: &Planned) -> (bool, String) {
    let hold = Duration::from_millis(p.hold_ms);
    let i = {
        let mut g = d.lock().await;
        let i = agent_index(&g, p.target);
        g.agents[i].service.kill9().await;
        i
    };
    tokio::time::sleep(hold).await;
    (true, start_agent(d, i).await)
}

/// The AgentPause fault: inject, hold, heal.
async fn pause_agent(d: &Shared, p: &Planned) -> (bool, String) {
    let hold = Duration::from_millis(p.hold_ms);
    let i = {
        let mut g = d.lock().await;
        let i = agent_index(&g, p.target);
        if let Err(e) = g.agents[i].service.pause() {
            return (false, format!("{e:#}"));
        }
        i
    };
    tokio::time::sleep(hold).await;
    let mut g = d.lock().await;
    let note = match g.agents[i].service.resume() {
        Ok(()) => String::new(),
        Err(e) => format!("{e:#}"),
    };
    (true, note)
}

/// The CrashAfterAck and CrashAfterSpawn faults: inject, hold, heal.
async fn crash_agent_at(d: &Shared, p: &Planned) -> (bool, String) {
    let point = if p.kind == Kind::CrashAfterAck {
        CRASH_AFTER_ACK
    } else {
        CRASH_AFTER_SPAWN
    };
    let i = {
        let mut g = d.lock().await;
        let i = agent_index(&g, p.target);
        let a = &mut g.agents[i];
        a.service.kill9().await;
        a.service.set_env(
            "OUTPOST_CHAOS_CRASH_AT",
            Some(&format!("{point}:{}", p.nth)),
        );
        if let Err(e) = a.service.start() {
            return (false, format!("start with the crash point: {e:#}"));
        }
        i
    };
    // Wait (without holding the lock) for the agent to reach the point and die.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut crashed = false;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut g = d.lock().await;
        if !g.agents[i].service.running() {
            crashed = true;
            break;
        }
    }
    if !crashed {
        let mut g = d.lock().await;
        g.agents[i].service.kill9().await;
    }
    let note = start_agent(d, i).await;
    if crashed {
        (true, note)
    } else {
        (
            true,
            format!("{point} not reached within 45 s; killed -9 instead {note}"),
        )
    }
}

/// The Partition, HalfOpenIn and HalfOpenOut faults: inject, hold, heal.
async fn cut_agent(d: &Shared, p: &Planned) -> (bool, String) {
    let hold = Duration::from_millis(p.hold_ms);
    let (inbound, outbound) = match p.kind {
        Kind::Partition => (true, true),
        Kind::HalfOpenIn => (true, false),
        _ => (false, true),
    };
    let ns = {
        let g = d.lock().await;
        g.agents[agent_index(&g, p.target)].netns.clone()
    };
    cut_for(&ns, inbound, outbound, hold).await
}

/// The Latency and SlowLink faults: inject, hold, heal.
async fn slow_agent(d: &Shared, p: &Planned) -> (bool, String) {
    let hold = Duration::from_millis(p.hold_ms);
    let proxy = {
        let g = d.lock().await;
        std::sync::Arc::clone(&g.agents[agent_index(&g, p.target)].proxy)
    };
    let (mode, note) = if p.kind == Kind::Latency {
        let ms = 200 + p.hold_ms % 1300;
        (
            Mode::Delay(Duration::from_millis(ms)),
            format!("{ms} ms per chunk"),
        )
    } else {
        (Mode::Slow(2048), "2 KiB/s".to_string())
    };
    proxy.set(mode);
    tokio::time::sleep(hold).await;
    proxy.set(Mode::Pass);
    (true, note)
}

/// The DiskFull fault: inject, hold, heal.
async fn fill_disk(d: &Shared, p: &Planned) -> (bool, String) {
    let hold = Duration::from_millis(p.hold_ms);
    let data = {
        let g = d.lock().await;
        g.agents[agent_index(&g, p.target)].data.clone()
    };
    let filler = data.join("chaos-filler");
    // Fill what is free; the write stops at ENOSPC.
    let written = fill(&filler);
    tokio::time::sleep(hold).await;
    let _ = std::fs::remove_file(&filler);
    (true, format!("{} KiB filler", written / 1024))
}

/// The CorruptBuffer fault: inject, hold, heal.
async fn corrupt_buffer(d: &Shared, p: &Planned) -> (bool, String) {
    let mut g = d.lock().await;
    let i = agent_index(&g, p.target);
    g.agents[i].service.kill9().await;
    let path = g.agents[i].data.join("buffer.db");
    let note = match crate::verdict::snapshot_buffer(&path) {
        Ok(snap) => {
            let note = format!(
                "epoch {} with {} rows buffered moved aside",
                snap.epoch,
                snap.seqs.len()
            );
            g.lost_to_corruption.push((i, snap));
            note
        }
        Err(e) => format!("could not read the buffer before corrupting it: {e}"),
    };
    let corrupted = corrupt(&path);
    drop(g);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let restarted = start_agent(d, i).await;
    match corrupted {
        Ok(()) => (true, format!("{note} {restarted}")),
        Err(e) => (false, format!("corrupt {}: {e}", path.display())),
    }
}

/// The CorruptTasks fault: inject, hold, heal.
async fn corrupt_tasks(d: &Shared, p: &Planned) -> (bool, String) {
    let mut g = d.lock().await;
    let i = agent_index(&g, p.target);
    g.agents[i].service.kill9().await;
    let path = g.agents[i].data.join("tasks.db");
    let before = crate::verdict::read_tasks(&path);
    let corrupted = corrupt(&path);
    if corrupted.is_ok() {
        g.tasks_corrupted.push(crate::verdict::DamagedStore {
            agent: i,
            at_ms: world::World::real().now_unix_ms(),
            before,
        });
    }
    drop(g);
    let restarted = start_agent(d, i).await;
    match corrupted {
        Ok(()) => (true, restarted),
        Err(e) => (false, format!("corrupt {}: {e}", path.display())),
    }
}

/// The ReplicaKill fault: inject, hold, heal.
async fn kill_replica(d: &Shared, p: &Planned) -> (bool, String) {
    let hold = Duration::from_millis(p.hold_ms);
    let i;
    {
        let mut g = d.lock().await;
        i = p.target % g.replicas.len();
        g.replicas[i].kill9().await;
    }
    tokio::time::sleep(hold).await;
    let mut g = d.lock().await;
    let addr = g.replica_addrs[i].clone();
    let r = &mut g.replicas[i];
    if let Err(e) = r.start() {
        return (true, format!("restart: {e:#}"));
    }
    let ready = wait_ready(r, "serving again", || crate::deploy::healthz(addr.clone())).await;
    (
        true,
        ready.err().map(|e| format!("{e:#}")).unwrap_or_default(),
    )
}

/// The RedisRestart fault: inject, hold, heal.
async fn restart_redis(d: &Shared, p: &Planned) -> (bool, String) {
    let hold = Duration::from_millis(p.hold_ms);
    {
        let mut g = d.lock().await;
        g.redis.kill9().await;
    }
    tokio::time::sleep(hold).await;
    let mut g = d.lock().await;
    let addr = format!("127.0.0.1:{}", g.redis_port);
    if let Err(e) = g.redis.start() {
        return (true, format!("restart: {e:#}"));
    }
    let ready = wait_ready(&mut g.redis, "accepting", || accepts(&addr)).await;
    (
        true,
        ready.err().map(|e| format!("{e:#}")).unwrap_or_default(),
    )
}

/// The StorageRestart and StorageKill faults: inject, hold, heal.
async fn restart_storage(d: &Shared, p: &Planned) -> (bool, String) {
    let hold = Duration::from_millis(p.hold_ms);
    {
        let mut g = d.lock().await;
        if p.kind == Kind::StorageKill {
            g.storage_pg.kill9().await;
        } else {
            // Fast shutdown: sessions are ended, the cluster stops cleanly.
            g.storage_pg
                .stop(Signal::SIGINT, Duration::from_secs(20))
                .await;
        }
    }
    tokio::time::sleep(hold).await;
    let mut g = d.lock().await;
    let url = g.storage_url.clone();
    let psql = g.pg_bin.join("psql");
    // After a kill -9 the old backends may hold shared memory a moment: retry.
    let mut last = String::new();
    for _ in 0..50 {
        match g.storage_pg.start() {
            Ok(()) => {}
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if g.storage_pg.running() {
            break;
        }
    }
    drop(g);
    match crate::deploy::wait_for_sql(&psql, &url).await {
        Ok(()) => (true, String::new()),
        Err(e) => (true, format!("{e:#} {last}")),
    }
}

/// The SshCut fault: inject, hold, heal.
async fn cut_ssh(d: &Shared, p: &Planned) -> (bool, String) {
    let hold = Duration::from_millis(p.hold_ms);
    let ns = {
        let g = d.lock().await;
        if g.ssh_hosts.is_empty() {
            return (false, "no SSH hosts".into());
        }
        g.ssh_hosts[p.target % g.ssh_hosts.len()].netns.clone()
    };
    cut_for(&ns, true, true, hold).await
}

/// Cut `ns` (as [`crate::host::Netns::cut`]) for `hold`, then heal it.
async fn cut_for(
    ns: &crate::host::Netns,
    inbound: bool,
    outbound: bool,
    hold: Duration,
) -> (bool, String) {
    if let Err(e) = ns.cut(inbound, outbound) {
        let _ = ns.heal();
        return (false, format!("{e:#}"));
    }
    tokio::time::sleep(hold).await;
    match ns.heal() {
        Ok(()) => (true, String::new()),
        Err(e) => (true, format!("heal: {e:#}")),
    }
}

/// Write zeros to `path` until the filesystem is full; returns the bytes written.
fn fill(path: &std::path::Path) -> u64 {
    use std::io::Write;
    let Ok(mut f) = std::fs::File::create(path) else {
        return 0;
    };
    let block = vec![0u8; 64 * 1024];
    let mut written = 0;
    loop {
        match f.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.sync_all();
    written
}

/// Overwrite the SQLite header and the first page's b-tree header of `path` with garbage, and
/// drop its WAL: the file no longer passes an integrity check.
fn corrupt(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(b"chaos: not a database any more")?;
    f.seek(SeekFrom::Start(100))?;
    f.write_all(&[0xA5; 64])?;
    f.sync_all()?;
    let _ = std::fs::remove_file(format!("{}-wal", path.display()));
    let _ = std::fs::remove_file(format!("{}-shm", path.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{AGENT_LANE, Kind, SERVICE_LANE, plan};

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = plan(7, 0, &AGENT_LANE, 3, 600_000);
        let b = plan(7, 0, &AGENT_LANE, 3, 600_000);
        let c = plan(8, 0, &AGENT_LANE, 3, 600_000);
        let key = |p: &[super::Planned]| -> Vec<(u64, Kind, usize, u64)> {
            p.iter()
                .map(|f| (f.at_ms, f.kind, f.target, f.hold_ms))
                .collect()
        };
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
        assert!(a.iter().all(|f| f.at_ms < 600_000 && f.target < 3));
    }

    #[test]
    fn ten_minutes_plan_over_a_hundred_faults_of_every_kind() {
        let agents = plan(1, 0, &AGENT_LANE, 3, 600_000);
        let services = plan(1, 1, &SERVICE_LANE, 2, 600_000);
        assert!(
            agents.len() + services.len() >= 100,
            "{} + {}",
            agents.len(),
            services.len()
        );
        for kind in Kind::all() {
            assert!(
                agents.iter().chain(&services).any(|f| f.kind == kind),
                "{} never planned",
                kind.name()
            );
        }
        // Only the second replica is killed in the second half.
        assert!(
            services
                .iter()
                .filter(|f| f.kind == Kind::ReplicaKill && f.at_ms > 300_000)
                .all(|f| f.target == 1)
        );
    }

    #[test]
    fn in_short_runs_the_first_replica_keeps_the_resource_checks_life() {
        for seed in 0..50 {
            for duration_ms in [90_000, 120_000, 180_000] {
                let services = plan(seed, 1, &SERVICE_LANE, 2, duration_ms);
                for f in services.iter().filter(|f| f.kind == Kind::ReplicaKill) {
                    assert!(
                        f.target == 1
                            || f.at_ms + crate::resources::LIFE_COMPARED_MS <= duration_ms,
                        "seed {seed}, {duration_ms} ms: replica 0 killed at {} ms",
                        f.at_ms
                    );
                }
            }
        }
    }

    #[test]
    fn every_kind_parses_from_its_name() {
        for kind in Kind::all() {
            assert_eq!(Kind::parse(kind.name()), Some(kind));
        }
        assert_eq!(Kind::parse("meteor"), None);
    }
}
