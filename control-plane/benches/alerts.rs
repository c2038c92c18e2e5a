//! Alert evaluation over a large fleet (`just bench alerts`): 10,000 agents whose stored
//! health carries transaction-ID ages, replication lag, pgBackRest status and WAL archiving,
//! 5 % of them over a threshold, evaluated round after round by the same code the lease
//! holder runs (every built-in rule on every agent, the alerts advanced, the round committed).
//! Printed: wall and CPU time of a round, and the CPU a minute of evaluation costs at the
//! default interval (15 s), against the target of at most 1 s of one core per minute.
//! SQLite and PostgreSQL storage each (PostgreSQL's own CPU is not in this process's figure,
//! so its wall time is printed beside it). There is no peer: the tools Outpost is compared with
//! leave rule evaluation to Prometheus or Grafana.

use std::time::Duration;

use tokio::time::Instant;

use axum::extract::FromRef;
use control_plane::alerts::evaluator;
use control_plane::alerts::state::Grouping;
use control_plane::handles::Handles;
use control_plane::settings::Settings;
use control_plane::state::AppState;
use control_plane::storage::{EnrollAttempt, Storage};
use tokio_util::sync::CancellationToken;
use world::World;

const AGENTS: usize = 10_000;
const ROUNDS: usize = 8;

fn cpu_s() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn health(i: usize, now_ms: i64) -> String {
    let hot = i.is_multiple_of(20);
    let now_s = now_ms / 1000;
    let stop = if hot { now_s - 30 * 3600 } else { now_s - 3600 };
    serde_json::json!({
        "xid_age": {"database": "app", "age": if hot { 1_600_000_000_i64 } else { 200_000_000 }, "ts_ms": now_ms},
        "replication": {"standbys": 1, "max_lag_s": if hot { 700.0 } else { 0.4 }, "ts_ms": now_ms},
        "backups": {"ts_ms": now_ms, "error": null, "stanzas": [{
            "name": "main", "code": 0, "message": "ok", "running": false,
            "full": {"label": "F", "stop_ms": stop * 1000, "duration_s": 60, "size": 1, "repo_delta": 1},
            "diff": null, "incr": null, "newest_failed": null,
            "check": null, "verify": null, "drill": null}]},
        "archiver": {"ts_ms": now_ms, "archive_mode": "on", "archived_count": 10,
            "failed_count": if hot { 3 } else { 0 }, "last_archived_wal": "000000010000000000000009",
            "last_archived_ms": now_ms - 60_000,
            "last_failed_wal": if hot { serde_json::json!("00000001000000000000000A") } else { serde_json::Value::Null },
            "last_failed_ms": if hot { serde_json::json!(now_ms - 30_000) } else { serde_json::Value::Null },
            "ready_count": 0},
    })
    .to_string()
}

async fn fill(storage: &Storage, world: &World) {
    let now_ms = world.now_unix_ms();
    for i in 0..AGENTS {
        let token = format!("tok{i}");
        storage
            .create_enroll_token(&token, now_ms, now_ms + 3_600_000)
            .await
            .expect("token");
        let agent_id = format!("agt_{i:05}");
        storage
            .enroll_agent(EnrollAttempt {
                token_hash: token,
                enrollment_id: format!("enr{i}"),
                name: format!("db{i:05}"),
                new_agent_id: agent_id.clone(),
                credential_hash: format!("cred{i}"),
                now_ms,
            })
            .await
            .expect("enroll");
        storage
            .set_agent_health(&agent_id, &health(i, now_ms))
            .await
            .expect("health");
    }
}

/// (wall ms, CPU ms) per round, the first (which fires 5 % of the fleet) apart.
async fn measure(label: &str, storage: Storage) {
    let world = World::real();
    storage.migrate().await.expect("migrate");
    let started = Instant::now();
    fill(&storage, &world).await;
    eprintln!(
        "{label}: {AGENTS} agents stored in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let state = AppState::new(
        world.clone(),
        storage.clone(),
        Settings::default(),
        CancellationToken::new(),
    );
    let h = Handles::from_ref(&state);
    let mut rounds = Vec::new();
    for round in 0..=ROUNDS {
        let now_ms = world.now_unix_ms();
        let fence = storage
            .take_lease(evaluator::LEASE, "bench", now_ms, 60_000)
            .await
            .expect("lease")
            .expect("free");
        let (wall, cpu) = (Instant::now(), cpu_s());
        let queued = evaluator::evaluate_round(&h, "bench", fence, now_ms, Grouping::default())
            .await
            .expect("round")
            .expect("held");
        let figures = (
            wall.elapsed().as_secs_f64() * 1000.0,
            (cpu_s() - cpu) * 1000.0,
        );
        if round == 0 {
            let firing = storage.alerts().await.expect("alerts").len();
            assert_eq!(
                firing,
                AGENTS / 20 * 4,
                "every hot agent holds xid_age, replication_lag, backup_rpo and archiving_failing (some still pending)"
            );
            println!(
                "{label:<10} first round ({} alerts, {queued} notices): {:.0} ms wall, {:.0} ms CPU",
                AGENTS / 20 * 4,
                figures.0,
                figures.1
            );
        } else {
            rounds.push(figures);
        }
    }
    let n = rounds.len() as f64;
    let wall = rounds.iter().map(|r| r.0).sum::<f64>() / n;
    let cpu = rounds.iter().map(|r| r.1).sum::<f64>() / n;
    let per_minute = cpu * 60.0 / Duration::from_secs(15).as_secs_f64();
    println!(
        "{label:<10} steady round: {wall:.0} ms wall, {cpu:.0} ms CPU; CPU per minute at 15 s: {per_minute:.0} ms (target <= 1000 ms)"
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let world = World::real();
        println!(
            "alert evaluation, {AGENTS} agents, every built-in rule ({} cores)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let dir = tempfile::tempdir().expect("dir");
        let sqlite = control_plane::server::open_storage(&world, dir.path(), None)
            .await
            .expect("sqlite");
        measure("sqlite", sqlite).await;
        match fixtures::Postgres::start().await {
            Ok(pg) => {
                let url = pg.create_database("alerts_bench").expect("database");
                let storage = control_plane::server::open_storage(&world, dir.path(), Some(&url))
                    .await
                    .expect("postgres");
                measure("postgres", storage).await;
            }
            Err(e) => println!("postgres   not measured: {e}"),
        }
    });
}
