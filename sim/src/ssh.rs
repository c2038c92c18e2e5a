//! The `ssh` scenario: supervised SSH execution against simulated hosts.
//!
//! Three hosts run a russh server whose `work` command streams output, may go quiet for longer
//! than the idle timeout, and exits with a planned status. An operator host runs one
//! operation after another through the real fleet runner and connection pool, and the driver
//! partitions or holds (half-open) the operator's link at a random moment of each faulty
//! operation: before connect, during the handshake, during authentication, mid-output. Some
//! operations run past the command deadline (a slow remote).
//!
//! Checked for every operation: it ends within the bound of its layered timeouts (per
//! attempt; `not_started` is retried); `not_started` means the host never received the
//! command, and no operation reached a host twice; `ok`/`command_failed` carry the planned exit
//! status; `uncertain` only on a faulty link; a clean link gives the planned class (a quiet
//! command on a live link is not idle). At the end no socket, channel or connection is left
//! on the operator, and no session on any host.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use remote_exec::fleet::{self, ErrorBudget, Plan, Pool};
use remote_exec::quote::{command_line, split};
use remote_exec::{Client, Host, HostKeyPolicy, Live, OpId, Outcome, RetryPolicy, Timeouts};
use russh::keys::{PrivateKey, ssh_key};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId};
use tokio_util::sync::CancellationToken;

use crate::harness::{host_world, new_sim};
use crate::scenario::Schedule;
use crate::trace;

pub const HOSTS: [&str; 3] = ["db1", "db2", "db3"];
const OPERATOR: &str = "operator";
const OPS: usize = 10;
/// Quiet time after the last operation: servers must notice dead clients by then.
pub const SETTLE: Duration = Duration::from_secs(40);

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        handshake: Duration::from_secs(2),
        auth: Duration::from_secs(2),
        command: Duration::from_secs(8),
        idle: Duration::from_secs(3),
    }
}

fn retry() -> RetryPolicy {
    RetryPolicy::default()
}

/// The longest one operation may take: every attempt at its worst, and the pauses between.
fn op_bound() -> Duration {
    let r = retry();
    let pauses: Duration = (1..r.attempts_max)
        .filter_map(|a| r.retry_after(a, Outcome::NotStarted))
        .sum();
    timeouts().bound(Duration::from_secs(1)) * r.attempts_max + pauses
}

/// Per operation: the host, the command's shape, and an optional link fault.
#[derive(Clone, Debug)]
struct Op {
    host: usize,
    total_ms: u64,
    chunks: u32,
    gap_ms: u64,
    exit: u32,
    fault: Option<LinkFault>,
}

#[derive(Clone, Copy, Debug)]
struct LinkFault {
    hold: bool,
    after_ms: u64,
    length_ms: u64,
}

impl Op {
    fn duration_ms(&self) -> u64 {
        self.total_ms + self.gap_ms
    }
}

fn plan_ops(seed: u64) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x55a5_1e55);
    (0..OPS)
        .map(|_| {
            let slow = rng.random_bool(0.15);
            Op {
                host: rng.random_range(0..HOSTS.len()),
                // Clean runs end well inside the 8 s deadline; slow ones well past it.
                total_ms: if slow {
                    rng.random_range(11_000..14_000)
                } else {
                    rng.random_range(0..2_000)
                },
                chunks: rng.random_range(1..6),
                // Up to 5 s of silence, past the 3 s idle timeout: keepalives must carry it.
                gap_ms: if rng.random_bool(0.4) {
                    rng.random_range(3_500..5_000)
                } else {
                    0
                },
                exit: if rng.random_bool(0.3) { 3 } else { 0 },
                fault: rng.random_bool(0.6).then(|| LinkFault {
                    hold: rng.random_bool(0.5),
                    after_ms: rng.random_range(0..3_000),
                    length_ms: rng.random_range(1_000..10_000),
                }),
            }
        })
        .collect()
}

/// The length of the simulation: every operation at its worst, then the settle time.
pub fn schedule() -> Schedule {
    let per_op = op_bound() + Duration::from_secs(1);
    let quiet_from = per_op * OPS as u32;
    Schedule {
        events: Vec::new(),
        quiet_from,
        // Every scenario keeps a quiet minute at the end; the settle time fits in it.
        run_for: quiet_from + SETTLE.max(Duration::from_secs(60)),
    }
}

#[derive(Default)]
struct Shared {
    /// Exec requests each host received, by operation.
    started: BTreeMap<usize, u32>,
    /// The operation in progress and when it began (simulated ms).
    current: Option<(usize, u128)>,
    /// Finished operations: outcome, exit code, elapsed.
    done: BTreeMap<usize, (Outcome, Option<i32>, Duration, String)>,
    /// The operator's gauges after its pool closed.
    client_live: Option<Live>,
}

type SharedState = Arc<Mutex<Shared>>;

fn lock(s: &SharedState) -> MutexGuard<'_, Shared> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn key_from_seed(seed: u64, who: &str) -> PrivateKey {
    let mut bytes = [0u8; 32];
    let mut rng = StdRng::seed_from_u64(crate::harness::host_seed(seed, who));
    rng.fill(&mut bytes);
    PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&bytes))
}

/// A simulated sshd session.
struct Server {
    host: String,
    client_key: ssh_key::PublicKey,
    shared: SharedState,
}

impl russh::server::Handler for Server {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, russh::Error> {
        Ok(if *key.public_key == self.client_key {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), russh::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let argv = split(data);
        let num =
            |i: usize| -> Option<u64> { std::str::from_utf8(argv.get(i)?).ok()?.parse().ok() };
        let parsed = (argv.first().map(Vec::as_slice) == Some(b"work".as_slice()))
            .then(|| Some((num(1)?, num(2)?, num(3)?, num(4)?, num(5)?)))
            .flatten();
        let Some((op, total_ms, chunks, gap_ms, exit)) = parsed else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        let op = usize::try_from(op).unwrap_or(usize::MAX);
        *lock(&self.shared).started.entry(op).or_default() += 1;
        trace::record(format!("{} exec op {op}", self.host));
        session.channel_success(channel)?;
        let handle = session.handle();
        let chunks = chunks.max(1);
        tokio::spawn(async move {
            for i in 0..chunks {
                tokio::time::sleep(Duration::from_millis(total_ms / chunks)).await;
                if handle
                    .data(channel, format!("op {op} chunk {i}\n").into_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                if i == 0 && gap_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(gap_ms)).await;
                }
            }
            let code = u32::try_from(exit).unwrap_or(1);
            let _ = handle.exit_status_request(channel, code).await;
            let _ = handle.eof(channel).await;
            let _ = handle.close(channel).await;
        });
        Ok(())
    }
}

fn server_config(seed: u64, host: &str) -> russh::server::Config {
    russh::server::Config {
        keys: vec![key_from_seed(seed, host)],
        // A client that vanished (half-open) is noticed within 15 s.
        keepalive_interval: Some(Duration::from_secs(5)),
        keepalive_max: 2,
        inactivity_timeout: Some(Duration::from_secs(30)),
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        ..Default::default()
    }
}

pub fn simulate_ssh(seed: u64, plan: &Schedule) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-sim-ssh-")
        .tempdir()?;
    let ops = plan_ops(seed);
    let shared: SharedState = Arc::default();
    let sessions: Arc<AtomicI64> = Arc::default();
    let client_key = key_from_seed(seed, OPERATOR);
    let known_hosts = dir.path().join("known_hosts");
    write_known_hosts(&known_hosts, seed)?;

    let mut sim = new_sim(seed, plan);
    add_hosts(&mut sim, seed, &shared, &sessions, &client_key);
    add_operator(
        &mut sim,
        seed,
        &shared,
        &ops,
        client_key,
        dir.path(),
        &known_hosts,
    );
    drive(&mut sim, plan, &ops, &shared)?;
    check(&ops, &lock(&shared), sessions.load(Ordering::SeqCst))
}

/// The SSH servers, one per host, counting their live sessions.
fn add_hosts(
    sim: &mut turmoil::Sim<'_>,
    seed: u64,
    shared: &SharedState,
    sessions: &Arc<AtomicI64>,
    client_key: &PrivateKey,
) {
    for host in HOSTS {
        let config = Arc::new(server_config(seed, host));
        let (shared, sessions, client_pub) = (
            shared.clone(),
            sessions.clone(),
            client_key.public_key().clone(),
        );
        let world = host_world(seed, host);
        sim.host(host, move || {
            let (config, shared, sessions, client_pub, world) = (
                config.clone(),
                shared.clone(),
                sessions.clone(),
                client_pub.clone(),
                world.clone(),
            );
            async move {
                let listener = world.net().bind("0.0.0.0:22").await?;
                loop {
                    let (stream, _) = listener.accept().await?;
                    let handler = Server {
                        host: host.to_string(),
                        client_key: client_pub.clone(),
                        shared: shared.clone(),
                    };
                    let (config, sessions) = (config.clone(), sessions.clone());
                    sessions.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        if let Ok(running) =
                            russh::server::run_stream(config, stream, handler).await
                        {
                            let _ = running.await;
                        }
                        sessions.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
        });
    }
}

/// The operator: runs the planned operations one after another through a pool, recording
/// each outcome, then closes the pool and stays up while the servers notice.
fn add_operator(
    sim: &mut turmoil::Sim<'_>,
    seed: u64,
    shared: &SharedState,
    ops: &[Op],
    client_key: PrivateKey,
    dir: &Path,
    known_hosts: &Path,
) {
    let world = host_world(seed, OPERATOR);
    let (shared, ops) = (shared.clone(), ops.to_vec());
    let identity = dir.join("id_ed25519");
    let known_hosts = known_hosts.to_path_buf();
    sim.client(OPERATOR, async move {
        let client = Arc::new(Client::new(
            world.clone(),
            timeouts(),
            HostKeyPolicy::Strict,
        ));
        client.add_key(&identity, client_key);
        let pool = Arc::new(Pool::new(client.clone()));
        for (i, op) in ops.iter().enumerate() {
            run_op(&world, &pool, &shared, (i, op), &identity, &known_hosts).await?;
        }
        pool.close().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        lock(&shared).client_live = Some(client.gauges().live());
        // Stay up while the servers notice clients that vanished behind a held link.
        tokio::time::sleep(SETTLE).await;
        Ok(())
    });
}

/// One planned operation on its host, its outcome recorded in `shared`.
async fn run_op(
    world: &world::World,
    pool: &Arc<Pool>,
    shared: &SharedState,
    (i, op): (usize, &Op),
    identity: &Path,
    known_hosts: &Path,
) -> anyhow::Result<()> {
    let host = Host {
        name: HOSTS[op.host].to_string(),
        address: HOSTS[op.host].to_string(),
        port: 22,
        user: "postgres".into(),
        identity_file: identity.to_path_buf(),
        known_hosts: known_hosts.to_path_buf(),
        groups: vec![],
    };
    let argv: Vec<String> = vec![
        "work".into(),
        i.to_string(),
        op.total_ms.to_string(),
        op.chunks.to_string(),
        op.gap_ms.to_string(),
        op.exit.to_string(),
    ];
    let plan = Arc::new(Plan {
        op_id: OpId::generate(world),
        command: command_line(&argv)?,
        receipts: false,
        concurrency: 1,
        budget: ErrorBudget::Unlimited,
        // The default policy: not_started is retried, nothing else. A pooled
        // connection that an earlier fault left dead is caught this way.
        retry: retry(),
        output_bytes_max: 4096,
    });
    lock(shared).current = Some((i, turmoil::sim_elapsed().unwrap_or_default().as_millis()));
    let (results, _) = fleet::run(
        pool.clone(),
        vec![host],
        plan,
        None,
        CancellationToken::new(),
    )
    .await;
    let r = &results[0].report;
    trace::record(format!(
        "op {i} on {}: {} in {} ms",
        HOSTS[op.host],
        r.outcome,
        r.elapsed.as_millis()
    ));
    {
        let mut s = lock(shared);
        s.current = None;
        let error = r.error.clone().unwrap_or_default();
        s.done.insert(i, (r.outcome, r.exit_code, r.elapsed, error));
    }
    // Let the driver heal the link before the next operation.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Step the simulation, putting each operation's link fault on and off at its planned time.
fn drive(
    sim: &mut turmoil::Sim<'_>,
    plan: &Schedule,
    ops: &[Op],
    shared: &SharedState,
) -> anyhow::Result<()> {
    let mut faulted: Option<(usize, bool)> = None; // (op, link currently faulty)
    loop {
        let now = sim.elapsed();
        trace::set_driver_elapsed(now);
        if now >= plan.run_for {
            break;
        }
        let current = lock(shared).current;
        match current {
            Some((i, started_ms)) => {
                if let Some(f) = ops[i].fault {
                    let host = HOSTS[ops[i].host];
                    let since = now.as_millis().saturating_sub(started_ms);
                    let active = since >= u128::from(f.after_ms)
                        && since < u128::from(f.after_ms + f.length_ms);
                    let was = faulted.is_some_and(|(op, on)| op == i && on);
                    if active && !was {
                        trace::record(format!(
                            "fault op {i}: {} {OPERATOR}-{host}",
                            if f.hold { "hold" } else { "partition" }
                        ));
                        if f.hold {
                            sim.hold(OPERATOR, host);
                        } else {
                            sim.partition(OPERATOR, host);
                        }
                        faulted = Some((i, true));
                    } else if !active && was {
                        trace::record(format!("heal op {i}"));
                        sim.repair(OPERATOR, host);
                        sim.release(OPERATOR, host);
                        faulted = Some((i, false));
                    }
                }
            }
            None => {
                if let Some((i, true)) = faulted {
                    let host = HOSTS[ops[i].host];
                    trace::record(format!("heal op {i} (ended)"));
                    sim.repair(OPERATOR, host);
                    sim.release(OPERATOR, host);
                    faulted = None;
                }
            }
        }
        let done = sim
            .step()
            .map_err(|e| anyhow::anyhow!("simulation error: {e}"))?;
        if done {
            break;
        }
    }
    Ok(())
}

fn write_known_hosts(path: &Path, seed: u64) -> anyhow::Result<()> {
    let mut text = String::new();
    for host in HOSTS {
        let key = key_from_seed(seed, host);
        text.push_str(&format!("{host} {}\n", key.public_key().to_openssh()?));
    }
    std::fs::write(path, text)?;
    Ok(())
}

fn check(ops: &[Op], s: &Shared, server_sessions: i64) -> anyhow::Result<()> {
    let t = timeouts();
    let bound = op_bound();
    for (i, op) in ops.iter().enumerate() {
        let Some((outcome, exit, elapsed, error)) = s.done.get(&i) else {
            anyhow::bail!("op {i} never finished ({op:?})");
        };
        let started = s.started.get(&i).copied().unwrap_or(0);
        let ctx = || format!("op {i} {op:?}: {outcome} after {elapsed:?} ({error})");
        anyhow::ensure!(
            *elapsed <= bound,
            "{}: longer than the bound {bound:?}",
            ctx()
        );
        anyhow::ensure!(started <= 1, "{}: the host ran it {started} times", ctx());
        match outcome {
            Outcome::NotStarted => anyhow::ensure!(
                started == 0,
                "{}: not_started, but the host received the command",
                ctx()
            ),
            Outcome::Ok | Outcome::CommandFailed => {
                anyhow::ensure!(started == 1, "{}: finished but never started", ctx());
                anyhow::ensure!(
                    *exit == Some(i32::try_from(op.exit)?),
                    "{}: wrong exit status {exit:?}",
                    ctx()
                );
            }
            Outcome::Uncertain => {
                anyhow::ensure!(op.fault.is_some(), "{}: uncertain on a clean link", ctx())
            }
            Outcome::TimedOut => anyhow::ensure!(
                op.fault.is_some() || op.duration_ms() > t.command.as_millis() as u64,
                "{}: timed out although it should have finished",
                ctx()
            ),
        }
        if op.fault.is_none() {
            let expected = if op.duration_ms() > t.command.as_millis() as u64 {
                Outcome::TimedOut
            } else if op.exit == 0 {
                Outcome::Ok
            } else {
                Outcome::CommandFailed
            };
            anyhow::ensure!(
                *outcome == expected,
                "{}: on a clean link expected {expected}",
                ctx()
            );
        }
    }
    let live = s
        .client_live
        .ok_or_else(|| anyhow::anyhow!("the operator never finished"))?;
    anyhow::ensure!(
        live == Live::default(),
        "the operator leaked {live:?} after closing its pool"
    );
    anyhow::ensure!(
        server_sessions == 0,
        "{server_sessions} server sessions still open {SETTLE:?} after the last operation"
    );
    trace::record(format!(
        "checked {} ops: {:?}",
        ops.len(),
        s.done.values().map(|d| d.0.as_str()).collect::<Vec<_>>()
    ));
    Ok(())
}
